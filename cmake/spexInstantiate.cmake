# spex_instantiate(<target> [float] [double]): compiles spex's instantiation unit
# (instantiations.cpp: the layers, experts, routers and optimizers for the scalar types given,
# default both) into <target>, with <target>'s own flags, and defines SPEX_EXTERN_FLOAT /
# SPEX_EXTERN_DOUBLE for it, so that its other sources that include spex/spex.hpp only declare
# those classes instead of compiling them again (docs/install.md, "Compile time").
set_property(GLOBAL PROPERTY SPEX_INSTANTIATION_UNIT "${SPEX_INSTANTIATION_UNIT_PATH}")
function(spex_instantiate target)
  set(types ${ARGN})
  if(NOT types)
    set(types float double)
  endif()
  get_property(unit GLOBAL PROPERTY SPEX_INSTANTIATION_UNIT)
  target_sources(${target} PRIVATE "${unit}")
  foreach(type IN LISTS types)
    if(type STREQUAL "float")
      target_compile_definitions(${target} PRIVATE SPEX_EXTERN_FLOAT=1)
    elseif(type STREQUAL "double")
      target_compile_definitions(${target} PRIVATE SPEX_EXTERN_DOUBLE=1)
    else()
      message(FATAL_ERROR "spex_instantiate(${target} ${ARGN}): '${type}' is not float or double")
    endif()
  endforeach()
endfunction()
