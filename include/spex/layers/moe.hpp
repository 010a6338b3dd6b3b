#pragma once
// Mixture-of-experts layer: a router (ReluRouter for ReMoE, TopKRouter for the classic MoE)
// picks experts per token, FFN experts run per expert on their token block as GEMMs, and the
// outputs are gate-weighted and summed. With the ReLU router the layer also owns the sparsity
// penalty (L1 or load-balanced L1, coefficient lambda from a LambdaController), whose gradient
// it folds into backward.
#include <string>

#include "../core/check.hpp"
#include "../core/parameter.hpp"
#include "../core/types.hpp"
#include "../experts/ffn.hpp"
#include "../metrics/routing.hpp"
#include "../select/relu_router.hpp"
#include "../select/router_config.hpp"
#include "../select/sparsity.hpp"
#include "../select/topk_router.hpp"

namespace spex {

/// MoE layer over a Router (ReluRouter<T, Arch> or TopKRouter<T, Arch>).
///
///   spex::MoEConfig cfg;
///   cfg.d = 512; cfg.n_experts = 8; cfg.hidden = 1024; cfg.top_k = 1;
///   spex::MoE<float, spex::ReluRouter<float>> remoe(cfg, /*seed=*/1);
///   spex::LambdaController ctl(cfg.budget() ? 1.0 - double(cfg.budget()) / cfg.experts() : 0);
///   remoe.set_lambda(ctl.lambda());
///   remoe.forward(x, y, cache);                 // x, y: B x 512
///   remoe.backward(dy, cache, &dx, grads);      // penalty gradient included
///   ctl.update(remoe.stats(cache).sparsity);    // once per optimizer step
///
/// Tokens with no active expert get y = 0 (the residual carries them); experts with no token
/// and batches with no active pair are fine. There is no per-token cap: in the dense warm-up
/// every expert may be active for every token.
/// Thread safety: forward, infer and backward are const; one cache and grads per caller.
template <class T = float, class Router = ReluRouter<T>, class Arch = default_arch>
class MoE {
 public:
  static constexpr bool kRelu = Router::kRelu;
  struct Cache {
    RowMat<T> x;
    typename Router::Cache router;
    ExpertGroups groups;
    typename FfnExperts<T, Arch>::Cache experts;
    RowMat<T> dgates;
  };
  struct Grads {
    typename Router::Grads router;
    typename FfnExperts<T, Arch>::Grads experts;
    void zero() {
      router.zero();
      experts.zero();
    }
  };

  explicit MoE(const MoEConfig& cfg, std::uint64_t seed = 0) : MoE(cfg, Rng(seed)) {}

  const MoEConfig& config() const { return cfg_; }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  FfnExperts<T, Arch>& experts() { return experts_; }
  const FfnExperts<T, Arch>& experts() const { return experts_; }
  Grads make_grads() const { return Grads{router_.make_grads(), experts_.make_grads()}; }

  /// The sparsity penalty's coefficient (ReLU router; ignored by TopK).
  void set_lambda(double lambda) {
    SPEX_CHECK(lambda >= 0 && std::isfinite(lambda), "lambda = " << lambda << " must be finite and >= 0");
    lambda_ = lambda;
  }
  double lambda() const { return lambda_; }

