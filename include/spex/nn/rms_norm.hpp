#pragma once
// RMSNorm of each row with a zero-centred learned gain (PEER-pytorch's `pre_rmsnorm`; the
// product-key layers' input_rmsnorm, docs/peer.md, "Input RMSNorm"):
//   y = x / max(||x||, eps) * sqrt(d) * (1 + gamma),   gamma = 0 at construction (identity gain).
// ||x|| / sqrt(d) is the root mean square of the row; eps = 1e-12 is torch's F.normalize default,
// under which a zero row maps to zero.
#include <algorithm>
#include <cmath>
#include <string>

#include "../core/check.hpp"
#include "../core/parallel.hpp"
#include "../core/parameter.hpp"
#include "../core/types.hpp"

namespace spex {

/// Thread safety: forward and backward are const (one cache per concurrent caller).
/// Usage (through Peer's input_rmsnorm): examples/snippets/memory_layers.cpp.
template <class T>
class RmsNorm {
 public:
  struct Cache {
    Vec<T> scale;                    // per row: sqrt(d) / max(||x||, eps)
    std::vector<unsigned char> clamped;  // per row: ||x|| <= eps (the scale is then a constant)
  };
  struct Grads {
    Vec<T> gamma;
    void zero() { gamma.setZero(); }
    /// f(data, size) for each array, in a fixed order (sums over ranks).
    template <class F>
    void for_each_array(F&& f) {
      f(gamma.data(), Index(gamma.size()));
    }
  };

  RmsNorm() = default;
  /// features = 0: no norm (identity, no parameter).
  explicit RmsNorm(Index features, T eps = T(1e-12)) : eps_(eps) {
    SPEX_CHECK(features >= 0, "RmsNorm features = " << features << " must be >= 0 (0: no norm)");
    check_positive(double(eps), "RmsNorm eps");
    gamma_ = Vec<T>::Zero(features);
  }

  /// Whether the norm is on (features >= 1).
  bool enabled() const { return gamma_.size() > 0; }
  Index features() const { return Index(gamma_.size()); }
  Vec<T>& gamma() { return gamma_; }
  const Vec<T>& gamma() const { return gamma_; }

  Grads make_grads() const { return Grads{Vec<T>::Zero(gamma_.size())}; }
  void check_grads(const Grads& g, const char* what) const {
    SPEX_CHECK(g.gamma.size() == gamma_.size(), what << " has input-norm gradients of " << g.gamma.size()
                                                     << " features, the layer's input norm has " << gamma_.size()
                                                     << ": grads were made by another layer");
  }

  /// prefix + "gamma" with its gradient in g (none when g is null); nothing when disabled.
  ParameterList<T> parameters(Grads* g, const std::string& prefix) {
    if (!enabled()) return {};
    if (g) check_grads(*g, "grads");
    return {dense_parameter<T>(prefix + "gamma", gamma_, g ? &g->gamma : nullptr)};
  }

  /// y = the normalized rows of x (y may be x itself); keeps what backward needs in `c`.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    const Index b = x.rows(), d = features();
    SPEX_CHECK(x.cols() == d, "the input norm's input has " << x.cols() << " columns, expected " << d);
    check_shape(y, b, d, "the input norm's output");
    c.scale.resize(b);
    c.clamped.resize(static_cast<std::size_t>(b));
    const T root_d = std::sqrt(T(d));
    parallel_for(b, [&](Index t, int) {
      const T norm = x.row(t).norm();
      const bool clamped = !(norm > eps_);
      const T s = root_d / (clamped ? eps_ : norm);
      c.scale(t) = s;
      c.clamped[static_cast<std::size_t>(t)] = clamped;
      for (Index f = 0; f < d; ++f) y(t, f) = x(t, f) * s * (T(1) + gamma_(f));
    });
  }

  /// From dy (the gradient of y) and the forward's x: dx (assigned; may be dy itself) and, when g
  /// is given, g.gamma += sum over rows of dy * x * scale. With u = (1 + gamma) * dy:
  /// dx = scale * (u - x (x . u) / ||x||^2) (scale * u where ||x|| <= eps).
  void backward(CMatRef<T> x, CMatRef<T> dy, MatRef<T> dx, const Cache& c, Grads* g) const {
    const Index b = x.rows(), d = features();
    check_shape(dy, b, d, "the input norm's dy");
    check_shape(dx, b, d, "the input norm's dx");
    SPEX_CHECK(c.scale.size() == b, "the input norm's cache holds " << c.scale.size() << " rows, the batch has " << b);
    if (g) {
      check_grads(*g, "grads");
      for (Index t = 0; t < b; ++t)  // rows in order: the sum does not depend on the thread count
        g->gamma += (dy.row(t).array() * x.row(t).array() * c.scale(t)).matrix().transpose();
    }
    parallel_for(b, [&](Index t, int) {
      const T s = c.scale(t);
      T xu = 0, xx = 0;
      for (Index f = 0; f < d; ++f) {
        const T u = (T(1) + gamma_(f)) * dy(t, f);
        xu += x(t, f) * u;
        xx += x(t, f) * x(t, f);
      }
      const T k = c.clamped[static_cast<std::size_t>(t)] ? T(0) : xu / xx;
      for (Index f = 0; f < d; ++f) dx(t, f) = s * ((T(1) + gamma_(f)) * dy(t, f) - x(t, f) * k);
    });
  }

 private:
  T eps_ = T(1e-12);
  Vec<T> gamma_;
};

}  // namespace spex
