#pragma once
// Row gathers over a table of rows (expert tables: row i is expert i, contiguous). The rows
// are read in place and never copied out: this is the memory-bound step of PEER and PKM, so
// each kernel prefetches the rows it will read next (on AMD CPUs the float and bf16 kernels only
// their first line: prefetch_first_line_only) and walks four rows at a time to share the loads of x
// (gather_dot) or of y (gather_axpy).
// Preconditions (checked by the callers, not here): 0 <= ids[r] < rows of the table.
#include "scalar/gather.hpp"
#include "simd.hpp"
#include "vector.hpp"

namespace spex::kernels {

namespace detail {
// Rows ahead to prefetch. Measured on 2 KiB rows of a 2 GiB table: on a Xeon VM 4 gathered
// 17.4 GB/s with two threads, 2 gathered 15.4 (prefetching into L2 instead of L1, or further
// ahead, changed nothing there). On a 2-core AMD EPYC VM (Zen, huge pages), the expert step's
// pattern (u rows dotted, then v rows added, 128 product-key picks per token) ran 1.23-1.27x
// as fast (paired, interleaved runs) with four rows per pass and 8 rows ahead as with two rows
// and 4 ahead; 12 ahead was as fast as 8, 16 no faster. Compact rows (one per pass, 1 KiB or
// 512 B) gathered 1.3x (bf16) and 1.5x (int8) the rows per second with 8 ahead and no touch
// (below) than with 4 ahead and the touch. docs/performance.md has the layer's figures.
constexpr std::size_t kPrefetchAhead = 8;
// Rows ahead whose first value is loaded, not prefetched. On a Xeon VM (huge pages in the guest),
// prefetches of rows on pages missing from the TLB did not hide the page walk: rows arrived one
// memory latency apart whatever the prefetch distance (2 to 16 rows, same speed). A load does
// walk the page table, early, without stalling (nothing waits for its value): over 2^20 rows of
// 512, one thread gathered 19% (float) to 84% (int8) more rows per second with loads 16 ahead.
// On the AMD EPYC VM these loads cost instead (the float kernels gathered 12-15% more rows per
// second without them, the compact ones 20-45%), so they are made on Intel CPUs only, and for
// float rows only: the compact kernels, now several rows per pass, were no faster with them on
// an Intel Xeon VM either (kernels/compact.hpp).
constexpr std::size_t kTouchAhead = 16;

/// The CPU's vendor, read once (x86 with GCC or Clang; `other` elsewhere).
enum class CpuVendor { intel, amd, other };
inline CpuVendor cpu_vendor() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  static const CpuVendor vendor = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return CpuVendor::intel;
    if (__builtin_cpu_is("amd")) return CpuVendor::amd;
    return CpuVendor::other;
  }();
  return vendor;
#else
  return CpuVendor::other;
#endif
}

/// Whether the gathers touch rows ahead (Intel CPUs: see kTouchAhead).
inline bool touch_rows_ahead() { return cpu_vendor() == CpuVendor::intel; }

/// Whether the gathers prefetch only the first line of a row ahead (AMD CPUs) and leave the rest
/// of the row to the hardware's stream prefetcher. Measured on a 2-core AMD EPYC VM (family 26,
/// huge pages, 2 threads) over random 2 KiB rows of a 2 GiB table: a plain read of the rows ran
/// at 35-41 GB/s with the first line prefetched 8 rows ahead, 33-38 with 2 to 8 lines, 16-19
/// with every line; PEER's expert step ran 1.5-2x and its forward + backward 2x as fast
/// (docs/performance.md). bf16 rows (kernels/compact.hpp) do the same since they pass eight rows
/// at a time on AVX-512 (with four, the first line alone had been slower); int8 rows keep every
/// line (with the first only their step was slower in the layer). scatter_axpy
/// (rows written, not measured) keeps every line, and other CPUs keep the prefetches measured on
/// a Xeon VM (every line, with kTouchAhead for float rows).
inline bool prefetch_first_line_only() { return cpu_vendor() == CpuVendor::amd; }