  /// Training forward (keeps the input for backward).
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    check_input(x, y);
    c.x = x;
    run(x, y, c);
  }
  /// Inference forward (same routing rule; nothing kept for backward).
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    check_input(x, y);
    run(x, y, c);
  }
  void infer(CMatRef<T> x, MatRef<T> y) const {
    Cache c;
    infer(x, y, c);
  }

  /// From dy (B x d): grads accumulate (router, experts, and for the ReLU router the penalty
  /// lambda * dL_reg/dR on active entries); *dx (B x d) is assigned when given.
  void backward(CMatRef<T> dy, Cache& c, MatRef<T>* dx, Grads& g) const {
    SPEX_CHECK(c.x.rows() == dy.rows() && c.router.gates.rows() == dy.rows(),
               "dy has " << dy.rows() << " rows but the cache holds a forward pass of " << c.x.rows() << " tokens");
    SPEX_CHECK(dy.cols() == cfg_.d, "dy has " << dy.cols() << " columns, expected d = " << cfg_.d);
    if (cfg_.check_finite) check_finite(dy, "dy");
    if (dx) {
      check_shape(*dx, c.x.rows(), cfg_.d, "dx");
      dx->setZero();
    }
    c.dgates.resize(dy.rows(), experts_.n_experts());
    experts_.backward(c.x, c.router.gates, c.groups, dy, c.dgates, dx, g.experts, c.experts);
    if (Router::kRelu && cfg_.penalty != Penalty::none && lambda_ > 0 && dy.rows() > 0) {
      const Vec<double> w = penalty_weights(cfg_.penalty, c.router.gates, double(cfg_.budget()));
      const double scale = lambda_ / double(dy.rows());
      for (Index t = 0; t < dy.rows(); ++t)
        for (Index e = 0; e < experts_.n_experts(); ++e)
          if (c.router.gates(t, e) > T(0)) c.dgates(t, e) += T(scale * w(e));
    }
    router_.backward(c.x, c.dgates, c.router, g.router, dx);
  }

  /// The layer's extra loss term: lambda * L_reg (ReLU router) or aux + z-loss (TopK).
  double aux_loss(const Cache& c) const {
    return Router::kRelu ? lambda_ * penalty_value(c) : router_.aux_loss(c.router);
  }
  /// Unscaled penalty L_reg of the last forward (ReLU router; 0 for TopK or Penalty::none).
  double penalty_value(const Cache& c) const {
    return Router::kRelu ? spex::penalty_value(cfg_.penalty, c.router.gates, double(cfg_.budget())) : 0.0;
  }
  /// Sparsity, active experts, loads, dead experts, ... of the last forward.
  RoutingStats stats(const Cache& c) const { return routing_stats(c.router.gates, double(cfg_.budget())); }

  /// "moe.router.weight", "moe.experts.w1", "moe.experts.w2" with their gradients in g (the
  /// expert ones zeroed lazily: see Parameter::stale).
  ParameterList<T> parameters(Grads* g = nullptr) {
    ParameterList<T> list;
    list.push_back(dense_parameter<T>("moe.router.weight", router_.weight(), g ? &g->router.weight : nullptr));
    append_parameters(list, experts_.parameters("moe.experts.", g ? &g->experts : nullptr));
    return list;
  }

 private:
  MoE(const MoEConfig& cfg, Rng rng) : cfg_(validate(cfg)), router_(cfg_, rng) {
    experts_ = FfnExperts<T, Arch>(cfg_.ffn, cfg_.experts(), cfg_.d, cfg_.expert_hidden(), rng);
  }

  static MoEConfig validate(const MoEConfig& c) {
    SPEX_CHECK(c.d >= 1, "d = " << c.d << " must be >= 1");
    SPEX_CHECK(c.n_experts >= 1, "n_experts = " << c.n_experts << " must be >= 1");
    SPEX_CHECK(c.granularity >= 1, "granularity = " << c.granularity << " must be >= 1");
    SPEX_CHECK(c.top_k >= 1 && c.top_k <= c.n_experts, "top_k = " << c.top_k << " must be in [1, n_experts = " << c.n_experts << "]");
    const Index hidden = c.hidden > 0 ? c.hidden : 4 * c.d;
    SPEX_CHECK(hidden % c.granularity == 0,
               "hidden = " << hidden << " must divide by granularity = " << c.granularity);
    return c;
  }

  void check_input(const CMatRef<T>& x, const MatRef<T>& y) const {
    SPEX_CHECK(x.cols() == cfg_.d, "x has " << x.cols() << " columns, expected d = " << cfg_.d);
    check_shape(y, x.rows(), cfg_.d, "y");
    if (cfg_.check_finite) check_finite(x, "x");
  }

  void run(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    router_.forward(x, c.router);
    c.groups.build(c.router.gates);
    experts_.forward(x, c.router.gates, c.groups, y, c.experts);
  }

  MoEConfig cfg_;
  Router router_;
  FfnExperts<T, Arch> experts_;
  double lambda_ = 0.0;
};

}  // namespace spex
