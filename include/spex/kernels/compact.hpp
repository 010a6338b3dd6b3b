#pragma once
// Gathers over compact expert rows: bfloat16 rows, or int8 rows with one float scale per row
// (symmetric, per-row absmax quantization). Rows are widened to float in registers, W lanes at a
// time, and accumulated in float; x, y and the results stay float. These are the compact twins
// of gather_dot / gather_axpy (kernels/gather.hpp) for inference over half or a quarter of the
// bytes. Like the float gathers they prefetch the rows ahead and touch them on Intel CPUs
// (kernels/gather.hpp).
// Preconditions (checked by the callers, not here): 0 <= ids[r] < rows of the table.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "gather.hpp"
#include "scalar/compact.hpp"
#include "simd.hpp"

namespace spex::kernels {

namespace detail {
#if SPEX_SIMD
// xsimd 8.1 has no widening loads: its load_as<int32>(const int16*) converts element by element
// through a buffer in memory. The x86 ISAs widen in one instruction (SSE2 by interleaving with
// zeros), so these loads use them and keep xsimd's conversion for other ISAs.
/// W bfloat16 values at p as a float batch: each value becomes the high half of a float.
template <class Arch>
inline xsimd::batch<float, Arch> load_bf16(const std::uint16_t* p) {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#endif
#if defined(__AVX2__)
  if constexpr (std::is_base_of<xsimd::avx2, Arch>::value)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same<xsimd::sse2, Arch>::value)
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
  using U = xsimd::batch<std::uint32_t, Arch>;
  const U u = xsimd::load_as<std::uint32_t, Arch>(p, xsimd::unaligned_mode()) << 16;
  return xsimd::bitwise_cast<xsimd::batch<float, Arch>>(u);
}
/// W int8 values at p as a float batch.
template <class Arch>
inline xsimd::batch<float, Arch> load_i8(const std::int8_t* p) {
#if defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
#if defined(__AVX2__)
  if constexpr (std::is_base_of<xsimd::avx2, Arch>::value)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same<xsimd::sse2, Arch>::value) {
    std::int32_t four;
    std::memcpy(&four, p, sizeof four);
    const __m128i b = _mm_cvtsi32_si128(four);                        // 4 bytes in the low lane
    const __m128i w = _mm_unpacklo_epi8(b, b), d = _mm_unpacklo_epi16(w, w);  // each byte in a lane's top
    return _mm_cvtepi32_ps(_mm_srai_epi32(d, 24));                   // sign-extended
  }
#endif
  return xsimd::batch_cast<float>(xsimd::load_as<std::int32_t, Arch>(p, xsimd::unaligned_mode()));
}

/// sum_i widen(row[i]) * x[i], the row widened by Widen (below): two accumulators over
/// alternate batches, then the last d mod W values (the order widened_gather_dot sums in).
template <class Arch, class Widen, class S>
inline float widened_dot(const S* row, const float* x, std::size_t d) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::size_t W = B::size;
  B a0(0.f), a1(0.f);
  std::size_t i = 0;
  for (; i + 2 * W <= d; i += 2 * W) {
    a0 = xsimd::fma(Widen::batch(row + i), B::load_unaligned(x + i), a0);
    a1 = xsimd::fma(Widen::batch(row + i + W), B::load_unaligned(x + i + W), a1);
  }
  for (; i + W <= d; i += W) a0 = xsimd::fma(Widen::batch(row + i), B::load_unaligned(x + i), a0);
  float s = xsimd::hadd(a0 + a1);
  for (; i < d; ++i) s = madd(Widen::one(row[i]), x[i], s);
  return s;
}

/// How a compact scalar S widens to float: `batch` W values at p, `one` a single value. Types,
/// not function pointers, so that the calls inline whatever the optimizer's inlining budget.
template <class Arch>
struct WidenBf16 {
  static xsimd::batch<float, Arch> batch(const std::uint16_t* p) { return load_bf16<Arch>(p); }
  static float one(std::uint16_t v) { return scalar::bf16_to_float(v); }
};
template <class Arch>
struct WidenI8 {
  static xsimd::batch<float, Arch> batch(const std::int8_t* p) { return load_i8<Arch>(p); }
  static float one(std::int8_t v) { return float(v); }
};

