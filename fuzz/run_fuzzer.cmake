# Runs PROGRAM (a libFuzzer binary) for SECONDS from the seed corpus SEEDS, with its new inputs
# in WORK; fails on any crash, leak, sanitizer report, or allocation over 512 MiB (a loader
# must refuse a file that asks for memory it does not hold before allocating).
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK}/corpus)
set(ENV{OMP_NUM_THREADS} 1)
execute_process(COMMAND ${PROGRAM} -max_total_time=${SECONDS} -max_len=4096 -malloc_limit_mb=512 -artifact_prefix=${WORK}/ ${WORK}/corpus ${SEEDS}
                RESULT_VARIABLE rc ERROR_VARIABLE log)
string(REGEX MATCH "Done [0-9]+ runs in [0-9]+ second\\(s\\)" done "${log}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the fuzzer found a failure (exit ${rc}); the input is in ${WORK}:\n${log}")
endif()
get_filename_component(name ${PROGRAM} NAME)
message(STATUS "${name}: ${done}, no failure")