/// Loads one value of `p` (the row's page gets walked and its first line fetched).
template <class T>
inline void touch(const T* p) {
  const volatile T* v = p;
  const T value = *v;
  (void)value;
}

}  // namespace detail

namespace detail {
/// Which lines of a row prefetch_row fetches: all of them, (AMD) the first only, or none (rows
/// already in cache).
enum class RowLines { all, first_on_amd, none };

/// Prefetches the row at position r of the id list and (Intel, when `touch_ahead`) touches the one
/// kTouchAhead - kPrefetchAhead further, if any. Kernels call it with r = their position +
/// kPrefetchAhead.
template <class T>
inline void prefetch_row(const T* table, std::size_t ld, const std::int64_t* ids, std::size_t r, std::size_t m,
                         std::size_t d, RowLines lines, bool touch_ahead = true) {
  if (lines == RowLines::none) return;
  const bool first = lines == RowLines::first_on_amd && prefetch_first_line_only();
  if (r < m) prefetch_lines(table + static_cast<std::size_t>(ids[r]) * ld, first ? 1 : static_cast<int>((d * sizeof(T) + 63) / 64));
  if (!touch_ahead || !touch_rows_ahead()) return;
  const std::size_t far = r + (kTouchAhead - kPrefetchAhead);
  if (far < m) touch(table + static_cast<std::size_t>(ids[far]) * ld);
}
}  // namespace detail

namespace detail {
#if SPEX_SIMD
// The row gathers below serve float rows here and compact rows (kernels/compact.hpp) alike. A
// Rows policy says how a row of its storage S reads as T: `batch` W values at p, `one` a single
// value, `lines`, which lines of a row are prefetched, `touch_ahead`, whether rows are touched
// ahead on Intel CPUs (kTouchAhead), and `rows_per_pass`, how many rows a pass reads at once
// (each row is summed in the same order whatever the pass). A Scale policy gives
// a row's dot (`dot`) and axpy coefficient (`coef`) their per-row scale and prefetches it
// (`prefetch`).

/// Rows of T read as they are stored; on AMD CPUs only their first line is prefetched.
template <class Arch, class T>
struct PlainRows {
  static xsimd::batch<T, Arch> batch(const T* p) { return xsimd::batch<T, Arch>::load_unaligned(p); }
  static T one(T v) { return v; }
  static constexpr RowLines lines = RowLines::first_on_amd;
  static constexpr bool touch_ahead = true;
  // Eight float rows per pass were 7% slower than four on a 2-core AMD EPYC VM (in one program).
  static constexpr std::size_t rows_per_pass = 4;
};

/// Float rows of a table that sits in cache (a few hundred KiB, read over and over): no
/// prefetch, no touch. On an Intel Xeon (2 MiB L2), the dots of ~27 random rows of 128 floats of
/// a 512 KiB table took 340 cycles this way against 480-900 with PlainRows' prefetches.
template <class Arch, class T>
struct CachedRows : PlainRows<Arch, T> {
  static constexpr RowLines lines = RowLines::none;
  static constexpr bool touch_ahead = false;
};

/// Rows without a scale.
struct NoScale {
  template <class T>
  T dot(std::size_t, T s) const { return s; }
  template <class T>
  T coef(std::size_t, T alpha) const { return alpha; }
  void prefetch(std::size_t) const {}
};

/// Prefetches row r of the id list (and its scale) when r < m.
template <class Rows, class S, class Scale>
inline void prefetch_pick(const S* table, std::size_t ld, const std::int64_t* ids, std::size_t r, std::size_t m, std::size_t d,
                          const Scale& scale) {
  prefetch_row(table, ld, ids, r, m, d, Rows::lines, Rows::touch_ahead);
  if (r < m) scale.prefetch(static_cast<std::size_t>(ids[r]));
}

/// Starts the pass over rows r .. r + Rows::rows_per_pass of the id list: prefetches the rows
/// kPrefetchAhead further on and points row[q] at row r + q.
template <class Rows, class S, class Scale>
inline void start_pass(const S* table, std::size_t ld, const std::int64_t* ids, std::size_t r, std::size_t m,
                       std::size_t d, const Scale& scale, const S* (&row)[Rows::rows_per_pass]) {
  for (std::size_t q = 0; q < Rows::rows_per_pass; ++q) prefetch_pick<Rows>(table, ld, ids, r + kPrefetchAhead + q, m, d, scale);
  for (std::size_t q = 0; q < Rows::rows_per_pass; ++q) row[q] = table + static_cast<std::size_t>(ids[r + q]) * ld;
}

/// row . x with two accumulators over alternate batches, then the last d mod W values (the
/// order every row gather sums a row in).
template <class Arch, class Rows, class S, class T>
inline T row_dot(const S* row, const T* x, std::size_t d) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  B a0(T(0)), a1(T(0));
  std::size_t i = 0;
  for (; i + 2 * W <= d; i += 2 * W) {
    a0 = xsimd::fma(Rows::batch(row + i), B::load_unaligned(x + i), a0);
    a1 = xsimd::fma(Rows::batch(row + i + W), B::load_unaligned(x + i + W), a1);
  }
  for (; i + W <= d; i += W) a0 = xsimd::fma(Rows::batch(row + i), B::load_unaligned(x + i), a0);
  T s = xsimd::hadd(a0 + a1);
  for (; i < d; ++i) s = madd(Rows::one(row[i]), x[i], s);
  return s;
}

