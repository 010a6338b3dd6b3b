#!/usr/bin/env bash
# The whole test suite: an optimized build with the GEMM engines found (OpenBLAS + libxsmm; the
# GEMM tests also against BLIS), a Debug build under AddressSanitizer and
# UndefinedBehaviorSanitizer with Eigen's GEMM only (header-only use), and a short libFuzzer run
# over the safetensors loaders (clang). All must pass. clang (fuzzing), BLIS, python3-torch
# (the PyTorch interop test) and Open MPI (the expert-parallel tests, run with mpirun, label mpi)
# are installed too. The trees build with Ninja: it compiles a target's files while the targets it
# links are still compiling, where Make waits for them (the sanitizer tree built in 194 s instead of
# 286 on a 2-core VM).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh ninja-build clang libclang-rt-14-dev libblis-openmp-dev python3-torch python3-numpy libopenmpi-dev openmpi-bin openssh-client
jobs=$(nproc)
# configure DIR ARGS...: a Ninja tree in DIR (a tree configured earlier with another generator is
# removed first: CMake refuses to switch generators in place).
configure() {
  local dir=$1
  shift
  if [ -f "$dir/CMakeCache.txt" ] && ! grep -qx 'CMAKE_GENERATOR:INTERNAL=Ninja' "$dir/CMakeCache.txt"; then rm -rf "$dir"; fi
  cmake -G Ninja -S . -B "$dir" "$@"
}

configure build/release -DCMAKE_BUILD_TYPE=Release -DSPEX_BUILD_TESTS=ON
cmake --build build/release -j "$jobs"
(cd build/release && ctest --output-on-failure -j "$jobs")

configure build/sanitize -DCMAKE_BUILD_TYPE=Debug -DSPEX_BUILD_TESTS=ON -DSPEX_SANITIZE=ON -DSPEX_BUILD_EXAMPLES=OFF \
  -DSPEX_GEMM=eigen -DSPEX_GEMM_XSMM=OFF
cmake --build build/sanitize -j "$jobs"
(cd build/sanitize && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j "$jobs")

CXX=clang++ configure build/fuzz -DCMAKE_BUILD_TYPE=Debug -DSPEX_FUZZ=ON -DSPEX_BUILD_TESTS=OFF \
  -DSPEX_BUILD_EXAMPLES=OFF -DSPEX_INSTALL=OFF -DSPEX_USE_OPENMP=OFF -DSPEX_GEMM=eigen -DSPEX_GEMM_XSMM=OFF
cmake --build build/fuzz -j "$jobs" --target fuzz_safetensors fuzz_layer_files
(cd build/fuzz && ctest --output-on-failure -j "$jobs")
