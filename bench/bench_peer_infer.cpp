// PEER inference per expert-table storage: float32, bfloat16, int8 with a scale per row
// (core/compact_table.hpp). Same layers (same seed), same inputs; retrieval is the same code
// for all three, so differences come from the expert step.
//   BM_PeerInfer_<f32|bf16|int8>/<config>       whole infer at the config's batch, tokens/s
//   BM_PeerExpertStep_<f32|bf16|int8>/<config>  the expert step alone on a real retrieval:
//                                                table bytes read per second (rows + scales)
//   BM_PeerRowRead_<f32|bf16|int8>/<config>     the same rows only read (each 64-byte line
//                                                loaded, nothing computed): the step's ceiling
//                                                on this machine with this access pattern
//   BM_PeerExpertCompute_<f32|bf16|int8>/<config> the step's work with its rows in cache (the
//                                                picks folded onto the first kCachedRows rows):
//                                                its time without memory. A step slower than
//                                                this and its row read together does not
//                                                overlap the two
//   BM_RowBurst_<f32|bf16|int8>/<rows>          one thread reading the step's rows in bursts
//                                                of <rows> rows, every line prefetched, then
//                                                loaded: one core's bytes/s against the rows
//                                                it has requested at once
//   BM_PeerLatency_<f32|bf16|int8>              one token through infer at config 1
//                                                (N = 1024^2, d = 512): what an interactive user waits
//   BM_PeerLatencyPart_<query|scores|topk>      that token's query projection, sub-key scores,
//                                                top-k of both halves and the k^2 step (all heads)
//   BM_PeerLatencyExperts_<f32|bf16|int8>       that token's expert step
// with BM_StreamCopy in the same binary. Threads from OMP_NUM_THREADS (run with 1 and 2).
//   build/bench/bench/bench_peer_infer --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <cstdint>
#include <cstring>
#include <vector>

#include "peer_row_read.hpp"

