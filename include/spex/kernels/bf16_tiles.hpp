#pragma once
// Approximate inner products of float rows in bf16: both operands rounded to bf16, products
// summed in float, through Intel AMX bf16 tiles (TDPBF16PS) or, on CPUs with AVX512_BF16 and no
// AMX (AMD Zen 4 and newer, Intel Cooper Lake), its vector form VDPBF16PS over the same packed
// operands. The scores are within a known bound of the exact ones (bf16_score_error below), so a
// caller can keep every row that may rank in its exact top-k and score those exactly
// (kernels/refined_topk.hpp): an exact search whose bulk runs at the bf16 rate (about five
// times the float FMA rate of one core with the tiles, twice it with VDPBF16PS).
//
// The tiles compile in when the build targets AMX (__AMX_TILE__ and __AMX_BF16__, e.g.
// -march=native on a Sapphire Rapids or newer Xeon); at run time the process must be granted the
// tile state (Linux, arch_prctl): bf16_tiles_ready() asks once and says whether the kernels may
// run. VDPBF16PS compiles in when the build targets AVX512_BF16 (__AVX512BF16__) and not AMX.
// Elsewhere the kernels compile to nothing and bf16_tiles_ready() is false.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <cstdint>

#include "scalar/compact.hpp"
#include "simd.hpp"  // first: it includes the intrinsics with GCC 12's spurious warnings off
#include "gather.hpp"     // detail::cpu_vendor
#include "transpose.hpp"
#include "vector.hpp"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define SPEX_AVX512_BF16 1
#include "detail/intrinsics_warnings_off.hpp"
#include <immintrin.h>
#include "detail/intrinsics_warnings_on.hpp"
#else
#define SPEX_AVX512_BF16 0
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define SPEX_AMX_BF16 1
#include "detail/intrinsics_warnings_off.hpp"
#include <immintrin.h>
#include "detail/intrinsics_warnings_on.hpp"
#include <sys/syscall.h>
#include <unistd.h>
#else
#define SPEX_AMX_BF16 0
#endif

namespace spex::kernels {

/// Rows and columns of one tile: 16 rows of 32 bf16 (64 bytes) per operand, 16 x 16 floats out.
inline constexpr std::size_t kTileRows = 16, kTileDepth = 32;

/// Bound on |tile score - exact score| for rows q and c of h values, where "exact" is any float
/// dot of q and c (kernels::dot, gather_dot): nq, nc bound their Euclidean norms and eq, ec the
/// norms of their rounding to bf16, |bf16(q) - q| and |bf16(c) - c| (bf16_rounding_bound; at
/// most 2^-8 nq and 2^-8 nc). With q~ = bf16(q): |q~ . c~ - q . c| = |q~ . (c~ - c) + (q~ - q) . c|
/// <= |q~| ec + eq nc (Cauchy-Schwarz) and |q~| <= nq (1 + 2^-8); summing h products in float,
/// in any order and rounding or truncating, errs by at most h 2^-23 |q~| |c~|, the exact dot by
/// h 2^-24 nq nc. The 8 extra 2^-22 nq nc cover the float arithmetic of the bound and of the
/// callers' thresholds; the last term the tiles' flushing of values and sums below 2^-126.
inline float bf16_score_error(std::size_t h, float nq, float nc, float eq, float ec) {
  return (1 + 0x1p-7f) * (nq * ec + eq * nc) + static_cast<float>(h + 8) * 0x1p-22f * nq * nc +
         0x1p-100f * (1.0f + nq) * (1.0f + nc);
}

#if SPEX_AVX512_BF16
// The lanes of the 16 values from i on that lie below h.
inline __mmask16 lanes(std::size_t h, std::size_t i) {
  return i >= h ? __mmask16(0) : h - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (h - i)) - 1);
}
#endif

/// Length of a packed row of h values: h rounded up to whole tile depths (zeros beyond h).
inline std::size_t bf16_row_length(std::size_t h) { return (h + kTileDepth - 1) / kTileDepth * kTileDepth; }

/// Rows r0 .. r0 + rows of a float matrix (row r at src + r * stride) as bf16 rows of
/// bf16_row_length(h) values, row-major, the padding zero: the "A" operand of scores_bf16_tiles.
inline void pack_rows_bf16(const float* src, std::size_t stride, std::size_t rows, std::size_t h, std::uint16_t* out) {
  const std::size_t hp = bf16_row_length(h);
#if SPEX_AVX512_BF16
  // VCVTNE2PS2BF16 rounds to nearest even as scalar::float_to_bf16 does (and flushes denormals to zero, which
  // the tiles would do anyway).
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t i = 0; i < hp; i += kTileDepth) {
      const float* x = src + r * stride + i;
      _mm512_storeu_si512(out + r * hp + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(lanes(h, i + 16), x + 16),
                                                                        _mm512_maskz_loadu_ps(lanes(h, i), x)));
    }
