#pragma once
// Expert-parallel PEER and PKM over MPI: dist::ShardedPeer and dist::ShardedPkm.
//
// Each rank holds its own tokens (data parallel) and a shard of the expert tables: expert id on
// rank id mod P, as row id / P (partition.hpp says why round robin). Retrieval (query network,
// norm, sub-keys) is replicated: every rank holds the same weights, runs it on its own tokens,
// and its gradients are summed over the ranks in rank order (collectives.hpp, RankOrderSum), so
// the replicas stay bit-identical under any optimizer. BatchNorm normalizes with the statistics
// of the whole batch (its sums over the ranks), as one process would.
//
// Per training step, with the exchange (exchange.hpp):
//   forward   retrieval on the local tokens -> requests (token, expert row, gate) to the owners
//             -> PEER: each token's x to each of its owners (one row per (token, owner)) ->
//             owners run their experts (grouped forms of the experts' kernels) -> partial rows
//             back, summed per token in rank order;
//   backward  dy to the owners -> owners: gate gradients per request back, PEER also partial
//             dx rows back; expert gradients accumulate row-sparse on the owner (never
//             exchanged) -> retrieval backward locally -> its gradients summed over the ranks.
// The optimizer then steps the shard's rows (lazy Adam rows stay on the owner) and the
// replicated retrieval, identically on every rank.
//
// Equal to one process: with the global batch split over the ranks in rank order (rank r holds
// tokens [B r / P, B (r + 1) / P), any split in rank order works), outputs, dx and gradients
// equal Peer's / Pkm's over the whole batch up to the order of floating-point sums: a token's
// output sums its owners' partial sums in rank order instead of its picks in slot order, dx
// likewise, the retrieval's gradients and BatchNorm's statistics sum per-rank partial sums
// (an expert row's gradient adds its terms in global token order, as one process does, but the
// terms themselves carry the differences). With P = 1 everything is bit-identical. Measured in
// double (tests/dist/test_sharded_layers.cpp, P = 2..4): outputs, dx and gradients within a
// few units in the last place (relative differences <= 1.3e-15), parameters after 3 Adam steps
// likewise; the test allows 1e-12.
//
// Every rank calls the same methods in the same order (they are collectives). Bad arguments on
// any rank throw spex::Error on every rank (all_or_none) before anything changes.
// Thread safety: none (collectives in a fixed order); one cache per forward/backward pair.
// Usage: examples/snippets/dist/sharded_layers.cpp (compiled and run by the test suite under mpirun).
#include <mpi.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/check.hpp"
#include "../core/layer_state.hpp"
#include "../core/parameter.hpp"
#include "../core/random.hpp"
#include "../experts/neurons.hpp"
#include "../experts/values.hpp"
#include "../layers/detail/product_key_layer.hpp"
#include "../select/key_retrieval.hpp"
#include "collectives.hpp"
#include "exchange.hpp"
#include "partition.hpp"

namespace spex {
namespace dist {

template <class T, class Arch, class Experts>
class ShardedProductKeyLayer {
  static constexpr bool kNeurons = std::is_same<Experts, NeuronExperts<T, Arch>>::value;

 public:
  using Config = ProductKeyLayerConfig;
  using Scalar = T;
  static constexpr const char* kName = kNeurons ? "ShardedPeer" : "ShardedPkm";

  struct Cache {
    RowMat<T> x;                                     // this rank's input, for backward
    typename KeyRetrieval<T, Arch>::Cache retrieval;
    ExpertExchange<T> exchange;                      // this batch's plan
    RowMat<T> received_x, partial;                   // owner side: received tokens' x, partial outputs
    std::vector<T> pre;                              // owner side: per received request (PEER)
    RowMat<T> received_dy, partial_dx, dx_scratch;
    std::vector<T> request_dgates;
    RowMat<T> dgates;                                // this rank's tokens, B x h*k
    typename Experts::Cache experts;
    typename KeyRetrieval<T, Arch>::Grads local;     // this rank's retrieval gradients, before the sum
    std::vector<RankSum<T>> sums;
    std::vector<T> flat;
    RowMat<T> dy_copy;
    detail::PassTag pass;
  };
  /// The replicated retrieval's gradients (the whole batch's, the same on every rank after
  /// backward) and the shard's row-sparse expert gradients.
  struct Grads {
    typename KeyRetrieval<T, Arch>::Grads retrieval;
    typename Experts::Grads experts;
    StorageEpoch epoch;  // parameter lists point into these (core/parameter.hpp, Lifetime)
    void zero() {
      retrieval.zero();
      experts.zero();
    }
  };

