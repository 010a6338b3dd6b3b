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
      : Base(own_values(cfg), seed, std::move(dispatch)) {}

  /// A layer whose values are `pool` (Memory+'s values shared by several memory layers; each
  /// layer its own query network, keys and output head): the pool must hold table_rows(cfg)
  /// slots of d_value (d_out when 0). config().shared_values is set. The layer's gradients add to
  /// the pool's one gradient, its parameters() leave the table out (list pool->parameters() once
  /// beside them), and a copy of the layer reads the same pool. Sharded (dist::ShardedPkm), the
  /// pool must be sharded over the same communicator (dist::sharded_value_pool). No growth,
  /// freezing of experts or compact storage.
  Pkm(const ProductKeyLayerConfig& cfg, std::shared_ptr<ValuePool<T>> pool, std::uint64_t seed = 0, Dispatch dispatch = Dispatch())
      : Base(shared_values(cfg), seed, std::move(dispatch),
             [&](const ProductKeyLayerConfig& c, RowStride rows) { return pooled_experts(c, pool, rows); }) {}

 private:
  Pkm(const ProductKeyLayerConfig& cfg, detail::Unfilled unfilled) : Base(own_values(cfg), unfilled) {}

  static ProductKeyLayerConfig own_values(const ProductKeyLayerConfig& cfg) {
    SPEX_CHECK(!cfg.shared_values, "Pkm: shared_values = true: the layer reads a ValuePool shared with other layers; build it with "
                                   "Pkm(cfg, pool, seed) (load its file with SafetensorsLoader::layer into that layer, and the pool with "
                                   "SafetensorsLoader::parameters(pool->parameters(), prefix))");
    return cfg;
  }
  static ProductKeyLayerConfig shared_values(ProductKeyLayerConfig cfg) {
    SPEX_CHECK(cfg.storage == TableStorage::native, "Pkm: a layer reading a value pool stores nothing compact (storage = native)");
    cfg.shared_values = true;
    return cfg;
  }
  static Experts pooled_experts(const ProductKeyLayerConfig& c, const std::shared_ptr<ValuePool<T>>& pool, RowStride rows) {
    SPEX_CHECK(pool != nullptr, "Pkm: the value pool is null");
    SPEX_CHECK(pool->n_slots() == detail::table_rows(c) && pool->d_value() == c.d_value,
               "Pkm: the value pool is " << pool->n_slots() << " x " << pool->d_value() << ", the layer needs " << detail::table_rows(c)
                                         << " x " << c.d_value << " (n_experts" << (c.per_head_tables ? " * heads" : "") << " x d_value)");
    const RowStride held = pool->rows();
    SPEX_CHECK(held.first == rows.first && held.step == rows.step,
               "Pkm: the value pool holds the slots first + i * step for (first, step) = (" << held.first << ", " << held.step
               << "), this layer's shard is (" << rows.first << ", " << rows.step << ")"
               << (rows.step > 1 ? ": build the pool with dist::sharded_value_pool over the layer's communicator"
                                 : ": a layer in one process reads a whole pool"));
    return Experts(pool);
  }

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
