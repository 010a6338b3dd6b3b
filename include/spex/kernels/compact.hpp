#pragma once
// Gathers over compact expert rows: bfloat16 rows, or int8 rows with one float scale per row
// (symmetric, per-row absmax quantization). Rows are widened to float in registers, W lanes at a
// time, and accumulated in float; x, y and the results stay float. These are the compact twins
// of gather_dot / gather_axpy (kernels/gather.hpp) for inference over half or a quarter of the
// bytes. Like the float gathers they prefetch and touch the rows ahead (kernels/gather.hpp).
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

/// sum_i widen(row[i]) * x[i] with `load` widening W values of the row.
template <class Arch, class S, class Load>
inline float widened_dot(const S* row, const float* x, std::size_t d, Load load, float (*one)(S)) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::size_t W = B::size;
  B a0(0.f), a1(0.f);
  std::size_t i = 0;
  for (; i + 2 * W <= d; i += 2 * W) {
    a0 = xsimd::fma(load(row + i), B::load_unaligned(x + i), a0);
    a1 = xsimd::fma(load(row + i + W), B::load_unaligned(x + i + W), a1);
  }
  for (; i + W <= d; i += W) a0 = xsimd::fma(load(row + i), B::load_unaligned(x + i), a0);
  float s = xsimd::hadd(a0 + a1);
  for (; i < d; ++i) s = madd(one(row[i]), x[i], s);
  return s;
}

inline float i8_to_float(std::int8_t v) { return float(v); }

// The dot goes one row at a time: measured on a Xeon VM over 2^20 rows of 512, walking two rows
// at a time (as the float gathers then did) gathered 15-35% fewer compact rows per second.

/// out[r] = scale(ids[r]) * (row ids[r] . x) for r < m.
template <class Arch, class S, class Load, class Scale>
inline void widened_gather_dot(const S* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const float* x,
                               std::size_t d, float* out, Load load, float (*one)(S), Scale scale) {
  for (std::size_t r = 0; r < m; ++r) {
    prefetch_row(table, ld, ids, r + kPrefetchAhead, m, d, RowLines::all);
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    out[r] = scale(id) * widened_dot<Arch>(table + id * ld, x, d, load, one);
  }
}

/// Batches of y an axpy holds in registers while it walks the rows: 16 of the 32 AVX-512
/// registers, 8 of 16 elsewhere.
template <class Arch>
constexpr std::size_t kAxpyBatches = std::is_base_of<xsimd::avx512f, Arch>::value ? 16 : 8;
/// Rows an axpy walks per sweep over y's column blocks: the later blocks read the sweep's rows
/// from the caches (64 rows of d = 4096 bf16 are 512 KiB).
constexpr std::size_t kAxpySweepRows = 64;

