#pragma once
// Expert parallelism over MPI as a dispatch policy (layers/dispatch.hpp):
//   Peer<T, Arch, dist::ExpertParallel>, Pkm<..., dist::ExpertParallel>, MoE<T, Router, Arch,
//   dist::ExpertParallel> (aliases dist::ShardedPeer, ShardedPkm, ShardedMoE: dist/layers.hpp).
//
// Each rank holds its own tokens (data parallel) and a shard of the expert table: expert id on
// rank id mod P, as row id / P (partition.hpp says why round robin). Everything else (the
// retrieval of PEER and PKM, MoE's router) is replicated: every rank holds the same weights, runs
// it on its own tokens, and its gradients are summed over the ranks in rank order
// (collectives.hpp, RankOrderSum), so the replicas stay bit-identical under any optimizer. What
// depends on the whole batch (BatchNorm's statistics, ReMoE's penalty and sparsity, TopK's
// balancing loss) is computed from sums over the ranks, as one process would over the whole batch.
//
// Per training step, with the exchange (exchange.hpp):
//   forward   routing on the local tokens -> requests (token, expert row, gate) to the owners ->
//             each token's x to each of its owners that read it (one row per (token, owner)) ->
//             owners run their experts (the experts' grouped kernels; MoE: FFN blocks per expert)
//             -> partial rows back, summed per token in rank order;
//   backward  dy to the owners -> gate gradients per request back, partial dx rows back;
//             expert gradients accumulate row-sparse on the owner (never exchanged) -> the
//             replicated part's backward locally -> its gradients summed over the ranks.
//
// Equal to one process: with the global batch split over the ranks in rank order, outputs, dx and
// gradients equal the one-process layer's over the whole batch up to the order of floating-point
// sums (a token's output sums its owners' partial sums in rank order; replicated gradients sum
// per-rank partial sums); with P = 1 everything is bit-identical. tests/dist measures it
// (docs/expert_parallelism.md gives the figures and the bytes model).
//
// Every rank calls the same methods in the same order (they are collectives); bad arguments on
// any rank throw spex::Error on every rank before anything changes. Thread safety: none.
#include <mpi.h>

#include <initializer_list>
#include <memory>
#include <vector>

#include "../core/check.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../experts/ffn.hpp"
#include "collectives.hpp"
#include "exchange.hpp"
#include "partition.hpp"

namespace spex {
namespace dist {

class ExpertParallel {
 public:
  static constexpr bool kSharded = true;

  /// What every sharded layer's Cache holds for the exchange: the batch's plan, the owner side's
  /// rows, and this rank's replicated gradients before their sum over the ranks.
  template <class T, class ReplicatedGrads>
  struct ExchangeState {
    ExpertExchange<T> exchange;
    RowMat<T> received_x, partial, received_dy, partial_dx, dx_scratch;
    std::vector<T> request_dgates;
    ReplicatedGrads local;
    std::vector<RankSum<T>> sums;
    std::vector<T> flat;
  };
  template <class T, class ReplicatedGrads>
  struct ProductKeyState : ExchangeState<T, ReplicatedGrads> {
    std::vector<T> pre;  // owner side: per received request (PEER)
  };
  template <class T, class ReplicatedGrads>
  struct MoEState : ExchangeState<T, ReplicatedGrads> {
    std::vector<Index> pick_begin, pick_ids;  // this rank's routed pairs, token by token
    std::vector<T> pick_gates, pick_dgates;
    RowMat<T> received_gates, received_dgates;  // owner side: received tokens x local experts
    RowMat<unsigned char> received_pairs;       // owner side: 1 where a pair was received (probes have gate 0)
    ExpertGroups groups;
  };

  /// Shards over the ranks of `comm` (which must outlive every layer built with it).
  ExpertParallel(MPI_Comm comm = MPI_COMM_WORLD)  // NOLINT: implicit, so that layers take a communicator
      : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)), reduction_(std::make_unique<RankOrderSum>(comm)) {}
  ExpertParallel(ExpertParallel&&) = default;
  ExpertParallel& operator=(ExpertParallel&&) = default;

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  /// Which rank holds which expert, as which row.
  const ExpertPartition& partition() const { return part_; }
  /// Bytes this rank has sent to other ranks for the replicated part (its gradient sums, batch
  /// statistics) since construction; the experts' traffic is the cache's exchange's.
  std::uint64_t replicated_bytes() const { return reduction_->off_rank_bytes(); }

