#pragma once
// What PEER and PKM share: the configuration (everything about retrieval, plus the expert
// activation PEER uses), its validation, and the forward/backward skeleton around
// KeyRetrieval. The layers differ only in their experts (experts/neurons.hpp vs
// experts/values.hpp), plugged in through Layer::experts_forward / experts_backward.
#include <cmath>
#include <string>

#include "../../core/check.hpp"
#include "../../core/parameter.hpp"
#include "../../core/types.hpp"
#include "../../kernels/activation.hpp"
#include "../../select/key_retrieval.hpp"

namespace spex {

/// Configuration of a product-key layer (PEER, PKM). Give n_keys (n, N = n^2) or n_experts
/// (N, a perfect square). Defaults are the PEER paper's: h = 8, k = 16, query BatchNorm,
/// softmax over each head's k scores, sub-keys shared by all heads.
struct ProductKeyLayerConfig {
  Index d_in = 0;
  Index d_out = 0;                   ///< 0: same as d_in
  Index n_keys = 0;                  ///< n; or
  Index n_experts = 0;               ///< N = n^2
  Index heads = 8;
  Index top_k = 16;
  Index d_key = 128;                 ///< query dimension per head (even)
  kernels::Activation activation = kernels::Activation::gelu_erf;  ///< PEER only
  ScoreFn score = ScoreFn::softmax;
  NormKind norm = NormKind::batch;
  bool shared_keys = true;
  bool query_bias = false;
  bool check_finite = true;          ///< throw on NaN/Inf in x and dy (one pass over each)
  double norm_eps = 1e-5, norm_momentum = 0.1;
};

namespace detail {

inline Index resolve_n_keys(const ProductKeyLayerConfig& c) {
  if (c.n_keys > 0) {
    SPEX_CHECK(c.n_experts == 0 || c.n_experts == c.n_keys * c.n_keys,
               "n_experts = " << c.n_experts << " does not match n_keys = " << c.n_keys << " (N = n^2)");
    return c.n_keys;
  }
  SPEX_CHECK(c.n_experts >= 1, "give n_keys (n) or n_experts (N = n^2); got n_keys = " << c.n_keys
                                                                                       << ", n_experts = " << c.n_experts);
  Index n = static_cast<Index>(std::llround(std::sqrt(static_cast<double>(c.n_experts))));
  while (n * n > c.n_experts) --n;
  while ((n + 1) * (n + 1) <= c.n_experts) ++n;
  SPEX_CHECK(n * n == c.n_experts, "n_experts = " << c.n_experts << " is not a perfect square (N = n^2 for product keys)");
  return n;
}

inline ProductKeyLayerConfig resolve(ProductKeyLayerConfig c) {
  SPEX_CHECK(c.d_in >= 1, "d_in = " << c.d_in << " must be >= 1");
  SPEX_CHECK(c.d_out >= 0, "d_out = " << c.d_out << " must be >= 0 (0: same as d_in)");
  c.n_keys = resolve_n_keys(c);
  c.n_experts = c.n_keys * c.n_keys;
  if (c.d_out == 0) c.d_out = c.d_in;
  return c;
}

inline KeyRetrievalConfig retrieval_config(const ProductKeyLayerConfig& c) {
  KeyRetrievalConfig r;
  r.d_in = c.d_in;
  r.n_keys = c.n_keys;
  r.heads = c.heads;
  r.top_k = c.top_k;
  r.d_key = c.d_key;
  r.score = c.score;
  r.norm = c.norm;
  r.shared_keys = c.shared_keys;
  r.query_bias = c.query_bias;
  r.norm_eps = c.norm_eps;
  r.norm_momentum = c.norm_momentum;
  return r;
}

/// The layer skeleton. Layer provides: Experts type, experts_, experts_forward(x, c, y) and
/// experts_backward(dy, c, dx, g), expert_parameters(list, g).
template <class T, class Arch, class Layer, class Experts>
class ProductKeyLayer {
 public:
  using Config = ProductKeyLayerConfig;

