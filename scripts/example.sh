#!/usr/bin/env bash
# Builds one example compiled for this machine's CPU and runs it with the remaining arguments.
#   scripts/example.sh retrieval_demo | compare_layers | lifelong [args...]
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1
shift
scripts/deps.sh
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DSPEX_NATIVE_ARCH=ON -DSPEX_BUILD_TESTS=OFF
cmake --build build/demo -j "$(nproc)" --target "$target"
"build/demo/examples/$target" "$@"
