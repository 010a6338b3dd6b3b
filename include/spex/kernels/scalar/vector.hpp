#pragma once
// Scalar twins of kernels/vector.hpp: the plain reference the SIMD kernels are tested against.
#include <cstddef>
#include <cstdint>
#include <limits>

namespace spex::kernels::scalar {

template <class T>
T dot(const T* x, const T* y, std::size_t n) {
  T s = 0;
  for (std::size_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

/// y += a * x
template <class T>
void axpy(T a, const T* x, T* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

/// y = a * x
template <class T>
void scale_to(T a, const T* x, T* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = a * x[i];
}

/// x *= a
template <class T>
void scale(T a, T* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] *= a;
}

template <class T>
T sum(const T* x, std::size_t n) {
  T s = 0;
  for (std::size_t i = 0; i < n; ++i) s += x[i];
  return s;
}

/// Largest element; -inf for n == 0. NaN elements are skipped.
template <class T>
T max(const T* x, std::size_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (std::size_t i = 0; i < n; ++i)
    if (x[i] > m) m = x[i];
  return m;
}

/// Bit i set iff x[i] != 0 (NaN included), for n <= 64.
template <class T>
std::uint64_t nonzero_bits(const T* x, std::size_t n) {
  std::uint64_t bits = 0;
  for (std::size_t i = 0; i < n; ++i) bits |= std::uint64_t(x[i] != T(0)) << i;
  return bits;
}

}  // namespace spex::kernels::scalar
