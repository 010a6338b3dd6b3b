#pragma once
// Mixture-of-experts layer: a router (ReluRouter for ReMoE, TopKRouter for the classic MoE)
// picks experts per token, FFN experts run per expert on their token block as GEMMs, and the
// outputs are gate-weighted and summed. With the ReLU router the layer also owns the sparsity
// penalty (L1 or load-balanced L1, coefficient lambda from a LambdaController), whose gradient
// it folds into backward.
#include <optional>
#include <vector>
#include <string>

#include "../core/check.hpp"
#include "../core/layer_state.hpp"
#include "../core/parameter.hpp"
#include "../core/types.hpp"
#include "../experts/ffn.hpp"
#include "../experts/shared_experts.hpp"
#include "../metrics/routing.hpp"
#include "../select/relu_router.hpp"
#include "../select/sparsity.hpp"
#include "../select/topk_router.hpp"
#include "dispatch.hpp"
#include "moe_config.hpp"

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
/// Dispatch: where the experts run (layers/dispatch.hpp). With dist::ExpertParallel (alias
/// dist::ShardedMoE) every method is a collective, the router is replicated and what depends on
/// the whole batch (the penalty, sparsity, TopK's balancing loss) is the whole batch's, the same
/// on every rank; such a layer is dropless (capacity_factor 0: capacity drops by the whole
/// batch's token order).
template <class T = float, class Router = ReluRouter<T>, class Arch = default_arch, class Dispatch = Local>
class MoE {
 public:
  using Config = MoEConfig;
  using Scalar = T;
  static constexpr bool kRelu = Router::kRelu;
  static constexpr const char* kName = Dispatch::kSharded ? "ShardedMoE" : "MoE";

  /// The gradients of what every rank holds a replica of (router, shared experts).
  struct ReplicatedGrads {
    typename Router::Grads router;
    typename SharedExperts<T, Arch>::Grads shared;
    void zero() {
      router.zero();
      shared.zero();
    }
    template <class F>
    void for_each_array(F&& f) {
      router.for_each_array(f);
      shared.for_each_array(f);
    }
  };
  /// Per-call state, owned by the caller and reused across calls.
  struct Cache {
    RowMat<T> x;
    typename Router::Cache router;
    ExpertGroups groups;
    typename FfnExperts<T, Arch>::Cache experts;
    typename SharedExperts<T, Arch>::Cache shared;
    RowMat<T> dgates;
    RowMat<T> dy_copy;   // dy, when dx is the same matrix
    std::vector<Index> probe;  // ReLU, training: per token its probed expert (revival), or -1
    // The whole batch's statistics (with a sharded dispatch: summed over the ranks).
    Index tokens = 0;
    Vec<double> penalty_w;            // ReLU: the penalty's weights
    double penalty = 0, sparsity = 0; // ReLU: L_reg; the sparsity 1 - nnz / (T E)
    Vec<double> load;                 // tokens routed to each expert (gate > 0)
    typename Dispatch::template MoEState<T, ReplicatedGrads> dispatch;  // a sharded dispatch's exchange
    detail::PassTag pass;
  };
  /// Gradients; backward accumulates into them until zero(). Not assignable: parameter lists
  /// point into them (core/parameter.hpp, Lifetime; moving or destroying them makes those
  /// lists stale).
  struct Grads : ReplicatedGrads {
    typename FfnExperts<T, Arch>::Grads experts;
    StorageEpoch epoch;
    void zero() {
      ReplicatedGrads::zero();
      experts.zero();
    }
    Grads(ReplicatedGrads r, typename FfnExperts<T, Arch>::Grads e) : ReplicatedGrads(std::move(r)), experts(std::move(e)) {}
    Grads(Grads&&) = default;
    Grads(const Grads&) = default;
    Grads& operator=(const Grads&) = delete;
    Grads& operator=(Grads&&) = delete;
  };

