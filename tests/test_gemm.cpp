// core/gemm.hpp: every engine this build has, against a scalar reference in long double, on
// all transpose combinations, strided operands and outputs, empty and thin shapes and the tile
// boundaries of gemm(); plus what must not happen: reading C when assigning, results that
// depend on the thread count, shapes that do not match.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>
#include <spex/core/gemm.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;

namespace {

std::vector<GemmEngine> engines() {
  std::vector<GemmEngine> out;
  for (auto e : {GemmEngine::eigen, GemmEngine::cblas, GemmEngine::xsmm})
    if (gemm_engine_available(e)) out.push_back(e);
  return out;
}

// op(A) op(B) in long double, from the stored (untransposed) matrices.
template <class T>
RowMat<double> reference(const RowMat<T>& a, bool ta, const RowMat<T>& b, bool tb) {
  const Index m = ta ? a.cols() : a.rows(), k = ta ? a.rows() : a.cols(), n = tb ? b.rows() : b.cols();
  RowMat<double> c(m, n);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      long double s = 0;
      for (Index p = 0; p < k; ++p) s += (long double)(ta ? a(p, i) : a(i, p)) * (tb ? b(j, p) : b(p, j));
      c(i, j) = double(s);
    }
  return c;
}

// Rounding bound of a k-term dot product of N(0,1) values, with room for any summation order.
template <class T>
double tolerance(Index k) {
  return 4.0 * double(std::numeric_limits<T>::epsilon()) * std::sqrt(double(std::max<Index>(k, 1))) * 8.0;
}

template <class T>
void check_engine_block(GemmEngine engine, Index m, Index n, Index k, bool ta, bool tb, bool accumulate) {
  CAPTURE(gemm_engine_name(engine), m, n, k, ta, tb, accumulate, sizeof(T));
  // Operands are blocks of larger matrices: strides differ from the widths.
  const RowMat<T> a_big = randn_mat((ta ? k : m) + 2, (ta ? m : k) + 3, 11).template cast<T>();
  const RowMat<T> b_big = randn_mat((tb ? n : k) + 2, (tb ? k : n) + 5, 12).template cast<T>();
  const RowMat<T> a = a_big.block(1, 2, ta ? k : m, ta ? m : k), b = b_big.block(1, 3, tb ? n : k, tb ? k : n);
  RowMat<T> c_big = randn_mat(m + 2, n + 4, 13).template cast<T>();
  const RowMat<T> c_before = c_big;
  const Index ldc = c_big.cols();
  auto operand = [](const RowMat<T>& big, const RowMat<T>& part, Index r0, Index c0, bool t) {
    return detail::GemmOperand<T>{&big(r0, c0), part.rows(), part.cols(), big.cols(), t};
  };
  detail::gemm_block(engine, operand(a_big, a, 1, 2, ta), operand(b_big, b, 1, 3, tb), c_big.data() + ldc + 1, ldc, m,
                     n, accumulate);
  RowMat<double> expected = reference(a, ta, b, tb);
  if (accumulate) expected += c_before.block(1, 1, m, n).template cast<double>();
  const double err = m * n == 0 ? 0.0 : (c_big.block(1, 1, m, n).template cast<double>() - expected).cwiseAbs().maxCoeff();
  CHECK(err <= tolerance<T>(k) * (1.0 + (m * n == 0 ? 0.0 : expected.cwiseAbs().maxCoeff())));
  // Nothing outside the block changed.
  RowMat<T> outside = c_big;
  outside.block(1, 1, m, n) = c_before.block(1, 1, m, n);
  CHECK(outside == c_before);
}

}  // namespace

TEST_CASE("gemm engines: every engine agrees with a long-double reference", "[gemm]") {
  const Index shapes[][3] = {{1, 1, 1}, {2, 7, 5}, {5, 3, 9}, {8, 33, 17}, {64, 128, 512}, {37, 96, 130}, {100, 20, 3}};
  for (auto engine : engines())
    for (const auto& s : shapes)
      for (int t = 0; t < 4; ++t)
        for (bool acc : {false, true}) {
          check_engine_block<float>(engine, s[0], s[1], s[2], t & 1, t & 2, acc);
          check_engine_block<double>(engine, s[0], s[1], s[2], t & 1, t & 2, acc);
        }
}

