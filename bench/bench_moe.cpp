// Mixture-of-experts layers at d = 512, float32, batch 512 or 4096 (the last argument): ReMoE (ReLU router, ~1/8 of the
// (token, expert) pairs active) and TopK (k = 1) at E = 8 (hidden 1024) and E = 64
// (hidden 128), GELU or SwiGLU experts, against a dense FFN of the same active size and of the
// full size; and DeepSeek-V3's routing (sigmoid scores, selection bias, renormalized, plus one
// shared expert of the routed experts' hidden). Forward is inference (infer); the dense FFN is
// FfnExperts::infer with one expert every token uses. Tokens/s, plus the GFLOP/s of the expert
// MLPs (routed pairs; the shared expert's are extra). Threads from OMP_NUM_THREADS.
//   build/bench/bench_moe --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include "bench_common.hpp"

namespace {

constexpr spex::Index kD = 512;

spex::MoEConfig config(spex::Index experts, spex::FfnKind ffn) {
  spex::MoEConfig cfg;
  cfg.d_in = kD;
  cfg.n_experts = experts;
  cfg.hidden = experts == 8 ? 1024 : 128;
  cfg.experts_per_token = experts / 8;  // 1/8 active: k = 1 of 8, 8 of 64
  cfg.ffn = ffn;
  cfg.router_init_std = 1.0 / std::sqrt(double(kD));
  return cfg;
}

// Inputs with feature 0 constant 1, so a router weight on it sets the activation threshold.
const spex::RowMat<float>& input(spex::Index batch) {
  static std::map<spex::Index, spex::RowMat<float>> inputs;
  auto& x = inputs[batch];
  if (x.rows() != batch) {
    x = spex_bench::random_matrix(batch, kD, 5);
    x.col(0).setConstant(1.f);
  }
  return x;
}

// Shifts the ReLU router's threshold so that 1/8 of the pairs of the benchmark's batch are active
// (the sparsity ReMoE's controller holds in training), measured on that batch itself: the same
// threshold taken from 512 tokens left 13.4% of the pairs active at 4096 (E 8), so the MoE ran
// 7% more expert work than the dense FFN it is compared with.
template <class Layer>
void calibrate_relu(Layer& moe, spex::Index batch) {
  auto& w = moe.router().weight();
  w.col(0).setZero();
  const spex::RowMat<float> logits = input(batch) * w.transpose();
  std::vector<float> all(logits.data(), logits.data() + logits.size());
  std::nth_element(all.begin(), all.begin() + all.size() * 7 / 8, all.end());
  w.col(0).setConstant(-all[all.size() * 7 / 8]);
}

// DeepSeek-V3's routing on the same experts: sigmoid, bias, renormalized, one shared expert.
spex::MoEConfig deepseek(spex::MoEConfig cfg) {
  cfg.score = spex::ScoreFn::sigmoid;
  cfg.expert_bias = true;
  cfg.renormalize = cfg.experts_per_token > 1;
  cfg.aux_coeff = 0.0;
  cfg.shared_experts = 1;
  return cfg;
}

template <class Router, bool kDeepSeek = false>
spex::MoE<float, Router>& layer(spex::Index experts, spex::FfnKind ffn) {
  static std::map<std::pair<spex::Index, int>, std::unique_ptr<spex::MoE<float, Router>>> cache;
  auto& slot = cache[{experts, int(ffn)}];
  if (!slot) {
    slot = std::make_unique<spex::MoE<float, Router>>(kDeepSeek ? deepseek(config(experts, ffn)) : config(experts, ffn), 1);
  }
  return *slot;
}

void counters(benchmark::State& state, spex::Index batch, double active_fraction, double flops_per_iter) {
  state.counters["tokens/s"] = benchmark::Counter(double(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["active"] = active_fraction;
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(spex_bench::label());
}

// FLOPs of the expert MLPs for `pairs` routed (token, expert) pairs.
double expert_flops(const spex::MoEConfig& cfg, double pairs) {
  const double h = double(cfg.expert_hidden()), h1 = cfg.ffn == spex::FfnKind::swiglu ? 2 * h : h;
  return 2.0 * pairs * double(cfg.d_in) * (h1 + h);
}

template <class Router, bool kBackward, bool kDeepSeek = false>
void moe_bench(benchmark::State& state) {
  const spex::Index experts = state.range(0);
  const auto ffn = spex::FfnKind(state.range(1));
  const spex::Index batch = state.range(2);
  auto& moe = layer<Router, kDeepSeek>(experts, ffn);
  if (Router::kRelu) calibrate_relu(moe, batch);  // the layers are shared by both batch sizes
  const auto& x = input(batch);
  const auto& dy = spex_bench::random_matrix(batch, kD, 6);
  spex::RowMat<float> y(batch, kD), dx(batch, kD);
  typename spex::MoE<float, Router>::Cache cache;
  auto grads = moe.make_grads();
  moe.set_lambda(1e-3);
  auto step = [&] {
    if (kBackward) {
      grads.zero();
      moe.forward(x, y, cache);
      moe.backward(dy, dx, cache, grads);
    } else {
      moe.infer(x, y, cache);
    }
  };
  // One untimed step first, of the kind timed: the cache's buffers (hundreds of MB at 4096
  // tokens) are allocated and their pages touched there, and libxsmm generates its kernels for
  // the step's shapes, as in a serving or training loop that reuses its cache (the PyTorch peers
  // warm up too). Training timed after an inference pass only took 16.5 ms per step over 412
  // steps and 18.3 over 29 (E 64, 512 tokens).
  step();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(y.data());
  }
  const double pairs = double(cache.groups.rows());
  counters(state, batch, pairs / double(batch * moe.n_experts()),
           (kBackward ? 3.0 : 1.0) * expert_flops(moe.config(), pairs));
}

void BM_MoEForward_ReLU(benchmark::State& s) { moe_bench<spex::ReluRouter<float>, false>(s); }
void BM_MoEForward_TopK(benchmark::State& s) { moe_bench<spex::TopKRouter<float>, false>(s); }
void BM_MoEForwardBackward_ReLU(benchmark::State& s) { moe_bench<spex::ReluRouter<float>, true>(s); }
void BM_MoEForwardBackward_TopK(benchmark::State& s) { moe_bench<spex::TopKRouter<float>, true>(s); }
void BM_MoEForward_DeepSeek(benchmark::State& s) { moe_bench<spex::TopKRouter<float>, false, true>(s); }
void BM_MoEForwardBackward_DeepSeek(benchmark::State& s) { moe_bench<spex::TopKRouter<float>, true, true>(s); }

// Dense FFN: one expert that every token uses, the same FfnExperts code path without routing.
void BM_DenseFFN(benchmark::State& state) {
  const spex::Index hidden = state.range(0);
  const auto ffn = spex::FfnKind(state.range(1));
  const spex::Index batch = state.range(2);
  spex::Rng rng(3);
  static std::map<std::pair<spex::Index, int>, std::unique_ptr<spex::FfnExperts<float>>> cache;
  auto& slot = cache[{hidden, int(ffn)}];
  if (!slot) slot = std::make_unique<spex::FfnExperts<float>>(ffn, 1, kD, hidden, rng);
  const spex::RowMat<float> gates = spex::RowMat<float>::Ones(batch, 1);
  spex::ExpertGroups groups;
  groups.build(gates);
  spex::FfnExperts<float>::Cache c;
  spex::RowMat<float> y(batch, kD);
  slot->infer(input(batch), gates, groups, y, c);  // untimed: the cache's buffers, as above
  for (auto _ : state) {
    slot->infer(input(batch), gates, groups, y, c);
    benchmark::DoNotOptimize(y.data());
  }
  const double h = double(hidden), h1 = ffn == spex::FfnKind::swiglu ? 2 * h : h;
  counters(state, batch, 1.0, 2.0 * double(batch) * kD * (h1 + h));
}

void moe_args(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{8, 64}, {0, 1}, {512, 4096}})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_MoEForward_ReLU)->Apply(moe_args);
BENCHMARK(BM_MoEForward_TopK)->Apply(moe_args);
BENCHMARK(BM_MoEForwardBackward_ReLU)->Apply(moe_args);
BENCHMARK(BM_MoEForwardBackward_TopK)->Apply(moe_args);
BENCHMARK(BM_MoEForward_DeepSeek)->Apply(moe_args);
BENCHMARK(BM_MoEForwardBackward_DeepSeek)->Apply(moe_args);
BENCHMARK(BM_DenseFFN)->ArgsProduct({{1024, 8192}, {0, 1}, {512, 4096}})->Unit(benchmark::kMillisecond)->UseRealTime();
SPEX_BENCH_MACHINE_LIMITS();
