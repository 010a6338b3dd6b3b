#pragma once
// Mixture-of-experts layer: a router (ReluRouter for ReMoE, TopKRouter for the classic MoE)
// picks experts per token, FFN experts run per expert on their token block as GEMMs, and the
// outputs are gate-weighted and summed. With the ReLU router the layer also owns the sparsity
// penalty (L1 or load-balanced L1, coefficient lambda from a LambdaController), whose gradient
// it folds into backward.
#include <string>

#include "../core/check.hpp"
#include "../core/layer_state.hpp"
#include "../core/parameter.hpp"
#include "../core/types.hpp"
#include "../experts/ffn.hpp"
#include "../metrics/routing.hpp"
#include "../select/relu_router.hpp"
#include "../select/router_config.hpp"
#include "../select/sparsity.hpp"
#include "../select/topk_router.hpp"

namespace spex {

/// MoE layer over a Router (ReluRouter<T, Arch> or TopKRouter<T, Arch>). Usage:
/// examples/snippets/moe.cpp (compiled by the test suite).
///
/// Tokens with no active expert get y = 0 (the residual carries them); experts with no token
/// and batches with no active pair are fine. There is no per-token cap: in the dense warm-up
/// every expert may be active for every token.
/// Thread safety: infer and backward are const (one cache and grads per concurrent caller);
/// the training forward is not (like Peer's; MoE itself keeps no batch state, but all layers
/// share one rule).
template <class T = float, class Router = ReluRouter<T>, class Arch = default_arch>
class MoE {
 public:
  using Config = MoEConfig;
  using Scalar = T;
  static constexpr bool kRelu = Router::kRelu;
  static constexpr const char* kName = "MoE";

  /// Per-call state, owned by the caller and reused across calls.
  struct Cache {
    RowMat<T> x;
    typename Router::Cache router;
    ExpertGroups groups;
    typename FfnExperts<T, Arch>::Cache experts;
    RowMat<T> dgates;
    RowMat<T> dy_copy;   // dy, when dx is the same matrix
    Vec<double> penalty_w;
    detail::PassTag pass;
  };
  /// Gradients; backward accumulates into them until zero(). Not assignable: parameter lists
  /// point into them (core/parameter.hpp, Lifetime; moving or destroying them makes those
  /// lists stale).
  struct Grads {
    typename Router::Grads router;
    typename FfnExperts<T, Arch>::Grads experts;
    StorageEpoch epoch;
    void zero() {
      router.zero();
      experts.zero();
    }
    Grads(typename Router::Grads r, typename FfnExperts<T, Arch>::Grads e) : router(std::move(r)), experts(std::move(e)) {}
    Grads(Grads&&) = default;
    Grads(const Grads&) = default;
    Grads& operator=(const Grads&) = delete;
    Grads& operator=(Grads&&) = delete;
  };

  explicit MoE(const Config& cfg, std::uint64_t seed = 0) : MoE(cfg, Rng(seed)) {}

  const Config& config() const { return cfg_; }
  Index d_in() const { return cfg_.d_in; }
  Index d_out() const { return cfg_.output_width(); }
  /// Experts after granularity (E * G).
  Index n_experts() const { return experts_.n_experts(); }
  /// Experts per token after granularity (k * G): exact for TopK, the average target for ReLU.
  Index experts_per_token() const { return cfg_.total_per_token(); }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  FfnExperts<T, Arch>& experts() { return experts_; }
  const FfnExperts<T, Arch>& experts() const { return experts_; }
  Grads make_grads() const { return Grads(router_.make_grads(), experts_.make_grads()); }

  /// The sparsity penalty's coefficient (ReLU router; ignored by TopK), in [0, kMaxLambda].
  void set_lambda(double lambda) {
    check_range(lambda, 0, kMaxLambda, "lambda");
    lambda_ = lambda;
  }
  double lambda() const { return lambda_; }

