#!/usr/bin/env bash
# Fuzzes the safetensors parser and loaders with libFuzzer (clang, AddressSanitizer,
# UndefinedBehaviorSanitizer) for SECONDS (default 600), from fuzz/seeds plus the corpus kept in
# build/fuzz/corpus between runs. Any crash leaves its input in build/fuzz/ and exits non-zero.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
scripts/deps.sh clang libclang-rt-14-dev nlohmann-json3-dev
CXX=clang++ cmake -S . -B build/fuzz -DCMAKE_BUILD_TYPE=Debug -DSPEX_FUZZ=ON -DSPEX_BUILD_TESTS=OFF \
  -DSPEX_BUILD_EXAMPLES=OFF -DSPEX_INSTALL=OFF -DSPEX_USE_OPENMP=OFF > /dev/null
cmake --build build/fuzz -j "$(nproc)" --target fuzz_safetensors
mkdir -p build/fuzz/corpus
echo "fuzzing for ${seconds} s on $(lscpu | sed -n 's/^Model name: *//p')"
OMP_NUM_THREADS=1 build/fuzz/fuzz/fuzz_safetensors -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 \
  -artifact_prefix=build/fuzz/ build/fuzz/corpus fuzz/seeds
