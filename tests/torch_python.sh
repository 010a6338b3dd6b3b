# Sourced by the tests that run PyTorch: sets $python to a python3 that imports torch and numpy
# (Debian's python3-torch lives in the system interpreter), or exits 77 (ctest: skipped).
python=""
for p in /usr/bin/python3 python3; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch, numpy" >/dev/null 2>&1; then python=$p; break; fi
done
if [ -z "$python" ]; then
  echo "SKIPPED: no python3 with torch and numpy (Debian: apt-get install python3-torch python3-numpy)"
  exit 77
fi
