// PEER layer: forward and forward+backward (row-sparse expert grads) in tokens/s at the two
// reference configurations, the expert step alone as bytes gathered per second, and a
// streaming copy in the same binary for the bandwidth ratio. Threads from OMP_NUM_THREADS.
//   build/bench/bench_peer --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <cstring>

#include "bench_common.hpp"

namespace {

// Config 0: d = 256, N = 256^2, batch 512, d_key 128. Config 1: d = 512, N = 1024^2, batch 256,
// d_key 256. Both h = 8, k = 16, softmax scores, GELU experts, no query norm (the PyTorch
// reference the issue measured).
struct Shape {
  spex::Index d, n, batch, d_key;
};
constexpr Shape kShapes[] = {{256, 256, 512, 128}, {512, 1024, 256, 256}};

spex::Peer<float>& layer(int config) {
  static std::unique_ptr<spex::Peer<float>> layers[2];
  if (!layers[config]) {
    const Shape s = kShapes[config];
    spex::Peer<float>::Config cfg;
    cfg.d_in = s.d;
    cfg.n_keys = s.n;
    cfg.heads = 8;
    cfg.top_k = 16;
    cfg.d_key = s.d_key;
    cfg.norm = spex::NormKind::none;
    cfg.activation = spex::kernels::Activation::gelu_erf;
    layers[config] = std::make_unique<spex::Peer<float>>(cfg, 1);
  }
  return *layers[config];
}

// Distinct input batches, cycled through: the same batch over and over would find its expert
// rows in the 480 MiB L3 of these VMs instead of memory.
constexpr int kBatches = 8;
const spex::RowMat<float>& input(int config, int i) {
  const Shape s = kShapes[config];
  return spex_bench::random_matrix(s.batch, s.d, 100 + 10 * config + i);
}

void tokens_counter(benchmark::State& state, spex::Index batch) {
  state.counters["tokens/s"] = benchmark::Counter(double(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(spex_bench::label());
}

void BM_PeerForward(benchmark::State& state) {
  const int config = int(state.range(0));
  auto& peer = layer(config);
  const Shape s = kShapes[config];
  spex::RowMat<float> y(s.batch, s.d);
  spex::Peer<float>::Cache cache;
  int i = 0;
  for (auto _ : state) {
    peer.infer(input(config, i++ % kBatches), y, cache);
    benchmark::DoNotOptimize(y.data());
  }
  tokens_counter(state, s.batch);
}

void BM_PeerForwardBackward(benchmark::State& state) {
  const int config = int(state.range(0));
  auto& peer = layer(config);
  const Shape s = kShapes[config];
  const auto& dy = spex_bench::random_matrix(s.batch, s.d, 4);
  spex::RowMat<float> y(s.batch, s.d), dx(s.batch, s.d);
  spex::Peer<float>::Cache cache;
  auto grads = peer.make_grads();
  int i = 0;
  for (auto _ : state) {
    grads.zero();
    peer.forward(input(config, i++ % kBatches), y, cache);
    peer.backward(dy, dx, cache, grads);
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

// Streaming copy of 1 GiB split over the threads; bytes/s counts read + written (STREAM).
void BM_StreamCopy(benchmark::State& state) {
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
  state.SetLabel(spex_bench::label());
}

}  // namespace

BENCHMARK(BM_StreamCopy)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerExpertStep)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerForward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerForwardBackward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