#else
  for (std::size_t r = 0; r < rows; ++r) {
    const float* x = src + r * stride;
    std::uint16_t* o = out + r * hp;
    for (std::size_t i = 0; i < h; ++i) o[i] = scalar::float_to_bf16(x[i]);
    for (std::size_t i = h; i < hp; ++i) o[i] = 0;
  }
#endif
}

/// Values a key panel of n rows of h takes (pack_keys_bf16): n rounded up to 32 rows.
inline std::size_t bf16_key_panel_size(std::size_t n, std::size_t h) {
  return (n + 2 * kTileRows - 1) / (2 * kTileRows) * (2 * kTileRows) * bf16_row_length(h);
}

/// Key rows j0 .. j0 + rows (row j at src + j * stride; j0 a multiple of 16) into the key panel
/// `panel` of scores_bf16_tiles: for each block of 16 keys and each tile depth of 32 values,
/// 16 lines of 64 bytes, line p holding values 2p and 2p + 1 of each of the 16 keys (the
/// pairs TDPBF16PS multiplies). The lanes of the last block past j0 + rows are written as zero
/// keys; whole blocks past the table up to the panel's 32-key multiple are the caller's to zero.
inline void pack_keys_bf16(const float* src, std::size_t stride, std::size_t j0, std::size_t rows, std::size_t h,
                           std::uint16_t* panel) {
  const std::size_t hp = bf16_row_length(h), depths = hp / kTileDepth, end = j0 + rows;
  // One 32-bit word per pair: word (block, depth, pair, lane) of the panel.
  std::uint32_t* words = reinterpret_cast<std::uint32_t*>(panel);
  for (std::size_t b0 = j0; b0 < end; b0 += kTileRows) {
    std::uint32_t* block = words + (b0 / kTileRows) * depths * kTileRows * kTileRows;
#if SPEX_AVX512_BF16
    // Each key's 32 values of a depth convert to the 16 words of one row, and the 16 x 16
    // words are transposed in registers: row p is then line p of the panel.
    for (std::size_t d = 0; d < depths; ++d) {
      const std::size_t i = d * kTileDepth;
      __m512 r[kTileRows];
      for (std::size_t l = 0; l < kTileRows; ++l) {
        const float* x = src + (b0 + l) * stride + i;
        r[l] = b0 + l < end ? (__m512)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(lanes(h, i + 16), x + 16),
                                                          _mm512_maskz_loadu_ps(lanes(h, i), x))
                            : _mm512_setzero_ps();
      }
      detail::transpose_16x16(r);
      for (std::size_t p = 0; p < kTileRows; ++p) _mm512_storeu_ps(block + (d * kTileRows + p) * kTileRows, r[p]);
    }
#else
    for (std::size_t l = 0; l < kTileRows; ++l) {
      const float* x = b0 + l < end ? src + (b0 + l) * stride : nullptr;
      for (std::size_t pair = 0; pair < hp / 2; ++pair) {  // word (depth, pair % 16, lane) = pair * 16 + lane
        const std::size_t i = 2 * pair;
        const std::uint32_t lo = x && i < h ? scalar::float_to_bf16(x[i]) : 0u, hi = x && i + 1 < h ? scalar::float_to_bf16(x[i + 1]) : 0u;
        block[pair * kTileRows + l] = lo | hi << 16;
      }
    }
#endif
  }
}

/// Rows (and queries) whose norm exceeds this are scored in float: below it the bf16 scores and
/// their bound stay finite (|q| |c| (1 + 2^-6) < 2^128).
inline constexpr float kBf16MaxNorm = 0x1p60f;

/// An upper bound on the Euclidean norm of x[0..h): the float dot of x with itself errs by at
/// most h 2^-24 of it, the square root and the product by an ulp each. Infinite when above
/// kBf16MaxNorm or not finite (callers then take the float path).
template <class Arch = default_arch>
float norm_bound(const float* x, std::size_t h) {
  const float r = std::sqrt(dot<Arch>(x, x, h) * (1 + float(h + 4) * 0x1p-23f)) * (1 + 0x1p-21f);
  return r <= kBf16MaxNorm ? r : std::numeric_limits<float>::infinity();
}

