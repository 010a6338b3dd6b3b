#pragma once
// Scalar twins of kernels/compact.hpp: gathers over compact expert rows, bfloat16 (the high 16
// bits of a float) or int8 with one float scale per row, converted to float and accumulated
// in float. Also the conversions that make such rows: float -> bfloat16 (nearest, ties to
// even) and a row -> int8 with its scale (symmetric per-row absmax).
#include <cmath>
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

/// The bfloat16 nearest to f, ties to even (the rounding of io's to_bf16); NaN stays a quiet
/// NaN, values beyond bfloat16's range become infinities.
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // NaN
  // Adding 0x7fff plus the lowest kept bit rounds the dropped half to nearest even; a carry
  // into the exponent is the correct next binade (or infinity).
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

/// Quantizes a finite row of d floats to int8, symmetric per-row absmax: scale = max|x| / 127,
/// q[i] = round(x[i] / scale) (nearest, ties to even), so |x[i] - scale q[i]| <= scale / 2.
/// Returns the scale (0 for a row of zeros, whose q are 0).
inline float quantize_row_i8(const float* x, std::size_t d, std::int8_t* q) {
  float absmax = 0;
  for (std::size_t i = 0; i < d; ++i) absmax = std::fmax(absmax, std::fabs(x[i]));
  const float scale = absmax / 127.f;
  for (std::size_t i = 0; i < d; ++i) {
    const float r = scale > 0 ? std::nearbyint(x[i] / scale) : 0.f;
    q[i] = static_cast<std::int8_t>(std::fmin(127.f, std::fmax(-127.f, r)));
  }
  return scale;
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
