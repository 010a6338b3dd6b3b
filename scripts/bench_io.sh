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
# dd writes the same number of random bytes from memory (/dev/shm; zeros can be special-cased
# by virtual disks), fsync'd like the save; dd and save alternate, five times each (this VM's
# disk has fast and slow periods).
bytes=$(( 2 * 1048576 * 512 * 4 + 1048576 ))
head -c "$bytes" /dev/urandom > /dev/shm/spex_bench_io.bin
build/bench/bench/io_load save "$dir/peer.safetensors" 1024 512 5 \
  "dd if=/dev/shm/spex_bench_io.bin of=$dir/dd.bin bs=1M conv=fsync status=none && rm -f $dir/dd.bin"
rm -f /dev/shm/spex_bench_io.bin
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cache="cold page cache"; else cache="warm page cache (cannot drop caches here)"; fi
echo "-- mapped, $cache"
build/bench/bench/io_load load "$dir/peer.safetensors" map
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
echo "-- copied, $cache"
build/bench/bench/io_load load "$dir/peer.safetensors" copy
echo "-- mapped again (warm page cache)"
build/bench/bench/io_load load "$dir/peer.safetensors" map
rm -f "$dir/peer.safetensors"
