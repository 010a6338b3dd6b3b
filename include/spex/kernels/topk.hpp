#pragma once
// Top-k selection of score rows: best first (descending), ties to the smaller index,
// deterministic. A min-heap of the k best keeps its worst entry at the root; a SIMD compare
// against that threshold rejects whole vectors of scores at once, and only the rare lanes
// above it touch the heap (the faiss HeapBlockResultHandler idea). Because ids arrive in
// increasing order, a score equal to the threshold can never win its tie, so the filter
// is a strict '>'.
// NaN scores are never selected; a row with fewer than k other scores pads with -inf / -1.
#include <algorithm>

#include "scalar/topk.hpp"
#include "simd.hpp"

namespace spex::kernels {

/// Offers scores[0..n) with ids first_id + i to the top-k heap (vals, ids, size) of
/// capacity k. Successive calls for one heap must pass increasing ids (blocks in order).
/// Scores below `floor` are skipped: pass a value known to be <= the k-th best score of the
/// whole row (or -inf) to keep them off the heap while it fills.
template <class Arch = default_arch, class T>
void topk_push_block(const T* scores, std::size_t n, std::int64_t first_id, std::size_t k, T* vals,
                     std::int64_t* ids, std::size_t& size, T floor = -std::numeric_limits<T>::infinity()) {
  if (k == 0) return;
  std::size_t i = 0;
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  // While the heap fills, admit scores >= floor; once full, only scores above its root can
  // enter ('>' suffices, see the file comment; '>=' here costs nothing and offer() decides).
  B thr(size < k ? floor : std::max(floor, vals[0]));
  for (; i + W <= n; i += W) {
    const auto pass = B::load_unaligned(scores + i) >= thr;
    if (!xsimd::any(pass)) continue;
    // Visit only the passing lanes: most vectors that pass at all pass in one or two lanes.
    for (std::uint32_t bits = detail::lane_bits<Arch, T>(pass); bits != 0; bits &= bits - 1) {
      const std::size_t j = i + static_cast<std::size_t>(__builtin_ctz(bits));
      heap::offer(vals, ids, size, k, scores[j], first_id + static_cast<std::int64_t>(j));
    }
    if (size == k) thr = B(std::max(floor, vals[0]));
  }
#endif
  for (; i < n; ++i)
    if (scores[i] >= floor) heap::offer(vals, ids, size, k, scores[i], first_id + static_cast<std::int64_t>(i));
}

namespace detail {
#if SPEX_SIMD
/// Ranks of the values v[a0 .. a0+W) among v[0..c): rank(a) = #{j : v[j] > v[a], or v[j] == v[a]
/// and j < a}, i.e. their positions in the order "larger first, ties to the smaller index".
/// Distinct for distinct a. v must be readable up to a0 + W. Branch-free: one compare and one
/// add per j for W candidates at once; only the j inside the block compare indices (every j
/// before it is below every a, every j after it above).
template <class Arch, class T>
xsimd::batch<T, Arch> rank_block(const T* v, std::size_t c, std::size_t a0) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  alignas(Arch::alignment()) T lane_index[W];
  for (std::size_t l = 0; l < W; ++l) lane_index[l] = static_cast<T>(a0 + l);
  const B va = B::load_unaligned(v + a0), ia = B::load_aligned(lane_index), one(T(1));
  B count(T(0));
  const std::size_t block_end = std::min(a0 + W, c);
  std::size_t j = 0;
  for (; j < a0; ++j) count = xsimd::select(B(v[j]) >= va, count + one, count);
  for (; j < block_end; ++j) {
    const B vj(v[j]);
    count = xsimd::select((vj > va) | ((vj == va) & (B(static_cast<T>(j)) < ia)), count + one, count);
  }
  for (; j < c; ++j) count = xsimd::select(B(v[j]) > va, count + one, count);
  return count;
}

/// Writes the c values cv (and their ids ci) to the slots of their ranks (rank_block's) below
/// k: vals[r], ids[r]. Ranks are distinct, so every value is first written to `slot_v`,
/// `slot_i` (c entries each) at its rank, with no branch on it, and the first min(k, c) copied.
template <class Arch, class T, class Id>
void place_by_rank(const T* cv, const Id* ci, std::size_t c, std::size_t k, T* slot_v, std::int64_t* slot_i, T* vals,
                   std::int64_t* ids) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  alignas(Arch::alignment()) T ranks[W];
  for (std::size_t a0 = 0; a0 < c; a0 += W) {
    rank_block<Arch>(cv, c, a0).store_aligned(ranks);
    const std::size_t lanes = std::min(W, c - a0);
    for (std::size_t l = 0; l < lanes; ++l) {
      const std::size_t r = static_cast<std::size_t>(ranks[l]);
      slot_v[r] = cv[a0 + l];
      slot_i[r] = static_cast<std::int64_t>(ci[a0 + l]);
    }
  }
  const std::size_t placed = std::min(k, c);
  std::copy(slot_v, slot_v + placed, vals);
  std::copy(slot_i, slot_i + placed, ids);
}
#endif
}  // namespace detail

