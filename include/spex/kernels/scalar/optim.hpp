#pragma once
// Scalar twin of kernels/optim.hpp.
#include <cmath>
#include <cstddef>

namespace spex::kernels {

/// Coefficients of one Adam step (see kernels/optim.hpp).
template <class T>
struct AdamStep {
  T beta1, beta2;
  T step;         ///< lr / (1 - beta1^t)
  T inv_sqrt_c2;  ///< 1 / sqrt(1 - beta2^t)
  T eps;
  T decay;        ///< lr * weight_decay (AdamW), or 0
  T l2;           ///< weight_decay added to the gradient (Adam), or 0
};

namespace scalar {

template <class T>
void adam_update(T* w, const T* g, T* m, T* v, std::size_t n, const AdamStep<T>& a) {
  for (std::size_t i = 0; i < n; ++i) {
    const T gi = (g ? g[i] : T(0)) + a.l2 * w[i];
    w[i] -= a.decay * w[i];
    m[i] = a.beta1 * m[i] + (T(1) - a.beta1) * gi;
    v[i] = a.beta2 * v[i] + (T(1) - a.beta2) * gi * gi;
    w[i] -= a.step * m[i] / (std::sqrt(v[i]) * a.inv_sqrt_c2 + a.eps);
  }
}

}  // namespace scalar
}  // namespace spex::kernels
