#include <set>

#include <spex/core/sparse_rows.hpp>

#include "test_util.hpp"

using namespace spex;

TEST_CASE("SparseRowGrad keeps each row once and densifies to the sum", "[core]") {
  SparseRowGrad<double> g(10, 3);
  const double a[] = {1, 2, 3}, b[] = {10, 20, 30};
  g.add_row(7, a);
  g.add_row(2, b);
  g.add_row(7, b);
  CHECK(g.rows() == std::vector<Index>{7, 2});
  RowMat<double> d = g.to_dense();
  CHECK(d(7, 0) == 11);
  CHECK(d(7, 2) == 33);
  CHECK(d(2, 1) == 20);
  CHECK(d.row(0).isZero());
  RowMat<double> table = RowMat<double>::Ones(10, 3);
  g.apply_sgd(table, 0.5);
  CHECK(table(7, 1) == 1 - 0.5 * 22);
  CHECK(table(0, 0) == 1);
  g.zero();
  CHECK(g.nnz_rows() == 0);
  CHECK(g.find(7) == -1);
  g.add_row(3, a);
  CHECK(g.rows() == std::vector<Index>{3});
  CHECK(g.to_dense()(3, 2) == 3);
  CHECK_THROWS_WITH(g.add_row(10, a), Catch::Contains("row 10 is outside [0, 10)"));
}

TEST_CASE("accumulate_rows sums colliding occurrences like a plain loop", "[core]") {
  const Index n = 20, b = 30, m = 6, w = 9;
  Rng rng(1);
  IndexMat ids(b, m);
  for (Index t = 0; t < b; ++t)
    for (Index j = 0; j < m; ++j) ids(t, j) = Index(rng.below(n));  // many collisions
  RowMat<double> coef(b, m), src(b, w);
  fill_normal(coef, 1.0, rng);
  fill_normal(src, 1.0, rng);
  RowMat<double> expect = RowMat<double>::Zero(n, w);
  for (int rep = 0; rep < 2; ++rep)
    for (Index t = 0; t < b; ++t)
      for (Index j = 0; j < m; ++j) expect.row(ids(t, j)) += coef(t, j) * src.row(t);
  SparseRowGrad<double> g(n, w);
  RowScatterPlan plan;
  accumulate_rows(ids, coef, src, g, plan);
  accumulate_rows(ids, coef, src, g, plan);  // accumulates onto the rows already held
  CHECK((g.to_dense() - expect).cwiseAbs().maxCoeff() < 1e-12);
  std::set<Index> uniq(ids.data(), ids.data() + ids.size());
  CHECK(Index(uniq.size()) == g.nnz_rows());
  // ids and coef as blocks of wider matrices (rows not contiguous): the same gradient.
  IndexMat wide_ids = IndexMat::Constant(b, m + 3, -1);
  RowMat<double> wide_coef = RowMat<double>::Zero(b, m + 3);
  wide_ids.middleCols(1, m) = ids;
  wide_coef.middleCols(1, m) = coef;
  SparseRowGrad<double> g2(n, w);
  accumulate_rows(wide_ids.middleCols(1, m), wide_coef.middleCols(1, m), src, g2, plan);
  accumulate_rows(wide_ids.middleCols(1, m), wide_coef.middleCols(1, m), src, g2, plan);
  CHECK(g2.rows() == g.rows());
  CHECK(g2.values() == g.values());
}

TEMPLATE_TEST_CASE("accumulate_rows streams large new gradients with the same values, any thread count", "[core]", float,
                   double) {
  using T = TestType;
  // Enough new rows for kStreamGradientBytes: a row picked once is streamed; row 11, held before
  // the call and picked many times, is summed as before. An odd width starts most rows off a
  // vector boundary (the kernel's unaligned head).
  const Index w = 257, b = 64, m = Index(kStreamGradientBytes / (w * sizeof(T))) / b + 8, n = 2 * b * m + 2;
  IndexMat ids(b, m);
  for (Index t = 0; t < b; ++t)
    for (Index j = 0; j < m; ++j) ids(t, j) = 2 * (t * m + j) + 2;  // even: never row 11
  for (Index j = 0; j < m; j += 5) ids(3, j) = 11;
  Index picked_once = 0;
  for (Index i = 0; i < ids.size(); ++i) picked_once += ids.data()[i] != 11;
  REQUIRE(double(picked_once) * double(w) * sizeof(T) >= double(kStreamGradientBytes));
  Rng rng(2);
  RowMat<T> coef(b, m), src(b, w);
  fill_normal(coef, 1.0, rng);
  fill_normal(src, 1.0, rng);
  const std::vector<T> held(static_cast<std::size_t>(w), T(0.5));
  std::vector<RowMat<T>> values;
  std::vector<std::vector<Index>> rows;
  const int saved = max_threads();
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    SparseRowGrad<T> g(n, w);
    RowScatterPlan plan;
    g.add_row(11, held.data());
    accumulate_rows(ids, coef, src, g, plan);
    values.push_back(g.values());
    rows.push_back(g.rows());
  }
  set_num_threads(saved);
  CHECK(values[0] == values[1]);
  CHECK(values[0] == values[2]);
  REQUIRE(rows[0].size() == std::size_t(picked_once + 1));
  // Row 11 first (held), then the new rows in the order of their first pick.
  RowMat<double> row11 = RowMat<double>::Constant(1, w, 0.5);
  for (Index j = 0; j < m; j += 5) row11 += double(coef(3, j)) * src.row(3).template cast<double>();
  CHECK(rows[0][0] == 11);
  CHECK((values[0].row(0).template cast<double>() - row11).cwiseAbs().maxCoeff() < 1e-5);
  Index s = 1, exact = 0;
  for (Index t = 0; t < b; ++t)
    for (Index j = 0; j < m; ++j) {
      if (ids(t, j) == 11) continue;
      REQUIRE(rows[0][static_cast<std::size_t>(s)] == ids(t, j));
      const RowMat<T> expect = coef(t, j) * src.row(t);  // a row picked once is a * x exactly
      exact += values[0].row(s) == expect;
      ++s;
    }
  CHECK(exact == picked_once);
}
