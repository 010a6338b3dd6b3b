#pragma once
// Expert-parallel mixture of experts over MPI: dist::ShardedMoE, over ReMoE's ReLU router or the
// classic TopK router.
//
// Each rank holds its own tokens and the experts e with e mod P = rank (partition.hpp); the
// router is replicated (its gradients summed over the ranks in rank order, as the product-key
// layers' retrieval: product_key_layers.hpp). Per step: routing on the local tokens -> every
// routed (token, expert) pair is a request to the expert's owner, each token's x goes once to
// each of its owners -> owners group their received tokens per expert and run the FFN experts
// as GEMMs, as MoE does -> partial outputs back, summed per token in rank order. Dropless: no
// capacity (TopK's capacity_factor must be 0: it drops by the whole batch's token order).
//
// What depends on the whole batch is the whole batch's, summed over the ranks, so every rank
// holds the same values and the layer equals MoE over the whole batch:
//  - ReLU router: the penalty's token count and routed counts c_e (l1_lb's weights), its value,
//    and the sparsity that the LambdaController follows (sparsity(cache), the same on every
//    rank, as the reference averages it over data-parallel ranks: every rank's controller then
//    holds the same lambda);
//  - TopK router: the load-balancing loss's counts and probability sums, the z-loss, and their
//    token count (TopKRouter::use_whole_batch).
// Equal to one process up to the order of floating-point sums (outputs sum per-owner partial
// sums; the router's gradient sums per-rank ones); tests/dist/test_sharded_moe.cpp measures it.
//
// Collectives: every rank calls the same methods in the same order; bad arguments on any rank
// throw spex::Error on every rank. Thread safety: none.
// Usage: examples/snippets/dist/sharded_layers.cpp (compiled and run by the test suite under mpirun).
#include <mpi.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "../core/check.hpp"
#include "../core/layer_state.hpp"
#include "../core/parameter.hpp"
#include "../core/random.hpp"
#include "../experts/ffn.hpp"
#include "../select/relu_router.hpp"
#include "../select/router_config.hpp"
#include "../select/sparsity.hpp"
#include "../select/topk_router.hpp"
#include "collectives.hpp"
#include "exchange.hpp"
#include "partition.hpp"

namespace spex {
namespace dist {

template <class T = float, class Router = ReluRouter<T>, class Arch = default_arch>
class ShardedMoE {
 public:
  using Config = MoEConfig;
  using Scalar = T;
  static constexpr bool kRelu = Router::kRelu;
  static constexpr const char* kName = "ShardedMoE";

  struct Cache {
    RowMat<T> x;
    typename Router::Cache router;
    ExpertExchange<T> exchange;
    std::vector<Index> pick_begin, pick_ids;       // this rank's routed pairs, token by token
    std::vector<T> pick_gates, pick_dgates;
    RowMat<T> received_x, received_gates;          // owner side: received tokens x local experts
    ExpertGroups groups;
    typename FfnExperts<T, Arch>::Cache experts;
    RowMat<T> partial, received_dy, received_dgates, partial_dx, dx_scratch;
    std::vector<T> request_dgates;
    RowMat<T> dgates;                              // this rank's tokens x all experts
    Index tokens = 0;                              // the whole batch's
    Vec<double> penalty_w;                         // ReLU: the penalty's weights (whole batch)
    double penalty = 0, sparsity = 0;              // ReLU: L_reg and sparsity of the whole batch
    typename Router::Grads local;                  // this rank's router gradients, before the sum
    std::vector<RankSum<T>> sums;
    std::vector<T> flat;
    RowMat<T> dy_copy;
    detail::PassTag pass;
  };
  struct Grads {
    typename Router::Grads router;
    typename FfnExperts<T, Arch>::Grads experts;
    StorageEpoch epoch;  // parameter lists point into these (core/parameter.hpp, Lifetime)
    void zero() {
      router.zero();
      experts.zero();
    }
  };

