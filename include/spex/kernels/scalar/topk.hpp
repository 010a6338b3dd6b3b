#pragma once
// Scalar twin of kernels/topk.hpp: the same streaming heap, without the SIMD filter.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../detail/heap.hpp"

namespace spex::kernels {

/// Sorts a top-k heap best first and pads the slots it could not fill (fewer than k
/// non-NaN scores were offered) with score -inf and id -1.
template <class T>
void topk_finish(std::size_t k, T* vals, std::int64_t* ids, std::size_t size) {
  heap::sort_best_first(vals, ids, size);
  for (std::size_t i = size; i < k; ++i) {
    vals[i] = -std::numeric_limits<T>::infinity();
    ids[i] = -1;
  }
}

namespace scalar {

/// Offers scores[0..n) with ids first_id + i to the top-k heap (vals, ids, size).
/// Successive calls for one heap must pass increasing ids (blocks in order).
template <class T>
void topk_push_block(const T* scores, std::size_t n, std::int64_t first_id, std::size_t k, T* vals,
                     std::int64_t* ids, std::size_t& size) {
  for (std::size_t i = 0; i < n; ++i) {
    const T s = scores[i];
    if (std::isnan(s)) continue;
    heap::offer(vals, ids, size, k, s, first_id + static_cast<std::int64_t>(i));
  }
}

/// Top-k of scores[0..n), best first, ties to the smaller index; NaN never selected.
template <class T>
void topk(const T* scores, std::size_t n, std::size_t k, T* vals, std::int64_t* ids) {
  std::size_t size = 0;
  topk_push_block(scores, n, 0, k, vals, ids, size);
  topk_finish(k, vals, ids, size);
}

}  // namespace scalar
}  // namespace spex::kernels