// Both gathers walk four rows per pass, as the float gathers do (kernels/gather.hpp): four rows
// are read at once and share the loads of x (dot) or of y (axpy); every line of a row is
// prefetched 8 rows ahead, and an int8 row's scale with it. On a 2-core AMD EPYC VM (PEER's
// expert step, 256 tokens x 128 picks over 2^20 rows of 512, `BM_PeerExpertStep_*/1`) this
// took the bf16 step from 1.6x the float step's time to 1.0x and the int8 step from 1.0x to
// 0.7x, against one row per pass (dot) and y's columns held in registers over 64 rows (axpy).
// The compact step's time moved up to 2x between processes, so the comparison is with the float
// step in the same process (docs/performance.md). A Xeon VM had measured two compact rows per
// pass 15-35% slower than one; not measured there again.

/// out[r] = scale(ids[r]) * (row ids[r] . x) for r < m, each row summed as widened_dot sums it.
template <class Arch, class Widen, class S, class Scale>
inline void widened_gather_dot(const S* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const float* x,
                               std::size_t d, float* out, Scale scale) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::size_t W = B::size;
  std::size_t r = 0;
  for (; r + 4 <= m; r += 4) {
    for (std::size_t q = 0; q < 4; ++q) {
      prefetch_row(table, ld, ids, r + kPrefetchAhead + q, m, d, RowLines::all);
      if (r + kPrefetchAhead + q < m) scale.prefetch(static_cast<std::size_t>(ids[r + kPrefetchAhead + q]));
    }
    const std::size_t i0 = static_cast<std::size_t>(ids[r]), i1 = static_cast<std::size_t>(ids[r + 1]),
                      i2 = static_cast<std::size_t>(ids[r + 2]), i3 = static_cast<std::size_t>(ids[r + 3]);
    const S *r0 = table + i0 * ld, *r1 = table + i1 * ld, *r2 = table + i2 * ld, *r3 = table + i3 * ld;
    B a0(0.f), a1(0.f), b0(0.f), b1(0.f), c0(0.f), c1(0.f), e0(0.f), e1(0.f);
    std::size_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      const B x0 = B::load_unaligned(x + i), x1 = B::load_unaligned(x + i + W);
      a0 = xsimd::fma(Widen::batch(r0 + i), x0, a0);
      b0 = xsimd::fma(Widen::batch(r1 + i), x0, b0);
      c0 = xsimd::fma(Widen::batch(r2 + i), x0, c0);
      e0 = xsimd::fma(Widen::batch(r3 + i), x0, e0);
      a1 = xsimd::fma(Widen::batch(r0 + i + W), x1, a1);
      b1 = xsimd::fma(Widen::batch(r1 + i + W), x1, b1);
      c1 = xsimd::fma(Widen::batch(r2 + i + W), x1, c1);
      e1 = xsimd::fma(Widen::batch(r3 + i + W), x1, e1);
    }
    for (; i + W <= d; i += W) {
      const B x0 = B::load_unaligned(x + i);
      a0 = xsimd::fma(Widen::batch(r0 + i), x0, a0);
      b0 = xsimd::fma(Widen::batch(r1 + i), x0, b0);
      c0 = xsimd::fma(Widen::batch(r2 + i), x0, c0);
      e0 = xsimd::fma(Widen::batch(r3 + i), x0, e0);
    }
    float s0 = xsimd::hadd(a0 + a1), s1 = xsimd::hadd(b0 + b1), s2 = xsimd::hadd(c0 + c1), s3 = xsimd::hadd(e0 + e1);
    for (; i < d; ++i) {
      s0 = madd(Widen::one(r0[i]), x[i], s0);
      s1 = madd(Widen::one(r1[i]), x[i], s1);
      s2 = madd(Widen::one(r2[i]), x[i], s2);
      s3 = madd(Widen::one(r3[i]), x[i], s3);
    }
    out[r] = scale(i0) * s0;
    out[r + 1] = scale(i1) * s1;
    out[r + 2] = scale(i2) * s2;
    out[r + 3] = scale(i3) * s3;
  }
  for (; r < m; ++r) {
    prefetch_row(table, ld, ids, r + kPrefetchAhead, m, d, RowLines::all);
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    out[r] = scale(id) * widened_dot<Arch, Widen>(table + id * ld, x, d);
  }
}

