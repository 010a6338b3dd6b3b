#pragma once
// Helpers shared by the tests: random data, the lengths every kernel is tried on, and plain
// references that do not share code with what they check.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include <catch2/catch.hpp>
#include <spex/core/random.hpp>
#include <spex/core/types.hpp>
#include <spex/kernels/simd.hpp>

namespace spex_test {

/// 0, 1, every length up to 2 x SIMD width + 1, and a few large odd ones.
template <class T>
std::vector<std::size_t> kernel_lengths() {
  const std::size_t w = spex::kernels::simd_width<T, spex::default_arch>();
  std::vector<std::size_t> n;
  for (std::size_t i = 0; i <= 2 * w + 1; ++i) n.push_back(i);
  for (std::size_t i : {4 * w + 3, std::size_t(1000), std::size_t(4099)}) n.push_back(i);
  return n;
}

/// `n` values from N(0, 1), placed at offset `offset` of the returned buffer so the data
/// pointer can be deliberately misaligned.
template <class T>
std::vector<T> randn(std::size_t n, std::uint64_t seed, std::size_t offset = 0) {
  spex::Rng rng(seed);
  std::vector<T> v(n + offset, T(0));
  for (std::size_t i = 0; i < n; ++i) v[offset + i] = static_cast<T>(rng.normal());
  return v;
}

/// Top-k by a full stable sort: descending, ties to the smaller index, NaN never selected.
template <class T>
void reference_topk(const T* s, std::size_t n, std::size_t k, std::vector<T>& vals, std::vector<std::int64_t>& ids) {
  std::vector<std::int64_t> order;
  for (std::size_t i = 0; i < n; ++i)
    if (!(s[i] != s[i])) order.push_back(static_cast<std::int64_t>(i));
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return s[a] > s[b]; });
  vals.assign(k, -std::numeric_limits<T>::infinity());
  ids.assign(k, -1);
  for (std::size_t i = 0; i < k && i < order.size(); ++i) {
    ids[i] = order[i];
    vals[i] = s[order[i]];
  }
}

/// rows x cols from N(0, scale^2), seeded.
inline spex::RowMat<double> randn_mat(spex::Index rows, spex::Index cols, std::uint64_t seed, double scale = 1.0) {
  spex::RowMat<double> m(rows, cols);
  spex::Rng rng(seed);
  spex::fill_normal(m, scale, rng);
  return m;
}

template <class T>
constexpr double tol() {
  return sizeof(T) == 4 ? 1e-5 : 1e-12;
}

}  // namespace spex_test
