// PEER layer: forward and forward+backward (row-sparse expert grads) in tokens/s at the two
// reference configurations, the expert step alone as bytes gathered per second, the same rows
// only read (BM_PeerRowRead: the step's ceiling with its access pattern), and a streaming copy
// in the same binary for the bandwidth ratio. Threads from OMP_NUM_THREADS.
//   build/bench/bench_peer --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include "peer_row_read.hpp"

namespace {

using spex_bench::kPeerBatches;
using spex_bench::tokens_counter;
constexpr auto& kShapes = spex_bench::kPeerShapes;
constexpr int kBatches = kPeerBatches;
spex::Peer<float>& layer(int config) { return spex_bench::peer_layer(config); }
const spex::RowMat<float>& input(int config, int i) { return spex_bench::peer_input(config, i); }
using Shape = spex_bench::PeerShape;

void BM_PeerForward(benchmark::State& state) {
  const int config = int(state.range(0));
  auto& peer = layer(config);
  const Shape s = kShapes[config];
  spex::RowMat<float> y(s.batch, s.d);
  spex::Peer<float>::Cache cache;
  peer.infer(input(config, kBatches - 1), y, cache);  // untimed: the cache's buffers, as in a serving loop
  int i = 0;
  for (auto _ : state) {
    peer.infer(input(config, i++ % kBatches), y, cache);
    benchmark::DoNotOptimize(y.data());
  }
  tokens_counter(state, s.batch);
}

// The forward with the sub-keys scored by the float GEMM only (bf16 tiles not used; the same
// as BM_PeerForward where the CPU or build has no AMX): the tiles' effect in one binary.
void BM_PeerForward_gemm(benchmark::State& state) {
  auto& retrieval = layer(int(state.range(0))).retrieval();
  for (spex::Index h = 0; h < 8; ++h) retrieval.keys(h).set_bf16_tiles(spex::Bf16Tiles::never);
  BM_PeerForward(state);
  for (spex::Index h = 0; h < 8; ++h) retrieval.keys(h).set_bf16_tiles(spex::Bf16Tiles::automatic);
}

void BM_PeerForwardBackward(benchmark::State& state) {
  const int config = int(state.range(0));
  auto& peer = layer(config);
  const Shape s = kShapes[config];
  const auto& dy = spex_bench::random_matrix(s.batch, s.d, 4);
  spex::RowMat<float> y(s.batch, s.d), dx(s.batch, s.d);
  spex::Peer<float>::Cache cache;
  auto grads = peer.make_grads();
  auto step = [&](int batch) {
    grads.zero();
    peer.forward(input(config, batch), y, cache);
    peer.backward(dy, dx, cache, grads);
  };
  step(kBatches - 1);  // untimed: the cache's and gradients' buffers, as in a training loop
  int i = 0;
  for (auto _ : state) {
    step(i++ % kBatches);
    benchmark::DoNotOptimize(dx.data());
  }
  tokens_counter(state, s.batch);
  state.counters["rows/step"] = double(grads.experts.up.nnz_rows());
}

// The expert step alone on the retrieval of a real forward: gather-dot of u rows, GELU and
// gate, gather-axpy of v rows. Reported as expert-row bytes read per second.
void BM_PeerExpertStep(benchmark::State& state) {
  const int config = int(state.range(0));
  auto& peer = layer(config);
  const Shape s = kShapes[config];
  spex::RowMat<float> y(s.batch, s.d);
  std::vector<spex::Peer<float>::Cache> caches(kBatches);
  for (int i = 0; i < kBatches; ++i) peer.infer(input(config, i), y, caches[i]);
  spex::RowMat<float> pre;
  int i = 0;
  for (auto _ : state) {
    const auto& c = caches[i % kBatches];
    peer.experts().forward(input(config, i % kBatches), c.retrieval.ids, c.retrieval.gates, y, pre);
    ++i;
    benchmark::DoNotOptimize(y.data());
  }
  const double bytes = double(s.batch) * 8 * 16 * 2 * double(s.d) * sizeof(float);
  state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  tokens_counter(state, s.batch);
}

// The forward split into its steps, each on the shapes of the real forward, over the threads
// as the layer runs them: bench.sh reports BM_PeerForward against the sum and against the
// roofline (query and sub-key GEMMs at the GEMM peak, expert rows at copy bandwidth).
// Step 1: the query projection X W_qᵀ (B x d -> B x h d_key).
void BM_PeerPartQuery(benchmark::State& state) {
  const int config = int(state.range(0));
  auto& peer = layer(config);
  const Shape s = kShapes[config];
  spex::RowMat<float> q(s.batch, 8 * s.d_key);
  int i = 0;
  for (auto _ : state) {
    peer.retrieval().query().forward(input(config, i++ % kBatches), q);
    benchmark::DoNotOptimize(q.data());
  }
  tokens_counter(state, s.batch);
}

// The B h head queries of a real forward (no norm: the projection's output), made once.
const spex::RowMat<float>& head_queries(int config) {
  static spex::RowMat<float> q[2];
  if (q[config].size() == 0) {
    const Shape s = kShapes[config];
    spex::RowMat<float> qb(s.batch, 8 * s.d_key);
    layer(config).retrieval().query().forward(input(config, 0), qb);
    q[config] = Eigen::Map<spex::RowMat<float>>(qb.data(), s.batch * 8, s.d_key);
  }
  return q[config];
}

// Step 2: sub-key scores, both halves of all B h head queries against the n sub-keys, in the
// tasks of ProductKeys::search (a block of queries against one half each), from the transposed
// copy it makes for such batches.
void BM_PeerPartSubkeyScores(benchmark::State& state) {
  const int config = int(state.range(0));
  const auto& keys = layer(config).retrieval().keys(0);
  const auto& q = head_queries(config);
  const spex::Index rows = q.rows(), half = q.cols() / 2, qb = keys.kQueryBlock, blocks = (rows + qb - 1) / qb;
  const bool transposed_copy = rows >= keys.kTransposedKeysMinQueries;
  std::vector<spex::RowMat<float>> s(spex::max_threads(), spex::RowMat<float>(qb, keys.n()));
  spex::RowMat<float> ct[2];
  for (auto _ : state) {
    if (transposed_copy)
      for (int h = 0; h < 2; ++h) keys.copy_transposed(h, ct[h]);
    spex::parallel_for(2 * blocks, [&](spex::Index task, int t) {
      const int h = int(task % 2);
      const spex::Index q0 = (task / 2) * qb, r = std::min(qb, rows - q0);
      if (transposed_copy)
        spex::gemm(s[t].topRows(r), q.block(q0, h * half, r, half), ct[h], false);
      else
        spex::gemm(s[t].topRows(r), q.block(q0, h * half, r, half), keys.sub_keys(h).transpose(), false);
    });
    benchmark::DoNotOptimize(s[0].data());
  }
  tokens_counter(state, kShapes[config].batch);
}

// Steps 3 and 4: top-k of each half's score row, then the exact top-k of the k x k sums, for all
// B h head queries (scores of a real batch, computed once).
template <bool kProductStep>
void peer_part_topk(benchmark::State& state) {
  const int config = int(state.range(0));
  const auto& keys = layer(config).retrieval().keys(0);
  const auto& q = head_queries(config);
  const spex::Index rows = q.rows(), half = q.cols() / 2, n = keys.n();
  const std::size_t k = 16;
  const spex::RowMat<float> s1 = q.leftCols(half) * keys.sub_keys(0).transpose(), s2 = q.rightCols(half) * keys.sub_keys(1).transpose();
  spex::RowMat<float> a(rows, k), b(rows, k), v(rows, k);
  spex::IndexMat ia(rows, k), ib(rows, k), id(rows, k);
  for (spex::Index r = 0; r < rows; ++r) {
    spex::kernels::topk(&s1(r, 0), std::size_t(n), k, &a(r, 0), &ia(r, 0));
    spex::kernels::topk(&s2(r, 0), std::size_t(n), k, &b(r, 0), &ib(r, 0));
  }
  std::vector<spex::kernels::ProductTopKScratch<float>> scratch(spex::max_threads());
  const auto method = spex::ProductKeys<float>::default_method(spex::Index(k));
  for (auto _ : state) {
    spex::parallel_for(rows, [&](spex::Index r, int t) {
      if (kProductStep) {
        spex::kernels::product_topk(method, &a(r, 0), &ia(r, 0), k, &b(r, 0), &ib(r, 0), k, std::int64_t(n), k,
                                    &v(r, 0), &id(r, 0), scratch[t]);
      } else {
        spex::kernels::topk(&s1(r, 0), std::size_t(n), k, &a(r, 0), &ia(r, 0));
        spex::kernels::topk(&s2(r, 0), std::size_t(n), k, &b(r, 0), &ib(r, 0));
      }
    });
    benchmark::DoNotOptimize(id.data());
  }
  tokens_counter(state, kShapes[config].batch);
}
void BM_PeerPartTopK(benchmark::State& state) { peer_part_topk<false>(state); }
void BM_PeerPartProductStep(benchmark::State& state) { peer_part_topk<true>(state); }

// Steps 2 to 4 as the layer runs them: one ProductKeys::search over the B h head queries (the
// bench layers share their sub-keys), on the path the forward takes (bf16 tiles where the
// build and CPU have them, then the parts above time the float path the forward skips).
void BM_PeerPartRetrieval(benchmark::State& state) {
  const int config = int(state.range(0));
  const auto& keys = layer(config).retrieval().keys(0);
  const auto& q = head_queries(config);
  const spex::Index k = 16;
  spex::RowMat<float> scores(q.rows(), k);
  spex::IndexMat ids(q.rows(), k);
  spex::ProductKeys<float>::Workspace ws;
  for (auto _ : state) {
    keys.search(q, k, scores, ids, ws);
    benchmark::DoNotOptimize(ids.data());
  }
  tokens_counter(state, kShapes[config].batch);
}

}  // namespace

SPEX_BENCH_MACHINE_LIMITS();
BENCHMARK(BM_PeerPartQuery)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerPartSubkeyScores)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerPartTopK)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerPartProductStep)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerPartRetrieval)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerExpertStep)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
using spex_bench::BM_PeerRowRead;
BENCHMARK_TEMPLATE(BM_PeerRowRead, spex::TableStorage::native)
    ->Name("BM_PeerRowRead")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_PeerForward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerForward_gemm)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerForwardBackward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