/// out[r] = scale.dot(ids[r], row ids[r] . x) for r < m: Rows::rows_per_pass rows per pass
/// (the loads of x shared), each row summed as row_dot sums it, the rest one by one.
template <class Arch, class Rows, class S, class T, class Scale>
inline void rows_gather_dot(const S* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const T* x,
                            std::size_t d, T* out, const Scale& scale) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size, N = Rows::rows_per_pass;
  std::size_t r = 0;
  for (; r + N <= m; r += N) {
    const S* row[N];
    start_pass<Rows>(table, ld, ids, r, m, d, scale, row);
    B a0[N], a1[N];
    for (std::size_t q = 0; q < N; ++q) a0[q] = a1[q] = B(T(0));
    std::size_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      const B x0 = B::load_unaligned(x + i), x1 = B::load_unaligned(x + i + W);
      for (std::size_t q = 0; q < N; ++q) a0[q] = xsimd::fma(Rows::batch(row[q] + i), x0, a0[q]);
      for (std::size_t q = 0; q < N; ++q) a1[q] = xsimd::fma(Rows::batch(row[q] + i + W), x1, a1[q]);
    }
    for (; i + W <= d; i += W) {
      const B x0 = B::load_unaligned(x + i);
      for (std::size_t q = 0; q < N; ++q) a0[q] = xsimd::fma(Rows::batch(row[q] + i), x0, a0[q]);
    }
    for (std::size_t q = 0; q < N; ++q) {
      T s = xsimd::hadd(a0[q] + a1[q]);
      for (std::size_t j = i; j < d; ++j) s = madd(Rows::one(row[q][j]), x[j], s);
      out[r + q] = scale.dot(static_cast<std::size_t>(ids[r + q]), s);
    }
  }
  for (; r < m; ++r) {
    prefetch_pick<Rows>(table, ld, ids, r + kPrefetchAhead, m, d, scale);
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    out[r] = scale.dot(id, row_dot<Arch, Rows>(table + id * ld, x, d));
  }
}