  /// The layer Peer(cfg, seed) / Pkm(cfg, seed) would be, sharded over the ranks of `comm`:
  /// the same retrieval weights on every rank, and this rank's rows of the same expert tables
  /// (drawn row by row, never held whole: 1/P of the tables' memory). Native storage only.
  /// `comm` must outlive the layer.
  ShardedProductKeyLayer(const Config& cfg, std::uint64_t seed, MPI_Comm comm)
      : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)), reduction_(std::make_unique<RankOrderSum>(comm)) {
    all_or_none(comm_, kName, [&] {
      cfg_ = detail::resolve(cfg);
      SPEX_CHECK(cfg_.n_experts >= ranks_, kName << ": " << cfg_.n_experts << " experts cannot be sharded over " << ranks_ << " ranks");
      SPEX_CHECK(cfg_.storage == TableStorage::native,
                 kName << ": storage " << to_string(cfg_.storage) << " is for inference in one process; shards are native");
    });
    check_same_on_all_ranks(comm_, kName,
                            {cfg_.n_experts, cfg_.d_in, cfg_.d_out, cfg_.heads, cfg_.top_k, cfg_.d_key, int(cfg_.norm), int(cfg_.score),
                             cfg_.learn_keys, cfg_.shared_keys, cfg_.frozen.keys, std::int64_t(seed)});
    part_ = ExpertPartition(cfg_.n_experts, ranks_);
    Rng rng(seed);  // the draws of detail::ProductKeyLayer's and Peer's / Pkm's constructors
    retrieval_ = KeyRetrieval<T, Arch>(detail::retrieval_config(cfg_), rng);
    const RowStride rows{rank_, ranks_};
    if constexpr (kNeurons)
      experts_ = Experts(cfg_.n_experts, cfg_.d_in, cfg_.d_out, cfg_.activation, rng, rows);
    else
      experts_ = Experts(cfg_.n_experts, cfg_.d_out, rng, rows);
    retrieval_.norm().set_batch_reduction(reduction_.get());
  }
  ShardedProductKeyLayer(const ShardedProductKeyLayer&) = delete;
  ShardedProductKeyLayer& operator=(const ShardedProductKeyLayer&) = delete;
  ShardedProductKeyLayer(ShardedProductKeyLayer&&) = default;
  ShardedProductKeyLayer& operator=(ShardedProductKeyLayer&&) = default;

  const Config& config() const { return cfg_; }
  Index d_in() const { return cfg_.d_in; }
  Index d_out() const { return cfg_.d_out; }
  /// Experts of the whole layer (all shards).
  Index n_experts() const { return cfg_.n_experts; }
  MPI_Comm comm() const { return comm_; }
  /// Bytes this rank has sent to other ranks for the replicated part (its gradient sums and,
  /// with BatchNorm, the batch statistics) since construction; the experts' traffic is the
  /// cache's (Cache::exchange.off_rank_bytes()).
  std::uint64_t replicated_bytes() const { return reduction_->off_rank_bytes(); }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  /// Which rank holds which expert, as which row.
  const ExpertPartition& partition() const { return part_; }
  /// This rank's experts: row i is expert partition().global_id(rank(), i).
  const Experts& experts() const { return experts_; }
  Experts& experts() { return experts_; }
  KeyRetrieval<T, Arch>& retrieval() { return retrieval_; }
  const KeyRetrieval<T, Arch>& retrieval() const { return retrieval_; }
  /// Bytes of this rank's expert tables.
  std::size_t table_bytes() const { return experts_.table_bytes(); }
  /// This shard's frozen rows: the frozen experts (config().frozen) are the ids below keys^2,
  /// which round robin places in the first rows of every shard.
  Index frozen_rows() const { return part_.local_rows_below(rank_, cfg_.frozen.keys * cfg_.frozen.keys); }

  Grads make_grads() const { return Grads{retrieval_.make_grads(), experts_.make_grads(frozen_rows()), {}}; }