  /// The layer MoE<T, Router>(cfg, seed) would be, sharded over the ranks of `comm`: the same
  /// router on every rank and this rank's experts (rank, rank + P, ...) with the same weights,
  /// drawn without ever holding the others. `comm` must outlive the layer.
  ShardedMoE(const Config& cfg, std::uint64_t seed, MPI_Comm comm)
      : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)), reduction_(std::make_unique<RankOrderSum>(comm)) {
    all_or_none(comm_, kName, [&] {
      cfg_ = validate(cfg);
      SPEX_CHECK(cfg_.total_experts() >= ranks_,
                 kName << ": " << cfg_.total_experts() << " experts cannot be sharded over " << ranks_ << " ranks");
      SPEX_CHECK(kRelu || cfg_.capacity_factor == 0, kName << ": capacity_factor = " << cfg_.capacity_factor
                                                           << " drops by the whole batch's token order; the sharded layer is dropless (0)");
    });
    check_same_on_all_ranks(comm_, kName,
                            {cfg_.total_experts(), cfg_.d_in, cfg_.output_width(), cfg_.expert_hidden(), cfg_.total_per_token(),
                             int(cfg_.ffn), int(cfg_.penalty), std::int64_t(seed)});
    part_ = ExpertPartition(cfg_.total_experts(), ranks_);
    Rng rng(seed);  // MoE's constructor's draws
    router_ = Router(cfg_, rng);
    experts_ = FfnExperts<T, Arch>(cfg_.ffn, cfg_.total_experts(), cfg_.d_in, cfg_.expert_hidden(), rng, cfg_.output_width(),
                                   RowStride{rank_, ranks_});
  }
  ShardedMoE(const ShardedMoE&) = delete;
  ShardedMoE& operator=(const ShardedMoE&) = delete;
  ShardedMoE(ShardedMoE&&) = default;
  ShardedMoE& operator=(ShardedMoE&&) = default;

  const Config& config() const { return cfg_; }
  Index d_in() const { return cfg_.d_in; }
  Index d_out() const { return cfg_.output_width(); }
  /// Experts of the whole layer (E * G, all shards).
  Index n_experts() const { return cfg_.total_experts(); }
  Index experts_per_token() const { return cfg_.total_per_token(); }
  MPI_Comm comm() const { return comm_; }
  /// Bytes this rank has sent to other ranks for the replicated part (its gradient sums and,
  /// with BatchNorm, the batch statistics) since construction; the experts' traffic is the
  /// cache's (Cache::exchange.off_rank_bytes()).
  std::uint64_t replicated_bytes() const { return reduction_->off_rank_bytes(); }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  const ExpertPartition& partition() const { return part_; }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  /// This rank's experts: its expert i is partition().global_id(rank(), i).
  FfnExperts<T, Arch>& experts() { return experts_; }
  const FfnExperts<T, Arch>& experts() const { return experts_; }
  Grads make_grads() const { return Grads{router_.make_grads(), experts_.make_grads(), {}}; }

  /// The penalty coefficient (ReLU router; ignored by TopK), in [0, kMaxLambda]. Every rank
  /// must hold the same: feed every rank's controller sparsity(cache), which is the same.
  void set_lambda(double lambda) {
    check_range(lambda, 0, kMaxLambda, "lambda");
    lambda_ = lambda;
  }
  double lambda() const { return lambda_; }

