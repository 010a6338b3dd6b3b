// The expert step's memory traffic per storage type, as in PEER: for 256 tokens x 128 picks,
// gather-dot of u rows with x, then gather-axpy of v rows weighted by those dots, over N = 2^20
// rows of d = 512 per table: float32 (2 x 2 GiB), bfloat16 (2 x 1 GiB) and int8 with a float
// scale per row (2 x 0.5 GiB). Every iteration takes the next of 32 sets of random picks, so the
// rows come from memory, not from the caches. Reported as table bytes read per second (and
// tokens per second), next to a streaming copy in the same binary.
//   bench_compact [--benchmark_repetitions=5 --benchmark_report_aggregates_only=true]
#include <vector>

#include <spex/kernels/compact.hpp>

#include "bench_common.hpp"

namespace {

constexpr std::size_t kRows = std::size_t(1) << 20, kDim = 512, kTokens = 256, kPicks = 128, kSets = 32;

const std::vector<std::int64_t>& picks() {
  static std::vector<std::int64_t> ids = [] {
    spex::Rng rng(5);
    std::vector<std::int64_t> v(kSets * kTokens * kPicks);
    for (auto& id : v) id = std::int64_t(rng.below(kRows));
    return v;
  }();
  return ids;
}

/// A table of small values (their size does not matter here, only their bytes), one per seed;
/// huge pages requested before the first touch, as the layers' tables do (core/memory.hpp).
template <class S>
const std::vector<S, Eigen::aligned_allocator<S>>& table(int which) {
  static std::vector<S, Eigen::aligned_allocator<S>> t[2];
  auto& v = t[which];
  if (v.empty()) {
    v.reserve(kRows * kDim);
    spex::advise_huge_pages(v.data(), kRows * kDim * sizeof(S));
    v.resize(kRows * kDim);
    spex::parallel_for(spex::Index(kRows), [&](spex::Index r, int) {
      for (std::size_t i = 0; i < kDim; ++i) {
        const unsigned h = unsigned(r * 31 + i * 7 + which) % 200;
        if constexpr (std::is_same<S, float>::value) v[std::size_t(r) * kDim + i] = 0.01f * float(h) - 1.f;
        else if constexpr (std::is_same<S, std::uint16_t>::value) v[std::size_t(r) * kDim + i] = std::uint16_t(0x3c00 + h);
        else v[std::size_t(r) * kDim + i] = std::int8_t(int(h) - 100);
      }
    });
  }
  return v;
}

/// Runs the step for every token (parallel over tokens, each with its own y).
template <class S, class Step>
void run(benchmark::State& state, Step step) {
  const auto& u = table<S>(0);
  const auto& v = table<S>(1);
  const auto& ids = picks();
  const std::vector<float> scale(kRows, 0.01f);
  std::vector<float> x(kTokens * kDim, 0.5f), y(kTokens * kDim), dots(kTokens * kPicks);
  std::size_t set = 0;
  for (auto _ : state) {
    const std::int64_t* set_ids = ids.data() + (set++ % kSets) * kTokens * kPicks;
    spex::parallel_for(spex::Index(kTokens), [&](spex::Index tok, int) {
      const std::size_t o = std::size_t(tok);
      step(u.data(), v.data(), scale.data(), set_ids + o * kPicks, x.data() + o * kDim, dots.data() + o * kPicks,
           y.data() + o * kDim);
    });
    benchmark::DoNotOptimize(y.data());
  }
  const double bytes = 2.0 * double(kTokens * kPicks) * double(kDim * sizeof(S));
  state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(kTokens), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(spex_bench::label());
}

void BM_ExpertRows_f32(benchmark::State& state) {
  run<float>(state, [](const float* u, const float* v, const float*, const std::int64_t* ids, const float* x, float* d,
                       float* y) {
    spex::kernels::gather_dot(u, kDim, ids, kPicks, x, kDim, d);
    spex::kernels::gather_axpy(v, kDim, ids, d, kPicks, y, kDim);
  });
}
void BM_ExpertRows_bf16(benchmark::State& state) {
  run<std::uint16_t>(state, [](const std::uint16_t* u, const std::uint16_t* v, const float*, const std::int64_t* ids,
                               const float* x, float* d, float* y) {
    spex::kernels::gather_dot_bf16(u, kDim, ids, kPicks, x, kDim, d);
    spex::kernels::gather_axpy_bf16(v, kDim, ids, d, kPicks, y, kDim);
  });
}
void BM_ExpertRows_int8(benchmark::State& state) {
  run<std::int8_t>(state, [](const std::int8_t* u, const std::int8_t* v, const float* s, const std::int64_t* ids,
                             const float* x, float* d, float* y) {
    spex::kernels::gather_dot_i8(u, kDim, s, ids, kPicks, x, kDim, d);
    spex::kernels::gather_axpy_i8(v, kDim, s, ids, d, kPicks, y, kDim);
  });
}

}  // namespace

BENCHMARK(BM_ExpertRows_f32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ExpertRows_bf16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ExpertRows_int8)->Unit(benchmark::kMillisecond)->UseRealTime();
SPEX_BENCH_MACHINE_LIMITS();
