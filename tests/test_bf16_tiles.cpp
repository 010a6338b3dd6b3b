// bf16 tile scores (kernels/bf16_tiles.hpp), the exact top-k refined from approximate scores
// (kernels/refined_topk.hpp), and product-key search through both. The tile kernel itself runs
// only where the build targets AMX and the OS grants the tiles (the "amx:" test build on such a
// CPU); the packing, the bound's use and the refinement are tested on every build.
#include <cmath>

#include <spex/kernels/bf16_tiles.hpp>
#include <spex/kernels/refined_topk.hpp>
#include <spex/select/exhaustive.hpp>
#include <spex/select/product_keys.hpp>

#include "test_util.hpp"

using namespace spex;

namespace {
std::vector<float> random_values(std::size_t n, std::uint64_t seed, double scale) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = float(rng.normal() * scale);
  return v;
}
}  // namespace

TEST_CASE("bf16 key panels hold each key's value pairs in tile lines, zeros past the keys and values", "[kernels]") {
  for (std::size_t n : {1, 16, 37, 64})
    for (std::size_t h : {2, 32, 40, 128}) {
      CAPTURE(n, h);
      const std::size_t stride = h + 3;
      const auto c = random_values(n * stride, 7 + n + h, 1.0);
      const std::size_t hp = kernels::bf16_row_length(h), n32 = (n + 31) / 32 * 32;
      REQUIRE(kernels::bf16_key_panel_size(n, h) == n32 * hp);
      std::vector<std::uint16_t> panel(n32 * hp, 0xffff);
      // In two calls, as the threads pack blocks of a table; then the whole blocks past it.
      const std::size_t first = n > 16 ? 16 : n;
      kernels::pack_keys_bf16(c.data(), stride, 0, first, h, panel.data());
      if (n > first) kernels::pack_keys_bf16(c.data(), stride, first, n - first, h, panel.data());
      const std::size_t packed = (n + 15) / 16 * 16;
      std::fill(panel.begin() + std::ptrdiff_t(packed * hp), panel.end(), std::uint16_t(0));
      for (std::size_t j = 0; j < n32; ++j)
        for (std::size_t i = 0; i < hp; ++i) {
          const std::size_t at = ((j / 16 * (hp / 32) + i / 32) * 16 + (i % 32) / 2) * 32 + 2 * (j % 16) + i % 2;
          const std::uint16_t expected = j < n && i < h ? kernels::scalar::float_to_bf16(c[j * stride + i]) : 0;
          if (panel[at] != expected) FAIL_CHECK("key " << j << ", value " << i);
        }
      const auto q = random_values(3 * stride, 9, 1.0);
      std::vector<std::uint16_t> rows(3 * hp, 0xffff);
      kernels::pack_rows_bf16(q.data(), stride, 3, h, rows.data());
      for (std::size_t r = 0; r < 3; ++r)
        for (std::size_t i = 0; i < hp; ++i) CHECK(rows[r * hp + i] == (i < h ? kernels::scalar::float_to_bf16(q[r * stride + i]) : 0));
    }
}

TEST_CASE("bf16_rounding_bound bounds the norm of a row's rounding to bf16, closely", "[kernels]") {
  for (std::size_t h : {1, 7, 16, 40, 128, 257}) {
    CAPTURE(h);
    const auto x = random_values(h, 50 + h, 3.0);
    double sum = 0;
    for (float v : x) {
      const double d = double(kernels::scalar::bf16_to_float(kernels::scalar::float_to_bf16(v))) - v;
      sum += d * d;
    }
    const double exact = std::sqrt(sum);
    const float bound = kernels::bf16_rounding_bound(x.data(), h);
    CHECK(bound >= exact);
    CHECK(bound <= exact * (1 + 1e-4) + 1e-30);
    CHECK(bound <= 0x1p-8 * std::sqrt(kernels::scalar::dot(x.data(), x.data(), h)) * (1 + 1e-4));
  }
}

