#!/usr/bin/env bash
# The whole test suite: an optimized build with the GEMM engines found (OpenBLAS + libxsmm; the
# GEMM tests also against BLIS), a Debug build under AddressSanitizer and
# UndefinedBehaviorSanitizer with Eigen's GEMM only (header-only use), and a short libFuzzer run
# over the safetensors loaders (clang). All must pass. clang (fuzzing), BLIS, python3-torch
# (the PyTorch interop test) and Open MPI (the expert-parallel tests, run with mpirun, label mpi)
# are installed too.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh clang libclang-rt-14-dev libblis-openmp-dev python3-torch python3-numpy libopenmpi-dev openmpi-bin openssh-client
jobs=$(nproc)

cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DSPEX_BUILD_TESTS=ON
cmake --build build/release -j "$jobs"
(cd build/release && ctest --output-on-failure -j "$jobs")

cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=Debug -DSPEX_BUILD_TESTS=ON -DSPEX_SANITIZE=ON -DSPEX_BUILD_EXAMPLES=OFF \
  -DSPEX_GEMM=eigen -DSPEX_GEMM_XSMM=OFF
cmake --build build/sanitize -j "$jobs"
(cd build/sanitize && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j "$jobs")

CXX=clang++ cmake -S . -B build/fuzz -DCMAKE_BUILD_TYPE=Debug -DSPEX_FUZZ=ON -DSPEX_BUILD_TESTS=OFF \
  -DSPEX_BUILD_EXAMPLES=OFF -DSPEX_INSTALL=OFF -DSPEX_USE_OPENMP=OFF -DSPEX_GEMM=eigen -DSPEX_GEMM_XSMM=OFF
cmake --build build/fuzz -j "$jobs" --target fuzz_safetensors fuzz_layer_files
(cd build/fuzz && ctest --output-on-failure -j "$jobs")
