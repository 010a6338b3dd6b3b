#pragma once
// Exact top-k of the Cartesian sums {a[i] + b[j]} of two lists sorted best first (the top-k
// of each product-key half), ids ia[i] * n + ib[j]. Three ways, all exact and all giving
// the same list, best first with ties to the smaller id:
//  - full:   every one of the ka * kb sums through a top-k heap;
//  - pruned: pair (i, j) is beaten by the (i+1)(j+1) - 1 pairs (i' <= i, j' <= j) (larger or
//            equal sum, and on equal sums a smaller id, because each list breaks its own ties
//            to the smaller index), so only pairs with (i+1)(j+1) <= k can be in the top k:
//            about k ln k of them, 50 of 256 at k = 16;
//  - heap:   the multi-sequence walk of the inverted multi-index (Babenko & Lempitsky 2012):
//            pop the best pair of a frontier k times, pushing (i, j+1), and (i+1, 0) when j = 0;
//            every pair is pushed once, the frontier holds at most k + 1 pairs.
// Pure scalar code: the inputs are a few dozen values, so branches beat vectors here.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "detail/heap.hpp"
#include "scalar/topk.hpp"

namespace spex::kernels {

enum class ProductTopK { full, pruned, heap };

inline const char* to_string(ProductTopK m) {
  switch (m) {
    case ProductTopK::full: return "full";
    case ProductTopK::pruned: return "pruned";
    case ProductTopK::heap: return "heap";
  }
  return "?";
}

/// Frontier storage for the heap walk, reused across calls (no allocation once reserved).
template <class T>
struct ProductTopKScratch {
  std::vector<T> vals;
  std::vector<std::int64_t> ids;
  std::vector<std::int64_t> pos;  // i * kb + j of each frontier entry
  void reserve(std::size_t k) {
    if (vals.size() < k + 1) {
      vals.resize(k + 1);
      ids.resize(k + 1);
      pos.resize(k + 1);
    }
  }
};

/// All ka * kb sums. Any sizes: when k > ka * kb the tail pads with -inf / -1.
template <class T>
void product_topk_full(const T* a, const std::int64_t* ia, std::size_t ka, const T* b, const std::int64_t* ib,
                       std::size_t kb, std::int64_t n, std::size_t k, T* vals, std::int64_t* ids) {
  std::size_t size = 0;
  for (std::size_t i = 0; i < ka; ++i)
    for (std::size_t j = 0; j < kb; ++j) heap::offer(vals, ids, size, k, a[i] + b[j], ia[i] * n + ib[j]);
  topk_finish(k, vals, ids, size);
}

/// Only the pairs with (i+1)(j+1) <= k, within the lists: any sizes (when k > ka * kb the
/// tail pads with -inf / -1).
template <class T>
void product_topk_pruned(const T* a, const std::int64_t* ia, std::size_t ka, const T* b, const std::int64_t* ib,
                         std::size_t kb, std::int64_t n, std::size_t k, T* vals, std::int64_t* ids) {
  std::size_t size = 0;
  for (std::size_t i = 0; i < k && i < ka; ++i) {
    const std::size_t jmax = std::min(k / (i + 1), kb);
    const T ai = a[i];
    const std::int64_t row = ia[i] * n;
    for (std::size_t j = 0; j < jmax; ++j) {
      const T s = ai + b[j];
      if (size == k && s < vals[0]) break;  // b is sorted: the rest of this row is worse too
      heap::offer(vals, ids, size, k, s, row + ib[j]);
    }
  }
  topk_finish(k, vals, ids, size);
}

/// Multi-sequence walk. Any sizes (when k > ka * kb the tail pads with -inf / -1).
template <class T>
void product_topk_heap(const T* a, const std::int64_t* ia, std::size_t ka, const T* b, const std::int64_t* ib,
                       std::size_t kb, std::int64_t n, std::size_t k, T* vals, std::int64_t* ids,
                       ProductTopKScratch<T>& scratch) {
  scratch.reserve(k);
  T* fv = scratch.vals.data();
  std::int64_t* fid = scratch.ids.data();
  std::int64_t* fpos = scratch.pos.data();
  std::size_t size = 0;
  // The frontier is a max-heap (root = best): sift with the order reversed.
  auto up = [&](std::size_t p) {
    const T v = fv[p];
    const std::int64_t id = fid[p], ps = fpos[p];
    while (p > 0) {
      const std::size_t parent = (p - 1) / 2;
      if (!heap::better(v, id, fv[parent], fid[parent])) break;
      fv[p] = fv[parent];
      fid[p] = fid[parent];
      fpos[p] = fpos[parent];
      p = parent;
    }
    fv[p] = v;
    fid[p] = id;
    fpos[p] = ps;
  };
  auto down = [&](std::size_t p) {
    const T v = fv[p];
    const std::int64_t id = fid[p], ps = fpos[p];
    for (;;) {
      std::size_t c = 2 * p + 1;
      if (c >= size) break;
      if (c + 1 < size && heap::better(fv[c + 1], fid[c + 1], fv[c], fid[c])) ++c;
      if (!heap::better(fv[c], fid[c], v, id)) break;
      fv[p] = fv[c];
      fid[p] = fid[c];
      fpos[p] = fpos[c];
      p = c;
    }
    fv[p] = v;
    fid[p] = id;
    fpos[p] = ps;
  };
  auto push = [&](std::size_t i, std::size_t j) {
    fv[size] = a[i] + b[j];
    fid[size] = ia[i] * n + ib[j];
    fpos[size] = static_cast<std::int64_t>(i * kb + j);
    up(size++);
  };
  if (ka > 0 && kb > 0) push(0, 0);
  std::size_t out = 0;
  while (out < k && size > 0) {
    vals[out] = fv[0];
    ids[out] = fid[0];
    ++out;
    const std::size_t i = static_cast<std::size_t>(fpos[0]) / kb, j = static_cast<std::size_t>(fpos[0]) % kb;
    // Replace the popped root by its first follower (cheaper than pop + push).
    if (j + 1 < kb) {
      fv[0] = a[i] + b[j + 1];
      fid[0] = ia[i] * n + ib[j + 1];
      fpos[0] = static_cast<std::int64_t>(i * kb + j + 1);
      down(0);
    } else {
      --size;
      if (size > 0) {
        fv[0] = fv[size];
        fid[0] = fid[size];
        fpos[0] = fpos[size];
        down(0);
      }
    }
    if (j == 0 && i + 1 < ka) push(i + 1, 0);
  }
  for (; out < k; ++out) {
    vals[out] = -std::numeric_limits<T>::infinity();
    ids[out] = -1;
  }
}

/// Dispatches on the method (see the file comment; all give the same result).
template <class T>
void product_topk(ProductTopK method, const T* a, const std::int64_t* ia, std::size_t ka, const T* b,
                  const std::int64_t* ib, std::size_t kb, std::int64_t n, std::size_t k, T* vals, std::int64_t* ids,
                  ProductTopKScratch<T>& scratch) {
  switch (method) {
    case ProductTopK::full: product_topk_full(a, ia, ka, b, ib, kb, n, k, vals, ids); return;
    case ProductTopK::pruned: product_topk_pruned(a, ia, ka, b, ib, kb, n, k, vals, ids); return;
    case ProductTopK::heap: product_topk_heap(a, ia, ka, b, ib, kb, n, k, vals, ids, scratch); return;
  }
}

}  // namespace spex::kernels
