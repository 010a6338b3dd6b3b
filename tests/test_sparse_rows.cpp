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
}
