#!/usr/bin/env bash
# Exports PyTorch reference layers (tools/export_reference.py) and checks spex reproduces their
# outputs (tests/torch_interop.cpp). Exit 77 (ctest: skipped) when no python3 with torch is found.
# Usage: torch_interop.sh CHECKER OUTDIR
set -euo pipefail
checker=$1 out=$2
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tests/torch_python.sh
. "$here/torch_python.sh"
rm -rf "$out"
"$python" "$here/../tools/export_reference.py" "$out"
"$checker" "$out"
