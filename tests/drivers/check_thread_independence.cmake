# Runs compare_layers --quick (shortened; the recall task, which trains all five layers, without
# the char-lm one, which costs three times as much and runs the same layers) with
# OMP_NUM_THREADS = 1, 2, 3 and requires the three curves.csv (every loss, sparsity and lambda at
# full precision) to be identical.
foreach(threads 1 2 3)
  set(ENV{OMP_NUM_THREADS} ${threads})
  set(ENV{OMP_WAIT_POLICY} PASSIVE)
  execute_process(COMMAND ${PROGRAM} --quick --tasks recall --steps 40 --out ${OUT}/t${threads}
                  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "compare_layers with ${threads} threads failed (${rc}): ${err}")
  endif()
  file(SHA256 ${OUT}/t${threads}/curves.csv hash_${threads})
endforeach()
if(NOT hash_1 STREQUAL hash_2 OR NOT hash_1 STREQUAL hash_3)
  message(FATAL_ERROR "curves.csv differs between 1, 2 and 3 threads (see ${OUT}/t1, t2, t3)")
endif()
message(STATUS "curves.csv identical with 1, 2 and 3 threads")