  struct Cache {
    RowMat<T> x;                                   // the input, for backward
    typename KeyRetrieval<T, Arch>::Cache retrieval;
    typename Experts::Cache experts;
    RowMat<T> pre;                                 // expert pre-activations (PEER)
    RowMat<T> dgates;
  };
  struct Grads {
    typename KeyRetrieval<T, Arch>::Grads retrieval;
    typename Experts::Grads experts;
    /// Clears every gradient (call once per optimizer step; backward accumulates).
    void zero() {
      retrieval.zero();
      experts.zero();
    }
  };

  const Config& config() const { return cfg_; }
  Index n_experts() const { return cfg_.n_experts; }
  Index d_in() const { return cfg_.d_in; }
  Index d_out() const { return cfg_.d_out; }
  KeyRetrieval<T, Arch>& retrieval() { return retrieval_; }
  const KeyRetrieval<T, Arch>& retrieval() const { return retrieval_; }
  Experts& experts() { return experts_; }
  const Experts& experts() const { return experts_; }

  Grads make_grads() const { return Grads{retrieval_.make_grads(), experts_.make_grads()}; }

  /// Training forward: y (B x d_out) from x (B x d_in); fills `cache` (reused across calls:
  /// no allocation once it has seen the largest batch) and updates BatchNorm's running
  /// statistics. Not const for that reason.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) {
    check_input(x, y);
    c.x = x;
    retrieval_.forward(x, c.retrieval);
    self().experts_forward(x, c, y);
  }

  /// Inference forward with eval-mode norm; thread-safe with one cache per thread.
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    check_input(x, y);
    retrieval_.infer(x, c.retrieval);
    self().experts_forward(x, c, y);
  }

  /// Inference forward with a cache of its own (allocates on every call).
  void infer(CMatRef<T> x, MatRef<T> y) const {
    Cache c;
    infer(x, y, c);
  }

  /// From dy (B x d_out) after forward(x, y, c): grads accumulate (dense for the query
  /// network, norm and sub-keys; row-sparse for the expert tables, only rows retrieved in
  /// this batch); *dx (B x d_in) is assigned when dx is given.
  void backward(CMatRef<T> dy, Cache& c, MatRef<T>* dx, Grads& g) const {
    SPEX_CHECK(c.x.rows() == dy.rows() && c.retrieval.ids.rows() == dy.rows(),
               "dy has " << dy.rows() << " rows but the cache holds a forward pass of " << c.x.rows() << " tokens");
    SPEX_CHECK(dy.cols() == cfg_.d_out, "dy has " << dy.cols() << " columns, expected d_out = " << cfg_.d_out);
    if (cfg_.check_finite) check_finite(dy, "dy");
    if (dx) {
      check_shape(*dx, c.x.rows(), cfg_.d_in, "dx");
      dx->setZero();
    }
    c.dgates.resize(dy.rows(), retrieval_.per_token());
    self().experts_backward(dy, c, dx, g);
    retrieval_.backward(c.x, c.dgates, c.retrieval, g.retrieval, dx);
  }

  /// Every parameter by name ("<layer>.query.weight", "<layer>.keys.c1", "<layer>.experts.up",
  /// ...), paired with its gradient in `g` when given.
  ParameterList<T> parameters(Grads* g = nullptr) {
    ParameterList<T> list;
    append_parameters(list, retrieval_.parameters(g ? &g->retrieval : nullptr), std::string(Layer::kName) + ".");
    self().expert_parameters(list, g ? &g->experts : nullptr);
    return list;
  }

 protected:
  ProductKeyLayer(const Config& cfg, Rng& rng) : cfg_(resolve(cfg)), retrieval_(retrieval_config(cfg_), rng) {}

  void check_input(const CMatRef<T>& x, const MatRef<T>& y) const {
    SPEX_CHECK(x.cols() == cfg_.d_in, "x has " << x.cols() << " columns, expected d_in = " << cfg_.d_in);
    check_shape(y, x.rows(), cfg_.d_out, "y");
    if (cfg_.check_finite) check_finite(x, "x");
  }

  const Layer& self() const { return static_cast<const Layer&>(*this); }
  Layer& self() { return static_cast<Layer&>(*this); }

  Config cfg_;
  KeyRetrieval<T, Arch> retrieval_;
  Experts experts_;
};

}  // namespace detail
}  // namespace spex
