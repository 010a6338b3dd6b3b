#pragma once
// Top-k selection of score rows: best first (descending), ties to the smaller index,
// deterministic. A min-heap of the k best keeps its worst entry at the root; a SIMD compare
// against that threshold rejects whole vectors of scores at once, and only the rare lanes
// above it touch the heap (the faiss HeapBlockResultHandler idea). Because ids arrive in
// increasing order, a score equal to the threshold can never win its tie, so the filter
// is a strict '>'.
// NaN scores are never selected; a row with fewer than k other scores pads with -inf / -1.
#include "scalar/topk.hpp"
#include "simd.hpp"

namespace spex::kernels {

/// Offers scores[0..n) with ids first_id + i to the top-k heap (vals, ids, size) of
/// capacity k. Successive calls for one heap must pass increasing ids (blocks in order).
template <class Arch = default_arch, class T>
void topk_push_block(const T* scores, std::size_t n, std::int64_t first_id, std::size_t k, T* vals,
                     std::int64_t* ids, std::size_t& size) {
  if (k == 0) return;
  std::size_t i = 0;
  // Fill phase: the first k non-NaN scores go in unconditionally.
  for (; i < n && size < k; ++i)
    if (!std::isnan(scores[i])) heap::push(vals, ids, size, scores[i], first_id + static_cast<std::int64_t>(i));
  if (i == n) return;
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  B thr(vals[0]);
  for (; i + 2 * W <= n; i += 2 * W) {
    const B v0 = B::load_unaligned(scores + i), v1 = B::load_unaligned(scores + i + W);
    if (!xsimd::any((v0 > thr) | (v1 > thr))) continue;
    for (std::size_t j = i; j < i + 2 * W; ++j)
      if (scores[j] > vals[0]) heap::replace_top(vals, ids, size, scores[j], first_id + static_cast<std::int64_t>(j));
    thr = B(vals[0]);
  }
#endif
  for (; i < n; ++i)
    if (scores[i] > vals[0]) heap::replace_top(vals, ids, size, scores[i], first_id + static_cast<std::int64_t>(i));
}

/// Top-k of scores[0..n) into vals/ids (k entries each), best first, ties to the smaller index.
template <class Arch = default_arch, class T>
void topk(const T* scores, std::size_t n, std::size_t k, T* vals, std::int64_t* ids) {
  std::size_t size = 0;
  topk_push_block<Arch>(scores, n, 0, k, vals, ids, size);
  topk_finish(k, vals, ids, size);
}

}  // namespace spex::kernels