TEST_CASE("gemm engines: empty shapes and k = 0", "[gemm]") {
  for (auto engine : engines())
    for (bool acc : {false, true}) {
      check_engine_block<float>(engine, 0, 5, 4, false, true, acc);
      check_engine_block<float>(engine, 3, 0, 4, true, false, acc);
      // k = 0: C = 0 (assign) or unchanged (accumulate).
      check_engine_block<float>(engine, 3, 4, 0, false, false, acc);
    }
}

TEST_CASE("gemm engines: assigning never reads C (NaN there does not leak)", "[gemm]") {
  for (auto engine : engines()) {
    CAPTURE(gemm_engine_name(engine));
    const RowMat<float> a = randn_mat(16, 32, 1).cast<float>(), b = randn_mat(32, 24, 2).cast<float>();
    RowMat<float> c = RowMat<float>::Constant(16, 24, std::numeric_limits<float>::quiet_NaN());
    detail::gemm_block(engine, detail::gemm_operand(a), detail::gemm_operand(b), c.data(), c.cols(), 16, 24, false);
    CHECK(c.allFinite());
  }
}

TEST_CASE("gemm: Eigen expressions across tile boundaries, accumulate, nested in a parallel loop", "[gemm]") {
  // 600 x 1100 spans 3 x 3 tiles of 256 x 512 with partial ones.
  const Index m = 600, n = 1100, k = 70;
  const RowMat<float> x = randn_mat(m, k, 3).cast<float>(), w = randn_mat(n, k, 4).cast<float>();
  const RowMat<double> expected = reference(x, false, w, true);
  RowMat<float> y(m, n);
  gemm(y, x, w.transpose(), false);
  CHECK((y.cast<double>() - expected).cwiseAbs().maxCoeff() < tolerance<float>(k) * expected.cwiseAbs().maxCoeff());
  RowMat<float> y2 = y;
  gemm(y2, x, w.transpose(), true);
  CHECK((y2.cast<double>() - 2 * expected).cwiseAbs().maxCoeff() < 2 * tolerance<float>(k) * expected.cwiseAbs().maxCoeff());
  // Inside a parallel loop the tiles run on the calling thread, with the same results.
  RowMat<float> y3(m, n);
  parallel_for(2, [&](Index i, int) {
    if (i == 0) gemm(y3, x, w.transpose(), false);
  });
  CHECK(y3 == y);
  // Transposed A into a block of a wider C: the weight-gradient shape (dW = dyᵀ x).
  RowMat<float> g = RowMat<float>::Zero(k + 2, n);
  const RowMat<float> dy = randn_mat(m, n, 5).cast<float>();
  gemm(g.middleRows(1, k), x.transpose(), dy, false);
  const RowMat<double> expected_g = reference(x, true, dy, false);
  CHECK((g.middleRows(1, k).cast<double>() - expected_g).cwiseAbs().maxCoeff() <
        tolerance<float>(m) * expected_g.cwiseAbs().maxCoeff());
  CHECK(g.row(0).isZero());
  CHECK(g.row(k + 1).isZero());
}

TEST_CASE("gemm: results do not depend on the thread count", "[gemm][determinism]") {
  const int saved = max_threads();
  // One tile (a single engine call outside any parallel region) and several.
  for (const Index m : {1, 5, 130, 700}) {
    CAPTURE(m);
    const RowMat<float> x = randn_mat(m, 300, 6).cast<float>(), w = randn_mat(400, 300, 7).cast<float>();
    RowMat<float> y1(m, 400), y2(m, 400), dx1(m, 300), dx2(m, 300);
    set_num_threads(1);
    gemm(y1, x, w.transpose(), false);
    gemm(dx1, y1, w, false);
    set_num_threads(2);
    gemm(y2, x, w.transpose(), false);
    gemm(dx2, y2, w, false);
    CHECK(y1 == y2);
    CHECK(dx1 == dx2);
  }
  set_num_threads(saved);
}

