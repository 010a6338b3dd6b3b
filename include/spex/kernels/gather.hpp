#pragma once
// Row gathers over a table of rows (expert tables: row i is expert i, contiguous). The rows
// are read in place and never copied out: this is the memory-bound step of PEER and PKM, so
// each kernel prefetches the rows it will read next and walks two rows at a time to share
// the loads of x (gather_dot) or of y (gather_axpy).
// Preconditions (checked by the callers, not here): 0 <= ids[r] < rows of the table.
#include "scalar/gather.hpp"
#include "simd.hpp"
#include "vector.hpp"

namespace spex::kernels {

namespace detail {
// Rows ahead to prefetch. Measured on 2 KiB rows of a 2 GiB table: 4 gathers 17.4 GB/s with two
// threads, 2 gathers 15.4 (prefetching into L2 instead of L1, or further ahead, changed nothing:
// one core then reads about as fast as it streams).
constexpr std::size_t kPrefetchAhead = 4;
// Rows ahead whose first value is loaded, not prefetched. On a Xeon VM (huge pages in the guest),
// prefetches of rows on pages missing from the TLB did not hide the page walk: rows arrived one
// memory latency apart whatever the prefetch distance (2 to 16 rows, same speed). A load does
// walk the page table, early, without stalling (nothing waits for its value): over 2^20 rows of
// 512, one thread gathered 19% (float) to 84% (int8) more rows per second with loads 16 ahead.
constexpr std::size_t kTouchAhead = 16;

/// Loads one value of `p` (the row's page gets walked and its first line fetched).
template <class T>
inline void touch(const T* p) {
  const volatile T* v = p;
  const T value = *v;
  (void)value;
}

/// Prefetches the row at position r of the id list and touches the one kTouchAhead -
/// kPrefetchAhead further, if any. Kernels call it with r = their position + kPrefetchAhead.
template <class T>
inline void prefetch_row(const T* table, std::size_t ld, const std::int64_t* ids, std::size_t r, std::size_t m,
                         std::size_t d) {
  if (r < m) prefetch_lines(table + static_cast<std::size_t>(ids[r]) * ld, static_cast<int>((d * sizeof(T) + 63) / 64));
  const std::size_t far = r + (kTouchAhead - kPrefetchAhead);
  if (far < m) touch(table + static_cast<std::size_t>(ids[far]) * ld);
}
}  // namespace detail

/// out[r] = table[ids[r]] . x for r < m; rows are d long, ld apart.
template <class Arch = default_arch, class T>
void gather_dot(const T* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const T* x,
                std::size_t d, T* out) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  std::size_t r = 0;
  for (; r + 2 <= m; r += 2) {
    detail::prefetch_row(table, ld, ids, r + detail::kPrefetchAhead, m, d);
    detail::prefetch_row(table, ld, ids, r + detail::kPrefetchAhead + 1, m, d);
    const T* r0 = table + static_cast<std::size_t>(ids[r]) * ld;
    const T* r1 = table + static_cast<std::size_t>(ids[r + 1]) * ld;
    B a0(T(0)), a1(T(0)), b0(T(0)), b1(T(0));
    std::size_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      const B x0 = B::load_unaligned(x + i), x1 = B::load_unaligned(x + i + W);
      a0 = xsimd::fma(B::load_unaligned(r0 + i), x0, a0);
      b0 = xsimd::fma(B::load_unaligned(r1 + i), x0, b0);
      a1 = xsimd::fma(B::load_unaligned(r0 + i + W), x1, a1);
      b1 = xsimd::fma(B::load_unaligned(r1 + i + W), x1, b1);
    }
    for (; i + W <= d; i += W) {
      const B x0 = B::load_unaligned(x + i);
      a0 = xsimd::fma(B::load_unaligned(r0 + i), x0, a0);
      b0 = xsimd::fma(B::load_unaligned(r1 + i), x0, b0);
    }
    T s0 = xsimd::hadd(a0 + a1), s1 = xsimd::hadd(b0 + b1);
    for (; i < d; ++i) {
      s0 += r0[i] * x[i];
      s1 += r1[i] * x[i];
    }
    out[r] = s0;
    out[r + 1] = s1;
  }
  if (r < m) out[r] = dot<Arch>(table + static_cast<std::size_t>(ids[r]) * ld, x, d);
#else
  scalar::gather_dot(table, ld, ids, m, x, d, out);
#endif
}

/// y += sum_r alpha[r] * table[ids[r]]
template <class Arch = default_arch, class T>
void gather_axpy(const T* table, std::size_t ld, const std::int64_t* ids, const T* alpha, std::size_t m,
                 T* y, std::size_t d) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  std::size_t r = 0;
  for (; r + 2 <= m; r += 2) {
    detail::prefetch_row(table, ld, ids, r + detail::kPrefetchAhead, m, d);
    detail::prefetch_row(table, ld, ids, r + detail::kPrefetchAhead + 1, m, d);
    const T* r0 = table + static_cast<std::size_t>(ids[r]) * ld;
    const T* r1 = table + static_cast<std::size_t>(ids[r + 1]) * ld;
    const B c0(alpha[r]), c1(alpha[r + 1]);
    std::size_t i = 0;
    for (; i + W <= d; i += W) {
      const B acc = xsimd::fma(c0, B::load_unaligned(r0 + i), B::load_unaligned(y + i));
      xsimd::fma(c1, B::load_unaligned(r1 + i), acc).store_unaligned(y + i);
    }
    for (; i < d; ++i) y[i] += alpha[r] * r0[i] + alpha[r + 1] * r1[i];
  }
  if (r < m) axpy<Arch>(alpha[r], table + static_cast<std::size_t>(ids[r]) * ld, y, d);
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
    detail::prefetch_row(static_cast<const T*>(table), ld, ids, r + detail::kPrefetchAhead, m, d);
    axpy<Arch>(alpha[r], x, table + static_cast<std::size_t>(ids[r]) * ld, d);
  }
#else
  scalar::scatter_axpy(table, ld, ids, alpha, m, x, d);
#endif
}

}  // namespace spex::kernels
