#pragma once
// ReMoE's router (Wang et al., ICLR 2025, Eq. 5): R = ReLU(x W^T), no bias, no softmax, no
// top-k. A token uses every expert whose output is > 0 (0..E of them), so routing is dropless
// and fully differentiable away from R = 0; the sparsity penalty (select/sparsity.hpp,
// applied by the layer) holds the average at the target.
#include <algorithm>
#include <vector>

#include "../core/check.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../nn/linear.hpp"
#include "router_config.hpp"

namespace spex {

/// Thread safety: const methods; one cache per concurrent caller.
template <class T = float, class Arch = default_arch>
class ReluRouter {
 public:
  static constexpr bool kRelu = true;
  static constexpr const char* kName = "relu";
  struct Cache {
    RowMat<T> logits, gates;  // B x E
    RowMat<T> dlogits;        // backward scratch
  };
  using Grads = typename Linear<T>::Grads;

  ReluRouter() = default;
  ReluRouter(const RouterConfig& cfg, Rng& rng) : linear_(validate(cfg).d_in, cfg.n_experts, false, rng) {
    check_relu_router_options(cfg);
    Rng r = rng.split(31);
    fill_normal(linear_.weight(), cfg.init_std, r);
  }

  Index n_experts() const { return linear_.out_features(); }
  RowMat<T>& weight() { return linear_.weight(); }
  const RowMat<T>& weight() const { return linear_.weight(); }
  Grads make_grads() const { return linear_.make_grads(); }
  void check_grads(const Grads& g, const char* what) const { linear_.check_grads(g, what); }

  /// gates = ReLU(x W^T), B x E.
  void forward(CMatRef<T> x, Cache& c) const {
    c.logits.resize(x.rows(), n_experts());
    linear_.forward(x, c.logits);
    check_router_logits(c.logits);
    c.gates = c.logits.cwiseMax(T(0));
  }

  /// dlogits = dgates on entries with logit > 0 (ReLU'(0) = 0); grads accumulate; *dx += the
  /// input gradient when given (a component: the layer assigns dx, each path adds its share).
  /// `probes` (per token an expert or -1; MoE's revival of tokens with no active expert): the
  /// probed logit also gets min(dgates, 0), the part of dL/dR that would switch the expert on,
  /// a straight-through signal where ReLU's own derivative is 0.
  void backward(CMatRef<T> x, CMatRef<T> dgates, Cache& c, Grads& g, MatRef<T>* dx,
                const std::vector<Index>* probes = nullptr) const {
    check_shape(dgates, x.rows(), n_experts(), "dgates");
    c.dlogits = (c.logits.array() > T(0)).select(dgates, T(0));
    if (probes && !probes->empty()) {
      SPEX_CHECK(Index(probes->size()) == x.rows(), "probes has " << probes->size() << " entries for " << x.rows() << " tokens");
      for (Index t = 0; t < x.rows(); ++t) {
        const Index e = (*probes)[static_cast<std::size_t>(t)];
        if (e >= 0) c.dlogits(t, e) = std::min(dgates(t, e), T(0));
      }
    }
    linear_.backward_accumulate(x, c.dlogits, dx, g);
  }

  /// No loss of its own: the sparsity penalty is the layer's.
  double aux_loss(const Cache&) const { return 0.0; }

 private:
  Linear<T> linear_;
};

}  // namespace spex
