#!/usr/bin/env bash
# Builds and runs examples/compare_layers (dense FFN, TopK MoE, ReMoE, PEER, PKM trained
# against each other), compiled for this machine's CPU. Arguments go to the program:
#   scripts/compare.sh --quick        (under a minute)
#   scripts/compare.sh                (the default run, a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DSPEX_NATIVE_ARCH=ON -DSPEX_BUILD_TESTS=OFF
cmake --build build/demo -j "$(nproc)" --target compare_layers
build/demo/examples/compare_layers "$@"
