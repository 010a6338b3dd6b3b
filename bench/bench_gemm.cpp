// The GEMM engines of this build side by side, one thread, on the shape classes spex's layers
// produce (the table behind core/gemm.hpp's gemm_engine_for and docs/api.md, "GEMM engines"):
// GFLOP/s per engine and shape. Argument 0: engine (0 Eigen, 1 CBLAS, 2 libxsmm), argument 1:
// the shape's row in kShapes. Engines the build lacks are skipped.
//   build/bench/bench_gemm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include "bench_common.hpp"

namespace {

struct Shape {
  const char* what;
  spex::Index m, n, k;
  bool a_transposed, b_transposed;
};
// C (m x n) = op(A) op(B), inner dimension k; one tile of gemm() at most (256 x 512).
constexpr Shape kShapes[] = {
    {"projection tile x Wt", 256, 512, 512, false, true},
    {"projection 64 rows x Wt", 64, 512, 512, false, true},
    {"sub-key scores 128 x 1024 keys", 128, 512, 128, false, true},
    {"expert block x W1t (E 64)", 64, 128, 512, false, true},
    {"expert block x W2t (E 64)", 64, 512, 128, false, true},
    {"backward dy x W", 64, 512, 512, false, false},
    {"weight grad dyt x (batch 512)", 256, 512, 512, true, false},
    {"expert weight grad (64 tokens)", 128, 512, 64, true, false},
    {"thin: 1 row x Wt", 1, 512, 512, false, true},
    {"thin: 4 rows x Wt", 4, 512, 512, false, true},
    {"thin: 4 rows x W", 4, 512, 512, false, false},
    {"16 rows x Wt", 16, 512, 512, false, true},
};

void BM_GemmEngine(benchmark::State& state) {
  const auto engine = spex::GemmEngine(state.range(0));
  const Shape s = kShapes[state.range(1)];
  if (!spex::gemm_engine_available(engine)) {
    state.SkipWithError("engine not in this build");
    return;
  }
  const auto& a = spex_bench::random_matrix(s.a_transposed ? s.k : s.m, s.a_transposed ? s.m : s.k, 1);
  const auto& b = spex_bench::random_matrix(s.b_transposed ? s.n : s.k, s.b_transposed ? s.k : s.n, 2);
  spex::RowMat<float> c(s.m, s.n);
  const spex::detail::GemmOperand<float> ao{a.data(), a.rows(), a.cols(), a.cols(), s.a_transposed};
  const spex::detail::GemmOperand<float> bo{b.data(), b.rows(), b.cols(), b.cols(), s.b_transposed};
  for (auto _ : state) {
    spex::detail::gemm_block(engine, ao, bo, c.data(), c.cols(), s.m, s.n, false);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(s.m) * double(s.n) * double(s.k) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  const spex::GemmEngine chosen = spex::gemm_engine_for(s.m, s.n, s.k, s.a_transposed, s.b_transposed);
  state.SetLabel(std::string(spex::gemm_engine_name(engine)) + ": " + s.what +
                 (engine == chosen ? " (chosen)" : "") + ", " + spex::gemm_cblas_kernel());
}

void engine_args(benchmark::internal::Benchmark* b) {
  for (int e = 0; e < 3; ++e)
    if (spex::gemm_engine_available(spex::GemmEngine(e)))
      for (int s = 0; s < int(sizeof(kShapes) / sizeof(kShapes[0])); ++s) b->Args({e, s});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_GemmEngine)->Apply(engine_args);
SPEX_BENCH_MACHINE_LIMITS();
