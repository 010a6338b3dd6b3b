#pragma once
// Scalar twins of kernels/compact.hpp: gathers over compact expert rows, bfloat16 (the high 16
// bits of a float) or int8 with one float scale per row, converted to float and accumulated
// in float.
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace spex::kernels::scalar {

/// The float whose high 16 bits are `b` (bfloat16 -> float is exact).
inline float bf16_to_float(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// out[r] = table[ids[r]] . x, bfloat16 rows d long, ld apart.
inline void gather_dot_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, std::size_t m,
                            const float* x, std::size_t d, float* out) {
  for (std::size_t r = 0; r < m; ++r) {
    const std::uint16_t* row = table + static_cast<std::size_t>(ids[r]) * ld;
    float s = 0;
    for (std::size_t i = 0; i < d; ++i) s += bf16_to_float(row[i]) * x[i];
    out[r] = s;
  }
}

/// y += sum_r alpha[r] * table[ids[r]], bfloat16 rows.
inline void gather_axpy_bf16(const std::uint16_t* table, std::size_t ld, const std::int64_t* ids, const float* alpha,
                             std::size_t m, float* y, std::size_t d) {
  for (std::size_t r = 0; r < m; ++r) {
    const std::uint16_t* row = table + static_cast<std::size_t>(ids[r]) * ld;
    for (std::size_t i = 0; i < d; ++i) y[i] += alpha[r] * bf16_to_float(row[i]);
  }
}

/// out[r] = scale[ids[r]] * (table[ids[r]] . x), int8 rows with one scale per row.
inline void gather_dot_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                          std::size_t m, const float* x, std::size_t d, float* out) {
  for (std::size_t r = 0; r < m; ++r) {
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    const std::int8_t* row = table + id * ld;
    float s = 0;
    for (std::size_t i = 0; i < d; ++i) s += float(row[i]) * x[i];
    out[r] = scale[id] * s;
  }
}

/// y += sum_r alpha[r] * scale[ids[r]] * table[ids[r]], int8 rows.
inline void gather_axpy_i8(const std::int8_t* table, std::size_t ld, const float* scale, const std::int64_t* ids,
                           const float* alpha, std::size_t m, float* y, std::size_t d) {
  for (std::size_t r = 0; r < m; ++r) {
    const std::size_t id = static_cast<std::size_t>(ids[r]);
    const std::int8_t* row = table + id * ld;
    const float c = alpha[r] * scale[id];
    for (std::size_t i = 0; i < d; ++i) y[i] += c * float(row[i]);
  }
}

}  // namespace spex::kernels::scalar
