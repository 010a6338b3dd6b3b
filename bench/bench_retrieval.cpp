// Retrieval: exhaustive inner-product top-k over N keys against exact product-key top-k over
// N = n^2 virtual keys, batch 256, arguments N / d_key / k. Thread count from OMP_NUM_THREADS.
//   build/bench/bench_retrieval --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <cmath>
#include <tuple>

#include "bench_common.hpp"

namespace {

constexpr spex::Index kBatch = 256;
using spex::kernels::ProductTopK;

// `tiles`: whether the search may score the sub-keys with bf16 tiles (AMX CPUs and builds).
const spex::ProductKeys<float>& product_keys(spex::Index n, spex::Index d_key, bool tiles = true) {
  static std::map<std::tuple<spex::Index, spex::Index, bool>, std::unique_ptr<spex::ProductKeys<float>>> cache;
  auto& slot = cache[{n, d_key, tiles}];
  if (!slot) {
    slot = std::make_unique<spex::ProductKeys<float>>(n, d_key, 1);
    slot->set_bf16_tiles(tiles ? spex::Bf16Tiles::automatic : spex::Bf16Tiles::never);
  }
  return *slot;
}

const spex::RowMat<float>& full_keys(spex::Index n, spex::Index d_key) {
  static std::map<std::pair<spex::Index, spex::Index>, std::unique_ptr<spex::RowMat<float>>> cache;
  auto& slot = cache[{n, d_key}];
  if (!slot) slot = std::make_unique<spex::RowMat<float>>(product_keys(n, d_key).full_keys());
  return *slot;
}

void set_counters(benchmark::State& state) {
  state.counters["queries/s"] = benchmark::Counter(double(kBatch), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(spex_bench::label());
}

void exhaustive_topk(benchmark::State& state, spex::Bf16Tiles tiles) {
  const spex::Index N = state.range(0), d = state.range(1), k = state.range(2);
  const spex::Index n = spex::Index(std::llround(std::sqrt(double(N))));
  const auto& keys = full_keys(n, d);
  const auto& q = spex_bench::random_matrix(kBatch, d, 7);
  spex::RowMat<float> s(kBatch, k);
  spex::IndexMat ids(kBatch, k);
  spex::ExhaustiveTopK<float> search;
  search.set_bf16_tiles(tiles);
  for (auto _ : state) {
    search.search(keys, q, k, s, ids);
    benchmark::DoNotOptimize(ids.data());
  }
  set_counters(state);
}

void BM_ExhaustiveTopK(benchmark::State& state) { exhaustive_topk(state, spex::Bf16Tiles::automatic); }
// The same with every score from the float GEMM (the bf16 tiles not used).
void BM_ExhaustiveTopK_gemm(benchmark::State& state) { exhaustive_topk(state, spex::Bf16Tiles::never); }

void product_key_topk(benchmark::State& state, ProductTopK method, bool tiles = true) {
  const spex::Index N = state.range(0), d = state.range(1), k = state.range(2);
  const spex::Index n = spex::Index(std::llround(std::sqrt(double(N))));
  const auto& pk = product_keys(n, d, tiles);
  const auto& q = spex_bench::random_matrix(kBatch, d, 7);
  spex::RowMat<float> s(kBatch, k);
  spex::IndexMat ids(kBatch, k);
  spex::ProductKeys<float>::Workspace ws;
  for (auto _ : state) {
    pk.search(q, k, s, ids, ws, method);
    benchmark::DoNotOptimize(ids.data());
  }
  set_counters(state);
}

void BM_ProductKeyTopK(benchmark::State& state) {
  product_key_topk(state, spex::ProductKeys<float>::default_method(state.range(2)));
}
// The same with every sub-key scored by the float GEMM (the bf16 tiles not used).
void BM_ProductKeyTopK_gemm(benchmark::State& state) {
  product_key_topk(state, spex::ProductKeys<float>::default_method(state.range(2)), false);
}
void BM_ProductKeyTopK_full(benchmark::State& state) { product_key_topk(state, ProductTopK::full); }
void BM_ProductKeyTopK_pruned(benchmark::State& state) { product_key_topk(state, ProductTopK::pruned); }
void BM_ProductKeyTopK_heap(benchmark::State& state) { product_key_topk(state, ProductTopK::heap); }

// The k-product step alone (the part the three variants differ in), on top-k lists of
// random half scores: nanoseconds per query.
void product_step(benchmark::State& state, ProductTopK method) {
  const std::size_t k = std::size_t(state.range(0)), n = 1024;
  const auto& h = spex_bench::random_matrix(2 * 64, n, 9);
  std::vector<float> a(64 * k), b(64 * k), v(k);
  std::vector<std::int64_t> ia(64 * k), ib(64 * k), id(k);
  for (std::size_t r = 0; r < 64; ++r) {
    spex::kernels::topk(&h(2 * r, 0), n, k, &a[r * k], &ia[r * k]);
    spex::kernels::topk(&h(2 * r + 1, 0), n, k, &b[r * k], &ib[r * k]);
  }
  spex::kernels::ProductTopKScratch<float> scratch;
  std::size_t r = 0;
  for (auto _ : state) {
    spex::kernels::product_topk(method, &a[r * k], &ia[r * k], k, &b[r * k], &ib[r * k], k, std::int64_t(n), k,
                                v.data(), id.data(), scratch);
    benchmark::DoNotOptimize(id.data());
    r = (r + 1) % 64;
  }
}
void BM_ProductStep_full(benchmark::State& state) { product_step(state, ProductTopK::full); }
void BM_ProductStep_pruned(benchmark::State& state) { product_step(state, ProductTopK::pruned); }
void BM_ProductStep_heap(benchmark::State& state) { product_step(state, ProductTopK::heap); }

void retrieval_args(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{128 * 128, 256 * 256, 512 * 512, 1024 * 1024}, {128, 256}, {8, 16, 32}});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_ProductKeyTopK)->Apply(retrieval_args);
BENCHMARK(BM_ProductKeyTopK_gemm)->Apply(retrieval_args);
BENCHMARK(BM_ProductKeyTopK_full)->Apply(retrieval_args);
BENCHMARK(BM_ProductKeyTopK_pruned)->Apply(retrieval_args);
BENCHMARK(BM_ProductKeyTopK_heap)->Apply(retrieval_args);
BENCHMARK(BM_ExhaustiveTopK)->Apply(retrieval_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ExhaustiveTopK_gemm)->Apply(retrieval_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ProductStep_full)->Arg(8)->Arg(16)->Arg(32)->Arg(64);
BENCHMARK(BM_ProductStep_pruned)->Arg(8)->Arg(16)->Arg(32)->Arg(64);
BENCHMARK(BM_ProductStep_heap)->Arg(8)->Arg(16)->Arg(32)->Arg(64);
SPEX_BENCH_MACHINE_LIMITS();