  /// Drawn from `seed`; with a sharded Dispatch (dist::ExpertParallel, or an MPI communicator it
  /// is made from), this rank's shard of MoE(cfg, seed): the same router on every rank and its
  /// experts (rank, rank + P, ...) with the same weights, drawn without holding the others.
  explicit MoE(const Config& cfg, std::uint64_t seed = 0, Dispatch dispatch = Dispatch()) : dispatch_(std::move(dispatch)) {
    dispatch_.collective(kName, [&] {
      cfg_ = validate(cfg);
      if constexpr (kRelu) check_relu_router_options(cfg_.router());
      SPEX_CHECK(!Dispatch::kSharded || cfg_.capacity_factor == 0,
                 kName << ": capacity_factor = " << cfg_.capacity_factor
                       << " drops by the whole batch's token order; the sharded layer is dropless (0)");
      dispatch_.set_experts(cfg_.total_experts(), kName);
    });
    dispatch_.check_same(kName, {cfg_.total_experts(), cfg_.d_in, cfg_.output_width(), cfg_.expert_hidden(), cfg_.total_per_token(),
                                 int(cfg_.ffn), int(cfg_.penalty), std::int64_t(seed), int(cfg_.score), cfg_.n_groups,
                                 cfg_.group_topk, cfg_.group_score_experts, int(cfg_.expert_bias), cfg_.shared_experts, cfg_.shared_expert_hidden(),
                                 int(cfg_.shared_gate), cfg_.seq_len});
    Rng rng(seed);
    router_ = Router(cfg_.router(), rng);
    experts_ = FfnExperts<T, Arch>(cfg_.ffn, cfg_.total_experts(), cfg_.d_in, cfg_.expert_hidden(), rng, cfg_.output_width(),
                                   dispatch_.rows());
    if (cfg_.shared_experts > 0)
      shared_ = SharedExperts<T, Arch>(cfg_.ffn, cfg_.shared_experts, cfg_.d_in, cfg_.shared_expert_hidden(), cfg_.output_width(),
                                       cfg_.shared_gate, cfg_.router_init_std, rng);
  }

  const Config& config() const { return cfg_; }
  Index d_in() const { return cfg_.d_in; }
  Index d_out() const { return cfg_.output_width(); }
  /// Experts after granularity (E * G; with a sharded dispatch: of all shards).
  Index n_experts() const { return cfg_.total_experts(); }
  /// Rows of the expert tables' partition: one per expert (the product-key layers' may differ).
  Index table_rows() const { return n_experts(); }
  /// Where the experts run (Local, or dist::ExpertParallel: its comm(), partition(), ...).
  const Dispatch& dispatch() const { return dispatch_; }
  /// Experts per token after granularity (k * G): exact for TopK, the average target for ReLU.
  Index experts_per_token() const { return cfg_.total_per_token(); }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  /// The experts this process holds (with a sharded dispatch its shard: its expert i is
  /// dispatch().partition().global_id(rank, i)).
  FfnExperts<T, Arch>& experts() { return experts_; }
  const FfnExperts<T, Arch>& experts() const { return experts_; }
  /// The shared experts (empty() when the config has none); replicated on every rank.
  SharedExperts<T, Arch>& shared_experts() { return shared_; }
  const SharedExperts<T, Arch>& shared_experts() const { return shared_; }
  Grads make_grads() const { return Grads(ReplicatedGrads{router_.make_grads(), shared_.make_grads()}, experts_.make_grads()); }