TEST_CASE("bf16 tile scores lie within bf16_score_error of the float dots", "[kernels]") {
  if (!kernels::bf16_tiles_ready()) {
    WARN("bf16 tiles not available in this build or on this CPU: the tile kernel is not run");
    return;
  }
  for (std::size_t h : {32, 40, 128, 256})
    for (double spread : {1.0, 1e3}) {
      CAPTURE(h, spread);
      const std::size_t rows = 64, n = 50, n32 = 64, hp = kernels::bf16_row_length(h);
      // Values over many magnitudes (spread): the products cancel, and the bound must still hold.
      Rng rng(11 + h);
      std::vector<float> q(rows * h), c(n * h);
      for (auto& x : q) x = float(rng.normal() * std::pow(spread, rng.uniform()));
      for (auto& x : c) x = float(rng.normal() * std::pow(spread, rng.uniform()));
      std::vector<std::uint16_t> qp(rows * hp), panel(kernels::bf16_key_panel_size(n, h));
      kernels::pack_rows_bf16(q.data(), h, rows, h, qp.data());
      kernels::pack_keys_bf16(c.data(), h, 0, n, h, panel.data());
      std::fill(panel.begin() + std::ptrdiff_t(64 * hp), panel.end(), std::uint16_t(0));
      std::vector<float> out(rows * n32, std::nanf(""));
      kernels::scores_bf16_tiles(qp.data(), rows, panel.data(), n32, h, out.data(), n32);
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t j = 0; j < n32; ++j) {
          const float* x = &q[r * h];
          if (j >= n) {
            CHECK(out[r * n32 + j] == 0.0f);  // zero keys
            continue;
          }
          const float* y = &c[j * h];
          const float exact = kernels::dot(x, y, h);
          const float nq = std::sqrt(kernels::scalar::dot(x, x, h)), nc = std::sqrt(kernels::scalar::dot(y, y, h));
          double bf16_sum = 0, magnitude = 0;  // the products of the rounded values, summed in double
          for (std::size_t i = 0; i < h; ++i) {
            const double p = double(kernels::scalar::bf16_to_float(kernels::scalar::float_to_bf16(x[i]))) * kernels::scalar::bf16_to_float(kernels::scalar::float_to_bf16(y[i]));
            bf16_sum += p;
            magnitude += std::abs(p);
          }
          const float approx = out[r * n32 + j];
          CHECK(std::abs(approx - exact) <= kernels::bf16_score_error(h, nq, nc, kernels::bf16_rounding_bound(x, h),
                                                                       kernels::bf16_rounding_bound(y, h)));
          CHECK(std::abs(approx - bf16_sum) <= double(h) * 0x1p-23 * magnitude + 1e-30);
        }
    }
}

TEST_CASE("topk_refined equals the exact top-k for any approximation within the slack", "[kernels]") {
  Rng rng(21);
  kernels::RefinedTopKScratch scratch;
  for (std::size_t n : {1, 17, 64, 1000, 1024})
    for (std::size_t k : {1, 4, 16})
      for (int kind = 0; kind < 3; ++kind) {
        if (k > n) continue;
        CAPTURE(n, k, kind);
        // kind 0: distinct scores; 1: few levels (many exact ties); 2: every score equal.
        std::vector<float> exact(n), approx(n);
        for (auto& e : exact) e = kind == 0 ? float(rng.normal()) : kind == 1 ? float(int(rng.below(5))) : 3.0f;
        const float slack = 0.25f;
        // Errors anywhere in [-slack, slack], the extremes included.
        for (std::size_t j = 0; j < n; ++j) {
          const int pick = int(rng.below(3));
          approx[j] = exact[j] + (pick == 0 ? -slack : pick == 1 ? slack : float(rng.uniform(-slack, slack)));
        }
        scratch.reserve(n, k);
        std::vector<float> vals(k), ref_vals(k);
        std::vector<std::int64_t> ids(k), ref_ids(k);
        std::int64_t last = -1;
        bool increasing = true;
        const std::size_t scored = kernels::topk_refined(
            approx.data(), n, k, slack,
            [&](const std::int64_t* rows, std::size_t m, float* out) {
              for (std::size_t r = 0; r < m; ++r) {
                increasing = increasing && rows[r] > last;
                last = rows[r];
                out[r] = exact[std::size_t(rows[r])];
              }
            },
            vals.data(), ids.data(), scratch);
        kernels::topk(exact.data(), n, k, ref_vals.data(), ref_ids.data());
        CHECK(increasing);
        CHECK(scored >= k);
        CHECK(scored <= n);
        CHECK(ids == ref_ids);
        CHECK(vals == ref_vals);
      }
}

