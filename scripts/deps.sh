#!/usr/bin/env bash
# Installs the Debian 12 packages spex builds with, only those that are missing:
#   g++ cmake make          the compiler and build tools
#   libeigen3-dev           Eigen 3.4 (matrices, products)            spex::spex
#   libxsimd-dev            xsimd 8.1 (the SIMD kernels)              spex::spex
#   catch2                  Catch2 2.13 (the test suite)
#   nlohmann-json3-dev      JSON for safetensors headers and configs  spex::io
#   libopenblas-openmp-dev  OpenBLAS, the GEMM engine                 spex::engines
#   libxsmm-dev             libxsmm, JIT kernels for small products   spex::engines
# and the packages given as arguments (scripts/test.sh adds Ninja, clang, BLIS, PyTorch, Open MPI).
# Usage: scripts/deps.sh [extra-package ...]
# As root it runs apt-get itself; otherwise through sudo when there is one, and without sudo
# it prints the command to run as root and stops.
set -euo pipefail
pkgs=(g++ cmake make libeigen3-dev libxsimd-dev catch2 nlohmann-json3-dev libopenblas-openmp-dev libxsmm-dev "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
install=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "spex needs these Debian packages: ${missing[*]}" >&2
  echo "run as root:  apt-get update && ${install[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" "${install[@]}"
