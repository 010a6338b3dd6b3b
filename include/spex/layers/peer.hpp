#pragma once
// PEER (He 2024, "Mixture of A Million Experts"): h heads of exact product-key retrieval pick
// h * k of N = n^2 single-neuron experts per token from one shared pool, and the layer
// returns f(x) = sum over heads and picks of g_j act(u_j . x) v_j. Use it in place of a
// feed-forward block. The math: docs/peer.md.
#include "../experts/neurons.hpp"
#include "detail/product_key_layer.hpp"

namespace spex {

/// PEER layer. Usage: examples/snippets/peer.cpp (compiled and run by the test suite); the
/// vocabulary it shares with Pkm and MoE: layers/layer_concept.hpp; Dispatch: layers/dispatch.hpp.
template <class T = float, class Arch = default_arch, class Dispatch = Local>
class Peer : public detail::ProductKeyLayer<T, Arch, Peer<T, Arch, Dispatch>, NeuronExperts<T, Arch>, Dispatch> {
  using Base = detail::ProductKeyLayer<T, Arch, Peer<T, Arch, Dispatch>, NeuronExperts<T, Arch>, Dispatch>;
  using Experts = NeuronExperts<T, Arch>;
  friend Base;
  friend struct detail::LayerFactory;

 public:
  static constexpr const char* kName = Dispatch::kSharded ? "ShardedPeer" : "Peer";

  /// Drawn from `seed`; with a sharded Dispatch (dist::ExpertParallel, or an MPI communicator it
  /// is made from), this rank's shard of the layer Peer(cfg, seed) would be: the same replicated
  /// weights on every rank and its rows of the same expert tables (never the whole tables).
  explicit Peer(const ProductKeyLayerConfig& cfg, std::uint64_t seed = 0, Dispatch dispatch = Dispatch())
      : Base(cfg, seed, std::move(dispatch)) {}

 private:
  Peer(const ProductKeyLayerConfig& cfg, detail::Unfilled unfilled) : Base(cfg, unfilled) {}

  static void check_config(const ProductKeyLayerConfig& c) {
    SPEX_CHECK(!c.shared_values, "Peer: shared_values = true is for Pkm's value tables (a ValuePool); set it false");
  }
  static Experts draw_experts(const ProductKeyLayerConfig& c, Rng& rng, RowStride rows) {
    const Index n = detail::table_rows(c);
    if (c.storage != TableStorage::native) return Experts(n, c.d_in, c.d_value, c.activation, c.glu, rng, c.storage);
    return Experts(n, c.d_in, c.d_value, c.activation, c.glu, rng, rows);
  }
  static Experts unfilled_experts(const ProductKeyLayerConfig& c) {
    return Experts(detail::table_rows(c), c.d_in, c.d_value, c.activation, c.glu, c.storage);
  }

  void experts_forward(CMatRef<T> x, typename Base::Cache& c, MatRef<T> y) const {
    this->experts_.forward(x, this->expert_rows(c), c.retrieval.gates, y, c.pre);
  }
  void experts_backward(CMatRef<T> dy, typename Base::Cache& c, MatRef<T>* dx, typename Base::Grads& g) const {
    this->experts_.backward(c.x, this->expert_rows(c), c.retrieval.gates, c.pre, dy, c.dgates, dx, g.experts, c.experts);
  }
};

}  // namespace spex
