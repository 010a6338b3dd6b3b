#include <spex/kernels/product_topk.hpp>
#include <spex/kernels/topk.hpp>

#include "test_util.hpp"

using namespace spex;
using kernels::ProductTopK;

namespace {
// Two half-score rows -> their top-k lists -> product top-k by `method`, against the top-k of
// all n*n sums computed explicitly.
template <class T>
void check_product(const std::vector<T>& s1, const std::vector<T>& s2, std::size_t k) {
  const std::size_t n = s1.size();
  std::vector<T> a(k), b(k);
  std::vector<std::int64_t> ia(k), ib(k);
  kernels::topk(s1.data(), n, k, a.data(), ia.data());
  kernels::topk(s2.data(), n, k, b.data(), ib.data());
  std::vector<T> all(n * n);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) all[i * n + j] = s1[i] + s2[j];
  std::vector<T> v_ref;
  std::vector<std::int64_t> id_ref;
  spex_test::reference_topk(all.data(), all.size(), k, v_ref, id_ref);
  kernels::ProductTopKScratch<T> scratch;
  for (ProductTopK m : {ProductTopK::full, ProductTopK::pruned, ProductTopK::heap}) {
    CAPTURE(kernels::to_string(m), n, k);
    std::vector<T> v(k);
    std::vector<std::int64_t> id(k);
    kernels::product_topk(m, a.data(), ia.data(), k, b.data(), ib.data(), k, std::int64_t(n), k, v.data(), id.data(),
                          scratch);
    CHECK(id == id_ref);
    CHECK(v == v_ref);
  }
}
}  // namespace

TEMPLATE_TEST_CASE("full, pruned and heap product top-k equal the top-k of all n^2 sums", "[kernels]", float,
                   double) {
  using T = TestType;
  for (std::size_t n : {1, 2, 5, 16, 40})
    for (std::size_t k : {1, 2, 3, 8, 16, 40}) {
      if (k > n) continue;
      check_product(spex_test::randn<T>(n, n * 100 + k), spex_test::randn<T>(n, n * 200 + k), k);
    }
}

TEMPLATE_TEST_CASE("product top-k is exact under heavy ties", "[kernels]", float, double) {
  using T = TestType;
  spex::Rng rng(11);
  for (std::size_t n : {4, 16, 33})
    for (std::size_t k : {1, 4, 16}) {
      if (k > n) continue;
      for (int rep = 0; rep < 5; ++rep) {
        std::vector<T> s1(n), s2(n);
        for (auto& v : s1) v = T(rng.below(3));  // small integers: every sum is exact, ties abound
        for (auto& v : s2) v = T(rng.below(3));
        check_product(s1, s2, k);
      }
      check_product(std::vector<T>(n, T(0)), std::vector<T>(n, T(0)), k);
    }
}
