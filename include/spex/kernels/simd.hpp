#pragma once
// The SIMD layer's common ground. Kernels are templates on `Arch` (default: the best ISA the
// translation unit's compiler flags enable); there is no runtime dispatch, because xsimd 8.1
// cannot instantiate an ISA's batch in a TU compiled without that ISA's flags.
// Kernels work on pointers and lengths only and never include Eigen.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "detail/intrinsics_warnings_off.hpp"  // spurious GCC 12 AVX-512 warnings
#include <xsimd/xsimd.hpp>
#include "detail/intrinsics_warnings_on.hpp"

#if defined(XSIMD_NO_SUPPORTED_ARCHITECTURE)
#define SPEX_SIMD 0
#else
#define SPEX_SIMD 1
#endif

namespace spex {

#if SPEX_SIMD
using default_arch = xsimd::default_arch;
#else
/// No SIMD ISA is enabled: every kernel runs its scalar twin.
struct default_arch {
  static constexpr const char* name() { return "scalar"; }
};
#endif

/// The SIMD instruction set spex's kernels use in this translation unit ("avx512bw",
/// "fma3+avx2", "sse2", ... or "scalar"): chosen by the compiler flags at compile time
/// (-march=native, -mavx2 -mfma, ...). A build without such flags gets SSE2 on x86-64,
/// 1.6-1.8x slower than AVX2 / AVX-512 in spex's benchmarks.
template <class Arch = default_arch>
constexpr const char* simd_arch_name() {
  return Arch::name();
}

namespace kernels {

template <class T>
constexpr bool is_simd_scalar_v = std::is_same<T, float>::value || std::is_same<T, double>::value;

/// Lanes of a batch of T on Arch (1 without SIMD).
template <class T, class Arch>
constexpr std::size_t simd_width() {
#if SPEX_SIMD
  return xsimd::batch<T, Arch>::size;
#else
  return 1;
#endif
}

/// a * b + c for the kernels' scalar tails: rounded once where the target has fast FMA (as the
/// SIMD bodies' xsimd::fma is in optimized code: xsimd 8 writes AVX-512's fma as x * y + z, which
/// the compiler fuses when it optimizes, so unoptimized builds round those twice) and twice
/// elsewhere, whatever the compiler makes of the code around it. Written as `s += a * b`, the compiler fuses it or not depending on inlining and
/// vectorization, so two paths meant to give the same bits (gather_dot's four-row pass and its
/// one-row tail) differed in the last bit when a test file was compiled with others.
template <class T>
inline T madd(T a, T b, T c) {
#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

namespace detail {
#if SPEX_SIMD
/// Bit l set iff lane l of `m` is true. xsimd 8.1 has no batch_bool::mask(): the x86 ISAs read
/// the compare's mask in one instruction (AVX-512 compares yield it); other ISAs select the lane
/// weights 2^l and add them up, exact since W <= 16 keeps the sum below 2^24.
template <class Arch, class T>
std::uint32_t lane_bits(const xsimd::batch_bool<T, Arch>& m) {
  constexpr bool is_float = std::is_same<T, float>::value;
#if defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) return static_cast<std::uint32_t>(m.data);
#endif
#if defined(__AVX__)
  if constexpr (std::is_base_of<xsimd::avx, Arch>::value) {
    if constexpr (is_float) return static_cast<std::uint32_t>(_mm256_movemask_ps(m));
    else return static_cast<std::uint32_t>(_mm256_movemask_pd(m));
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    if constexpr (is_float) return static_cast<std::uint32_t>(_mm_movemask_ps(m));
    else return static_cast<std::uint32_t>(_mm_movemask_pd(m));
  }
#endif
  (void)is_float;
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  static_assert(W <= 16, "lane_bits packs at most 16 lanes");
  alignas(Arch::alignment()) T w[W];
  for (std::size_t l = 0; l < W; ++l) w[l] = static_cast<T>(1u << l);
  return static_cast<std::uint32_t>(xsimd::hadd(xsimd::select(m, B::load_aligned(w), B(T(0)))));
}
#endif
}  // namespace detail

/// Hints the hardware to bring the first `lines` cache lines at p into cache.
inline void prefetch_lines(const void* p, int lines) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < lines; ++i) __builtin_prefetch(c + 64 * i, 0, 3);
}

}  // namespace kernels
}  // namespace spex
