#include <set>

#include <spex/select/exhaustive.hpp>
#include <spex/select/product_keys.hpp>

#include "test_util.hpp"

using namespace spex;
using kernels::ProductTopK;

namespace {
RowMat<float> small_ints(Index rows, Index cols, int levels, Rng& rng) {
  RowMat<float> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = float(int(rng.below(levels)) - levels / 2);
  return m;
}

// Product-key search by every method against exhaustive search over the explicit n^2 keys.
template <class T>
void check_against_exhaustive(const ProductKeys<T>& pk, const RowMat<T>& q, Index k, bool exact_scores) {
  RowMat<T> s_ref(q.rows(), k);
  IndexMat ids_ref(q.rows(), k);
  ExhaustiveTopK<T> exhaustive;
  exhaustive.search(pk.full_keys(), q, k, s_ref, ids_ref);
  typename ProductKeys<T>::Workspace ws;
  for (ProductTopK m : {ProductTopK::full, ProductTopK::pruned, ProductTopK::heap}) {
    CAPTURE(kernels::to_string(m), pk.n(), pk.d_key(), k, q.rows());
    RowMat<T> s(q.rows(), k);
    IndexMat ids(q.rows(), k);
    pk.search(q, k, s, ids, ws, m);
    CHECK(ids == ids_ref);
    if (exact_scores)
      CHECK(s == s_ref);
    else
      CHECK((s - s_ref).cwiseAbs().maxCoeff() < 1e-4);
    CHECK(ids.minCoeff() >= 0);
    CHECK(ids.maxCoeff() < pk.size());
  }
}
}  // namespace

TEST_CASE("product-key top-k equals exhaustive top-k over all n^2 keys, ties included", "[retrieval]") {
  Rng rng(1);
  for (Index n : {1, 3, 16, 45})
    for (Index d_key : {2, 8, 32})
      for (Index k : {Index(1), Index(4), Index(16), n}) {
        if (k > n) continue;
        for (Index batch : {1, 70}) {
          // Integer sub-keys and queries: all sums are exact, so scores and tie order must match.
          ProductKeys<float> pk(small_ints(n, d_key / 2, 3, rng), small_ints(n, d_key / 2, 3, rng));
          check_against_exhaustive(pk, small_ints(batch, d_key, 5, rng), k, true);
        }
      }
}

TEST_CASE("product-key top-k of a large batch (sub-keys copied transposed) equals exhaustive top-k",
          "[retrieval]") {
  Rng rng(3);
  for (Index batch : {ProductKeys<float>::kTransposedKeysMinQueries - 1, ProductKeys<float>::kTransposedKeysMinQueries + 37}) {
    ProductKeys<float> pk(small_ints(24, 4, 3, rng), small_ints(24, 4, 3, rng));
    check_against_exhaustive(pk, small_ints(batch, 8, 5, rng), 6, true);
  }
}

TEST_CASE("product keys' transposed copy equals the tables transposed, edge tiles and any thread count",
          "[retrieval]") {
  Rng rng(5);
  // 16 x 16 register tiles over blocks of 256 rows per thread: shapes with partial tiles and
  // blocks, and one whole block, by 1 and 2 threads; the copy's old contents must not survive.
  const int threads_before = max_threads();
  for (Index n : {1, 17, 256, 300})
    for (Index half : {1, 15, 16, 37})
      for (int threads : {1, 2}) {
        CAPTURE(n, half, threads);
        set_num_threads(threads);
        ProductKeys<float> pk(small_ints(n, half, 1000, rng), small_ints(n, half, 1000, rng));
        RowMat<float> out = RowMat<float>::Constant(half, n, 7.f);
        for (int h = 0; h < 2; ++h) {
          pk.copy_transposed(h, out);
          REQUIRE(out.rows() == half);
          REQUIRE(out.cols() == n);
          CHECK(out == pk.sub_keys(h).transpose());
        }
      }
  set_num_threads(threads_before);
}

TEST_CASE("product-key top-k on random keys finds the exhaustive ids", "[retrieval]") {
  Rng rng(2);
  for (Index n : {32, 100})
    for (Index d_key : {16, 64})
      for (Index k : {1, 8, 32}) {
        ProductKeys<float> pk(n, d_key, 100 + n + d_key);
        RowMat<float> q(33, d_key);
        fill_normal(q, 1.0, rng);
        check_against_exhaustive(pk, q, k, false);
      }
}

TEST_CASE("product-key retrieval uses the whole id range", "[retrieval]") {
  // A port of PEER indexed experts by position in the k^2 candidate list, so only ids below
  // k^2 ever came out. Here the ids must reach across [0, N).
  const Index n = 64, k = 4;
  ProductKeys<float> pk(n, 16, 9);
  RowMat<float> q(500, 16);
  Rng rng(4);
  fill_normal(q, 1.0, rng);
  RowMat<float> s(500, k);
  IndexMat ids(500, k);
  ProductKeys<float>::Workspace ws;
  pk.search(q, k, s, ids, ws);
  std::set<Index> seen(ids.data(), ids.data() + ids.size());
  CHECK(ids.maxCoeff() > pk.size() / 2);
  CHECK(Index(seen.size()) > 10 * k * k);
  for (Index b = 0; b < q.rows(); ++b)
    for (Index j = 1; j < k; ++j) CHECK(s(b, j - 1) >= s(b, j));
}

TEST_CASE("product keys accept strided query views and reuse their workspace", "[retrieval]") {
  ProductKeys<double> pk(20, 8, 3);
  RowMat<double> wide(30, 24);
  Rng rng(6);
  fill_normal(wide, 1.0, rng);
  ProductKeys<double>::Workspace ws;
  for (Index head = 0; head < 3; ++head) {  // a layer searches each head's block of columns
    CMatRef<double> q = wide.middleCols(head * 8, 8);
    CHECK(q.data() == &wide(0, head * 8));
    RowMat<double> s(30, 5), s2(30, 5);
    IndexMat ids(30, 5), ids2(30, 5);
    pk.search(q, 5, s, ids, ws);
    ExhaustiveTopK<double> ex;
    ex.search(pk.full_keys(), q, 5, s2, ids2);
    CHECK(ids == ids2);
  }
}

TEST_CASE("product keys reject bad arguments with clear errors", "[retrieval]") {
  CHECK_THROWS_WITH(ProductKeys<float>(8, 7), Catch::Contains("d_key = 7"));
  CHECK_THROWS_WITH(ProductKeys<float>(0, 8), Catch::Contains("n = 0"));
  CHECK_THROWS_WITH(ProductKeys<float>(RowMat<float>::Ones(4, 3), RowMat<float>::Ones(5, 3)),
                    Catch::Contains("c2"));
  ProductKeys<float> pk(8, 8);
  ProductKeys<float>::Workspace ws;
  RowMat<float> q = RowMat<float>::Ones(2, 8), s(2, 9);
  IndexMat ids(2, 9);
  CHECK_THROWS_WITH(pk.search(q, 9, s, ids, ws), Catch::Contains("k = 9") && Catch::Contains("n = 8"));
  RowMat<float> s3(2, 3);
  IndexMat ids3(2, 3);
  CHECK_THROWS_WITH(pk.search(RowMat<float>::Ones(2, 6), 3, s3, ids3, ws), Catch::Contains("d_key = 8"));
  q(0, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(pk.search(q, 3, s3, ids3, ws), Catch::Contains("queries"));
}
