#pragma once
// The GEMM entry point of the layers: C (+)= A B, with the rows of C split into fixed blocks
// that run in parallel_for, each block one single-threaded Eigen GEMM. Eigen's own threaded
// GEMM chooses its blocking from the thread count, so its results change in the last bits
// with OMP_NUM_THREADS; fixed blocks make every product independent of the thread count
// (training runs are bit-identical with 1, 2 or 3 threads).
#include <algorithm>

#include "parallel.hpp"
#include "types.hpp"

namespace spex {

/// Rows of C per task.
constexpr Index kGemmRowBlock = 64;

/// C = A * B (accumulate: C += A * B). A is m x k, B is k x n, C is m x n; any Eigen
/// expressions for A and B (transposes, blocks). C must not alias A or B.
template <class MC, class MA, class MB>
void gemm(MC&& c, const MA& a, const MB& b, bool accumulate) {
  const Index m = c.rows();
  const Index blocks = (m + kGemmRowBlock - 1) / kGemmRowBlock;
  parallel_for(blocks, [&](Index blk, int) {
    const Index r0 = blk * kGemmRowBlock, rows = std::min(kGemmRowBlock, m - r0);
    if (accumulate)
      c.middleRows(r0, rows).noalias() += a.middleRows(r0, rows) * b;
    else
      c.middleRows(r0, rows).noalias() = a.middleRows(r0, rows) * b;
  });
}

}  // namespace spex