/// The k-th largest of v[0..c) (1 <= k <= c, no NaN), ranked as rank_block ranks: branch-free,
/// O(c^2 / W), for the short lists it serves. v must be readable up to c rounded up to whole
/// vectors (the lanes past c are read and ignored).
template <class Arch = default_arch, class T>
T kth_largest(const T* v, std::size_t c, std::size_t k) {
#if SPEX_SIMD
  // The k-th largest is the largest v[a] that at least k values reach: count them for W
  // values at once (one compare and one add per j) and keep the largest that qualifies.
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  alignas(Arch::alignment()) T lane_index[W];
  for (std::size_t l = 0; l < W; ++l) lane_index[l] = static_cast<T>(l);
  const B index = B::load_aligned(lane_index), one(T(1)), needed(static_cast<T>(k));
  B best(-std::numeric_limits<T>::infinity());
  for (std::size_t a0 = 0; a0 < c; a0 += W) {
    const B va = B::load_unaligned(v + a0);
    B reach(T(0));
    for (std::size_t j = 0; j < c; ++j) reach = xsimd::select(B(v[j]) >= va, reach + one, reach);
    const auto qualifies = (reach >= needed) & (index < B(static_cast<T>(c - a0))) & (va > best);
    best = xsimd::select(qualifies, va, best);
  }
  alignas(Arch::alignment()) T lanes[W];
  best.store_aligned(lanes);
  return *std::max_element(lanes, lanes + W);
#else
  for (std::size_t a = 0; a < c; ++a) {
    std::size_t rank = 0;
    for (std::size_t j = 0; j < c; ++j) rank += v[j] > v[a] || (v[j] == v[a] && j < a);
    if (rank == k - 1) return v[a];
  }
  return v[0];  // not reached for 1 <= k <= c
#endif
}

/// A lower bound on the k-th best of scores[0..n): the k-th best of the maxima of G >= 2k
/// disjoint groups (element i is in group i mod G). Those maxima are distinct elements, so at
/// least k elements are >= the bound; with 2k groups only about 2k elements pass it on random
/// rows. -inf when the row is too short for the bound to pay off. NaN is ignored.
template <class Arch = default_arch, class T>
T topk_floor(const T* scores, std::size_t n, std::size_t k) {
  T floor = -std::numeric_limits<T>::infinity();
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  constexpr std::size_t kMaxAcc = 16;
  const std::size_t acc = (2 * k + W - 1) / W;
  if (k == 0 || acc > kMaxAcc || n < 2 * acc * W) return floor;
  // Group maxima of element i in group i mod (acc W), two copies of each accumulator so that
  // the compares of consecutive steps do not wait on each other; both start at -inf, and a NaN
  // never replaces a maximum (v > m is false), so no group's maximum is NaN.
  const B neg_inf(-std::numeric_limits<T>::infinity());
  B m[kMaxAcc], m2[kMaxAcc];
  for (std::size_t a = 0; a < acc; ++a) m[a] = m2[a] = neg_inf;
  const std::size_t step = acc * W;
  std::size_t i = 0;
  for (; i + 2 * step <= n; i += 2 * step)
    for (std::size_t a = 0; a < acc; ++a) {
      const B v = B::load_unaligned(scores + i + a * W), v2 = B::load_unaligned(scores + i + step + a * W);
      m[a] = xsimd::select(v > m[a], v, m[a]);
      m2[a] = xsimd::select(v2 > m2[a], v2, m2[a]);
    }
  for (; i + step <= n; i += step)
    for (std::size_t a = 0; a < acc; ++a) {
      const B v = B::load_unaligned(scores + i + a * W);
      m[a] = xsimd::select(v > m[a], v, m[a]);
    }
  alignas(Arch::alignment()) T maxima[kMaxAcc * W];
  for (std::size_t a = 0; a < acc; ++a) xsimd::select(m2[a] > m[a], m2[a], m[a]).store_aligned(maxima + a * W);
  return kth_largest<Arch>(maxima, acc * W, k);
#else
  (void)scores;
  (void)n;
  (void)k;
#endif
  return floor;
}

