#pragma once
// What every spex benchmark shares: the label (ISA and threads), cached random data, and the
// machine's limits measured in the same binary (a streaming copy and a large GEMM), which the
// figures of a binary are compared with.
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include <benchmark/benchmark.h>
#include <spex/spex.hpp>

namespace spex_bench {

/// "avx512bw, 2 threads": runs are only comparable with the same ISA and thread count; where the
/// searches may score in bf16 first, ", bf16 scores (AMX tiles)" or ", bf16 scores (VDPBF16PS)".
inline std::string label() {
  const bool tiles = spex::kernels::kBf16Scores == spex::kernels::Bf16Scores::amx_tiles;
  return std::string(spex::default_arch::name()) + ", " + std::to_string(spex::max_threads()) + " threads" +
         (spex::kernels::bf16_tiles_ready() ? (tiles ? ", bf16 scores (AMX tiles)" : ", bf16 scores (VDPBF16PS)") : "");
}

/// Random N(0, 1) matrix, made once per (rows, cols, seed) for the whole run.
inline const spex::RowMat<float>& random_matrix(spex::Index rows, spex::Index cols, std::uint64_t seed) {
  static std::map<std::tuple<spex::Index, spex::Index, std::uint64_t>, std::unique_ptr<spex::RowMat<float>>> cache;
  auto& slot = cache[{rows, cols, seed}];
  if (!slot) {
    slot = std::make_unique<spex::RowMat<float>>(rows, cols);
    spex::Rng rng(seed);
    spex::fill_normal(*slot, 1.0, rng);
  }
  return *slot;
}

/// Streaming copy of 1 GiB split over the threads; bytes/s counts read + written (STREAM).
inline void stream_copy(benchmark::State& state) {
  const std::size_t n = std::size_t(1) << 28;  // floats
  static std::vector<float> a(n, 1.f), b(n, 0.f);
  const spex::Index chunks = 64;
  for (auto _ : state) {
    spex::parallel_for(chunks, [&](spex::Index c, int) {
      const std::size_t len = n / chunks;
      std::memcpy(b.data() + c * len, a.data() + c * len, len * sizeof(float));
    });
    benchmark::DoNotOptimize(b.data());
  }
  state.counters["bytes/s"] = benchmark::Counter(2.0 * n * sizeof(float), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(label());
}

/// spex::gemm of a 512 x 512 activation block by a 1024 x 512 weight (transposed), the shape
/// of a projection: the float32 GEMM rate the engines reach here over the threads.
inline void gemm_peak(benchmark::State& state) {
  const spex::Index m = 512, k = 512, n = 1024;
  const auto& a = random_matrix(m, k, 7);
  const auto& b = random_matrix(n, k, 8);
  spex::RowMat<float> c(m, n);
  for (auto _ : state) {
    spex::gemm(c, a, b.transpose(), false);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(m) * double(k) * double(n) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(label() + ", " + spex::gemm_engine_name(spex::gemm_engine_for(256, 512, 512, false, true)));
}

}  // namespace spex_bench

/// Registers BM_StreamCopy and BM_GemmPeak in the binary that invokes it.
#define SPEX_BENCH_MACHINE_LIMITS()                                                                      \
  BENCHMARK(spex_bench::stream_copy)->Name("BM_StreamCopy")->Unit(benchmark::kMillisecond)->UseRealTime(); \
  BENCHMARK(spex_bench::gemm_peak)->Name("BM_GemmPeak")->Unit(benchmark::kMillisecond)->UseRealTime()
