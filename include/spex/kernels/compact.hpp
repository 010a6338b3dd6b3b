#pragma once
// Gathers over compact expert rows: bfloat16 rows, or int8 rows with one float scale per row
// (symmetric, per-row absmax quantization). Rows are widened to float in registers, W lanes at a
// time, and accumulated in float; x, y and the results stay float. These are the compact twins
// of gather_dot / gather_axpy for inference over half or a quarter of the bytes, and run their
// code (kernels/gather.hpp: the same passes of several rows and prefetches; no touch loads)
// with the rows widened.
// Preconditions (checked by the callers, not here): 0 <= ids[r] < rows of the table.
#include <cstddef>
#include <cstdint>
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

/// Rows per pass of both compact kinds: eight where the 32 AVX-512 registers hold their 16
/// accumulators, four elsewhere (16 registers).
template <class Arch>
inline constexpr std::size_t kCompactRowsPerPass = std::is_base_of<xsimd::avx512f, Arch>::value ? 8 : 4;

/// Compact rows for the row gathers (kernels/gather.hpp, detail::rows_gather_dot and _axpy):
/// widened to float W values at a time (`batch`) or one (`one`), never touched ahead (on an
/// Intel Xeon VM the step without the touch loads ran 1.08-1.09x (int8) and 0.99-1.23x (bf16) as
/// fast, in two sets of alternations; on AMD CPUs there are none), kCompactRowsPerPass rows per
/// pass. bf16 rows on AMD CPUs have only their first line prefetched, as float rows
/// (prefetch_first_line_only); int8 rows, and bf16 rows elsewhere, every line. Measured
/// (docs/performance.md, "Gather kernels"): on an AMD EPYC of family 26 (Zen 5), eight bf16 rows
/// per pass with the first line took PEER's bf16 step from 0.88x to 0.76x the float step's time
/// (medians of three processes; 1.36x as fast in one program over uniform picks), where the int8
/// step with the first line only was 1.6x slower in the layer (1.2x faster over uniform picks);
/// on an Intel Xeon eight int8 rows per pass ran 1.5x as fast as four, eight bf16 rows as fast
/// as four.
template <class Arch>
struct Bf16Rows {
  static xsimd::batch<float, Arch> batch(const std::uint16_t* p) { return load_bf16<Arch>(p); }
  static float one(std::uint16_t v) { return scalar::bf16_to_float(v); }
  static constexpr RowLines lines = RowLines::first_on_amd;
  static constexpr bool touch_ahead = false;
  static constexpr std::size_t rows_per_pass = kCompactRowsPerPass<Arch>;
};
template <class Arch>
struct I8Rows {
  static xsimd::batch<float, Arch> batch(const std::int8_t* p) { return load_i8<Arch>(p); }
  static float one(std::int8_t v) { return float(v); }
  static constexpr RowLines lines = RowLines::all;
  static constexpr bool touch_ahead = false;
  static constexpr std::size_t rows_per_pass = kCompactRowsPerPass<Arch>;
};

// The compact gathers walk several rows per pass, as the float gathers do (they are the same
// code; eight rows per pass on AVX-512, four elsewhere): the rows of a pass share the loads of x
// (dot) or of y (axpy); the rows 8 ahead are prefetched (every line, or for bf16 rows on AMD
// CPUs the first), and an int8 row's scale with them. Several rows per pass, on a 2-core AMD
// EPYC VM (PEER's expert step, 256 tokens x 128 picks over 2^20 rows of 512,
// `BM_PeerExpertStep_*/1`), took the bf16 step from 1.6x the float step's time to 1.0x and the
// int8 step from 1.0x to 0.7x, against one row per pass (dot) and y's columns held in registers
// over 64 rows (axpy). The compact step's time moved up to 2x between processes, so kernels are
// compared in one process (docs/performance.md).

/// int8 rows' float scales, one per row.
struct RowScale {
  const float* scale;
  float dot(std::size_t id, float s) const { return scale[id] * s; }
  float coef(std::size_t id, float alpha) const { return alpha * scale[id]; }
  void prefetch(std::size_t id) const { prefetch_lines(scale + id, 1); }
};
#endif
}  // namespace detail

/// out[r] = table[ids[r]] . x for r < m: bfloat16 rows d long, ld apart.
template <class Arch = default_arch>
void gather_dot_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, std::size_t m,
                     const float* x, std::size_t d, float* out) {
#if SPEX_SIMD
  detail::rows_gather_dot<Arch, detail::Bf16Rows<Arch>>(table, ld, ids, m, x, d, out, detail::NoScale{});
#else
  scalar::gather_dot_bf16(table, ld, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * table[ids[r]]: bfloat16 rows.
template <class Arch = default_arch>
void gather_axpy_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, const float* alpha,
                      std::size_t m, float* y, std::size_t d) {
#if SPEX_SIMD
  detail::rows_gather_axpy<Arch, detail::Bf16Rows<Arch>>(table, ld, ids, alpha, m, y, d, detail::NoScale{});
#else
  scalar::gather_axpy_bf16(table, ld, ids, alpha, m, y, d);
#endif
}

/// out[r] = scale[ids[r]] * (table[ids[r]] . x): int8 rows with one float scale per row.
template <class Arch = default_arch>
void gather_dot_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                   std::size_t m, const float* x, std::size_t d, float* out) {
#if SPEX_SIMD
  detail::rows_gather_dot<Arch, detail::I8Rows<Arch>>(table, ld, ids, m, x, d, out, detail::RowScale{scale});
#else
  scalar::gather_dot_i8(table, ld, scale, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * scale[ids[r]] * table[ids[r]]: int8 rows.
template <class Arch = default_arch>
void gather_axpy_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                    const float* alpha, std::size_t m, float* y, std::size_t d) {
#if SPEX_SIMD
  detail::rows_gather_axpy<Arch, detail::I8Rows<Arch>>(table, ld, ids, alpha, m, y, d, detail::RowScale{scale});
#else
  scalar::gather_axpy_i8(table, ld, scale, ids, alpha, m, y, d);
#endif
}

}  // namespace spex::kernels
