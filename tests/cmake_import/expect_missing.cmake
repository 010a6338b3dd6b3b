# Configures the consumer asking for COMPONENTS (comma-separated) on a machine without their
# packages (SPEX_CONSUMER_HIDE_OPTIONAL): the configuration must fail, and its message must name
# each missing component.
file(REMOVE_RECURSE "${BINARY}")
execute_process(
  COMMAND ${CMAKE_COMMAND} -S "${SOURCE}" -B "${BINARY}" "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DSPEX_CONSUMER_COMPONENTS=${COMPONENTS}"
          -DSPEX_CONSUMER_HIDE_OPTIONAL=ON
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "configuring with components ${COMPONENTS} and their packages hidden succeeded:\n${out}")
endif()
string(REPLACE "," ";" components "${COMPONENTS}")
foreach(component IN LISTS components)
  if(NOT err MATCHES "spex component '${component}'")
    message(FATAL_ERROR "the failure does not name component '${component}':\n${err}")
  endif()
endforeach()
message(STATUS "refused as expected:\n${err}")