namespace detail {
#if SPEX_SIMD
/// Appends the scores >= floor among the whole vectors of scores[0, n), and their indices, to
/// (cv, ci) at c in index order, until more than `capacity` have passed (c then exceeds it).
/// cv and ci must hold capacity + W entries. Returns where it stopped: the end of the whole
/// vectors, or the vector that went over. AVX-512 floats compress each vector's passing lanes
/// into place with no branch: the vectors that hold a candidate come at random, and a branch
/// on each cost 1.4x the whole top-k of a row of 1024 (docs/performance.md, "Top-k"); other
/// ISAs and types visit the passing lanes. With kValues false only the indices are collected
/// (cv unused): one compress a vector instead of two, 1.4x faster on a row of 1024 floats.
template <class Arch, class T, std::size_t capacity, bool kValues = true>
std::size_t collect_vectors(const T* scores, std::size_t n, T floor, T* cv, std::int32_t* ci, std::size_t& c) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  std::size_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value && std::is_same<T, float>::value) {
    const __m512 thr = _mm512_set1_ps(floor);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n && c <= capacity; i += 16) {
      const __m512 v = _mm512_loadu_ps(scores + i);
      const __mmask16 pass = _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ);  // NaN never passes
      if constexpr (kValues) _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(pass, v));
      _mm512_storeu_si512(ci + c, _mm512_maskz_compress_epi32(pass, index));
      c += static_cast<std::size_t>(__builtin_popcount(pass));
      index = _mm512_add_epi32(index, step);
    }
    return i;
  }
#endif
  const B thr(floor);
  for (; i + W <= n && c <= capacity; i += W) {
    const auto pass = B::load_unaligned(scores + i) >= thr;
    if (!xsimd::any(pass)) continue;
    for (std::uint32_t bits = lane_bits<Arch, T>(pass); bits != 0; bits &= bits - 1) {
      const std::size_t j = i + static_cast<std::size_t>(__builtin_ctz(bits));
      if constexpr (kValues) cv[c] = scores[j];
      ci[c++] = static_cast<std::int32_t>(j);
    }
  }
  return i;
}

/// Top-k of the scores >= floor by rank: the candidates (about 2k once the floor is tight) are
/// copied out in index order and ranked with rank_block; rank r goes to slot r. Branch-free,
/// unlike heap sifts. False when more than kCapacity candidates pass (heavy ties): the caller
/// then uses the heap.
template <class Arch, class T>
bool topk_by_rank(const T* scores, std::size_t n, std::size_t k, T floor, T* vals, std::int64_t* ids) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  constexpr std::size_t kCapacity = 256;
  alignas(Arch::alignment()) T cv[kCapacity + W];
  std::int32_t ci[kCapacity + W];
  std::size_t c = 0;
  std::size_t i = collect_vectors<Arch, T, kCapacity>(scores, n, floor, cv, ci, c);
  if (c > kCapacity) return false;
  for (; i < n; ++i)
    if (scores[i] >= floor) {
      if (c == kCapacity) return false;
      cv[c] = scores[i];
      ci[c++] = static_cast<std::int32_t>(i);
    }
  for (std::size_t p = c; p < c + W; ++p) cv[p] = -std::numeric_limits<T>::infinity();  // lanes past c
  T slot_v[kCapacity];
  std::int64_t slot_i[kCapacity];
  place_by_rank<Arch>(cv, ci, c, k, slot_v, slot_i, vals, ids);
  for (std::size_t r = c; r < k; ++r) {
    vals[r] = -std::numeric_limits<T>::infinity();
    ids[r] = -1;
  }
  return true;
}
#endif
}  // namespace detail

/// Top-k of scores[0..n) into vals/ids (k entries each), best first, ties to the smaller index.
template <class Arch = default_arch, class T>
void topk(const T* scores, std::size_t n, std::size_t k, T* vals, std::int64_t* ids) {
  const T floor = topk_floor<Arch>(scores, n, k);
#if SPEX_SIMD
  if (floor != -std::numeric_limits<T>::infinity() && n <= std::size_t(INT32_MAX) &&
      detail::topk_by_rank<Arch>(scores, n, k, floor, vals, ids))
    return;
#endif
  std::size_t size = 0;
  topk_push_block<Arch>(scores, n, 0, k, vals, ids, size, floor);
  topk_finish(k, vals, ids, size);
}

}  // namespace spex::kernels
