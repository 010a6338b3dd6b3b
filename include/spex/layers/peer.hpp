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
template <class T = float, class Arch = default_arch>
class Peer : public detail::ProductKeyLayer<T, Arch, Peer<T, Arch>, NeuronExperts<T, Arch>> {
  using Base = detail::ProductKeyLayer<T, Arch, Peer<T, Arch>, NeuronExperts<T, Arch>>;
  friend Base;
  friend struct detail::LayerFactory;

 public:
  using typename Base::Cache;
  using typename Base::Config;
  using typename Base::Grads;
  static constexpr const char* kName = "Peer";

  explicit Peer(const Config& cfg, std::uint64_t seed = 0) : Peer(cfg, Rng(seed)) {}

 private:
  Peer(const Config& cfg, detail::Unfilled, Rng rng = Rng(0)) : Base(cfg, rng) {
    this->experts_ = NeuronExperts<T, Arch>(this->cfg_.n_experts, this->cfg_.d_in, this->cfg_.d_out, this->cfg_.activation, this->cfg_.storage);
  }
  Peer(const Config& cfg, Rng rng) : Base(cfg, rng) {
    this->experts_ = NeuronExperts<T, Arch>(this->cfg_.n_experts, this->cfg_.d_in, this->cfg_.d_out,
                                            this->cfg_.activation, rng, this->cfg_.storage);
  }

  void experts_forward(CMatRef<T> x, Cache& c, MatRef<T> y) const {
    this->experts_.forward(x, c.retrieval.ids, c.retrieval.gates, y, c.pre);
  }
  void experts_backward(CMatRef<T> dy, Cache& c, MatRef<T>* dx, Grads& g) const {
    this->experts_.backward(c.x, c.retrieval.ids, c.retrieval.gates, c.pre, dy, c.dgates, dx, g.experts, c.experts);
  }
};

}  // namespace spex
