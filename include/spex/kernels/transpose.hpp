#pragma once
// Rows written as columns: the MoE experts' feature-major blocks (experts/ffn.hpp) gather an
// expert's tokens as the columns of xᵀ, and copy the columns of yᵀ back to token rows or add
// them, scaled by the tokens' gates, to the tokens' output rows (transpose_rows_axpy).
// On AVX-512, float: whole 16 x 16 tiles are transposed in registers (16 loads, 64 shuffles, 16
// stores). Measured on a 2-core AMD EPYC VM (AVX-512), one thread, 4096 rows of 512 floats
// from a 512-row matrix into 512 columns: 0.30-0.35 ms per pass against 0.70-0.81 ms for the
// scalar loop (its twin); hardware gathers (one vgatherdps per 16 values) took 0.89-0.96 ms.
// The tiles at the edges (an expert's last tokens) load and store through masks. Other ISAs
// and types run the scalar twin's loop. transpose_rows only copies, and transpose_rows_axpy
// adds with kernels::axpy itself: the same bits on every path.
#include <algorithm>
#include <cstddef>

#include "scalar/transpose.hpp"
#include "simd.hpp"
#include "vector.hpp"

namespace spex::kernels {

namespace detail {
#if SPEX_SIMD && defined(__AVX512F__)
/// r[0..16) (16 rows of 16 floats) transposed in place: r[c] becomes column c.
inline void transpose_16x16(__m512 r[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {  // pairs of rows interleaved: (a0 b0 a1 b1 ...), (a2 b2 a3 b3 ...) per 128-bit lane
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k)  // four rows: one column of four per 128-bit lane
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[4 * k + h]), b = _mm512_castps_pd(t[4 * k + 2 + h]);
      r[4 * k + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * k + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int k = 0; k < 2; ++k)  // eight rows: 128-bit lanes regrouped
    for (int h = 0; h < 4; ++h) {
      t[8 * k + h] = _mm512_shuffle_f32x4(r[8 * k + h], r[8 * k + 4 + h], 0x88);
      t[8 * k + 4 + h] = _mm512_shuffle_f32x4(r[8 * k + h], r[8 * k + 4 + h], 0xdd);
    }
  for (int h = 0; h < 8; ++h) {  // sixteen rows
    r[h] = _mm512_shuffle_f32x4(t[h], t[8 + h], 0x88);
    r[8 + h] = _mm512_shuffle_f32x4(t[h], t[8 + h], 0xdd);
  }
}
#endif
}  // namespace detail

#if SPEX_SIMD && defined(__AVX512F__)
namespace detail {
/// The n rows row(0), ..., row(n - 1) of m floats read in 16 x 16 tiles and transposed in
/// registers: store(i0, j0, rows, cols, r) gets tile (i0, j0) with r[c] holding the values
/// row(j0 + j)[i0 + c] for j < rows, c < cols. A tile at an edge (an expert's last tokens) is
/// read through masks (a masked lane neither reads nor faults), its missing rows as zeros.
template <class RowOf, class Store>
void for_each_transposed_tile(RowOf&& row, std::size_t n, std::size_t m, Store&& store) {
  constexpr std::size_t kTile = 16;
  for (std::size_t j0 = 0; j0 < n; j0 += kTile) {
    const std::size_t rows = std::min(kTile, n - j0);
    const float* src[kTile];
    for (std::size_t j = 0; j < rows; ++j) src[j] = row(j0 + j);
    for (std::size_t i0 = 0; i0 < m; i0 += kTile) {
      const std::size_t cols = std::min(kTile, m - i0);
      __m512 r[kTile];
      if (rows == kTile && cols == kTile) {
        for (std::size_t j = 0; j < kTile; ++j) r[j] = _mm512_loadu_ps(src[j] + i0);
      } else {
        const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
        for (std::size_t j = 0; j < kTile; ++j) r[j] = j < rows ? _mm512_maskz_loadu_ps(col_mask, src[j] + i0) : _mm512_setzero_ps();
      }
      transpose_16x16(r);
      store(i0, j0, rows, cols, r);
    }
  }
}
}  // namespace detail
#endif

/// dst[i * ld_dst + j] = row(j)[i] for i < m, j < n: the n rows row(0), ..., row(n - 1) (each at
/// least m long; `row` maps an index to a pointer) written as the columns of dst (m rows, ld_dst
/// apart). dst must not overlap the rows.
template <class Arch = default_arch, class T, class RowOf>
void transpose_rows(RowOf&& row, std::size_t n, std::size_t m, T* dst, std::size_t ld_dst) {
#if SPEX_SIMD && defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value && std::is_same<T, float>::value) {
    detail::for_each_transposed_tile(row, n, m, [&](std::size_t i0, std::size_t j0, std::size_t rows, std::size_t cols, const __m512* r) {
      if (rows == 16 && cols == 16) {
        for (std::size_t c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (i0 + c) * ld_dst + j0, r[c]);
        return;
      }
      const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);  // only the tile's rows x cols values
      for (std::size_t c = 0; c < cols; ++c) _mm512_mask_storeu_ps(dst + (i0 + c) * ld_dst + j0, row_mask, r[c]);
    });
    return;
  }