/// y += sum_r alpha[r] scale(ids[r]) row ids[r]. y's columns are taken kAxpyBatches batches at
/// a time and held in registers while the rows (of a sweep) go by: loading and storing y for
/// every row made the compact axpy 2.4x slower on a 2-core AMD EPYC VM (256 tokens x 128
/// product-key picks of 1 KiB bf16 rows: 5.0 ms against 2.1 ms; the rows' first block comes from
/// memory, the others from the caches). Every value of y still adds the rows in their order.
template <class Arch, class S, class Load, class Scale>
inline void widened_gather_axpy(const S* table, std::size_t ld, const std::int64_t* ids, const float* alpha, std::size_t m,
                                float* y, std::size_t d, Load load, float (*one)(S), Scale scale) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::size_t W = B::size, K = kAxpyBatches<Arch>;
  float c[kAxpySweepRows];
  const S* rows[kAxpySweepRows];
  for (std::size_t r0 = 0; r0 < m; r0 += kAxpySweepRows) {
    const std::size_t n = std::min(kAxpySweepRows, m - r0);
    for (std::size_t r = 0; r < n; ++r) {
      const std::size_t id = static_cast<std::size_t>(ids[r0 + r]);
      c[r] = alpha[r0 + r] * scale(id);
      rows[r] = table + id * ld;
    }
    std::size_t c0 = 0;
    for (; c0 + K * W <= d; c0 += K * W) {  // whole blocks: K batches in registers
      B acc[K];
      for (std::size_t k = 0; k < K; ++k) acc[k] = B::load_unaligned(y + c0 + k * W);
      for (std::size_t r = 0; r < n; ++r) {
        if (c0 == 0) prefetch_row(table, ld, ids, r0 + r + kPrefetchAhead, m, d, RowLines::all);
        const B a(c[r]);
        for (std::size_t k = 0; k < K; ++k) acc[k] = xsimd::fma(a, load(rows[r] + c0 + k * W), acc[k]);
      }
      for (std::size_t k = 0; k < K; ++k) acc[k].store_unaligned(y + c0 + k * W);
    }
    for (; c0 + W <= d; c0 += W) {  // the remaining batches, one at a time
      B acc = B::load_unaligned(y + c0);
      for (std::size_t r = 0; r < n; ++r) {
        if (c0 == 0) prefetch_row(table, ld, ids, r0 + r + kPrefetchAhead, m, d, RowLines::all);
        acc = xsimd::fma(B(c[r]), load(rows[r] + c0), acc);
      }
      acc.store_unaligned(y + c0);
    }
    for (std::size_t i = c0; i < d; ++i)  // the last d mod W values
      for (std::size_t r = 0; r < n; ++r) y[i] = madd(c[r], one(rows[r][i]), y[i]);
  }
}

struct NoScale {
  float operator()(std::size_t) const { return 1.f; }
};
struct RowScale {
  const float* scale;
  float operator()(std::size_t id) const { return scale[id]; }
};
#endif
}  // namespace detail

/// out[r] = table[ids[r]] . x for r < m: bfloat16 rows d long, ld apart.
template <class Arch = default_arch>
void gather_dot_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, std::size_t m,
                     const float* x, std::size_t d, float* out) {
#if SPEX_SIMD
  detail::widened_gather_dot<Arch>(table, ld, ids, m, x, d, out, detail::load_bf16<Arch>, scalar::bf16_to_float, detail::NoScale{});
#else
  scalar::gather_dot_bf16(table, ld, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * table[ids[r]]: bfloat16 rows.
template <class Arch = default_arch>
void gather_axpy_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, const float* alpha,
                      std::size_t m, float* y, std::size_t d) {
#if SPEX_SIMD
  detail::widened_gather_axpy<Arch>(table, ld, ids, alpha, m, y, d, detail::load_bf16<Arch>, scalar::bf16_to_float, detail::NoScale{});
#else
  scalar::gather_axpy_bf16(table, ld, ids, alpha, m, y, d);
#endif
}

/// out[r] = scale[ids[r]] * (table[ids[r]] . x): int8 rows with one float scale per row.
template <class Arch = default_arch>
void gather_dot_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                   std::size_t m, const float* x, std::size_t d, float* out) {
#if SPEX_SIMD
  detail::widened_gather_dot<Arch>(table, ld, ids, m, x, d, out, detail::load_i8<Arch>, detail::i8_to_float, detail::RowScale{scale});
#else
  scalar::gather_dot_i8(table, ld, scale, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * scale[ids[r]] * table[ids[r]]: int8 rows.
template <class Arch = default_arch>
void gather_axpy_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                    const float* alpha, std::size_t m, float* y, std::size_t d) {
#if SPEX_SIMD
  detail::widened_gather_axpy<Arch>(table, ld, ids, alpha, m, y, d, detail::load_i8<Arch>, detail::i8_to_float, detail::RowScale{scale});
#else
  scalar::gather_axpy_i8(table, ld, scale, ids, alpha, m, y, d);
#endif
}

}  // namespace spex::kernels
