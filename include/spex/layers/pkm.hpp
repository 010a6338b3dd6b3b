#pragma once
// Product-key memory (Lample et al. 2019): the same retrieval as PEER, with value-only experts:
// m(x) = sum over heads and picks of g_j v_j. Shares KeyRetrieval and the layer skeleton
// with Peer; only the experts differ. The math: docs/pkm.md.
#include "../experts/values.hpp"
#include "detail/product_key_layer.hpp"

namespace spex {

/// PKM layer (the `activation` field of the config is unused; `glu` must be false: its experts
/// are values, not neurons). Usage:
/// examples/snippets/peer.cpp (compiled and run by the test suite).
template <class T = float, class Arch = default_arch, class Dispatch = Local>
class Pkm : public detail::ProductKeyLayer<T, Arch, Pkm<T, Arch, Dispatch>, ValueExperts<T, Arch>, Dispatch> {
  using Base = detail::ProductKeyLayer<T, Arch, Pkm<T, Arch, Dispatch>, ValueExperts<T, Arch>, Dispatch>;
  using Experts = ValueExperts<T, Arch>;
  friend Base;
  friend struct detail::LayerFactory;

 public:
  static constexpr const char* kName = Dispatch::kSharded ? "ShardedPkm" : "Pkm";

  /// Drawn from `seed`; sharded as Peer's constructor says.
  explicit Pkm(const ProductKeyLayerConfig& cfg, std::uint64_t seed = 0, Dispatch dispatch = Dispatch())
      : Base(cfg, seed, std::move(dispatch)) {}

 private:
  Pkm(const ProductKeyLayerConfig& cfg, detail::Unfilled unfilled) : Base(cfg, unfilled) {}

  static void check_config(const ProductKeyLayerConfig& c) {
    SPEX_CHECK(!c.glu, "Pkm: glu = true is for Peer's neuron experts (act(u . x) (w . x) v); Pkm's experts are values: set glu = false");
  }
  static Experts draw_experts(const ProductKeyLayerConfig& c, Rng& rng, RowStride rows) {
    const Index n = detail::table_rows(c);
    return c.storage == TableStorage::native ? Experts(n, c.d_value, rng, rows) : Experts(n, c.d_value, rng, c.storage);
  }
  static Experts unfilled_experts(const ProductKeyLayerConfig& c) { return Experts(detail::table_rows(c), c.d_value, c.storage); }

  void experts_forward(CMatRef<T>, typename Base::Cache& c, MatRef<T> y) const {
    this->experts_.forward(this->expert_rows(c), c.retrieval.gates, y);
  }
  void experts_backward(CMatRef<T> dy, typename Base::Cache& c, MatRef<T>*, typename Base::Grads& g) const {
    this->experts_.backward(this->expert_rows(c), c.retrieval.gates, dy, c.dgates, g.experts, c.experts);
  }
};

}  // namespace spex
