#!/usr/bin/env bash
# spex's benchmarks and the peers a user would otherwise pick (PyTorch CPU modules, FAISS), on
# the same shapes in one run, as a table of ratios with the machine's limits measured in the
# same binaries (docs/performance.md is this script's output).
# Usage: scripts/bench.sh [--threads N] [--repetitions R] [--update-docs]
#   Two builds: the GEMM engines found (SPEX_GEMM=auto) and Eigen only. Results and the
#   report go to build/bench-report/. Takes ~11 minutes on 2 cores (a 4 GiB PEER is built in
#   spex and in PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 reps=5 update=""
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --repetitions) reps=$2; shift 2 ;;
    --update-docs) update=1; shift ;;
    *) echo "usage: scripts/bench.sh [--threads N] [--repetitions R] [--update-docs]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh libbenchmark-dev libopenblas-openmp-dev libxsmm-dev python3-torch python3-numpy python3-faiss
python=/usr/bin/python3  # Debian's, where python3-torch and python3-faiss live
out=build/bench-report
rm -rf "$out" && mkdir -p "$out"

declare -A gemm_flags=([engines]="-DSPEX_GEMM=auto -DSPEX_GEMM_XSMM=AUTO" [eigen]="-DSPEX_GEMM=eigen -DSPEX_GEMM_XSMM=OFF")
for variant in engines eigen; do
  # shellcheck disable=SC2086
  cmake -S . -B "build/bench-$variant" -DCMAKE_BUILD_TYPE=Release -DSPEX_NATIVE_ARCH=ON -DSPEX_BUILD_BENCHMARKS=ON \
    -DSPEX_BUILD_TESTS=OFF -DSPEX_BUILD_EXAMPLES=OFF -DSPEX_INSTALL=OFF ${gemm_flags[$variant]} > "$out/cmake-$variant.log"
  cmake --build "build/bench-$variant" -j "$(nproc)" --target bench_moe bench_peer bench_retrieval bench_gemm > /dev/null
done

export OMP_NUM_THREADS=$threads
# OpenBLAS picks its kernels from the CPU when it loads; a CPU newer than the OpenBLAS release
# gets older ones although it has AVX-512 (with Debian's 0.3.21: the AVX2 ones on Zen 5, the
# SSE3 ones, Prescott, on an Intel Xeon of model 207). Then everyone (spex and the peers, which
# use the same OpenBLAS) runs with its AVX-512 kernels. A value the caller set is kept (and
# reported).
kernel=$(build/bench-engines/bench/bench_gemm --benchmark_filter='BM_GemmEngine/1/0/' --benchmark_min_time=0.01 \
           --benchmark_format=json 2>/dev/null | sed -n 's/.*"label": ".*, \([A-Za-z0-9]*\)".*/\1/p' | head -1)
coretype="" note=""
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx512f /proc/cpuinfo && ! [[ "$kernel" =~ ^(SkylakeX|Cooperlake|SapphireRapids)$ ]]; then
  export OPENBLAS_CORETYPE=SkylakeX
  coretype=SkylakeX note="OpenBLAS detected $kernel (no AVX-512 kernels) on this AVX-512 CPU."
elif [ -n "${OPENBLAS_CORETYPE:-}" ]; then
  coretype=$OPENBLAS_CORETYPE note="set by the caller."
fi

cpu=$(lscpu | sed -n 's/^Model name: *//p')
family=$(sed -n 's/^cpu family[^0-9]*//p' /proc/cpuinfo | head -1)
isa=$(build/bench-engines/bench/bench_gemm --benchmark_filter='BM_GemmPeak' --benchmark_min_time=0.01 \
        --benchmark_format=json 2>/dev/null | sed -n 's/.*"label": "\([^,]*\),.*/\1/p' | head -1)
torch_version=$($python -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "missing")
faiss_version=$($python -c 'import faiss; print(faiss.__version__)' 2>/dev/null || echo "missing")
engines=$(sed -n 's/^-- spex: GEMM engine \(.*\)$/\1/p' "$out/cmake-engines.log")
cat > "$out/machine.json" <<JSON
{"cpu": "$cpu (family $family)", "isa": "$isa", "threads": $threads, "date": "$(date -u +%Y-%m-%d)",
 "engines": "$engines", "openblas_coretype": "$coretype", "coretype_note": "$note", "openblas_kernel": "$kernel",
 "torch": "$torch_version", "faiss": "$faiss_version",
 "peers": "PyTorch $torch_version and FAISS $faiss_version from Debian, on the same OpenBLAS (bench/peers/)"}
JSON
echo "CPU: $cpu (family $family), ISA $isa, $threads threads, engines: $engines, OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-}"

# A warm-up per benchmark: the first seconds of a process run slower on these VMs.
args=(--benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true --benchmark_format=json
      --benchmark_min_warmup_time=0.5)
for variant in engines eigen; do
  bin=build/bench-$variant/bench
  echo "-- spex ($variant)"
  "$bin/bench_moe" "${args[@]}" --benchmark_filter='BM_(MoE.*/(8|64)/0/512/|MoEForward_ReLU/(8|64)/0/4096/|DenseFFN/1024/0/|GemmPeak|StreamCopy)' \
    > "$out/bench_moe-$variant.json"
  "$bin/bench_peer" "${args[@]}" --benchmark_filter='BM_(Peer|GemmPeak|StreamCopy)' > "$out/bench_peer-$variant.json"
  "$bin/bench_retrieval" "${args[@]}" \
    --benchmark_filter='BM_(ProductKeyTopK|ExhaustiveTopK)(_gemm)?/1048576/256/16/|BM_GemmPeak' > "$out/bench_retrieval-$variant.json"
done
OMP_NUM_THREADS=1 build/bench-engines/bench/bench_gemm "${args[@]}" --benchmark_filter='BM_GemmEngine' \
  > "$out/bench_gemm-engines.json"

echo "-- peers"
status=0
$python bench/peers/torch_peers.py --threads "$threads" --repetitions "$reps" > "$out/peers-torch.jsonl" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 77 ] || exit "$status"
status=0
$python bench/peers/faiss_peers.py --threads "$threads" --repetitions "$reps" > "$out/peers-faiss.jsonl" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 77 ] || exit "$status"

$python bench/report.py "$out" ${update:+--update-docs docs/performance.md} | tee "$out/report.md"
