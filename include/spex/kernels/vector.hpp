#pragma once
// Vector kernels: dot, axpy, scale_to, scale, sum, max. Four independent accumulators hide the FMA
// latency (2 FMA ports x 4 cycles); unaligned loads; whole vectors, then a scalar tail.
#include <algorithm>

#include "scalar/vector.hpp"
#include "simd.hpp"

namespace spex::kernels {

template <class Arch = default_arch, class T>
T dot(const T* x, const T* y, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  B a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  std::size_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = xsimd::fma(B::load_unaligned(x + i), B::load_unaligned(y + i), a0);
    a1 = xsimd::fma(B::load_unaligned(x + i + W), B::load_unaligned(y + i + W), a1);
    a2 = xsimd::fma(B::load_unaligned(x + i + 2 * W), B::load_unaligned(y + i + 2 * W), a2);
    a3 = xsimd::fma(B::load_unaligned(x + i + 3 * W), B::load_unaligned(y + i + 3 * W), a3);
  }
  for (; i + W <= n; i += W) a0 = xsimd::fma(B::load_unaligned(x + i), B::load_unaligned(y + i), a0);
  T s = xsimd::hadd((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s = madd(x[i], y[i], s);
  return s;
#else
  return scalar::dot(x, y, n);
#endif
}

/// y += a * x
template <class Arch = default_arch, class T>
void axpy(T a, const T* x, T* y, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const B va(a);
  std::size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    xsimd::fma(va, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
    xsimd::fma(va, B::load_unaligned(x + i + W), B::load_unaligned(y + i + W)).store_unaligned(y + i + W);
  }
  for (; i + W <= n; i += W) xsimd::fma(va, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = madd(a, x[i], y[i]);
#else
  scalar::axpy(a, x, y, n);
#endif
}

/// y = a * x
template <class Arch = default_arch, class T>
void scale_to(T a, const T* x, T* y, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const B va(a);
  std::size_t i = 0;
  for (; i + W <= n; i += W) (va * B::load_unaligned(x + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = a * x[i];
#else
  scalar::scale_to(a, x, y, n);
#endif
}

/// x *= a
template <class Arch = default_arch, class T>
void scale(T a, T* x, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const B va(a);
  std::size_t i = 0;
  for (; i + W <= n; i += W) (va * B::load_unaligned(x + i)).store_unaligned(x + i);
  for (; i < n; ++i) x[i] *= a;
#else
  scalar::scale(a, x, n);
#endif
}

template <class Arch = default_arch, class T>
T sum(const T* x, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  B a0(T(0)), a1(T(0));
  std::size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a0 += B::load_unaligned(x + i);
    a1 += B::load_unaligned(x + i + W);
  }
  for (; i + W <= n; i += W) a0 += B::load_unaligned(x + i);
  T s = xsimd::hadd(a0 + a1);
  for (; i < n; ++i) s += x[i];
  return s;
#else
  return scalar::sum(x, n);
#endif
}

/// Largest element; -inf for n == 0. NaN elements are skipped.
template <class Arch = default_arch, class T>
T max(const T* x, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  B m(-std::numeric_limits<T>::infinity());
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const B v = B::load_unaligned(x + i);
    m = xsimd::select(v > m, v, m);  // a NaN lane compares false and is skipped
  }
  alignas(Arch::alignment()) T lanes[W];
  m.store_aligned(lanes);
  T r = scalar::max(lanes, W);
  for (; i < n; ++i)
    if (x[i] > r) r = x[i];
  return r;
#else
  return scalar::max(x, n);
#endif
}

}  // namespace spex::kernels
