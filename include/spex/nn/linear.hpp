#pragma once
// y = x W^T + b, the query network of PEER/PKM and any dense projection. W is out x in,
// row-major (PyTorch's Linear layout). Forward and backward are Eigen GEMMs.
#include <cmath>

#include "../core/check.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"

namespace spex {

/// Dense affine map. Thread safety: forward/backward are const; gradients go to the caller's
/// LinearGrads.
///
///   spex::Linear<float> proj(512, 256, /*bias=*/true, rng);
///   proj.forward(x, y);                    // x: B x 512, y: B x 256
///   proj.backward(x, dy, grads, &dx);      // grads accumulate, dx (B x 512) is added to
template <class T>
class Linear {
 public:
  struct Grads {
    RowMat<T> weight;
    Vec<T> bias;
    void zero() {
      weight.setZero();
      bias.setZero();
    }
  };

  Linear() = default;
  /// PyTorch's default init: W, b ~ U(-1/sqrt(in), 1/sqrt(in)).
  Linear(Index in, Index out, bool bias, Rng& rng) : weight_(out, in), bias_(bias ? out : 0) {
    SPEX_CHECK(in >= 1 && out >= 1, "Linear(" << in << ", " << out << ") needs positive sizes");
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

  /// y = x W^T + b (x: B x in, y: B x out).
  void forward(CMatRef<T> x, MatRef<T> y) const {
    SPEX_CHECK(x.cols() == in_features(), "x has " << x.cols() << " columns, expected in_features = " << in_features());
    check_shape(y, x.rows(), out_features(), "y");
    y.noalias() = x * weight_.transpose();
    if (has_bias()) y.rowwise() += bias_.transpose();
  }

  /// grads.weight += dy^T x, grads.bias += column sums of dy, and *dx += dy W when dx is given.
  void backward(CMatRef<T> x, CMatRef<T> dy, Grads& grads, MatRef<T>* dx) const {
    check_shape(dy, x.rows(), out_features(), "dy");
    check_shape(grads.weight, out_features(), in_features(), "grads.weight");
    grads.weight.noalias() += dy.transpose() * x;
    if (has_bias()) grads.bias += dy.colwise().sum().transpose();
    if (dx) {
      check_shape(*dx, x.rows(), in_features(), "dx");
      dx->noalias() += dy * weight_;
    }
  }

 private:
  RowMat<T> weight_;
  Vec<T> bias_;
};

}  // namespace spex
