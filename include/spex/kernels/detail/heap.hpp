#pragma once
// Inline heap functions over (values, ids) arrays, faiss-style: no heap object, the caller
// owns the arrays. The order is "better": a larger value, or an equal value with a smaller
// id. A top-k keeps a heap whose root is its *worst* kept entry (the admission threshold).
#include <cstddef>
#include <cstdint>
#include <utility>

namespace spex::kernels::heap {

template <class T>
inline bool better(T va, std::int64_t ia, T vb, std::int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

/// Restores the heap below `pos` (root = worst entry).
template <class T>
inline void sift_down(T* v, std::int64_t* id, std::size_t size, std::size_t pos) {
  const T val = v[pos];
  const std::int64_t vid = id[pos];
  for (;;) {
    std::size_t child = 2 * pos + 1;
    if (child >= size) break;
    if (child + 1 < size && better(v[child], id[child], v[child + 1], id[child + 1])) ++child;  // the worse child
    if (!better(val, vid, v[child], id[child])) break;
    v[pos] = v[child];
    id[pos] = id[child];
    pos = child;
  }
  v[pos] = val;
  id[pos] = vid;
}

/// Adds (val, i) to a heap of `size` entries; the arrays must hold size + 1.
template <class T>
inline void push(T* v, std::int64_t* id, std::size_t& size, T val, std::int64_t i) {
  std::size_t pos = size++;
  while (pos > 0) {
    const std::size_t parent = (pos - 1) / 2;
    if (!better(v[parent], id[parent], val, i)) break;  // parent already worse than the new entry
    v[pos] = v[parent];
    id[pos] = id[parent];
    pos = parent;
  }
  v[pos] = val;
  id[pos] = i;
}

/// Replaces the worst entry with (val, i).
template <class T>
inline void replace_top(T* v, std::int64_t* id, std::size_t size, T val, std::int64_t i) {
  v[0] = val;
  id[0] = i;
  sift_down(v, id, size, 0);
}

/// Offers (val, i) to a top-k heap of capacity k.
template <class T>
inline void offer(T* v, std::int64_t* id, std::size_t& size, std::size_t k, T val, std::int64_t i) {
  if (size < k)
    push(v, id, size, val, i);
  else if (better(val, i, v[0], id[0]))
    replace_top(v, id, size, val, i);
}

/// Turns the heap into a list sorted best first.
template <class T>
inline void sort_best_first(T* v, std::int64_t* id, std::size_t size) {
  for (std::size_t end = size; end > 1; --end) {
    std::swap(v[0], v[end - 1]);
    std::swap(id[0], id[end - 1]);
    sift_down(v, id, end - 1, 0);
  }
}

}  // namespace spex::kernels::heap