  /// What Peer/Pkm::grow(n_new, seed) does to the layer (ExpertIds::shells): the same new
  /// sub-keys on every rank and, on each, its rows of the same new experts (round robin appends
  /// the new ids at the end of every shard: the old rows keep their place). Collective, with the
  /// same arguments on every rank. Gradients, parameter lists and optimizers made before must be
  /// made again.
  void grow(Index n_new, std::uint64_t seed) {
    Config grown;
    all_or_none(comm_, kName, [&] { grown = detail::grown_config(cfg_, n_new, kName); });
    check_same_on_all_ranks(comm_, kName, {n_new, std::int64_t(seed)});
    if (n_new == cfg_.n_keys) return;
    Rng rng(seed);  // ProductKeyLayer::grow's draws
    Rng key_rng = rng.split(1), table_rng = rng.split(2);
    // First, on every rank or none: it allocates the most, and changes nothing if it fails.
    all_or_none(comm_, kName, [&] { experts_.grow(cfg_.n_experts, grown.n_experts, table_rng, RowStride{rank_, ranks_}); });
    retrieval_.grow(n_new, key_rng.next_u64());
    cfg_ = grown;
    part_ = ExpertPartition(cfg_.n_experts, ranks_);
    storage_replaced();
  }
  /// What Peer/Pkm::freeze(f) does (FrozenSet): on every shard its rows of the frozen experts.
  /// Collective. Gradients and optimizers made before must be made again.
  void freeze(const FrozenSet& f) {
    Config c = cfg_;
    all_or_none(comm_, kName, [&] {
      c.frozen = f;
      c = detail::resolve(c);  // validates
    });
    check_same_on_all_ranks(comm_, kName, {c.frozen.keys, c.frozen.sub_keys, c.frozen.query});
    retrieval_.freeze(c.frozen.sub_keys ? c.frozen.keys : 0, c.frozen.query);
    cfg_ = c;
    storage_replaced();
  }