/// An upper bound on |bf16(x) - x| over x[0..h) (rounded to nearest even, as the packing does):
/// each difference is exact in float, their squares sum with at most h 2^-24 relative error.
/// x must be finite (callers check norm_bound first).
template <class Arch = default_arch>
float bf16_rounding_bound(const float* x, std::size_t h) {
  float sum = 0;
  std::size_t i = 0;
#if SPEX_SIMD
  using B = xsimd::batch<float, Arch>;
  using U = xsimd::batch<std::uint32_t, Arch>;
  constexpr std::size_t W = B::size;
  B acc(0.0f);
  for (; i + W <= h; i += W) {
    const B v = B::load_unaligned(x + i);
    U b = xsimd::bitwise_cast<U>(v);
    b = (b + (U(0x7fffu) + ((b >> 16) & U(1u)))) & U(0xffff0000u);
    const B d = xsimd::bitwise_cast<B>(b) - v;
    acc = xsimd::fma(d, d, acc);
  }
  sum = xsimd::hadd(acc);
#endif
  for (; i < h; ++i) {
    const float d = scalar::bf16_to_float(scalar::float_to_bf16(x[i])) - x[i];
    sum += d * d;
  }
  return std::sqrt(sum * (1 + float(h + 4) * 0x1p-23f)) * (1 + 0x1p-21f);
}

/// The largest norm_bound and bf16_rounding_bound over `rows` rows of h values (row r at
/// x + r * stride): what bf16_score_error takes for a table or block of rows (or one query).
/// The norm is infinite when a row is not finite or above kBf16MaxNorm (the rounding is then
/// left out for that row: callers take the float path).
struct Bf16RowsBound {
  float norm = 0, rounding = 0;
};
template <class Arch = default_arch>
Bf16RowsBound bf16_rows_bound(const float* x, std::size_t stride, std::size_t rows, std::size_t h) {
  Bf16RowsBound b;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* row = x + r * stride;
    const float norm = norm_bound<Arch>(row, h);
    b.norm = std::max(b.norm, norm);
    if (norm <= kBf16MaxNorm) b.rounding = std::max(b.rounding, bf16_rounding_bound<Arch>(row, h));
  }
  return b;
}

/// Zeroes the whole blocks of a key panel of n keys past its last packed block, up to the
/// panel's 32-key multiple (the zero keys scores_bf16_tiles reads there).
inline void zero_key_panel_tail(std::uint16_t* panel, std::size_t n, std::size_t h) {
  const std::size_t hp = bf16_row_length(h), packed = (n + kTileRows - 1) / kTileRows * kTileRows;
  std::fill(panel + packed * hp, panel + bf16_key_panel_size(n, h), std::uint16_t(0));
}

/// What scores_bf16_tiles runs on in this build: AMX tiles, VDPBF16PS (AVX512_BF16 without
/// AMX), or nothing.
enum class Bf16Scores { none, vector_dot, amx_tiles };
inline constexpr Bf16Scores kBf16Scores =
    SPEX_AMX_BF16 ? Bf16Scores::amx_tiles : SPEX_AVX512_BF16 ? Bf16Scores::vector_dot : Bf16Scores::none;

/// True when scores_bf16_tiles may run: the build targets AMX bf16 and the OS granted this
/// process the tile state (asked once, thread-safe), or the build targets AVX512_BF16.
inline bool bf16_tiles_ready() {
#if SPEX_AMX_BF16
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, Linux 5.16+
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return SPEX_AVX512_BF16;
#endif
}

/// Whether the searches' `automatic` choice may take the bf16 scores on this CPU (within the
/// shapes each search names): with AMX tiles, yes; with VDPBF16PS, on AMD CPUs only, where it was
/// measured (Zen 5: twice the float FMA rate). On an Intel Xeon (Sapphire Rapids) VDPBF16PS ran
/// at half the float FMA rate (docs/performance.md, "Top-k"), so Intel CPUs without AMX keep
/// the float GEMM unless a search asks for `always`.
inline bool bf16_scores_by_default() {
  return bf16_tiles_ready() && (SPEX_AMX_BF16 || detail::cpu_vendor() == detail::CpuVendor::amd);
}

