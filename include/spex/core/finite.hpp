#pragma once
// Finiteness checks of whole matrices (inputs, projections, outputs), over the threads for
// large ones: a layer's checks of its 256 x 2048 queries and its input and output were serial
// passes that the other threads waited through.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>

#include "check.hpp"
#include "parallel.hpp"
#include "types.hpp"

namespace spex {

/// (row, col) of the first NaN or Inf in `m`, or (-1, -1): one vectorized pass when all is
/// finite (x * 0 is 0 for finite x and NaN for NaN and Inf; Eigen's sum() is vectorized,
/// allFinite() is not), over the threads in blocks of rows; the search only runs to name the
/// culprit.
template <class Mat>
std::pair<Index, Index> find_non_finite(const Mat& m) {
  using S = typename Mat::Scalar;
  constexpr Index kValuesPerTask = Index(1) << 15;
  const Index rows = m.rows(), block = std::max<Index>(1, kValuesPerTask / std::max<Index>(1, m.cols()));
  std::atomic<bool> any{false};
  parallel_for((rows + block - 1) / block, [&](Index task, int) {
    const Index r0 = task * block, n = std::min(block, rows - r0);
    if (std::isnan(static_cast<double>((m.middleRows(r0, n).array() * S(0)).sum()))) any = true;
  });
  if (!any) return {-1, -1};
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c)
      if (!std::isfinite(m(r, c))) return {Index(r), Index(c)};
  return {-1, -1};
}

/// Throws naming `what` and the first (row, col) holding NaN or Inf.
template <class Mat>
void check_finite(const Mat& m, const char* what) {
  const auto at = find_non_finite(m);
  SPEX_CHECK(at.first < 0, what << " holds a non-finite value " << m(at.first, at.second) << " at (" << at.first << ", "
                                << at.second << ")");
}

}  // namespace spex
