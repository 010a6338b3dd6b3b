#pragma once
// The element-wise Adam/AdamW update, vectorized: it runs over every entry of a dense
// parameter and every held row of a row-sparse one each step, and a scalar sqrt and divide
// per entry made the optimizer the largest part of a small model's training step.
//   g' = g + l2 w;  w -= decay w;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2;
//   w -= step m / (sqrt(v) inv_sqrt_c2 + eps)
// A null g is a zero gradient.
#include "scalar/optim.hpp"
#include "simd.hpp"

namespace spex::kernels {

template <class Arch = default_arch, class T>
void adam_update(T* w, const T* g, T* m, T* v, std::size_t n, const AdamStep<T>& a) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const B b1(a.beta1), b2(a.beta2), c1(T(1) - a.beta1), c2(T(1) - a.beta2), step(a.step), isc(a.inv_sqrt_c2),
      eps(a.eps), decay(a.decay), l2(a.l2);
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    B wi = B::load_unaligned(w + i);
    const B gi = xsimd::fma(l2, wi, g ? B::load_unaligned(g + i) : B(T(0)));
    wi = xsimd::fnma(decay, wi, wi);
    const B mi = xsimd::fma(b1, B::load_unaligned(m + i), c1 * gi);
    const B vi = xsimd::fma(b2, B::load_unaligned(v + i), c2 * gi * gi);
    mi.store_unaligned(m + i);
    vi.store_unaligned(v + i);
    (wi - step * mi / xsimd::fma(xsimd::sqrt(vi), isc, eps)).store_unaligned(w + i);
  }
  scalar::adam_update(w + i, g ? g + i : nullptr, m + i, v + i, n - i, a);
#else
  scalar::adam_update(w, g, m, v, n, a);
#endif
}

}  // namespace spex::kernels