  /// Training forward over this rank's tokens (collective). y may be x itself.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) {
    run(x, y, c);
    c.pass.set(id_, detail::PassTag::training, x.rows());
  }
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    run(x, y, c);
    c.pass.set(id_, detail::PassTag::inference, x.rows());
  }

  /// From dy after forward (collective): grads accumulate (the router's summed over the ranks,
  /// with the ReLU penalty's gradient lambda dL_reg/dR of the whole batch; this rank's
  /// experts'); dx is assigned. dx may be dy itself.
  void backward(CMatRef<T> dy, MatRef<T> dx, Cache& c, Grads& g) const { backward_impl(dy, &dx, c, g); }
  void backward(CMatRef<T> dy, Cache& c, Grads& g) const { backward_impl(dy, nullptr, c, g); }

  /// The layer's extra loss of the last forward, the whole batch's: lambda * L_reg (ReLU) or
  /// aux + z (TopK). The same on every rank; not collective.
  double aux_loss(const Cache& c) const {
    c.pass.check_filled(id_, "ShardedMoE::aux_loss");
    return kRelu ? lambda_ * c.penalty : router_.aux_loss(c.router);
  }
  /// L_reg of the last forward's whole batch (ReLU; 0 for TopK).
  double penalty_value(const Cache& c) const {
    c.pass.check_filled(id_, "ShardedMoE::penalty_value");
    return kRelu ? c.penalty : 0.0;
  }
  /// Sparsity 1 - nnz / (T E) of the last forward's whole batch: what the LambdaController
  /// takes. The same on every rank; not collective.
  double sparsity(const Cache& c) const {
    c.pass.check_filled(id_, "ShardedMoE::sparsity");
    return c.sparsity;
  }

  /// prefix + "router.weight" and this shard's "experts.w1", "experts.w2" (its experts' blocks),
  /// with their gradients.
  ParameterList<T> parameters(Grads& g, const std::string& prefix = "") {
    check_grads(g);
    return list(&g, prefix);
  }
  ParameterList<T> parameters(const std::string& prefix = "") { return list(nullptr, prefix); }
  ParameterList<const T> parameters(const std::string& prefix = "") const {
    return read_only(const_cast<ShardedMoE*>(this)->list(nullptr, prefix));
  }
  void check_grads(const Grads& g) const {
    router_.check_grads(g.router, "grads");
    experts_.check_grads(g.experts, "grads");
  }

 private:
  void run(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    c.pass.invalidate();
    if (c.exchange.comm() != comm_) c.exchange.bind(comm_);
    all_or_none(comm_, kName, [&] {
      detail::check_forward_args(x, y, cfg_.d_in, d_out(), cfg_.check_finite, kName);
      c.x = x;
      router_.forward(c.x, c.router);
    });
    whole_batch_statistics(c);
    // This rank's routed pairs (gate != 0, as MoE's ExpertGroups), token by token.
    const RowMat<T>& gates = c.router.gates;
    const Index b = gates.rows(), e = gates.cols();
    c.pick_begin.assign(1, 0);
    c.pick_ids.clear();
    c.pick_gates.clear();
    for (Index t = 0; t < b; ++t) {
      for (Index ex = 0; ex < e; ++ex)
        if (gates(t, ex) != T(0)) {
          c.pick_ids.push_back(ex);
          c.pick_gates.push_back(gates(t, ex));
        }
      c.pick_begin.push_back(Index(c.pick_ids.size()));
    }
    c.exchange.plan(b, c.pick_begin.data(), c.pick_ids.data(), c.pick_gates.data(), part_);
    c.exchange.to_owners(c.x, c.received_x);
    // Owners: the received tokens' gates over the local experts, grouped per expert.
    const Index received = c.exchange.received_tokens();
    c.received_gates.setZero(received, experts_.n_experts());
    for (Index q = 0; q < c.exchange.received_requests(); ++q)
      c.received_gates(c.exchange.request_tokens()[q], c.exchange.request_rows()[q]) = c.exchange.request_gates()[q];
    c.groups.build(c.received_gates);
    c.partial.resize(received, d_out());
    experts_.forward(c.received_x, c.received_gates, c.groups, c.partial, c.experts);
    c.exchange.to_sources(c.partial, y);
    all_or_none(comm_, kName, [&] {
      if (cfg_.check_finite) detail::check_output_finite(y, kName);
    });
  }

  /// The whole batch's token count and routing statistics (see the file's comment).
  void whole_batch_statistics(Cache& c) const {
    const RowMat<T>& gates = c.router.gates;
    Vec<double> counts = routed_counts(gates);  // per expert, its tokens (gate > 0)
    reduction_->sum(counts.data(), counts.size());
    c.tokens = reduction_->sum(gates.rows());
    c.sparsity = c.tokens > 0 ? 1.0 - counts.sum() / (double(c.tokens) * double(gates.cols())) : 0.0;
    if constexpr (kRelu) {
      c.penalty_w = penalty_weights(cfg_.penalty, counts, c.tokens, double(experts_per_token()));
      double s = penalty_sum(cfg_.penalty, gates, c.penalty_w);
      reduction_->sum(&s, 1);
      c.penalty = c.tokens > 0 ? s / double(c.tokens) : 0.0;
    } else {
      router_.use_whole_batch(c.router, *reduction_);
    }
  }

  void backward_impl(CMatRef<T> dy_in, MatRef<T>* dx, Cache& c, Grads& g) const {
    std::optional<CMatRef<T>> checked;
    all_or_none(comm_, kName, [&] {
      checked.emplace(detail::checked_backward_dy(c.pass, id_, kName, dy_in, cfg_.d_in, d_out(), cfg_.check_finite, dx, c.dy_copy));
      check_grads(g);
    });
    const CMatRef<T>& dy = *checked;
    const Index b = dy.rows();
    c.exchange.to_owners(dy, c.received_dy);
    const Index received = c.exchange.received_tokens();
    c.received_dgates.resize(received, experts_.n_experts());
    c.partial_dx.setZero(received, cfg_.d_in);
    MatRef<T> pdx(c.partial_dx);
    experts_.backward(c.received_x, c.received_gates, c.groups, c.received_dy, c.received_dgates, &pdx, g.experts, c.experts);
    c.request_dgates.resize(static_cast<std::size_t>(c.exchange.received_requests()));
    for (Index q = 0; q < c.exchange.received_requests(); ++q)
      c.request_dgates[static_cast<std::size_t>(q)] = c.received_dgates(c.exchange.request_tokens()[q], c.exchange.request_rows()[q]);
    c.pick_dgates.resize(c.pick_ids.size());
    c.exchange.requests_to_sources(c.request_dgates, c.pick_dgates.data());
    c.dgates.setZero(b, n_experts());
    for (Index t = 0; t < b; ++t)
      for (Index p = c.pick_begin[t]; p < c.pick_begin[t + 1]; ++p) c.dgates(t, c.pick_ids[p]) = c.pick_dgates[p];
    if (dx) {
      c.exchange.to_sources(c.partial_dx, *dx);
    } else {
      c.dx_scratch.resize(b, cfg_.d_in);
      c.exchange.to_sources(c.partial_dx, c.dx_scratch);
    }
    if (kRelu && cfg_.penalty != Penalty::none && lambda_ > 0)
      add_penalty_gradient(cfg_.penalty, c.router.gates, c.penalty_w, lambda_, c.dgates, c.tokens);
    c.local = g.router;  // shapes; the values are cleared next
    c.local.zero();
    router_.backward(c.x, c.dgates, c.router, c.local, dx);
    c.sums.clear();
    c.sums.push_back({c.local.weight.data(), g.router.weight.data(), Index(c.local.weight.size())});
    c.sums.push_back({c.local.bias.data(), g.router.bias.data(), Index(c.local.bias.size())});
    add_rank_sums(*reduction_, c.sums, c.flat);
  }

  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out;
    out.push_back(dense_parameter<T>(prefix + "router.weight", router_.weight(), g ? &g->router.weight : nullptr));
    append_parameters(out, experts_.parameters("experts.", g ? &g->experts : nullptr), prefix);
    return stamped(std::move(out), epoch_, g ? &g->epoch : nullptr);
  }

  MPI_Comm comm_;
  int rank_ = 0, ranks_ = 1;
  Config cfg_;
  std::unique_ptr<RankOrderSum> reduction_;
  ExpertPartition part_;
  Router router_;
  FfnExperts<T, Arch> experts_;
  double lambda_ = 0.0;
  detail::LayerId id_;
  StorageEpoch epoch_;  // advanced when the storage lists point into is replaced
};

}  // namespace dist
}  // namespace spex
