#pragma once
// PEER (He 2024, "Mixture of A Million Experts"): h heads of exact product-key retrieval pick
// h * k of N = n^2 single-neuron experts per token from one shared pool, and the layer
// returns f(x) = sum over heads and picks of g_j act(u_j . x) v_j. Use it in place of a
// feed-forward block.
#include "../experts/neurons.hpp"
#include "detail/product_key_layer.hpp"

namespace spex {

/// PEER layer. Usage: examples/snippets/peer.cpp (compiled and run by the test suite); the
/// vocabulary it shares with Pkm and MoE: layers/layer_concept.hpp.
template <class T = float, class Arch = default_arch, class Dispatch = Local>
class Peer : public detail::ProductKeyLayer<T, Arch, Peer<T, Arch, Dispatch>, NeuronExperts<T, Arch>, Dispatch> {
  using Base = detail::ProductKeyLayer<T, Arch, Peer<T, Arch, Dispatch>, NeuronExperts<T, Arch>, Dispatch>;
  friend Base;
  friend struct detail::LayerFactory;

 public:
  using typename Base::Cache;
  using typename Base::Config;
  using typename Base::Grads;
  static constexpr const char* kName = Dispatch::kSharded ? "ShardedPeer" : "Peer";

  /// Drawn from `seed`; with a sharded Dispatch (dist::ExpertParallel, or an MPI communicator it
  /// is made from), this rank's shard of the layer Peer(cfg, seed) would be: the same replicated
  /// weights on every rank and its rows of the same expert tables (never the whole tables).
  explicit Peer(const Config& cfg, std::uint64_t seed = 0, Dispatch dispatch = Dispatch())
      : Peer(cfg, Rng(seed), seed, std::move(dispatch)) {}

 private:
  // Tables allocated, not filled (loaders, io/layers.hpp).
  Peer(const Config& cfg, detail::Unfilled, Rng rng = Rng(0)) : Base(cfg, rng, 0, Dispatch()) {
    static_assert(!Dispatch::kSharded, "sharded layers load through dist::ShardedCheckpointLoader");
    this->experts_ = NeuronExperts<T, Arch>(this->cfg_.n_experts, this->cfg_.d_in, this->cfg_.d_out, this->cfg_.activation, this->cfg_.storage);
  }
  Peer(const Config& cfg, Rng rng, std::uint64_t seed, Dispatch dispatch) : Base(cfg, rng, seed, std::move(dispatch)) {
    const Config& c = this->cfg_;
    if (c.storage == TableStorage::native)
      this->experts_ = NeuronExperts<T, Arch>(c.n_experts, c.d_in, c.d_out, c.activation, rng, this->dispatch_.rows());
    else
      this->experts_ = NeuronExperts<T, Arch>(c.n_experts, c.d_in, c.d_out, c.activation, rng, c.storage);
  }

  void experts_forward(CMatRef<T> x, Cache& c, MatRef<T> y) const {
    this->experts_.forward(x, c.retrieval.ids, c.retrieval.gates, y, c.pre);
  }
  void experts_backward(CMatRef<T> dy, Cache& c, MatRef<T>* dx, Grads& g) const {
    this->experts_.backward(c.x, c.retrieval.ids, c.retrieval.gates, c.pre, dy, c.dgates, dx, g.experts, c.experts);
  }
};

}  // namespace spex
