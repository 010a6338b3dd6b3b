#include <spex/kernels/topk.hpp>

#include "test_util.hpp"

using namespace spex;

namespace {
template <class T>
void check_topk(const std::vector<T>& s, std::size_t k) {
  std::vector<T> v(k), v_s(k), v_ref;
  std::vector<std::int64_t> id(k), id_s(k), id_ref;
  kernels::topk(s.data(), s.size(), k, v.data(), id.data());
  kernels::scalar::topk(s.data(), s.size(), k, v_s.data(), id_s.data());
  spex_test::reference_topk(s.data(), s.size(), k, v_ref, id_ref);
  CHECK(id == id_ref);
  CHECK(id_s == id_ref);
  for (std::size_t i = 0; i < k; ++i) {
    CHECK(v[i] == v_ref[i]);
    CHECK(v_s[i] == v_ref[i]);
  }
}
}  // namespace

TEMPLATE_TEST_CASE("topk equals a full stable sort on random rows", "[kernels]", float, double) {
  using T = TestType;
  for (std::size_t n : spex_test::kernel_lengths<T>())
    for (std::size_t k : {std::size_t(1), std::size_t(2), std::size_t(7), std::size_t(16), std::size_t(33), n}) {
      if (k == 0 || k > n) continue;
      CAPTURE(n, k);
      check_topk(spex_test::randn<T>(n, 100 + n + k), k);
    }
}

TEMPLATE_TEST_CASE("topk breaks ties to the smaller index", "[kernels]", float, double) {
  using T = TestType;
  spex::Rng rng(3);
  for (std::size_t n : {5, 31, 64, 256, 257, 1024})  // 256 and 257 equal values: the capacity of topk_by_rank, and one over it
    for (std::size_t k : {1, 4, 16}) {
      if (k > n) continue;
      CAPTURE(n, k);
      std::vector<T> s(n);
      for (auto& v : s) v = T(rng.below(4));  // four distinct values, many ties
      check_topk(s, k);
      std::vector<T> flat(n, T(1.5));  // all equal: the first k indices
      check_topk(flat, k);
      std::vector<T> rising(n);  // increasing scores: the SIMD filter passes every block
      for (std::size_t i = 0; i < n; ++i) rising[i] = T(i);
      check_topk(rising, k);
    }
}

TEST_CASE("topk never selects NaN and pads with -inf / -1", "[kernels]") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<float> s(40, nan);
  s[5] = -inf;
  s[9] = 2.f;
  s[39] = 1.f;
  std::vector<float> v(4);
  std::vector<std::int64_t> id(4);
  kernels::topk(s.data(), s.size(), 4, v.data(), id.data());
  CHECK(id == std::vector<std::int64_t>{9, 39, 5, -1});
  CHECK(v[0] == 2.f);
  CHECK(v[2] == -inf);
  CHECK(v[3] == -inf);
  check_topk(s, 4);
  std::vector<float> mixed = spex_test::randn<float>(300, 9);
  for (std::size_t i = 0; i < mixed.size(); i += 7) mixed[i] = nan;
  check_topk(mixed, 10);
}

TEST_CASE("topk_push_block over blocks equals one pass over the whole row", "[kernels]") {
  const auto s = spex_test::randn<float>(5000, 77);
  for (std::size_t block : {1, 3, 64, 1000}) {
    CAPTURE(block);
    const std::size_t k = 20;
    std::vector<float> v(k);
    std::vector<std::int64_t> id(k);
    std::size_t size = 0;
    for (std::size_t b0 = 0; b0 < s.size(); b0 += block)
      kernels::topk_push_block(s.data() + b0, std::min(block, s.size() - b0), std::int64_t(b0), k, v.data(),
                               id.data(), size);
    kernels::topk_finish(k, v.data(), id.data(), size);
    std::vector<float> v_ref;
    std::vector<std::int64_t> id_ref;
    spex_test::reference_topk(s.data(), s.size(), k, v_ref, id_ref);
    CHECK(id == id_ref);
    CHECK(v == v_ref);
  }
}

TEMPLATE_TEST_CASE("kth_largest is the k-th of a descending sort, topk_floor at most it with k values reaching it", "[kernels]",
                   float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  spex::Rng rng(11);
  for (std::size_t c : {1, 2, 5, 16, 17, 31, 32, 33, 64, 100}) {
    for (int data = 0; data < 3; ++data) {
      // Padding past c: the kernel reads whole vectors and must ignore those lanes.
      std::vector<T> v = spex_test::randn<T>(c + 64, 40 + c + std::size_t(data));
      if (data == 1)
        for (std::size_t i = 0; i < c; ++i) v[i] = T(rng.below(3));  // heavy ties
      if (data == 2)
        for (std::size_t i = 0; i < c; i += 3) v[i] = -inf;
      for (std::size_t i = c; i < v.size(); ++i) v[i] = i % 2 ? nan : T(1e30);
      std::vector<T> sorted(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(c));
      std::sort(sorted.begin(), sorted.end(), std::greater<T>());
      for (std::size_t k = 1; k <= c; ++k) {
        CAPTURE(c, data, k);
        CHECK(kernels::kth_largest(v.data(), c, k) == sorted[k - 1]);
      }
    }
  }
  for (std::size_t n : {16, 64, 65, 1000, 1024, 4099})
    for (std::size_t k : {1, 4, 16, 32}) {
      CAPTURE(n, k);
      std::vector<T> s = spex_test::randn<T>(n, 70 + n + k);
      for (std::size_t i = 0; i < n; i += 5) s[i] = nan;  // ignored: never a maximum
      std::vector<T> finite;
      for (T x : s)
        if (x == x) finite.push_back(x);
      std::sort(finite.begin(), finite.end(), std::greater<T>());
      const T floor = kernels::topk_floor(s.data(), n, k);
      CHECK(!(floor != floor));
      if (floor == -inf) continue;  // too short a row: no bound
      CHECK(floor <= finite[k - 1]);
      CHECK(static_cast<std::size_t>(std::count_if(finite.begin(), finite.end(), [&](T x) { return x >= floor; })) >= k);
    }
}
