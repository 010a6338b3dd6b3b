#!/usr/bin/env bash
# Fuzzes the layer loaders with libFuzzer (clang, AddressSanitizer, UndefinedBehaviorSanitizer)
# for SECONDS (default 600): TARGET safetensors (random bytes, seeds in fuzz/seeds) or
# layer_files (structure-aware mutations of valid layer files, seeds in fuzz/seeds_layer_files),
# plus the corpus kept in build/fuzz/corpus_TARGET between runs. Any crash, leak or allocation
# over 512 MiB leaves its input in build/fuzz/ and exits non-zero. The seeds are such a run's
# corpus minimized to edge coverage:
#   build/fuzz/fuzz/fuzz_TARGET -merge=1 -use_counters=0 SEEDS_DIR build/fuzz/corpus_TARGET
# Usage: scripts/fuzz.sh [SECONDS] [TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
target=${2:-safetensors}
case "$target" in
  safetensors) seeds=fuzz/seeds ;;
  layer_files) seeds=fuzz/seeds_layer_files ;;
  *) echo "unknown target '$target' (safetensors, layer_files)" >&2; exit 2 ;;
esac
scripts/deps.sh clang libclang-rt-14-dev nlohmann-json3-dev
CXX=clang++ cmake -S . -B build/fuzz -DCMAKE_BUILD_TYPE=Debug -DSPEX_FUZZ=ON -DSPEX_BUILD_TESTS=OFF \
  -DSPEX_BUILD_EXAMPLES=OFF -DSPEX_INSTALL=OFF -DSPEX_USE_OPENMP=OFF > /dev/null
cmake --build build/fuzz -j "$(nproc)" --target "fuzz_$target"
mkdir -p "build/fuzz/corpus_$target"
echo "fuzzing fuzz_$target for ${seconds} s on $(lscpu | sed -n 's/^Model name: *//p')"
OMP_NUM_THREADS=1 "build/fuzz/fuzz/fuzz_$target" -max_total_time="$seconds" -max_len=4096 -malloc_limit_mb=512 \
  -print_final_stats=1 -artifact_prefix=build/fuzz/ "build/fuzz/corpus_$target" "$seeds"