/// y += sum_r scale.coef(ids[r], alpha[r]) row ids[r], added row after row: Rows::rows_per_pass
/// rows per pass over y (its loads and stores shared), the rest one by one.
template <class Arch, class Rows, class S, class T, class Scale>
inline void rows_gather_axpy(const S* table, std::size_t ld, const std::int64_t* ids, const T* alpha, std::size_t m, T* y,
                             std::size_t d, const Scale& scale) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size, N = Rows::rows_per_pass;
  std::size_t r = 0;
  for (; r + N <= m; r += N) {
    const S* row[N];
    start_pass<Rows>(table, ld, ids, r, m, d, scale, row);
    T k[N];
    for (std::size_t q = 0; q < N; ++q) k[q] = scale.coef(static_cast<std::size_t>(ids[r + q]), alpha[r + q]);
    std::size_t i = 0;
    for (; i + W <= d; i += W) {
      B acc = B::load_unaligned(y + i);
      for (std::size_t q = 0; q < N; ++q) acc = xsimd::fma(B(k[q]), Rows::batch(row[q] + i), acc);
      acc.store_unaligned(y + i);
    }
    for (; i < d; ++i) {
      T acc = y[i];
      for (std::size_t q = 0; q < N; ++q) acc = madd(k[q], Rows::one(row[q][i]), acc);
      y[i] = acc;
    }
  }
  for (; r < m; ++r) {
    prefetch_pick<Rows>(table, ld, ids, r + kPrefetchAhead, m, d, scale);
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    const T k = scale.coef(id, alpha[r]);
    const S* row = table + id * ld;
    const B c(k);
    std::size_t i = 0;
    for (; i + W <= d; i += W) xsimd::fma(c, Rows::batch(row + i), B::load_unaligned(y + i)).store_unaligned(y + i);
    for (; i < d; ++i) y[i] = madd(k, Rows::one(row[i]), y[i]);
  }
}
#endif
}  // namespace detail

/// out[r] = table[ids[r]] . x for r < m; rows are d long, ld apart. Several rows at a time (the
/// loads of x shared: detail::PlainRows), each summed as detail::row_dot sums it.
template <class Arch = default_arch, class T>
void gather_dot(const T* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const T* x,
                std::size_t d, T* out) {
#if SPEX_SIMD
  detail::rows_gather_dot<Arch, detail::PlainRows<Arch, T>>(table, ld, ids, m, x, d, out, detail::NoScale{});
#else
  scalar::gather_dot(table, ld, ids, m, x, d, out);
#endif
}

/// gather_dot (the same sums) over a table that sits in cache: no prefetches, which cost there
/// (detail::CachedRows).
template <class Arch = default_arch, class T>
void gather_dot_cached(const T* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const T* x, std::size_t d,
                       T* out) {
#if SPEX_SIMD
  detail::rows_gather_dot<Arch, detail::CachedRows<Arch, T>>(table, ld, ids, m, x, d, out, detail::NoScale{});
#else
  scalar::gather_dot(table, ld, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * table[ids[r]], added row after row (several rows per pass over y).
template <class Arch = default_arch, class T>
void gather_axpy(const T* table, std::size_t ld, const std::int64_t* ids, const T* alpha, std::size_t m,
                 T* y, std::size_t d) {
#if SPEX_SIMD
  detail::rows_gather_axpy<Arch, detail::PlainRows<Arch, T>>(table, ld, ids, alpha, m, y, d, detail::NoScale{});
#else
  scalar::gather_axpy(table, ld, ids, alpha, m, y, d);
#endif
}

/// table[ids[r]] += alpha[r] * x for r < m (repeated ids accumulate, in order).
template <class Arch = default_arch, class T>
void scatter_axpy(T* table, std::size_t ld, const std::int64_t* ids, const T* alpha, std::size_t m, const T* x,
                  std::size_t d) {
#if SPEX_SIMD
  for (std::size_t r = 0; r < m; ++r) {
    detail::prefetch_row(static_cast<const T*>(table), ld, ids, r + detail::kPrefetchAhead, m, d, detail::RowLines::all);
    axpy<Arch>(alpha[r], x, table + static_cast<std::size_t>(ids[r]) * ld, d);
  }
#else
  scalar::scatter_axpy(table, ld, ids, alpha, m, x, d);
#endif
}

}  // namespace spex::kernels