namespace {
// Product-key search with the bf16 tiles on any shape (where the build and CPU have them) against the float GEMM path and, for small
// tables, exhaustive search over the explicit keys; 1 and 2 threads.
void check_tiles_against_gemm(ProductKeys<float>& pk, const RowMat<float>& q, Index k, bool exhaustive) {
  const Index b = q.rows();
  RowMat<float> s_gemm(b, k), s(b, k);
  IndexMat ids_gemm(b, k), ids(b, k);
  ProductKeys<float>::Workspace ws;
  pk.set_bf16_tiles(Bf16Tiles::never);
  pk.search(q, k, s_gemm, ids_gemm, ws);
  pk.set_bf16_tiles(Bf16Tiles::always);
  const int threads_before = max_threads();
  RowMat<float> s_first;
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    pk.search(q, k, s, ids, ws);
    CAPTURE(threads);
    if (threads == 1) s_first = s;
    CHECK(s == s_first);  // the same bits on any thread count
    CHECK(ids == ids_gemm);
    CHECK((s - s_gemm).cwiseAbs().maxCoeff() <= 1e-4f * (1 + s_gemm.cwiseAbs().maxCoeff()));
  }
  set_num_threads(threads_before);
  if (exhaustive) {
    RowMat<float> s_ref(b, k);
    IndexMat ids_ref(b, k);
    ExhaustiveTopK<float>().search(pk.full_keys(), q, k, s_ref, ids_ref);
    CHECK(ids == ids_ref);
  }
}
}  // namespace

TEST_CASE("product-key search through bf16 tiles finds the exact top-k", "[retrieval]") {
  const Index batch = 101;
  Rng rng(31);
  SECTION("integer keys and queries: exact ties everywhere") {
    for (Index n : {5, 40})
      for (Index d_key : {4, 70}) {
        CAPTURE(n, d_key);
        RowMat<float> c1(n, d_key / 2), c2(n, d_key / 2), q(batch, d_key);
        for (auto* m : {&c1, &c2, &q})
          for (Index i = 0; i < m->size(); ++i) m->data()[i] = float(int(rng.below(5)) - 2);
        ProductKeys<float> pk(c1, c2);
        check_tiles_against_gemm(pk, q, std::min<Index>(n, 6), true);
      }
  }
  SECTION("random keys, PEER's shape, shells ids") {
    ProductKeys<float> pk(256, 256, 5, ExpertIds::shells);
    RowMat<float> q(batch, 256);
    fill_normal(q, 1.0, rng);
    check_tiles_against_gemm(pk, q, 16, false);
  }
  SECTION("each half's bound comes from its own rows when the tables span several packing blocks") {
    // Half 1's first block holds a key whose bf16 rounding drops 2^-8 - 2^-16 (it rounds to
    // 1): it ranks first exactly and second in bf16, so only a bound taken from that block's
    // rounding keeps it a candidate. Every other row (half 0, half 1's second block) is zero.
    const Index n = 300;
    RowMat<float> c1 = RowMat<float>::Zero(n, 2), c2 = RowMat<float>::Zero(n, 2);
    c2(0, 0) = 1 + 0x1p-8f - 0x1p-16f;
    c2(1, 0) = 1;
    c2(1, 1) = 0x1p-8f - 0x1p-14f;
    ProductKeys<float> pk(c1, c2);
    RowMat<float> q = RowMat<float>::Zero(batch, 4);
    q.rightCols(2).setOnes();
    check_tiles_against_gemm(pk, q, 1, true);
  }
  SECTION("a query too large for bf16 scores is scored exactly") {
    ProductKeys<float> pk(32, 16, 6);
    RowMat<float> q(batch, 16);
    fill_normal(q, 1.0, rng);
    q.row(3) *= 1e30f;
    q.row(5) *= 3e19f;  // just above the range
    q.row(7) *= 1e15f;  // large, within the tiles' range
    check_tiles_against_gemm(pk, q, 8, true);
  }
  SECTION("a non-finite sub-key leaves the search to the GEMM path") {
    ProductKeys<float> pk(32, 16, 7);
    pk.sub_keys(1)(4, 2) = std::numeric_limits<float>::quiet_NaN();
    RowMat<float> q(batch, 16);
    fill_normal(q, 1.0, rng);
    check_tiles_against_gemm(pk, q, 8, false);
  }
}

