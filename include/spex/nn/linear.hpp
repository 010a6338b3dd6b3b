#pragma once
// y = x W^T + b, the query network of PEER/PKM and any dense projection. W is out x in,
// row-major (PyTorch's Linear layout). Forward and backward are Eigen GEMMs.
#include <cmath>

#include "../core/check.hpp"
#include "../core/gemm.hpp"
#include "../core/parameter.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "weight_bias_grads.hpp"

namespace spex {

/// Dense affine map. Thread safety: forward/backward are const; gradients go to the caller's
/// LinearGrads.
///
/// Usage: examples/snippets/building_blocks.cpp (compiled and run by the test suite).
template <class T>
class Linear {
 public:
  using Grads = WeightBiasGrads<RowMat<T>, Vec<T>>;

  Linear() = default;
  /// PyTorch's default init: W, b ~ U(-1/sqrt(in), 1/sqrt(in)).
  Linear(Index in, Index out, bool bias, Rng& rng) {
    SPEX_CHECK(in >= 1 && out >= 1, "Linear(" << in << ", " << out << ") needs positive sizes");
    checked_mul(in, out, "Linear weight size");
    weight_.resize(out, in);
    bias_.resize(bias ? out : 0);
    const double bound = 1.0 / std::sqrt(double(in));
    fill_uniform(weight_, -bound, bound, rng);
    fill_uniform(bias_, -bound, bound, rng);
  }

  Index in_features() const { return weight_.cols(); }
  Index out_features() const { return weight_.rows(); }
  bool has_bias() const { return bias_.size() > 0; }
  RowMat<T>& weight() { return weight_; }
  const RowMat<T>& weight() const { return weight_; }
  Vec<T>& bias() { return bias_; }
  const Vec<T>& bias() const { return bias_; }

  /// Gradient buffers of the right shapes, zeroed.
  Grads make_grads() const {
    return Grads{RowMat<T>::Zero(weight_.rows(), weight_.cols()), Vec<T>::Zero(bias_.size())};
  }

  /// prefix + "weight" and (with a bias) prefix + "bias", paired with their gradients in g: the
  /// layers' vocabulary (layers/layer_concept.hpp), for optimizers, checkpoints and freezing
  /// (spex::frozen). The list points into this Linear and g (core/parameter.hpp, Lifetime; it
  /// tracks no epochs: a Linear never replaces its storage, but destroying it or g does).
  ParameterList<T> parameters(Grads& g, const std::string& prefix = "") {
    check_grads(g, "grads");
    return list(&g, prefix);
  }
  /// Writable values without gradients (loading weights).
  ParameterList<T> parameters(const std::string& prefix = "") { return list(nullptr, prefix); }
  /// Read-only values (saving weights).
  ParameterList<const T> parameters(const std::string& prefix = "") const {
    return read_only(const_cast<Linear*>(this)->list(nullptr, prefix));
  }

  /// Throws unless `g` has this layer's shapes (`what` names it in the message).
  void check_grads(const Grads& g, const char* what) const {
    SPEX_CHECK(g.weight.rows() == weight_.rows() && g.weight.cols() == weight_.cols() && g.bias.size() == bias_.size(),
               what << " holds a " << g.weight.rows() << " x " << g.weight.cols() << " weight gradient, the layer's weight is "
                    << weight_.rows() << " x " << weight_.cols() << ": grads were made by another layer");
  }

  /// y = x W^T + b (x: B x in, y: B x out). y may be x itself when in == out.
  void forward(CMatRef<T> x, MatRef<T> y) const {
    SPEX_CHECK(x.cols() == in_features(), "x has " << x.cols() << " columns, expected in_features = " << in_features());
    check_shape(y, x.rows(), out_features(), "y");
    if (overlap(x, y) == Overlap::none) {
      gemm(y, x, weight_.transpose(), false);
    } else {
      const RowMat<T> copy = x;  // y overwrites x
      gemm(y, copy, weight_.transpose(), false);
    }
    if (has_bias()) y.rowwise() += bias_.transpose();
  }

  /// grads.weight += dy^T x, grads.bias += column sums of dy; dx = dy W (assigned; dx may be
  /// dy or x itself).
  void backward(CMatRef<T> x, CMatRef<T> dy, MatRef<T> dx, Grads& grads) const {
    check_shape(dx, x.rows(), in_features(), "dx");
    backward_impl(x, dy, grads, &dx, false);
  }
  /// The same without the input gradient.
  void backward(CMatRef<T> x, CMatRef<T> dy, Grads& grads) const { backward_impl(x, dy, grads, nullptr, false); }
  /// For components that sum several paths into one dx: *dx += dy W when dx is given.
  void backward_accumulate(CMatRef<T> x, CMatRef<T> dy, MatRef<T>* dx, Grads& grads) const {
    if (dx) check_shape(*dx, x.rows(), in_features(), "dx");
    backward_impl(x, dy, grads, dx, true);
  }
  /// dx += dy W only (a frozen layer: no weight gradient). dx may be dy itself.
  void backward_input_accumulate(CMatRef<T> dy, MatRef<T> dx) const {
    SPEX_CHECK(dy.cols() == out_features(), "dy has " << dy.cols() << " columns, expected out_features = " << out_features());
    check_shape(dx, dy.rows(), in_features(), "dx");
    input_gradient(dy, dx, true);
  }

 private:
  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out;
    out.push_back(dense_parameter<T>(prefix + "weight", weight_, g ? &g->weight : nullptr));
    if (has_bias()) out.push_back(dense_parameter<T>(prefix + "bias", bias_, g ? &g->bias : nullptr));
    return out;
  }

  void backward_impl(CMatRef<T> x, CMatRef<T> dy, Grads& grads, MatRef<T>* dx, bool add) const {
    check_shape(dy, x.rows(), out_features(), "dy");
    check_grads(grads, "grads");
    gemm(grads.weight, dy.transpose(), x, true);
    if (has_bias()) grads.bias += dy.colwise().sum().transpose();
    if (dx) input_gradient(dy, *dx, add);
  }

  void input_gradient(CMatRef<T> dy, MatRef<T> dx, bool add) const {
    if (overlap(dy, dx) == Overlap::none) {
      gemm(dx, dy, weight_, add);
    } else {
      const RowMat<T> copy = dy;  // dx overwrites dy
      gemm(dx, copy, weight_, add);
    }
  }

  RowMat<T> weight_;
  Vec<T> bias_;
};

}  // namespace spex