/// out (rows32 x n32 floats, row stride ld >= n32) = the bf16 inner products of the packed
/// query rows `q` (rows32 rows of bf16_row_length(h), pack_rows_bf16; rows32 a multiple of 32)
/// with the n32 keys of `panel` (pack_keys_bf16; n32 a multiple of 32). Only when
/// bf16_tiles_ready(); with AMX it configures the calling thread's tiles and releases them on
/// return.
inline void scores_bf16_tiles(const std::uint16_t* q, std::size_t rows32, const std::uint16_t* panel, std::size_t n32,
                              std::size_t h, float* out, std::size_t ld) {
#if SPEX_AMX_BF16
  // Tiles 0-3: a 32 x 32 block of scores (2 x 2 tiles of 16 x 16 floats); 4, 5: 16 query rows
  // each; 6, 7: 16 keys each. Each TDPBF16PS adds one tile depth (32 values) to one 16 x 16 tile.
  struct alignas(64) TileConfig {
    std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
    std::uint16_t bytes_per_row[16] = {};
    std::uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
  const std::size_t hp = bf16_row_length(h), depths = hp / kTileDepth, q_stride = hp * 2, out_stride = ld * 4;
  const std::size_t key_block = depths * kTileRows * kTileDepth;  // values per 16 keys
  for (std::size_t r0 = 0; r0 < rows32; r0 += 32) {
    const std::uint16_t* qa = q + r0 * hp;
    const std::uint16_t* qb = qa + kTileRows * hp;
    for (std::size_t j0 = 0; j0 < n32; j0 += 32) {
      const std::uint16_t* ka = panel + (j0 / kTileRows) * key_block;
      const std::uint16_t* kb = ka + key_block;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (std::size_t d = 0; d < depths; ++d) {
        _tile_loadd(4, qa + d * kTileDepth, q_stride);
        _tile_loadd(5, qb + d * kTileDepth, q_stride);
        _tile_loadd(6, ka + d * kTileRows * kTileDepth, 64);
        _tile_loadd(7, kb + d * kTileRows * kTileDepth, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* o = out + r0 * ld + j0;
      _tile_stored(0, o, out_stride);
      _tile_stored(1, o + kTileRows, out_stride);
      _tile_stored(2, o + kTileRows * ld, out_stride);
      _tile_stored(3, o + kTileRows * ld + kTileRows, out_stride);
    }
  }
  _tile_release();
#elif SPEX_AVX512_BF16
  // VDPBF16PS adds the products of one value pair of a query (broadcast) and of 16 keys (line p
  // of a key block) to 16 float sums: 8 query rows x 32 keys of scores in 16 registers, each key
  // line loaded once for the 8 rows. Keys outer: a 32-key block (32 x h bf16) stays in L1 while
  // the query rows go by.
  constexpr std::size_t kRows = 8;
  const std::size_t pairs = bf16_row_length(h) / 2, block_words = pairs * kTileRows;  // words of 16 keys
  const auto* q_words = reinterpret_cast<const std::uint32_t*>(q);
  const auto* key_words = reinterpret_cast<const std::uint32_t*>(panel);
  for (std::size_t j0 = 0; j0 < n32; j0 += 2 * kTileRows) {
    const std::uint32_t* ka = key_words + (j0 / kTileRows) * block_words;
    const std::uint32_t* kb = ka + block_words;
    for (std::size_t r0 = 0; r0 < rows32; r0 += kRows) {
      const std::uint32_t* qr = q_words + r0 * pairs;
      __m512 sa[kRows], sb[kRows];
      for (std::size_t r = 0; r < kRows; ++r) sa[r] = sb[r] = _mm512_setzero_ps();
      for (std::size_t p = 0; p < pairs; ++p) {
        const __m512bh a = (__m512bh)_mm512_loadu_si512(ka + p * kTileRows);
        const __m512bh b = (__m512bh)_mm512_loadu_si512(kb + p * kTileRows);
        for (std::size_t r = 0; r < kRows; ++r) {
          const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[r * pairs + p]));
          sa[r] = _mm512_dpbf16_ps(sa[r], x, a);
          sb[r] = _mm512_dpbf16_ps(sb[r], x, b);
        }
      }
      for (std::size_t r = 0; r < kRows; ++r) {
        _mm512_storeu_ps(out + (r0 + r) * ld + j0, sa[r]);
        _mm512_storeu_ps(out + (r0 + r) * ld + j0 + kTileRows, sb[r]);
      }
    }
  }
#else
  (void)q, (void)rows32, (void)panel, (void)n32, (void)h, (void)out, (void)ld;
#endif
}

}  // namespace spex::kernels