namespace {

using spex::Index;
using spex::TableStorage;
using spex_bench::kPeerBatches;
using spex_bench::kPeerShapes;

constexpr int kLatencyConfig = 1;

template <TableStorage S>
void BM_PeerInfer(benchmark::State& state) {
  const int config = int(state.range(0));
  const auto& peer = spex_bench::peer_layer(config, S);
  const auto s = kPeerShapes[config];
  spex::RowMat<float> y(s.batch, s.d);
  spex::Peer<float>::Cache cache;
  int i = 0;
  for (auto _ : state) {
    peer.infer(spex_bench::peer_input(config, i++ % kPeerBatches), y, cache);
    benchmark::DoNotOptimize(y.data());
  }
  spex_bench::tokens_counter(state, s.batch);
  state.counters["table GiB"] = double(peer.table_bytes()) / double(1u << 30);
}

/// Expert-table bytes one token reads: h k rows of u and of v (and their int8 scales).
double expert_bytes_per_token(TableStorage storage, Index d) { return 2.0 * 8 * 16 * double(spex::row_bytes(storage, d, sizeof(float))); }

/// Rows the compute-only step's picks are folded onto: 64 rows of u and of v, 256 KiB of float
/// rows at d 512, within a core's L2 cache.
constexpr Index kCachedRows = 64;

/// The retrievals' picks folded onto the first kCachedRows rows (gates unchanged).
const std::vector<spex::IndexMat>& cached_picks(int config) {
  static std::vector<spex::IndexMat> picks[2];
  auto& p = picks[config];
  if (p.empty())
    for (const auto& c : spex_bench::peer_retrievals(config)) p.push_back(c.retrieval.ids.unaryExpr([](Index id) { return id % kCachedRows; }));
  return p;
}

/// Which rows the expert step reads: the retrievals' picks, or the same folded into cache.
enum class StepRows { retrieved, cached };

/// The expert step over the config's retrievals (their gates), on the rows `rows` says.
template <TableStorage S>
void run_expert_step(benchmark::State& state, StepRows rows) {
  const int config = int(state.range(0));
  const auto& peer = spex_bench::peer_layer(config, S);
  const auto s = kPeerShapes[config];
  const auto& caches = spex_bench::peer_retrievals(config);
  const std::vector<spex::IndexMat>* folded = rows == StepRows::cached ? &cached_picks(config) : nullptr;
  spex::RowMat<float> y(s.batch, s.d), pre;
  int i = 0;
  for (auto _ : state) {
    const std::size_t b = std::size_t(i++ % kPeerBatches);
    const auto& r = caches[b].retrieval;
    peer.experts().forward(spex_bench::peer_input(config, int(b)), folded ? (*folded)[b] : r.ids, r.gates, y, pre);
    benchmark::DoNotOptimize(y.data());
  }
  if (rows == StepRows::retrieved)
    state.counters["bytes/s"] =
        benchmark::Counter(double(s.batch) * expert_bytes_per_token(S, s.d), benchmark::Counter::kIsIterationInvariantRate);
  spex_bench::tokens_counter(state, s.batch);
}

template <TableStorage S>
void BM_PeerExpertStep(benchmark::State& state) { run_expert_step<S>(state, StepRows::retrieved); }
template <TableStorage S>
void BM_PeerExpertCompute(benchmark::State& state) { run_expert_step<S>(state, StepRows::cached); }

/// Reads the down table's rows of config 1's retrievals (token after token) on the calling
/// thread alone, in bursts of `rows` rows: every line of a burst's rows prefetched, then one word
/// of each line loaded, the next burst only after that. Bytes per second against the burst: what
/// one core reads with that many rows requested at once and nothing overlapping the bursts (the
/// expert step requests the rows of its next pass, eight rows ahead, while it computes).
template <TableStorage S>
void BM_RowBurst(benchmark::State& state) {
  const int config = 1;
  const auto s = kPeerShapes[config];
  const spex_bench::RawTables t = spex_bench::raw_tables(spex_bench::peer_layer(config, S), S, s.d);
  const std::size_t rows = std::size_t(state.range(0)), lines = (t.row_bytes + 63) / 64;
  const auto& caches = spex_bench::peer_retrievals(config);
  const std::size_t m = std::size_t(caches[0].retrieval.ids.size()) / rows * rows;  // picks per batch, whole bursts
  std::uint64_t sum = 0, zero = 0;
  asm volatile("" : "+r"(zero));  // a zero the compiler cannot see, so that sum & zero waits for sum
  int i = 0;
  for (auto _ : state) {
    const auto& ids = caches[i++ % kPeerBatches].retrieval.ids;  // row-major: token after token
    for (std::size_t r = 0; r < m; r += rows) {
      // The burst's addresses depend on every word the burst before loaded (times zero), so
      // the core cannot start a burst before the one before has arrived.
      const char* table = t.down + (sum & zero);
      for (std::size_t q = 0; q < rows; ++q) spex::kernels::prefetch_lines(table + std::size_t(ids.data()[r + q]) * t.stride, int(lines));
      for (std::size_t q = 0; q < rows; ++q) {
        const char* row = table + std::size_t(ids.data()[r + q]) * t.stride;
        for (std::size_t l = 0; l < lines; ++l) {
          std::uint64_t w;
          std::memcpy(&w, row + 64 * l, 8);
          sum += w;
        }
      }
    }
  }
  benchmark::DoNotOptimize(sum);
  state.counters["bytes/s"] = benchmark::Counter(double(m) * double(t.row_bytes), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel("1 thread");
}

// One token at a time, cycling through the tokens of the input batches: each token's expert
// rows come from memory, as they do for a user's next token.
const spex::RowMat<float>& latency_tokens() { return spex_bench::peer_input(kLatencyConfig, 0); }

template <TableStorage S>
void BM_PeerLatency(benchmark::State& state) {
  const auto& peer = spex_bench::peer_layer(kLatencyConfig, S);
  const auto& x = latency_tokens();
  spex::RowMat<float> y(1, x.cols());
  spex::Peer<float>::Cache cache;
  Index t = 0;
  for (auto _ : state) {
    peer.infer(x.row(t++ % x.rows()), y, cache);
    benchmark::DoNotOptimize(y.data());
  }
  spex_bench::tokens_counter(state, 1);
}

template <TableStorage S>
void BM_PeerLatencyExperts(benchmark::State& state) {
  const auto& peer = spex_bench::peer_layer(kLatencyConfig, S);
  const auto& x = latency_tokens();
  const auto& c = spex_bench::peer_retrievals(kLatencyConfig)[0];  // the retrieval of these tokens
  spex::RowMat<float> y(1, x.cols()), pre;
  Index t = 0;
  for (auto _ : state) {
    const Index r = t++ % x.rows();
    peer.experts().forward(x.row(r), c.retrieval.ids.row(r), c.retrieval.gates.row(r), y, pre);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["bytes/s"] =
      benchmark::Counter(expert_bytes_per_token(S, x.cols()), benchmark::Counter::kIsIterationInvariantRate);
  spex_bench::tokens_counter(state, 1);
}

// The retrieval of one token, in the layer's steps and shapes (select/key_retrieval.hpp and
// ProductKeys::search): the h head queries are the rows of one block.
void BM_PeerLatencyPart_query(benchmark::State& state) {
  const auto& peer = spex_bench::peer_layer(kLatencyConfig);
  const auto& x = latency_tokens();
  spex::RowMat<float> q(1, 8 * kPeerShapes[kLatencyConfig].d_key);
  Index t = 0;
  for (auto _ : state) {
    peer.retrieval().query().forward(x.row(t++ % x.rows()), q);
    benchmark::DoNotOptimize(q.data());
  }
  spex_bench::tokens_counter(state, 1);
}

/// The h = 8 head queries (h x d_key) of each latency token.
const std::vector<spex::RowMat<float>>& token_head_queries() {
  static std::vector<spex::RowMat<float>> out;
  if (out.empty()) {
    const auto& peer = spex_bench::peer_layer(kLatencyConfig);
    const auto& x = latency_tokens();
    const Index dk = kPeerShapes[kLatencyConfig].d_key;
    spex::RowMat<float> q(1, 8 * dk);
    for (Index t = 0; t < x.rows(); ++t) {
      peer.retrieval().query().forward(x.row(t), q);
      out.push_back(Eigen::Map<spex::RowMat<float>>(q.data(), 8, dk));
    }
  }
  return out;
}

void BM_PeerLatencyPart_scores(benchmark::State& state) {
  const auto& keys = spex_bench::peer_layer(kLatencyConfig).retrieval().keys(0);
  const auto& qs = token_head_queries();
  const Index half = keys.d_key() / 2;
  spex::RowMat<float> s1(8, keys.n()), s2(8, keys.n());
  std::size_t t = 0;
  for (auto _ : state) {
    const auto& q = qs[t++ % qs.size()];
    spex::gemm(s1, q.leftCols(half), keys.sub_keys(0).transpose(), false);
    spex::gemm(s2, q.rightCols(half), keys.sub_keys(1).transpose(), false);
    benchmark::DoNotOptimize(s2.data());
  }
  spex_bench::tokens_counter(state, 1);
}

void BM_PeerLatencyPart_topk(benchmark::State& state) {
  const auto& keys = spex_bench::peer_layer(kLatencyConfig).retrieval().keys(0);
  const auto& qs = token_head_queries();
  const Index half = keys.d_key() / 2, n = keys.n();
  const std::size_t k = 16;
  std::vector<spex::RowMat<float>> s1, s2;
  for (const auto& q : qs) {
    s1.push_back(q.leftCols(half) * keys.sub_keys(0).transpose());
    s2.push_back(q.rightCols(half) * keys.sub_keys(1).transpose());
  }
  std::vector<float> a(k), b(k), v(k);
  std::vector<std::int64_t> ia(k), ib(k), id(k);
  spex::kernels::ProductTopKScratch<float> scratch;
  const auto method = spex::ProductKeys<float>::default_method(Index(k));
  std::size_t t = 0;
  for (auto _ : state) {
    const std::size_t i = t++ % qs.size();
    for (Index h = 0; h < 8; ++h) {
      spex::kernels::topk(&s1[i](h, 0), std::size_t(n), k, a.data(), ia.data());
      spex::kernels::topk(&s2[i](h, 0), std::size_t(n), k, b.data(), ib.data());
      spex::kernels::product_topk(method, a.data(), ia.data(), k, b.data(), ib.data(), k, std::int64_t(n), k, v.data(),
                                  id.data(), scratch);
    }
    benchmark::DoNotOptimize(id.data());
  }
  spex_bench::tokens_counter(state, 1);
}

}  // namespace

SPEX_BENCH_MACHINE_LIMITS();
using spex_bench::BM_PeerRowRead;
#define SPEX_PER_STORAGE(name, suffix, S, args)                                                             \
  BENCHMARK_TEMPLATE(name, S)->Name(#name "_" suffix) args->Unit(benchmark::kMicrosecond)->UseRealTime()
#define SPEX_CONFIGS ->Arg(0)->Arg(1)
#define SPEX_NONE
SPEX_PER_STORAGE(BM_PeerExpertStep, "f32", TableStorage::native, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerExpertStep, "bf16", TableStorage::bf16, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerExpertStep, "int8", TableStorage::int8, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerExpertCompute, "f32", TableStorage::native, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerExpertCompute, "bf16", TableStorage::bf16, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerExpertCompute, "int8", TableStorage::int8, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerRowRead, "f32", TableStorage::native, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerRowRead, "bf16", TableStorage::bf16, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerRowRead, "int8", TableStorage::int8, SPEX_CONFIGS);
#define SPEX_BURSTS ->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)->Arg(32)
SPEX_PER_STORAGE(BM_RowBurst, "f32", TableStorage::native, SPEX_BURSTS);
SPEX_PER_STORAGE(BM_RowBurst, "bf16", TableStorage::bf16, SPEX_BURSTS);
SPEX_PER_STORAGE(BM_RowBurst, "int8", TableStorage::int8, SPEX_BURSTS);
SPEX_PER_STORAGE(BM_PeerInfer, "f32", TableStorage::native, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerInfer, "bf16", TableStorage::bf16, SPEX_CONFIGS);
SPEX_PER_STORAGE(BM_PeerInfer, "int8", TableStorage::int8, SPEX_CONFIGS);
BENCHMARK(BM_PeerLatencyPart_query)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_PeerLatencyPart_scores)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_PeerLatencyPart_topk)->Unit(benchmark::kMicrosecond)->UseRealTime();
SPEX_PER_STORAGE(BM_PeerLatencyExperts, "f32", TableStorage::native, SPEX_NONE);
SPEX_PER_STORAGE(BM_PeerLatencyExperts, "bf16", TableStorage::bf16, SPEX_NONE);
SPEX_PER_STORAGE(BM_PeerLatencyExperts, "int8", TableStorage::int8, SPEX_NONE);
SPEX_PER_STORAGE(BM_PeerLatency, "f32", TableStorage::native, SPEX_NONE);
SPEX_PER_STORAGE(BM_PeerLatency, "bf16", TableStorage::bf16, SPEX_NONE);
SPEX_PER_STORAGE(BM_PeerLatency, "int8", TableStorage::int8, SPEX_NONE);