/// y += sum_r alpha[r] scale(ids[r]) row ids[r], added row after row (four rows per pass over y).
template <class Arch, class Widen, class S, class Scale>
inline void widened_gather_axpy(const S* table, std::size_t ld, const std::int64_t* ids, const float* alpha, std::size_t m,
                                float* y, std::size_t d, Scale scale) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::size_t W = B::size;
  std::size_t r = 0;
  for (; r + 4 <= m; r += 4) {
    for (std::size_t q = 0; q < 4; ++q) {
      prefetch_row(table, ld, ids, r + kPrefetchAhead + q, m, d, RowLines::all);
      if (r + kPrefetchAhead + q < m) scale.prefetch(static_cast<std::size_t>(ids[r + kPrefetchAhead + q]));
    }
    const std::size_t i0 = static_cast<std::size_t>(ids[r]), i1 = static_cast<std::size_t>(ids[r + 1]),
                      i2 = static_cast<std::size_t>(ids[r + 2]), i3 = static_cast<std::size_t>(ids[r + 3]);
    const S *r0 = table + i0 * ld, *r1 = table + i1 * ld, *r2 = table + i2 * ld, *r3 = table + i3 * ld;
    const float k0 = alpha[r] * scale(i0), k1 = alpha[r + 1] * scale(i1), k2 = alpha[r + 2] * scale(i2),
                k3 = alpha[r + 3] * scale(i3);
    const B c0(k0), c1(k1), c2(k2), c3(k3);
    std::size_t i = 0;
    for (; i + W <= d; i += W) {
      B acc = xsimd::fma(c0, Widen::batch(r0 + i), B::load_unaligned(y + i));
      acc = xsimd::fma(c1, Widen::batch(r1 + i), acc);
      acc = xsimd::fma(c2, Widen::batch(r2 + i), acc);
      xsimd::fma(c3, Widen::batch(r3 + i), acc).store_unaligned(y + i);
    }
    for (; i < d; ++i) y[i] = madd(k3, Widen::one(r3[i]), madd(k2, Widen::one(r2[i]), madd(k1, Widen::one(r1[i]), madd(k0, Widen::one(r0[i]), y[i]))));
  }
  for (; r < m; ++r) {
    prefetch_row(table, ld, ids, r + kPrefetchAhead, m, d, RowLines::all);
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    const float k = alpha[r] * scale(id);
    const S* row = table + id * ld;
    const B c(k);
    std::size_t i = 0;
    for (; i + W <= d; i += W) xsimd::fma(c, Widen::batch(row + i), B::load_unaligned(y + i)).store_unaligned(y + i);
    for (; i < d; ++i) y[i] = madd(k, Widen::one(row[i]), y[i]);
  }
}

struct NoScale {
  float operator()(std::size_t) const { return 1.f; }
  void prefetch(std::size_t) const {}
};
struct RowScale {
  const float* scale;
  float operator()(std::size_t id) const { return scale[id]; }
  void prefetch(std::size_t id) const { __builtin_prefetch(scale + id, 0, 3); }
};
#endif
}  // namespace detail

/// out[r] = table[ids[r]] . x for r < m: bfloat16 rows d long, ld apart.
template <class Arch = default_arch>
void gather_dot_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, std::size_t m,
                     const float* x, std::size_t d, float* out) {
#if SPEX_SIMD
  detail::widened_gather_dot<Arch, detail::WidenBf16<Arch>>(table, ld, ids, m, x, d, out, detail::NoScale{});
#else
  scalar::gather_dot_bf16(table, ld, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * table[ids[r]]: bfloat16 rows.
template <class Arch = default_arch>
void gather_axpy_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, const float* alpha,
                      std::size_t m, float* y, std::size_t d) {
#if SPEX_SIMD
  detail::widened_gather_axpy<Arch, detail::WidenBf16<Arch>>(table, ld, ids, alpha, m, y, d, detail::NoScale{});
#else
  scalar::gather_axpy_bf16(table, ld, ids, alpha, m, y, d);
#endif
}

/// out[r] = scale[ids[r]] * (table[ids[r]] . x): int8 rows with one float scale per row.
template <class Arch = default_arch>
void gather_dot_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                   std::size_t m, const float* x, std::size_t d, float* out) {
#if SPEX_SIMD
  detail::widened_gather_dot<Arch, detail::WidenI8<Arch>>(table, ld, ids, m, x, d, out, detail::RowScale{scale});
#else
  scalar::gather_dot_i8(table, ld, scale, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * scale[ids[r]] * table[ids[r]]: int8 rows.
template <class Arch = default_arch>
void gather_axpy_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                    const float* alpha, std::size_t m, float* y, std::size_t d) {
#if SPEX_SIMD
  detail::widened_gather_axpy<Arch, detail::WidenI8<Arch>>(table, ld, ids, alpha, m, y, d, detail::RowScale{scale});
#else
  scalar::gather_axpy_i8(table, ld, scale, ids, alpha, m, y, d);
#endif
}

}  // namespace spex::kernels
