#!/usr/bin/env bash
# Builds and runs the retrieval demo: product-key top-k over N = 1024^2 keys against
# exhaustive search, compiled for this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DSPEX_NATIVE_ARCH=ON -DSPEX_BUILD_TESTS=OFF
cmake --build build/demo -j "$(nproc)" --target retrieval_demo
build/demo/examples/retrieval_demo "$@"
