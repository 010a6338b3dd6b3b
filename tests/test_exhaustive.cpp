#include <spex/select/exhaustive.hpp>

#include "test_util.hpp"

using namespace spex;

namespace {
// Plain reference: every (query, key) dot in double, then a stable sort.
template <class T>
void reference_search(const RowMat<T>& keys, const RowMat<T>& q, Index k, RowMat<T>& s, IndexMat& ids) {
  s.resize(q.rows(), k);
  ids.resize(q.rows(), k);
  std::vector<T> row(keys.rows());
  for (Index b = 0; b < q.rows(); ++b) {
    for (Index i = 0; i < keys.rows(); ++i) {
      double acc = 0;
      for (Index j = 0; j < keys.cols(); ++j) acc += double(q(b, j)) * double(keys(i, j));
      row[i] = T(acc);
    }
    std::vector<T> v;
    std::vector<std::int64_t> id;
    spex_test::reference_topk(row.data(), row.size(), std::size_t(k), v, id);
    for (Index j = 0; j < k; ++j) {
      s(b, j) = v[j];
      ids(b, j) = id[j];
    }
  }
}

// Small integer entries: every dot product is exact in float, so results must match exactly,
// ties included.
RowMat<float> small_ints(Index rows, Index cols, int levels, std::uint64_t seed) {
  Rng rng(seed);
  RowMat<float> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = float(int(rng.below(levels)) - levels / 2);
  return m;
}
}  // namespace

TEST_CASE("exhaustive top-k equals the reference exactly on integer data with ties", "[retrieval]") {
  for (Index n_keys : {1, 7, 1024, 2500})
    for (Index d : {1, 4, 33})
      for (Index k : {1, 5, 64}) {
        if (k > n_keys) continue;
        for (Index batch : {1, 3, 130}) {
          CAPTURE(n_keys, d, k, batch);
          const RowMat<float> keys = small_ints(n_keys, d, 3, n_keys + d);
          const RowMat<float> q = small_ints(batch, d, 5, batch + k);
          RowMat<float> s(batch, k), s_ref;
          IndexMat ids(batch, k), ids_ref;
          ExhaustiveTopK<float> search;
          search.search(keys, q, k, s, ids);
          reference_search(keys, q, k, s_ref, ids_ref);
          CHECK(ids == ids_ref);
          CHECK(s == s_ref);
        }
      }
}

TEST_CASE("exhaustive top-k splits the keys over the threads with the same results, ties across the runs",
          "[retrieval]") {
  // A batch of one query block reads the keys in one run per thread and merges the runs' lists:
  // integer data with many ties, keys over several key blocks (with a partial last one), by 1 to
  // 4 threads; each must equal the reference exactly, ties to the smaller id across the runs.
  const int threads_before = max_threads();
  for (Index n_keys : {600, 1300, 2049})
    for (Index k : {1, 16, 70})
      for (Index batch : {1, 5, 257}) {
        const RowMat<float> keys = small_ints(n_keys, 6, 3, n_keys);
        const RowMat<float> q = small_ints(batch, 6, 3, batch + k);
        RowMat<float> s_ref;
        IndexMat ids_ref;
        reference_search(keys, q, k, s_ref, ids_ref);
        ExhaustiveTopK<float> search;  // reused as the thread count changes
        for (int threads : {1, 2, 3, 4}) {
          CAPTURE(n_keys, k, batch, threads);
          set_num_threads(threads);
          RowMat<float> s(batch, k);
          IndexMat ids(batch, k);
          search.search(keys, q, k, s, ids);
          CHECK(ids == ids_ref);
          CHECK(s == s_ref);
        }
      }
  set_num_threads(threads_before);
}

TEST_CASE("exhaustive top-k on random data, reused and with strided views", "[retrieval]") {
  RowMat<double> keys(3000, 16), big(50, 40);
  Rng rng(5);
  fill_normal(keys, 1.0, rng);
  fill_normal(big, 1.0, rng);
  // Queries are a block of a wider matrix: the view must bind without a copy.
  CMatRef<double> q = big.block(3, 5, 40, 16);
  CHECK(q.data() == &big(3, 5));
  RowMat<double> s_ref;
  IndexMat ids_ref;
  reference_search<double>(keys, RowMat<double>(q), 10, s_ref, ids_ref);
  ExhaustiveTopK<double> search;
  for (int rep = 0; rep < 2; ++rep) {
    RowMat<double> s(40, 10);
    IndexMat ids(40, 10);
    search.search(keys, q, 10, s, ids);
    CHECK(ids == ids_ref);
    CHECK((s - s_ref).cwiseAbs().maxCoeff() < 1e-12);
  }
}

TEST_CASE("exhaustive top-k rejects bad arguments with clear errors", "[retrieval]") {
  RowMat<float> keys = RowMat<float>::Ones(10, 4), q = RowMat<float>::Ones(2, 4);
  RowMat<float> s(2, 3);
  IndexMat ids(2, 3);
  ExhaustiveTopK<float> search;
  CHECK_THROWS_WITH(search.search(keys, RowMat<float>::Ones(2, 5), 3, s, ids), Catch::Contains("columns"));
  CHECK_THROWS_WITH(search.search(keys, q, 11, s, ids), Catch::Contains("k = 11"));
  CHECK_THROWS_WITH(search.search(keys, q, 0, s, ids), Catch::Contains("k = 0"));
  RowMat<float> s_bad(2, 2);
  CHECK_THROWS_WITH(search.search(keys, q, 3, s_bad, ids), Catch::Contains("scores"));
  q(1, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(search.search(keys, q, 3, s, ids), Catch::Contains("queries"));
}