  RowStride rows() const { return RowStride{rank_, ranks_}; }
  Index local_rows_below(Index id_end) const { return part_.local_rows_below(rank_, id_end); }
  void set_experts(Index n_experts, const char* what) {
    SPEX_CHECK(n_experts >= ranks_, what << ": " << n_experts << " experts cannot be sharded over " << ranks_ << " ranks");
    part_ = ExpertPartition(n_experts, ranks_);
  }
  template <class F>
  void collective(const char* what, F&& f) const {
    all_or_none(comm_, what, std::forward<F>(f));
  }
  void check_same(const char* what, std::initializer_list<std::int64_t> values) const {
    check_same_on_all_ranks(comm_, what, std::vector<std::int64_t>(values));
  }
  BatchReduction* batch_reduction() const { return reduction_.get(); }

  template <class State, class Grads>
  Grads& replicated_grads(State& s, const Grads& g) const {
    s.local = g;  // shapes and frozen set; the values are cleared next
    s.local.zero();
    return s.local;
  }
  /// g += the sum over the ranks of every rank's s.local (rank order; the same on every rank).
  template <class State, class Grads>
  void sum_replicated(State& s, Grads& g) const {
    s.sums.clear();
    s.local.for_each_array([&](auto* p, Index n) { s.sums.push_back({p, nullptr, n}); });
    std::size_t i = 0;
    g.for_each_array([&](auto* p, Index) { s.sums[i++].total = p; });
    add_rank_sums(*reduction_, s.sums, s.flat);
  }

  /// PEER's and PKM's experts for this rank's tokens (ids, gates: B x h*k): y (B x d_out) is
  /// assigned the sum of the owners' partial outputs. x is read by experts that read the input.
  template <class Experts, class T, class G>
  void product_key_forward(const Experts& experts, CMatRef<T> x, CIndexMatRef ids, CMatRef<T> gates, ProductKeyState<T, G>& s,
                           MatRef<T> y) const {
    bind(s.exchange);
    s.exchange.plan(ids, gates, part_);
    s.partial.resize(s.exchange.received_tokens(), y.cols());
    if constexpr (Experts::kReadsInput) {
      s.exchange.to_owners(x, s.received_x);
      experts.forward_grouped(s.received_x, s.exchange.request_offsets(), s.exchange.request_rows(), s.exchange.request_gates(),
                              s.partial, s.pre);
    } else {
      experts.forward_grouped(s.exchange.request_offsets(), s.exchange.request_rows(), s.exchange.request_gates(), s.partial);
    }
    s.exchange.to_sources(s.partial, y);
  }
  /// Its backward: dgates (B x h*k) assigned; the shard's expert gradients accumulate; *dx is
  /// assigned the owners' input gradients (zero for experts that do not read the input).
  template <class Experts, class T, class G>
  void product_key_backward(const Experts& experts, CMatRef<T> dy, ProductKeyState<T, G>& s, MatRef<T> dgates, MatRef<T>* dx,
                            typename Experts::Grads& g, typename Experts::Cache& ec) const {
    const ExpertExchange<T>& ex = s.exchange;
    s.exchange.to_owners(dy, s.received_dy);
    s.request_dgates.resize(static_cast<std::size_t>(ex.received_requests()));
    if constexpr (Experts::kReadsInput) {
      s.partial_dx.setZero(ex.received_tokens(), experts.d_in());
      MatRef<T> pdx(s.partial_dx);
      experts.backward_grouped(s.received_x, ex.request_offsets(), ex.request_rows(), ex.request_tokens(), ex.request_gates(), s.pre,
                               s.received_dy, s.request_dgates.data(), &pdx, g, ec);
    } else {
      experts.backward_grouped(ex.request_offsets(), ex.request_rows(), ex.request_tokens(), ex.request_gates(), s.received_dy,
                               s.request_dgates.data(), g, ec);
    }
    s.exchange.requests_to_sources(s.request_dgates, dgates);
    if constexpr (Experts::kReadsInput) {
      partial_dx_to_sources(s, dx, dy.rows());  // every rank takes part, with or without a dx of its own
    } else if (dx) {
      dx->setZero();
    }
  }