#endif
  scalar::transpose_rows(row, n, m, dst, ld_dst);
}

/// out(i)[j] = fma(scale(i), row(j)[i], out(i)[j]) for i < m, j < n: the n rows row(0), ...,
/// row(n - 1) (each at least m long) as columns, column i scaled by scale(i) and added to the row
/// out(i) (n long; `out` maps an index to a pointer, `scale` to a factor). Each sum is rounded
/// as kernels::axpy rounds it: adding a column here gives the bits axpy(scale(i), column,
/// out(i)) gives.
/// The out(i) must be distinct rows that overlap neither each other nor the rows read.
template <class Arch = default_arch, class T, class RowOf, class ScaleOf, class OutOf>
void transpose_rows_axpy(RowOf&& row, std::size_t n, std::size_t m, ScaleOf&& scale, OutOf&& out) {
#if SPEX_SIMD && defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value && std::is_same<T, float>::value) {
    // 16 columns at a time transposed into rows of a buffer on the stack (L1), each then added
    // to its out row by axpy itself, so the adds run along whole rows. Adding each 16 x 16 tile
    // as it left the registers touched one line of 16 rows at a time, which over rows out of
    // cache made an MoE forward at 4096 tokens take 1.05-1.10x its time with this buffer
    // (docs/performance.md, "MoE experts"). The first lines of the 16 rows are prefetched
    // before the transpose.
    constexpr std::size_t kCols = 16, kChunk = 512;
    alignas(64) float buf[kCols * kChunk];
    for (std::size_t i0 = 0; i0 < m; i0 += kCols) {
      const std::size_t cols = std::min(kCols, m - i0);
      for (std::size_t j0 = 0; j0 < n; j0 += kChunk) {
        const std::size_t count = std::min(kChunk, n - j0);
        for (std::size_t i = 0; i < cols; ++i) prefetch_lines(out(i0 + i) + j0, 4);
        transpose_rows<Arch>([&](std::size_t j) { return row(j0 + j) + i0; }, count, cols, buf, kChunk);
        for (std::size_t i = 0; i < cols; ++i) axpy<Arch>(scale(i0 + i), buf + i * kChunk, out(i0 + i) + j0, count);
      }
    }
    return;
  }
#endif
  // Elsewhere each column gathered, a chunk at a time, and added by kernels::axpy itself.
  constexpr std::size_t kChunk = 64;
  T column[kChunk];
  for (std::size_t i = 0; i < m; ++i) {
    T* o = out(i);
    const T a = scale(i);
    for (std::size_t j0 = 0; j0 < n; j0 += kChunk) {
      const std::size_t count = std::min(kChunk, n - j0);
      for (std::size_t j = 0; j < count; ++j) column[j] = row(j0 + j)[i];
      axpy<Arch>(a, column, o + j0, count);
    }
  }
}

}  // namespace spex::kernels
