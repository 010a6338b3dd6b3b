#!/usr/bin/env bash
# Exports PyTorch reference layers (tools/export_reference.py) and checks spex reproduces their
# outputs (tests/torch_interop.cpp). Exit 77 (ctest: skipped) when no python3 with torch is found.
# Usage: torch_interop.sh CHECKER OUTDIR
set -euo pipefail
checker=$1 out=$2
here="$(cd "$(dirname "$0")" && pwd)"
python=""
for p in /usr/bin/python3 python3; do  # Debian's python3-torch lives in the system interpreter
  if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch, numpy" >/dev/null 2>&1; then python=$p; break; fi
done
if [ -z "$python" ]; then
  echo "SKIPPED: no python3 with torch and numpy (Debian: apt-get install python3-torch python3-numpy)"
  exit 77
fi
rm -rf "$out"
"$python" "$here/../tools/export_reference.py" "$out"
"$checker" "$out"