  /// Training forward: y (B x d_out) from x (B x d_in); fills `cache` for backward. y may be x
  /// itself (same matrix), no other overlap.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) {
    c.pass.invalidate();
    check_input(x, y);
    c.x = x;
    run(c.x, y, c);
    if (cfg_.check_finite) detail::check_output_finite(y, kName);
    c.pass.set(id_, detail::PassTag::training, x.rows());
  }
  /// Inference forward (same routing rule); const. A cache it fills cannot be used for backward.
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    c.pass.invalidate();
    check_input(x, y);
    run(x, y, c);
    if (cfg_.check_finite) detail::check_output_finite(y, kName);
    c.pass.set(id_, detail::PassTag::inference, x.rows());
  }
  void infer(CMatRef<T> x, MatRef<T> y) const {
    Cache c;
    infer(x, y, c);
  }

  /// From dy (B x d_out) after forward(x, y, c) on this layer: grads accumulate (router,
  /// experts, and for the ReLU router the penalty lambda * dL_reg/dR on active entries); dx
  /// (B x d_in) is assigned. dx may be dy itself.
  void backward(CMatRef<T> dy, MatRef<T> dx, Cache& c, Grads& g) const { backward_impl(dy, &dx, c, g); }
  /// The same without the input gradient.
  void backward(CMatRef<T> dy, Cache& c, Grads& g) const { backward_impl(dy, nullptr, c, g); }

  /// The layer's extra loss term: lambda * L_reg (ReLU router) or aux + z-loss (TopK).
  double aux_loss(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::aux_loss");
    return Router::kRelu ? lambda_ * penalty_value(c) : router_.aux_loss(c.router);
  }
  /// Unscaled penalty L_reg of the last forward (ReLU router; 0 for TopK or Penalty::none).
  double penalty_value(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::penalty_value");
    return Router::kRelu ? spex::penalty_value(cfg_.penalty, c.router.gates, double(experts_per_token())) : 0.0;
  }
  /// Forward FLOPs per token (metrics/flops.hpp): the router's logits for all E experts (and
  /// TopK's softmax over them) and `active` experts per token: by default the budget k * G,
  /// which TopK uses exactly and the ReLU router on average once its sparsity is on target
  /// (pass stats(cache).mean_active for a batch's actual figure).
  FlopCount flops_per_token(double active = -1) const {
    FlopCount f;
    f.router = flops::linear(cfg_.d_in, n_experts()) + (Router::kRelu ? double(n_experts()) : 3.0 * double(n_experts()));
    f.experts = experts_.flops_per_token(active >= 0 ? active : double(experts_per_token())).experts;
    return f;
  }
  /// Sparsity, active experts, loads, dead experts, ... of the last forward.
  RoutingStats stats(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::stats");
    return routing_stats(c.router.gates, double(experts_per_token()));
  }

  /// prefix + "router.weight", "experts.w1", "experts.w2", with their gradients in g.
  ParameterList<T> parameters(Grads& g, const std::string& prefix = "") {
    check_grads(g);
    return list(&g, prefix);
  }
  /// Writable values without gradients (loading weights).
  ParameterList<T> parameters(const std::string& prefix = "") { return list(nullptr, prefix); }
  /// Read-only values (saving weights from a const layer).
  ParameterList<const T> parameters(const std::string& prefix = "") const {
    return read_only(const_cast<MoE*>(this)->list(nullptr, prefix));
  }

  /// Throws unless `g` was made by a layer of this one's shapes.
  void check_grads(const Grads& g) const {
    router_.check_grads(g.router, "grads");
    experts_.check_grads(g.experts, "grads");
  }

 private:
  MoE(const Config& cfg, Rng rng) : cfg_(validate(cfg)), router_(cfg_, rng) {
    experts_ = FfnExperts<T, Arch>(cfg_.ffn, cfg_.total_experts(), cfg_.d_in, cfg_.expert_hidden(), rng, cfg_.output_width());
  }

  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out;
    out.push_back(dense_parameter<T>(prefix + "router.weight", router_.weight(), g ? &g->router.weight : nullptr));
    append_parameters(out, experts_.parameters("experts.", g ? &g->experts : nullptr), prefix);
    return stamped(std::move(out), epoch_, g ? &g->epoch : nullptr);
  }

  void backward_impl(CMatRef<T> dy_in, MatRef<T>* dx, Cache& c, Grads& g) const {
    const CMatRef<T> dy =
        detail::checked_backward_dy(c.pass, id_, kName, dy_in, cfg_.d_in, d_out(), cfg_.check_finite, dx, c.dy_copy);
    check_grads(g);
    const Index b = dy.rows();
    if (dx) dx->setZero();
    c.dgates.resize(b, experts_.n_experts());
    experts_.backward(c.x, c.router.gates, c.groups, dy, c.dgates, dx, g.experts, c.experts);
    if (Router::kRelu && cfg_.penalty != Penalty::none && lambda_ > 0 && b > 0) {
      c.penalty_w = penalty_weights(cfg_.penalty, c.router.gates, double(experts_per_token()));
      add_penalty_gradient(cfg_.penalty, c.router.gates, c.penalty_w, lambda_, c.dgates);
    }
    router_.backward(c.x, c.dgates, c.router, g.router, dx);
  }

  void check_input(const CMatRef<T>& x, const MatRef<T>& y) const {
    detail::check_forward_args(x, y, cfg_.d_in, d_out(), cfg_.check_finite, kName);
  }

  void run(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    router_.forward(x, c.router);
    c.groups.build(c.router.gates);
    experts_.forward(x, c.router.gates, c.groups, y, c.experts);
  }

  Config cfg_;
  Router router_;
  FfnExperts<T, Arch> experts_;
  double lambda_ = 0.0;
  detail::LayerId id_;
  StorageEpoch epoch_;  // advanced on assignment and destruction (core/parameter.hpp, Lifetime)
};

}  // namespace spex