TEST_CASE("product keys name a bad Bf16Tiles value", "[retrieval]") {
  ProductKeys<float> pk(4, 8, 1);
  CHECK_THROWS_WITH(pk.set_bf16_tiles(static_cast<Bf16Tiles>(7)), Catch::Matchers::Contains("ProductKeys::set_bf16_tiles: 7 is not a Bf16Tiles"));
  CHECK(pk.bf16_tiles() == Bf16Tiles::automatic);
}

namespace {
// Exhaustive search with the bf16 tiles on any shape (where the build and CPU have them)
// against the float GEMM path: the same ids, scores within float rounding, the same bits on 1, 2
// and 3 threads (which split the keys into 1, 2 or 3 runs).
void check_exhaustive_tiles(const RowMat<float>& keys, const RowMat<float>& q, Index k, bool exact_scores) {
  const Index b = q.rows();
  RowMat<float> s_gemm(b, k), s(b, k), s_first;
  IndexMat ids_gemm(b, k), ids(b, k);
  ExhaustiveTopK<float> search;
  search.set_bf16_tiles(Bf16Tiles::never);
  search.search(keys, q, k, s_gemm, ids_gemm);
  search.set_bf16_tiles(Bf16Tiles::always);
  const int threads_before = max_threads();
  for (int threads : {1, 2, 3}) {
    CAPTURE(threads);
    set_num_threads(threads);
    search.search(keys, q, k, s, ids);
    if (threads == 1) s_first = s;
    CHECK(ids == ids_gemm);
    if (exact_scores)
      CHECK(s == s_gemm);
    else
      CHECK(s == s_first);
    const auto finite = s_gemm.array().isFinite();
    CHECK((finite == s.array().isFinite()).all());
    CHECK((finite.select(s - s_gemm, 0.0f)).cwiseAbs().maxCoeff() <= 1e-4f * (1 + finite.select(s_gemm, 0.0f).cwiseAbs().maxCoeff()));
  }
  set_num_threads(threads_before);
}
}  // namespace

TEST_CASE("exhaustive search through bf16 tiles finds the exact top-k", "[retrieval]") {
  Rng rng(41);
  SECTION("integer keys and queries: exact ties everywhere, several key blocks and query blocks") {
    for (Index n_keys : {37, 1500})
      for (Index d : {8, 130}) {
        CAPTURE(n_keys, d);
        RowMat<float> keys(n_keys, d), q(300, d);
        for (auto* m : {&keys, &q})
          for (Index i = 0; i < m->size(); ++i) m->data()[i] = float(int(rng.below(3)) - 1);
        check_exhaustive_tiles(keys, q, std::min<Index>(n_keys, 20), true);
      }
  }
  SECTION("random keys over many blocks") {
    RowMat<float> keys(5000, 128), q(70, 128);
    fill_normal(keys, 1.0, rng);
    fill_normal(q, 1.0, rng);
    check_exhaustive_tiles(keys, q, 16, false);
  }
  SECTION("a NaN key is never selected, a key and a query too large for bf16 are scored exactly") {
    RowMat<float> keys(1200, 64), q(70, 64);
    fill_normal(keys, 1.0, rng);
    fill_normal(q, 1.0, rng);
    keys(700, 3) = std::numeric_limits<float>::quiet_NaN();
    keys.row(5) *= 2e18f;  // norm above 2^60: its block is scored exactly
    keys.row(900) *= 1e10f;  // large, within the tiles' range
    q.row(2) *= 2e18f;
    check_exhaustive_tiles(keys, q, 8, false);
  }
  SECTION("fewer finite scores than k pad with -inf and id -1") {
    RowMat<float> keys = RowMat<float>::Constant(40, 32, std::numeric_limits<float>::quiet_NaN()), q(65, 32);
    fill_normal(q, 1.0, rng);
    keys.row(3).setOnes();
    keys.row(30).setConstant(2.0f);
    check_exhaustive_tiles(keys, q, 4, false);
  }
}