  /// MoE's experts for this rank's tokens: the routed pairs (gate != 0) and the probes (per
  /// token an expert run with gate 0, or -1; empty: none) go to the experts' owners, which run
  /// them as FFN blocks per expert; y (B x d_out) is assigned.
  template <class T, class Arch, class G>
  void moe_forward(const FfnExperts<T, Arch>& experts, CMatRef<T> x, const RowMat<T>& gates, const std::vector<Index>& probes,
                   MoEState<T, G>& s, MatRef<T> y, typename FfnExperts<T, Arch>::Cache& ec) const {
    bind(s.exchange);
    const Index b = gates.rows(), e = gates.cols();
    s.pick_begin.assign(1, 0);
    s.pick_ids.clear();
    s.pick_gates.clear();
    for (Index t = 0; t < b; ++t) {
      const Index probe = probes.empty() ? -1 : probes[static_cast<std::size_t>(t)];
      for (Index ex = 0; ex < e; ++ex)
        if (gates(t, ex) != T(0) || ex == probe) {
          s.pick_ids.push_back(ex);
          s.pick_gates.push_back(gates(t, ex));
        }
      s.pick_begin.push_back(Index(s.pick_ids.size()));
    }
    s.exchange.plan(b, s.pick_begin.data(), s.pick_ids.data(), s.pick_gates.data(), part_);
    s.exchange.to_owners(x, s.received_x);
    // Owners: the received tokens' gates over the local experts, grouped per expert.
    const Index received = s.exchange.received_tokens();
    s.received_gates.setZero(received, experts.n_experts());
    s.received_pairs.setZero(received, experts.n_experts());
    for (Index q = 0; q < s.exchange.received_requests(); ++q) {
      s.received_gates(s.exchange.request_tokens()[q], s.exchange.request_rows()[q]) = s.exchange.request_gates()[q];
      s.received_pairs(s.exchange.request_tokens()[q], s.exchange.request_rows()[q]) = 1;
    }
    s.groups.build(s.received_pairs, s.received_gates);
    s.partial.resize(received, y.cols());
    experts.forward(s.received_x, s.received_gates, s.groups, s.partial, ec);
    s.exchange.to_sources(s.partial, y);
  }
  /// Its backward: dgates (B x E, this rank's tokens over all experts) and *dx assigned; the
  /// shard's expert gradients accumulate.
  template <class T, class Arch, class G>
  void moe_backward(const FfnExperts<T, Arch>& experts, CMatRef<T> dy, MoEState<T, G>& s, RowMat<T>& dgates, MatRef<T>* dx,
                    typename FfnExperts<T, Arch>::Grads& g, typename FfnExperts<T, Arch>::Cache& ec) const {
    const Index b = dy.rows();
    const ExpertExchange<T>& ex = s.exchange;
    s.exchange.to_owners(dy, s.received_dy);
    const Index received = ex.received_tokens();
    s.received_dgates.resize(received, experts.n_experts());
    s.partial_dx.setZero(received, experts.d_in());
    MatRef<T> pdx(s.partial_dx);
    experts.backward(s.received_x, s.received_gates, s.groups, s.received_dy, s.received_dgates, &pdx, g, ec);
    s.request_dgates.resize(static_cast<std::size_t>(ex.received_requests()));
    for (Index q = 0; q < ex.received_requests(); ++q)
      s.request_dgates[static_cast<std::size_t>(q)] = s.received_dgates(ex.request_tokens()[q], ex.request_rows()[q]);
    s.pick_dgates.resize(s.pick_ids.size());
    s.exchange.requests_to_sources(s.request_dgates, s.pick_dgates.data());
    dgates.setZero(b, part_.n_experts());
    for (Index t = 0; t < b; ++t)
      for (Index p = s.pick_begin[t]; p < s.pick_begin[t + 1]; ++p) dgates(t, s.pick_ids[p]) = s.pick_dgates[p];
    partial_dx_to_sources(s, dx, b);
  }

 private:
  template <class T>
  void bind(ExpertExchange<T>& exchange) const {
    if (exchange.comm() != comm_) exchange.bind(comm_);
  }
  template <class State, class T>
  void partial_dx_to_sources(State& s, MatRef<T>* dx, Index b) const {
    if (dx) {
      s.exchange.to_sources(s.partial_dx, *dx);
    } else {
      s.dx_scratch.resize(b, s.partial_dx.cols());
      s.exchange.to_sources(s.partial_dx, s.dx_scratch);
    }
  }

  MPI_Comm comm_;
  int rank_ = 0, ranks_ = 1;
  std::unique_ptr<RankOrderSum> reduction_;  // its address is the norm's and routers': stable across moves
  ExpertPartition part_;
};

}  // namespace dist
}  // namespace spex