  /// Training forward over this rank's tokens (collective): y (B x d_out) from x (B x d_in).
  /// BatchNorm's running statistics are updated (the same on every rank) only once the pass
  /// has succeeded on every rank. y may be x itself.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) {
    run(x, y, c, true);
    retrieval_.commit_running_stats(c.retrieval);
    c.pass.set(id_, detail::PassTag::training, x.rows());
  }
  /// Inference forward (collective; running statistics). A cache it fills cannot be used for
  /// backward.
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    run(x, y, c, false);
    c.pass.set(id_, detail::PassTag::inference, x.rows());
  }

  /// From dy (B x d_out) after forward(x, y, c) (collective): grads accumulate (the
  /// retrieval's summed over the ranks, the shard's expert rows on this rank); dx (B x d_in)
  /// is assigned. dx may be dy itself.
  void backward(CMatRef<T> dy, MatRef<T> dx, Cache& c, Grads& g) const { backward_impl(dy, &dx, c, g); }
  void backward(CMatRef<T> dy, Cache& c, Grads& g) const { backward_impl(dy, nullptr, c, g); }

  /// The retrieval's parameters (named as in Peer / Pkm) and this shard's expert tables
  /// ("experts.down", "experts.up" or "experts.values", this rank's rows), with gradients.
  ParameterList<T> parameters(Grads& g, const std::string& prefix = "") {
    check_grads(g);
    return list(&g, prefix);
  }
  ParameterList<T> parameters(const std::string& prefix = "") { return list(nullptr, prefix); }
  ParameterList<const T> parameters(const std::string& prefix = "") const {
    return read_only(const_cast<ShardedProductKeyLayer*>(this)->list(nullptr, prefix));
  }

  /// Throws unless `g` was made by this layer (shapes and frozen set).
  void check_grads(const Grads& g) const {
    retrieval_.check_grads(g.retrieval, "grads");
    experts_.check_grads(g.experts, "grads");
    SPEX_CHECK(g.experts.frozen_rows() == frozen_rows(),
               "grads were made for " << g.experts.frozen_rows() << " frozen rows, the shard has " << frozen_rows());
  }

 private:
  /// The forward pass; changes nothing in the layer (forward() commits the norm's statistics).
  void run(CMatRef<T> x, MatRef<T> y, Cache& c, bool training) const {
    c.pass.invalidate();
    if (c.exchange.comm() != comm_) c.exchange.bind(comm_);
    all_or_none(comm_, kName, [&] {
      detail::check_forward_args(x, y, cfg_.d_in, cfg_.d_out, cfg_.check_finite, kName);
      c.x = x;
      retrieval_.project(c.x, c.retrieval);
    });
    // The norm's sums are collective, and it throws on every rank or none (it checks the sums).
    all_or_none(comm_, kName, [&] { retrieval_.forward_projected(c.retrieval, training); });
    c.exchange.plan(c.retrieval.ids, c.retrieval.gates, part_);
    const Index received = c.exchange.received_tokens();
    c.partial.resize(received, cfg_.d_out);
    if constexpr (kNeurons) {
      c.exchange.to_owners(c.x, c.received_x);
      experts_.forward_grouped(c.received_x, c.exchange.request_offsets(), c.exchange.request_rows(),
                               c.exchange.request_gates(), c.partial, c.pre);
    } else {
      experts_.forward_grouped(c.exchange.request_offsets(), c.exchange.request_rows(), c.exchange.request_gates(), c.partial);
    }
    c.exchange.to_sources(c.partial, y);
    all_or_none(comm_, kName, [&] {
      if (cfg_.check_finite) detail::check_output_finite(y, kName);
    });
  }

  void backward_impl(CMatRef<T> dy_in, MatRef<T>* dx, Cache& c, Grads& g) const {
    std::optional<CMatRef<T>> checked;
    all_or_none(comm_, kName, [&] {
      checked.emplace(detail::checked_backward_dy(c.pass, id_, kName, dy_in, cfg_.d_in, cfg_.d_out, cfg_.check_finite, dx, c.dy_copy));
      check_grads(g);
    });
    const CMatRef<T>& dy = *checked;
    const Index b = dy.rows();
    // Owners: gate gradients per request, expert gradients, PEER's partial dx.
    c.exchange.to_owners(dy, c.received_dy);
    c.request_dgates.resize(static_cast<std::size_t>(c.exchange.received_requests()));
    if constexpr (kNeurons) {
      c.partial_dx.setZero(c.exchange.received_tokens(), cfg_.d_in);
      MatRef<T> pdx(c.partial_dx);
      experts_.backward_grouped(c.received_x, c.exchange.request_offsets(), c.exchange.request_rows(),
                                c.exchange.request_tokens(), c.exchange.request_gates(), c.pre, c.received_dy,
                                c.request_dgates.data(), &pdx, g.experts, c.experts);
    } else {
      experts_.backward_grouped(c.exchange.request_offsets(), c.exchange.request_rows(), c.exchange.request_tokens(),
                                c.exchange.request_gates(), c.received_dy, c.request_dgates.data(), g.experts, c.experts);
    }
    c.dgates.resize(b, retrieval_.per_token());
    c.exchange.requests_to_sources(c.request_dgates, c.dgates);
    // dx: the owners' partial sums (PEER; every rank takes part, with or without a dx of its
    // own), or zero (PKM), then the retrieval's share.
    if constexpr (kNeurons) {
      if (dx) {
        c.exchange.to_sources(c.partial_dx, *dx);
      } else {
        c.dx_scratch.resize(b, cfg_.d_in);
        c.exchange.to_sources(c.partial_dx, c.dx_scratch);
      }
    } else if (dx) {
      dx->setZero();
    }
    c.local = g.retrieval;  // shapes and frozen set; the values are cleared next
    c.local.zero();
    retrieval_.backward(c.x, c.dgates, c.retrieval, c.local, dx);
    sum_into(c.local, g.retrieval, c);
  }

  /// g += the sum over the ranks of every rank's `local` (rank order; the same on every rank).
  void sum_into(const typename KeyRetrieval<T, Arch>::Grads& local, typename KeyRetrieval<T, Arch>::Grads& g, Cache& c) const {
    c.sums.clear();
    auto add = [&](const auto& l, auto& total) { c.sums.push_back({l.data(), total.data(), Index(l.size())}); };
    add(local.query.weight, g.query.weight);
    add(local.query.bias, g.query.bias);
    add(local.norm.weight, g.norm.weight);
    add(local.norm.bias, g.norm.bias);
    for (std::size_t i = 0; i < local.keys.size(); ++i) add(local.keys[i], g.keys[i]);
    add_rank_sums(*reduction_, c.sums, c.flat);
  }

  // grow and freeze: lists and caches taken before are stale (as ProductKeyLayer's).
  void storage_replaced() {
    epoch_.advance();
    id_ = detail::LayerId();
  }

  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out = prefixed(retrieval_.parameters(g ? &g->retrieval : nullptr), prefix);
    append_parameters(out, experts_.parameters("experts.", g ? &g->experts : nullptr), prefix);
    return stamped(std::move(out), epoch_, g ? &g->epoch : nullptr);
  }

  MPI_Comm comm_;
  int rank_ = 0, ranks_ = 1;
  Config cfg_;
  std::unique_ptr<RankOrderSum> reduction_;  // its address is the norm's: stable across moves
  ExpertPartition part_;
  KeyRetrieval<T, Arch> retrieval_;
  Experts experts_;
  detail::LayerId id_;
  StorageEpoch epoch_;  // advanced when the storage lists point into is replaced
};

/// Expert-parallel PEER (see the file's comment).
template <class T = float, class Arch = default_arch>
using ShardedPeer = ShardedProductKeyLayer<T, Arch, NeuronExperts<T, Arch>>;
/// Expert-parallel PKM (see the file's comment).
template <class T = float, class Arch = default_arch>
using ShardedPkm = ShardedProductKeyLayer<T, Arch, ValueExperts<T, Arch>>;

}  // namespace dist
}  // namespace spex
