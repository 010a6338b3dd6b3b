#pragma once
// Exact top-k from approximate scores: given approx[j] within `slack` of the exact score of
// every j, only the j with approx[j] >= L - 2 slack can rank in the exact top-k, for any L at
// most the k-th largest approx: k rows have approx >= L, so exact scores >= L - slack, and
// every other j scores at most approx[j] + slack, below that. Those candidates (about k plus
// the rows within 2 slack of L; all of them when the scores tie) are scored exactly, and their
// top-k is the top-k of the exact scores of all n, best first and ties to the smaller index, as
// kernels::topk gives it.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "topk.hpp"

namespace spex::kernels {

/// Buffers of topk_refined for rows of up to n scores and k picks; reserve() once, then no
/// call allocates.
struct RefinedTopKScratch {
  std::vector<float> exact, values;        // the candidates' exact scores; by rank
  std::vector<std::int32_t> index;         // the candidates' rows, as collected
  std::vector<std::int64_t> ids, picks;    // the same rows; by rank
  void reserve(std::size_t n, std::size_t k) {
    (void)k;  // k <= n
    constexpr std::size_t kSlackLanes = 64;  // whole vectors are read and written past a count
    if (values.size() < n + kSlackLanes) {
      values.resize(n + kSlackLanes);
      exact.resize(n + kSlackLanes);
      index.resize(n + kSlackLanes);
      ids.resize(n + kSlackLanes);
      picks.resize(n + kSlackLanes);
    }
  }
};

/// Top-k (vals, ids; k <= n) of the exact scores of rows 0 .. n - 1, from their approximations
/// approx[0..n), each within `slack` (>= 0) of its exact score; all finite.
/// exact_scores(const std::int64_t* rows, std::size_t m, float* out) writes the exact scores of
/// m rows (increasing, each row's score independent of the others); it is called once, with the
/// candidates. Returns their number. scratch.reserve(n, k) first.
template <class Arch = default_arch, class ExactScores>
std::size_t topk_refined(const float* approx, std::size_t n, std::size_t k, float slack, ExactScores&& exact_scores,
                         float* vals, std::int64_t* ids, RefinedTopKScratch& scratch) {
  // A lower bound on the k-th largest approximation (topk_floor's: about 2k rows pass it) in
  // place of the k-th value itself, which costs a top-k: every row within 2 slack below it is
  // a candidate. (In float, the bound minus 2 slack may round up by half an ulp of the bound:
  // the callers' slack holds a margin of 1% of the rounding error it bounds, far above that.)
  const float floor = topk_floor<Arch>(approx, n, k) - 2 * slack;
  std::int32_t* ci = scratch.index.data();
  std::size_t m = 0, i = 0;
#if SPEX_SIMD
  i = detail::collect_vectors<Arch, float, std::size_t(-1) / 2, false>(approx, n, floor, nullptr, ci, m);
#endif
  for (; i < n; ++i)
    if (approx[i] >= floor) ci[m++] = static_cast<std::int32_t>(i);
  std::int64_t* rows = scratch.ids.data();
  std::copy(ci, ci + m, rows);
  float* ev = scratch.exact.data();
  exact_scores(static_cast<const std::int64_t*>(rows), m, ev);
#if SPEX_SIMD
  // The candidates ranked as topk_by_rank ranks them (larger first, ties to the smaller index,
  // which is the smaller row: they were collected in increasing order).
  detail::place_by_rank<Arch>(ev, rows, m, k, scratch.values.data(), scratch.picks.data(), vals, ids);
#else
  topk<Arch>(ev, m, k, vals, scratch.picks.data());
  for (std::size_t r = 0; r < k; ++r) ids[r] = rows[scratch.picks[r]];
#endif
  return m;
}

}  // namespace spex::kernels