TEST_CASE("gemm: a large product of few tiles gets narrower ones, with the same results on any thread count", "[gemm]") {
  // Small work or many tiles: the full tiles.
  CHECK(gemm_tiles(256, 512, 64).rows == kGemmTileRows);
  CHECK(gemm_tiles(256, 512, 64).cols == kGemmTileCols);
  CHECK(gemm_tiles(1024, 1024, 2048).cols == kGemmTileCols);
  // dy W of a batch of 256 over k = 2048: one tile becomes four of 256 x 128 (columns first).
  CHECK(gemm_tiles(256, 512, 2048).rows == 256);
  CHECK(gemm_tiles(256, 512, 2048).cols == 128);
  // Columns halve down to 128 while that adds tiles, then rows down to 64.
  CHECK(gemm_tiles(256, 128, 8192).rows == 64);  // 128 columns are one tile already
  CHECK(gemm_tiles(256, 1024, 1024).cols == 256);
  CHECK(gemm_tiles(64, 100, 1 << 16).rows == 256);
  CHECK(gemm_tiles(64, 100, 1 << 16).cols == 512);
  // A product at the split threshold (128 x 512 over 2048: four tiles of 128 x 128) against the
  // long-double reference, bit for bit the same with 1, 2 and 3 threads.
  const Index m = 128, n = 512, k = 2048;
  REQUIRE(double(m) * n * k >= kGemmSplitWork);
  const RowMat<float> a = randn_mat(m, k, 21).cast<float>(), b = randn_mat(k, n, 22).cast<float>();
  const RowMat<double> expected = reference(a, false, b, false);
  const int saved = max_threads();
  std::vector<RowMat<float>> c;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    c.emplace_back(m, n);
    gemm(c.back(), a, b, false);
  }
  set_num_threads(saved);
  CHECK(c[0] == c[1]);
  CHECK(c[0] == c[2]);
  CHECK((c[0].cast<double>() - expected).cwiseAbs().maxCoeff() < tolerance<float>(k) * expected.cwiseAbs().maxCoeff());
}

TEST_CASE("gemm: shape mismatches and non-contiguous operands are errors", "[gemm]") {
  RowMat<float> a(4, 5), b(6, 3), c(4, 3);
  CHECK_THROWS_WITH(gemm(c, a, b, false), Catch::Contains("C (4 x 3) = A (4 x 5) B (6 x 3)"));
  CHECK_THROWS_WITH(gemm(c, a, b, false), Catch::Contains("shapes do not match"));
  RowMat<float> bb(5, 6);
  // Every other column of bb: rows are not contiguous.
  Eigen::Map<const RowMat<float>, 0, Eigen::Stride<Eigen::Dynamic, 2>> strided(bb.data(), 5, 3,
                                                                              Eigen::Stride<Eigen::Dynamic, 2>(6, 2));
  CHECK_THROWS_WITH(gemm(c, a, strided, false), Catch::Contains("contiguous"));
}

TEST_CASE("gemm: the engine for each shape class", "[gemm]") {
  // Thin products stay on Eigen whatever the build links.
  CHECK(gemm_engine_for(1, 1024, 512, false, true) == GemmEngine::eigen);
  CHECK(gemm_engine_for(2, 1024, 512, false, false) == GemmEngine::eigen);
  CHECK(gemm_engine_for(8, 1024, 512, false, true) == GemmEngine::eigen);
  // The others go to an engine this build has.
  for (auto tb : {false, true}) {
    CHECK(gemm_engine_available(gemm_engine_for(64, 128, 512, false, tb)));
    CHECK(gemm_engine_available(gemm_engine_for(256, 512, 512, true, tb)));
  }
  if (gemm_engine_available(GemmEngine::xsmm)) {
    CHECK(gemm_engine_for(64, 128, 512, false, false) == GemmEngine::xsmm);
    CHECK(gemm_engine_for(128, 512, 64, true, false) == GemmEngine::xsmm);   // an expert's weight gradient
    CHECK(gemm_engine_for(64, 128, 512, false, true) != GemmEngine::xsmm);   // no JIT kernel for Bᵀ
    CHECK(gemm_engine_for(256, 512, 512, true, false) != GemmEngine::xsmm);  // Aᵀ over a long k
    // B's rows must span at most kXsmmMaxBBytes: k x n, or k rows of a wider B's stride.
    CHECK(gemm_engine_for(256, 128, 2048, false, false) == GemmEngine::xsmm);
    CHECK(gemm_engine_for(256, 512, 2048, false, false) != GemmEngine::xsmm);
    CHECK(gemm_engine_for(256, 128, 2048, false, false, sizeof(float), 512) != GemmEngine::xsmm);
    CHECK(gemm_engine_for(256, 128, 2048, false, false, sizeof(double)) != GemmEngine::xsmm);
  }
  if (!gemm_engine_available(GemmEngine::cblas) && !gemm_engine_available(GemmEngine::xsmm))
    CHECK(gemm_engine_for(256, 512, 512, false, true) == GemmEngine::eigen);
}