  /// Tokens routed to each expert (gate > 0, after capacity drops) in the last forward's whole
  /// batch (the same on every rank; not collective): what update_expert_bias takes, summed by
  /// the caller over a step's micro-batches.
  const Vec<double>& expert_load(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::expert_load");
    return c.load;
  }
  /// Auxiliary-loss-free balancing (TopK router with expert_bias; DeepSeek-V3, Megatron-Core):
  /// once per training step, b_e += rate * sign(mean(load) - load_e) with `load` the step's
  /// expert_load (default rate: Megatron-Core's 1e-3). Changes only which experts are selected.
  /// With a sharded dispatch every rank passes the same whole-batch load and stays identical.
  void update_expert_bias(const Vec<double>& load, double rate = 1e-3) {
    if constexpr (kRelu) {
      SPEX_CHECK(false, kName << "::update_expert_bias: ReLU routing has no expert bias (TopKRouter with expert_bias = true)");
    } else {
      router_.update_expert_bias(load, rate);
    }
  }

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
    run(x, y, c, true);
    c.pass.set(id_, detail::PassTag::training, x.rows());
  }
  /// Inference forward (same routing rule); const. A cache it fills cannot be used for backward.
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    c.pass.invalidate();
    run(x, y, c, false);
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

  /// The layer's extra loss term of the last forward: lambda * L_reg (ReLU router) or aux +
  /// z-loss (TopK); the whole batch's (the same on every rank; not collective).
  double aux_loss(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::aux_loss");
    return Router::kRelu ? lambda_ * c.penalty : router_.aux_loss(c.router);
  }
  /// Unscaled penalty L_reg of the last forward's whole batch (ReLU router; 0 for TopK or
  /// Penalty::none).
  double penalty_value(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::penalty_value");
    return Router::kRelu ? c.penalty : 0.0;
  }
  /// Sparsity 1 - nnz / (T E) of the last forward's whole batch: what the LambdaController
  /// takes (the same on every rank; not collective).
  double sparsity(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::sparsity");
    return c.sparsity;
  }
  /// Forward FLOPs per token (metrics/flops.hpp): the router's logits for all E experts (and
  /// TopK's softmax over them) and `active` experts per token: by default the budget k * G,
  /// which TopK uses exactly and the ReLU router on average once its sparsity is on target
  /// (pass stats(cache).mean_active for a batch's actual figure).
  FlopCount flops_per_token(double active = -1) const {
    FlopCount f;
    f.router = flops::linear(cfg_.d_in, n_experts()) + (Router::kRelu ? double(n_experts()) : 3.0 * double(n_experts()));
    f.experts = experts_.flops_per_token(active >= 0 ? active : double(experts_per_token())).experts + shared_.flops_per_token();
    return f;
  }
  /// Sparsity, active experts, loads, dead experts, max/mean load, capacity drops, the expert
  /// bias's range of the last forward's tokens (with a sharded dispatch: this rank's tokens);
  /// describe(stats) is the one-line router-quality report.
  RoutingStats stats(const Cache& c) const {
    c.pass.check_filled(id_, "MoE::stats");
    RoutingStats s = routing_stats(c.router.gates, double(experts_per_token()));
    if constexpr (!kRelu) {
      s.dropped = c.router.dropped;
      if (router_.expert_bias().size() > 0) {
        s.bias_min = double(router_.expert_bias().minCoeff());
        s.bias_max = double(router_.expert_bias().maxCoeff());
      }
    }
    return s;
  }

  /// prefix + "router.weight", "experts.w1", "experts.w2", with their gradients in g; with the
  /// options, the buffer "router.expert_bias" and "shared.w1", "shared.w2", "shared.gate.weight".
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
    shared_.check_grads(g.shared, "grads");
    experts_.check_grads(g.experts, "grads");
  }

 private:
  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out;
    out.push_back(dense_parameter<T>(prefix + "router.weight", router_.weight(), g ? &g->router.weight : nullptr));
    if constexpr (!kRelu) {
      if (cfg_.expert_bias)
        out.push_back(dense_parameter<T>(prefix + "router.expert_bias", router_.expert_bias(), static_cast<Vec<T>*>(nullptr)));
    }
    append_parameters(out, experts_.parameters("experts.", g ? &g->experts : nullptr), prefix);
    append_parameters(out, shared_.parameters("shared.", g ? &g->shared : nullptr), prefix);
    return stamped(std::move(out), epoch_, g ? &g->epoch : nullptr);
  }

  void backward_impl(CMatRef<T> dy_in, MatRef<T>* dx, Cache& c, Grads& g) const {
    std::optional<CMatRef<T>> checked;
    dispatch_.collective(kName, [&] {
      checked.emplace(detail::checked_backward_dy(c.pass, id_, kName, dy_in, cfg_.d_in, d_out(), cfg_.check_finite, dx, c.dy_copy));
      check_grads(g);
    });
    const CMatRef<T>& dy = *checked;
    if constexpr (Dispatch::kSharded) {
      dispatch_.moe_backward(experts_, dy, c.dispatch, c.dgates, dx, g.experts, c.experts);
    } else {
      if (dx) dx->setZero();
      c.dgates.resize(dy.rows(), experts_.n_experts());
      experts_.backward(c.x, c.router.gates, c.groups, dy, c.dgates, dx, g.experts, c.experts);
    }
    if (Router::kRelu && cfg_.penalty != Penalty::none && lambda_ > 0 && c.tokens > 0)
      add_penalty_gradient(cfg_.penalty, c.router.gates, c.penalty_w, lambda_, c.dgates, c.tokens);
    ReplicatedGrads& rg = dispatch_.replicated_grads(c.dispatch, static_cast<ReplicatedGrads&>(g));
    if constexpr (kRelu) router_.backward(c.x, c.dgates, c.router, rg.router, dx, &c.probe);
    else router_.backward(c.x, c.dgates, c.router, rg.router, dx);
    shared_.backward(c.x, dy, c.shared, rg.shared, dx);
    dispatch_.sum_replicated(c.dispatch, static_cast<ReplicatedGrads&>(g));
  }

  /// The forward pass: routing, the batch's statistics, the experts (in this process or on
  /// their owners). Training keeps x for backward.
  void run(CMatRef<T> x_in, MatRef<T> y, Cache& c, bool training) const {
    dispatch_.collective(kName, [&] {
      detail::check_forward_args(x_in, y, cfg_.d_in, d_out(), cfg_.check_finite, kName);
      if (training) c.x = x_in;  // before y overwrites x (y may be x)
      router_.forward(training ? CMatRef<T>(c.x) : x_in, c.router);
    });
    const CMatRef<T> x = training ? CMatRef<T>(c.x) : x_in;
    batch_statistics(c);
    find_probes(c, training);
    if (training)
      shared_.forward(x, c.shared);  // before y is written: y may be x
    else
      shared_.infer(x, c.shared);
    if constexpr (Dispatch::kSharded) {
      dispatch_.moe_forward(experts_, x, c.router.gates, c.probe, c.dispatch, y, c.experts);
    } else {
      c.groups.build(c.router.gates, c.probe);  // a probe's gate is 0: it adds nothing to y
      if (training)
        experts_.forward(x, c.router.gates, c.groups, y, c.experts);
      else
        experts_.infer(x, c.router.gates, c.groups, y, c.experts);
    }
    shared_.add_to(y, c.shared);
    dispatch_.collective(kName, [&] {
      if (cfg_.check_finite) detail::check_output_finite(y, kName);
    });
  }

  /// Revival of tokens that reach no expert (ReLU routing, training, revive_zero_expert_tokens):
  /// such a token's largest logit is probed, its expert run with gate 0 (y unchanged), so that
  /// backward learns dL/dR there (docs/remoe.md, "Dead routers").
  void find_probes(Cache& c, bool training) const {
    c.probe.clear();
    if constexpr (kRelu) {
      if (!training || !cfg_.revive_zero_expert_tokens) return;
      const RowMat<T>& gates = c.router.gates;
      const RowMat<T>& logits = c.router.logits;
      c.probe.assign(static_cast<std::size_t>(gates.rows()), -1);
      for (Index t = 0; t < gates.rows(); ++t) {
        Index top = 0;
        bool any = false;
        for (Index e = 0; e < gates.cols(); ++e) {
          any |= gates(t, e) > T(0);
          if (logits(t, e) > logits(t, top)) top = e;
        }
        if (!any && gates.cols() > 0) c.probe[static_cast<std::size_t>(t)] = top;
      }
    }
  }

  /// The whole batch's token count, sparsity and penalty (ReLU) or balancing statistics (TopK):
  /// this process's batch, or with a sharded dispatch the sums over the ranks.
  void batch_statistics(Cache& c) const {
    const BatchReduction* across = dispatch_.batch_reduction();
    const RowMat<T>& gates = c.router.gates;
    Vec<double>& counts = c.load;
    counts = routed_counts(gates);  // per expert, its tokens (gate > 0)
    if (across) across->sum(counts.data(), counts.size());
    c.tokens = across ? across->sum(gates.rows()) : gates.rows();
    c.sparsity = c.tokens > 0 ? 1.0 - counts.sum() / (double(c.tokens) * double(gates.cols())) : 0.0;
    if constexpr (kRelu) {
      c.penalty_w = penalty_weights(cfg_.penalty, counts, c.tokens, double(experts_per_token()));
      double s = penalty_sum(cfg_.penalty, gates, c.penalty_w);
      if (across) across->sum(&s, 1);
      c.penalty = c.tokens > 0 ? s / double(c.tokens) : 0.0;
    } else if (across) {
      router_.use_whole_batch(c.router, *across);
    }
  }

  Dispatch dispatch_;
  Config cfg_;
  Router router_;
  FfnExperts<T, Arch> experts_;
  SharedExperts<T, Arch> shared_;
  double lambda_ = 0.0;
  detail::LayerId id_;
  StorageEpoch epoch_;  // advanced on assignment and destruction (core/parameter.hpp, Lifetime)
};

}  // namespace spex
