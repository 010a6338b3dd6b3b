#!/usr/bin/env bash
# Save and load of a PEER model of N = 1024^2 experts, d = 512 (4 GiB of expert tables):
# save speed against dd of the same size (both fsync'd), load time and RSS mapped vs copied.
# Usage: scripts/bench_io.sh [DIR]   (DIR needs ~9 GB free; default build/bench_io)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/bench_io}
scripts/deps.sh libbenchmark-dev
cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DSPEX_NATIVE_ARCH=ON -DSPEX_BUILD_BENCHMARKS=ON > /dev/null
cmake --build build/bench -j "$(nproc)" --target io_load
mkdir -p "$dir"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; disk: $(df -h "$dir" | tail -1 | awk '{print $1}')"
build/bench/bench/io_load save "$dir/peer.safetensors"
bytes=$(stat -c %s "$dir/peer.safetensors")
echo "dd of the same size ($bytes bytes, 1 MiB blocks, fsync):"
dd if=/dev/zero of="$dir/dd.bin" bs=1M count=$(( (bytes + 1048575) / 1048576 )) conv=fsync 2>&1 | tail -1
rm -f "$dir/dd.bin"
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cache="cold page cache"; else cache="warm page cache (cannot drop caches here)"; fi
echo "-- mapped, $cache"
build/bench/bench/io_load load "$dir/peer.safetensors" map
echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
echo "-- copied, $cache"
build/bench/bench/io_load load "$dir/peer.safetensors" copy
echo "-- mapped again (warm page cache)"
build/bench/bench/io_load load "$dir/peer.safetensors" map
rm -f "$dir/peer.safetensors"
