#pragma once
// Product-key memory (Lample et al. 2019): the same retrieval as PEER, with value-only experts:
// m(x) = sum over heads and picks of g_j v_j. Shares KeyRetrieval and the layer skeleton
// with Peer; only the experts differ.
#include "../experts/values.hpp"
#include "detail/product_key_layer.hpp"

namespace spex {

/// PKM layer (the `activation` field of the config is unused). Usage:
/// examples/snippets/peer.cpp (compiled and run by the test suite).
template <class T = float, class Arch = default_arch, class Dispatch = Local>
class Pkm : public detail::ProductKeyLayer<T, Arch, Pkm<T, Arch, Dispatch>, ValueExperts<T, Arch>, Dispatch> {
  using Base = detail::ProductKeyLayer<T, Arch, Pkm<T, Arch, Dispatch>, ValueExperts<T, Arch>, Dispatch>;
  friend Base;
  friend struct detail::LayerFactory;

 public:
  using typename Base::Cache;
  using typename Base::Config;
  using typename Base::Grads;
  static constexpr const char* kName = Dispatch::kSharded ? "ShardedPkm" : "Pkm";

  /// Drawn from `seed`; with a sharded Dispatch (dist::ExpertParallel, or an MPI communicator it
  /// is made from), this rank's shard of the layer Pkm(cfg, seed) would be: the same replicated
  /// weights on every rank and its rows of the same expert tables (never the whole tables).
  explicit Pkm(const Config& cfg, std::uint64_t seed = 0, Dispatch dispatch = Dispatch())
      : Pkm(cfg, Rng(seed), seed, std::move(dispatch)) {}

 private:
  // Tables allocated, not filled (loaders, io/layers.hpp).
  Pkm(const Config& cfg, detail::Unfilled, Rng rng = Rng(0)) : Base(cfg, rng, 0, Dispatch()) {
    static_assert(!Dispatch::kSharded, "sharded layers load through dist::ShardedCheckpointLoader");
    this->experts_ = ValueExperts<T, Arch>(this->cfg_.n_experts, this->cfg_.d_out, this->cfg_.storage);
  }
  Pkm(const Config& cfg, Rng rng, std::uint64_t seed, Dispatch dispatch) : Base(cfg, rng, seed, std::move(dispatch)) {
    const Config& c = this->cfg_;
    if (c.storage == TableStorage::native)
      this->experts_ = ValueExperts<T, Arch>(c.n_experts, c.d_out, rng, this->dispatch_.rows());
    else
      this->experts_ = ValueExperts<T, Arch>(c.n_experts, c.d_out, rng, c.storage);
  }

  void experts_forward(CMatRef<T>, Cache& c, MatRef<T> y) const {
    this->experts_.forward(c.retrieval.ids, c.retrieval.gates, y);
  }
  void experts_backward(CMatRef<T> dy, Cache& c, MatRef<T>*, Grads& g) const {
    this->experts_.backward(c.retrieval.ids, c.retrieval.gates, dy, c.dgates, g.experts, c.experts);
  }
};

}  // namespace spex
