#pragma once
// Product-key memory (Lample et al. 2019): the same retrieval as PEER, with value-only experts:
// m(x) = sum over heads and picks of g_j v_j. Shares KeyRetrieval and the layer skeleton
// with Peer; only the experts differ.
#include "../experts/values.hpp"
#include "detail/product_key_layer.hpp"

namespace spex {

/// PKM layer (the `activation` field of the config is unused). Usage:
/// examples/snippets/peer.cpp (compiled and run by the test suite).
template <class T = float, class Arch = default_arch>
class Pkm : public detail::ProductKeyLayer<T, Arch, Pkm<T, Arch>, ValueExperts<T, Arch>> {
  using Base = detail::ProductKeyLayer<T, Arch, Pkm<T, Arch>, ValueExperts<T, Arch>>;
  friend Base;
  friend struct detail::LayerFactory;

 public:
  using typename Base::Cache;
  using typename Base::Config;
  using typename Base::Grads;
  static constexpr const char* kName = "Pkm";

  explicit Pkm(const Config& cfg, std::uint64_t seed = 0) : Pkm(cfg, Rng(seed)) {}

 private:
  Pkm(const Config& cfg, detail::Unfilled, Rng rng = Rng(0)) : Base(cfg, rng) {
    this->experts_ = ValueExperts<T, Arch>(this->cfg_.n_experts, this->cfg_.d_out, this->cfg_.storage);
  }
  Pkm(const Config& cfg, Rng rng) : Base(cfg, rng) {
    this->experts_ = ValueExperts<T, Arch>(this->cfg_.n_experts, this->cfg_.d_out, rng, this->cfg_.storage);
  }

  void experts_forward(CMatRef<T>, Cache& c, MatRef<T> y) const {
    this->experts_.forward(c.retrieval.ids, c.retrieval.gates, y);
  }
  void experts_backward(CMatRef<T> dy, Cache& c, MatRef<T>*, Grads& g) const {
    this->experts_.backward(c.retrieval.ids, c.retrieval.gates, dy, c.dgates, g.experts, c.experts);
  }
};

}  // namespace spex
