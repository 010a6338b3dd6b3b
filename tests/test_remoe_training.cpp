// A small seeded training loop: ReMoE's controller must drive the measured sparsity to the
// target 1 - k/E and hold it there, and the same loop with the TopK router must learn as well.
#include <spex/layers/moe.hpp>

#include "test_util.hpp"

using namespace spex;

namespace {

struct Run {
  std::vector<double> loss, sparsity, lambda;
};

// Regression onto a fixed random teacher y* = B tanh(A x) with plain SGD (the router at 0.3x the
// learning rate). Tokens come from 32 clusters, and feature 0 is a constant 1: a bias-free
// ReLU router can raise its sparsity only by moving its threshold, which on zero-mean
// isotropic inputs it cannot (P(w.x > 0) = 1/2 for every w); real hidden states are not
// zero-mean either.
template <class Router>
Run train(int steps, std::uint64_t seed) {
  const Index d = 16, b = 512;
  MoEConfig cfg;
  cfg.d_in = d;
  cfg.n_experts = 8;
  cfg.experts_per_token = 2;
  cfg.hidden = 32;
  cfg.ffn = FfnKind::gelu;
  cfg.router_init_std = 0.1;
  MoE<double, Router> moe(cfg, seed);
  LambdaController ctl(LambdaController::target_for(2, 8));
  Rng rng(seed + 100);
  RowMat<double> ta(32, d), tb(d, 32);
  fill_normal(ta, 1.0 / std::sqrt(double(d)), rng);
  fill_normal(tb, 1.0 / std::sqrt(32.0), rng);
  RowMat<double> centers(32, d);
  fill_normal(centers, 1.0, rng);
  typename MoE<double, Router>::Cache cache;
  auto grads = moe.make_grads();
  RowMat<double> x(b, d), y(b, d), dy(b, d);
  const double lr = 0.2;
  Run run;
  for (int step = 0; step < steps; ++step) {
    fill_normal(x, 0.2, rng);
    for (Index t = 0; t < b; ++t) x.row(t) += centers.row(Index(rng.below(32)));
    x.col(0).setConstant(1.0);
    const RowMat<double> target = (x * ta.transpose()).array().tanh().matrix() * tb.transpose();
    moe.set_lambda(ctl.lambda());
    moe.forward(x, y, cache);
    dy = (y - target) / double(b);  // L = 0.5 * sum ||y - y*||^2 / B
    run.loss.push_back(0.5 * (y - target).squaredNorm() / double(b));
    run.sparsity.push_back(moe.stats(cache).sparsity);
    run.lambda.push_back(ctl.lambda());
    grads.zero();
    moe.backward(dy, cache, grads);
    for (auto& p : moe.parameters(grads))
      p.value_map() -= (p.name == "router.weight" ? 0.3 * lr : lr) * p.grad_map();
    ctl.update(run.sparsity.back());
  }
  return run;
}

double mean_tail(const std::vector<double>& v, std::size_t n) {
  double s = 0;
  for (std::size_t i = v.size() - n; i < v.size(); ++i) s += v[i];
  return s / double(n);
}

}  // namespace

TEST_CASE("ReMoE's controller drives sparsity to 1 - k/E and holds it, TopK learns as well", "[remoe][training]") {
  const int steps = 400;
  const Run remoe = train<ReluRouter<double>>(steps, 1);
  const double target = 0.75;
  // Stage I: near-dense start (half the router outputs positive).
  CHECK(remoe.sparsity.front() < 0.6);
  // Stage III: over the last 150 steps, every 10-step mean within 3% of the target, and no
  // single step further than 8% (a step's sparsity is one batch's: it jitters).
  for (int i = steps - 150; i < steps; ++i) {
    double mean10 = 0;
    for (int j = i - 9; j <= i; ++j) mean10 += remoe.sparsity[j] / 10;
    CAPTURE(i, remoe.sparsity[i], mean10, remoe.lambda[i]);
    CHECK(std::abs(mean10 - target) <= 0.03 * target);
    CHECK(std::abs(remoe.sparsity[i] - target) <= 0.08 * target);
  }
  CHECK(remoe.lambda.back() > 1e-4);  // lambda had to grow by orders of magnitude to get there
  const Run topk = train<TopKRouter<double>>(steps, 1);
  const double l_remoe = mean_tail(remoe.loss, 50), l_topk = mean_tail(topk.loss, 50);
  CAPTURE(remoe.loss.front(), l_remoe, topk.loss.front(), l_topk);
  // Both learn the task (from about 3.3 to a few tenths); on this toy ReMoE ends about 2x above
  // TopK (0.27 vs 0.125 measured), so "comparable" is asserted as within 3x.
  CHECK(l_remoe < 0.2 * remoe.loss.front());
  CHECK(l_topk < 0.2 * topk.loss.front());
  CHECK(l_remoe < 3.0 * l_topk);
  CHECK(l_topk < 3.0 * l_remoe);
}
