#pragma once
// Scalar twins of kernels/gather.hpp.
#include <cstddef>
#include <cstdint>

namespace spex::kernels::scalar {

/// out[r] = table[ids[r]] . x for r < m; rows are d long, ld apart.
template <class T>
void gather_dot(const T* table, std::size_t ld, const std::int64_t* ids, std::size_t m, const T* x,
                std::size_t d, T* out) {
  for (std::size_t r = 0; r < m; ++r) {
    const T* row = table + static_cast<std::size_t>(ids[r]) * ld;
    T s = 0;
    for (std::size_t i = 0; i < d; ++i) s += row[i] * x[i];
    out[r] = s;
  }
}

/// y += sum_r alpha[r] * table[ids[r]]
template <class T>
void gather_axpy(const T* table, std::size_t ld, const std::int64_t* ids, const T* alpha, std::size_t m,
                 T* y, std::size_t d) {
  for (std::size_t r = 0; r < m; ++r) {
    const T* row = table + static_cast<std::size_t>(ids[r]) * ld;
    for (std::size_t i = 0; i < d; ++i) y[i] += alpha[r] * row[i];
  }
}

/// table[ids[r]] += alpha[r] * x for r < m (repeated ids accumulate).
template <class T>
void scatter_axpy(T* table, std::size_t ld, const std::int64_t* ids, const T* alpha, std::size_t m, const T* x,
                  std::size_t d) {
  for (std::size_t r = 0; r < m; ++r) {
    T* row = table + static_cast<std::size_t>(ids[r]) * ld;
    for (std::size_t i = 0; i < d; ++i) row[i] += alpha[r] * x[i];
  }
}

}  // namespace spex::kernels::scalar
