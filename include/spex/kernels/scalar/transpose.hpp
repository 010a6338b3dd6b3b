#pragma once
// Scalar twin of kernels/transpose.hpp.
#include <algorithm>
#include <cstddef>

namespace spex::kernels::scalar {

/// dst[i * ld_dst + j] = row(j)[i] for i < m, j < n: the n rows row(0..n) (each m long) written as
/// the columns of dst. Sixteen rows at a time, read side by side.
template <class T, class RowOf>
void transpose_rows(RowOf&& row, std::size_t n, std::size_t m, T* dst, std::size_t ld_dst) {
  constexpr std::size_t kRows = 16;
  for (std::size_t j0 = 0; j0 < n; j0 += kRows) {
    const std::size_t count = std::min(kRows, n - j0);
    const T* src[kRows];
    for (std::size_t j = 0; j < count; ++j) src[j] = row(j0 + j);
    for (std::size_t i = 0; i < m; ++i) {
      T* out = dst + i * ld_dst + j0;
      for (std::size_t j = 0; j < count; ++j) out[j] = src[j][i];
    }
  }
}

}  // namespace spex::kernels::scalar
