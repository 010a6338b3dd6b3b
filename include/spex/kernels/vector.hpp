#pragma once
// Vector kernels: dot, axpy, scale_to (and scale_to_stream), scale, sum, max. Four independent
// accumulators hide the FMA latency (2 FMA ports x 4 cycles); unaligned loads; whole vectors,
// then a scalar tail.
#include <algorithm>
#include <cstdint>

#include "scalar/vector.hpp"
#include "simd.hpp"  // first: it includes the intrinsics with GCC 12's spurious warnings off
#if defined(__SSE__)
#include "detail/intrinsics_warnings_off.hpp"
#include <immintrin.h>  // _mm_sfence, the streamed stores
#include "detail/intrinsics_warnings_on.hpp"
#endif

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

namespace detail {
#if SPEX_SIMD
/// Stores b at p, which is aligned to a whole batch, with a non-temporal store where the ISA has
/// one (x86: MOVNTPS / MOVNTPD), an ordinary aligned store elsewhere.
template <class Arch, class T>
void store_stream(const xsimd::batch<T, Arch>& b, T* p) {
  constexpr bool f32 = std::is_same<T, float>::value;
#if defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    if constexpr (f32) _mm512_stream_ps(p, b);
    else _mm512_stream_pd(p, b);
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_base_of<xsimd::avx, Arch>::value) {
    if constexpr (f32) _mm256_stream_ps(p, b);
    else _mm256_stream_pd(p, b);
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    if constexpr (f32) _mm_stream_ps(p, b);
    else _mm_stream_pd(p, b);
    return;
  }
#endif
  b.store_aligned(p);
}
#endif
}  // namespace detail

/// y = a * x, the values of scale_to, with y's whole aligned vectors written by non-temporal
/// stores (they bypass the caches: no read of y's lines before they are written). For a large
/// output written once and read by a later pass, such as a backward pass's new gradient rows:
/// 64 MB written with two threads took 2.3 ms against 5.0 with ordinary stores, and reading them
/// back cost the same (docs/performance.md, "PEER training"). Streamed stores are weakly
/// ordered: the writing thread calls stream_fence() before another thread reads y.
template <class Arch = default_arch, class T>
void scale_to_stream(T a, const T* x, T* y, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const std::size_t lane = (reinterpret_cast<std::uintptr_t>(y) / sizeof(T)) % W;
  const std::size_t head = std::min(n, lane == 0 ? std::size_t(0) : W - lane);
  std::size_t i = 0;
  for (; i < head; ++i) y[i] = a * x[i];
  const B va(a);
  for (; i + W <= n; i += W) detail::store_stream<Arch>(va * B::load_unaligned(x + i), y + i);
  for (; i < n; ++i) y[i] = a * x[i];
#else
  scalar::scale_to(a, x, y, n);
#endif
}

/// Orders this thread's streamed stores (scale_to_stream) before its later stores, so that a
/// thread that synchronizes with it afterwards (the end of a parallel loop) reads their values.
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
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

/// Bit i set iff x[i] != 0 (NaN included), for n <= 64: which of a token's (up to 64) experts
/// a row of gates routes it to, one compare per vector.
template <class Arch = default_arch, class T>
std::uint64_t nonzero_bits(const T* x, std::size_t n) {
#if SPEX_SIMD
  static_assert(is_simd_scalar_v<T>, "spex kernels take float or double");
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  constexpr std::uint64_t kLanes = (std::uint64_t(1) << W) - 1;
  std::uint64_t bits = 0;
  std::size_t i = 0;
  // The lanes equal to 0, inverted: xsimd's != is an ordered compare, false for NaN.
  for (; i + W <= n; i += W) bits |= (~std::uint64_t(detail::lane_bits<Arch, T>(B::load_unaligned(x + i) == B(T(0)))) & kLanes) << i;
  if (i < n) bits |= scalar::nonzero_bits(x + i, n - i) << i;
  return bits;
#else
  return scalar::nonzero_bits(x, n);
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
