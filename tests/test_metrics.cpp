#include <spex/metrics/usage.hpp>

#include "test_util.hpp"

using namespace spex;

TEST_CASE("usage metrics equal their formulas on hand-built distributions", "[metrics]") {
  const Index n = 64;
  SECTION("uniform: every expert used, KL 0, Gini ~0, half the experts hold half the mass") {
    ExpertUsage u(n);
    IndexMat ids(n, 1);
    RowMat<double> g = RowMat<double>::Constant(n, 1, 0.5);
    for (Index i = 0; i < n; ++i) ids(i, 0) = i;
    u.add(ids, g);
    const auto s = u.summary();
    CHECK(s.used == n);
    CHECK(s.usage_percent == 100.0);
    CHECK(s.kl_weighted == Approx(0.0).margin(1e-12));
    CHECK(s.kl_uniform == Approx(0.0).margin(1e-12));
    CHECK(s.gini == Approx(-1.0 / n));  // 1 - 2 mean(cumsum) = 1 - (n+1)/n
    CHECK(s.top50 == n / 2 + 1);        // numpy: N - searchsorted(cumsum, 0.5)
    CHECK(s.tokens == n);
  }
  SECTION("one-hot: one expert, KL log N, Gini 1 - 2/N") {
    ExpertUsage u(n);
    IndexMat ids = IndexMat::Constant(10, 3, 17);
    u.add(ids, RowMat<float>::Constant(10, 3, 0.3f));
    const auto s = u.summary();
    CHECK(s.used == 1);
    CHECK(s.usage_percent == Approx(100.0 / n));
    CHECK(s.kl_weighted == Approx(std::log(double(n))));
    CHECK(s.gini == Approx(1.0 - 2.0 / n));
    CHECK(s.top50 == 1);
    CHECK(s.top99 == 1);
  }
  SECTION("two experts with mass 3:1 accumulated over batches") {
    ExpertUsage u(4);
    IndexMat a(1, 2);
    a << 0, 1;
    RowMat<double> ga(1, 2);
    ga << 1.0, 1.0;
    u.add(a, ga);
    IndexMat b(1, 1);
    b << 0;
    RowMat<double> gb(1, 1);
    gb << 2.0;
    u.add(b, gb);
    const auto s = u.summary();
    CHECK(s.used == 2);
    CHECK(s.kl_weighted == Approx(std::log(4.0) + 0.75 * std::log(0.75) + 0.25 * std::log(0.25)));
    // counts 2:1
    CHECK(s.kl_uniform == Approx(std::log(4.0) + (2.0 / 3) * std::log(2.0 / 3) + (1.0 / 3) * std::log(1.0 / 3)));
    CHECK(s.top50 == 1);
    CHECK(s.top90 == 2);
  }
  SECTION("bad ids are reported") {
    ExpertUsage u(4);
    IndexMat ids = IndexMat::Constant(1, 1, 4);
    CHECK_THROWS_WITH(u.add(ids, RowMat<double>::Ones(1, 1)), Catch::Contains("outside [0, 4)"));
  }
}

TEST_CASE("TF-IDF slot ranking: the paper's scores by hand, ties by id, batches as documents", "[metrics]") {
  spex::TfIdfSlotRanking r(6);
  spex::IndexMat b1(2, 2), b2(1, 3), fresh(2, 3);
  b1 << 0, 1, 1, 2;  // slot 1 twice: one document still
  b2 << 0, 3, 0;
  r.add_background(b1);
  r.add_background(b2);
  CHECK(r.background_batches() == 2);
  CHECK(r.document_frequency(0) == 2);
  CHECK(r.document_frequency(1) == 1);
  CHECK(r.document_frequency(5) == 0);
  CHECK(r.idf(0) == Approx(std::log(3.0 / 3.0)));
  CHECK(r.idf(5) == Approx(std::log(3.0)));
  fresh << 0, 0, 1, 5, 4, 4;  // tf: 0 -> 2/6, 1 -> 1/6, 4 -> 2/6, 5 -> 1/6
  // scores: 0: 0; 1: 1/6 log(3/2); 4: 2/6 log 3; 5: 1/6 log 3
  const std::vector<spex::Index> top = r.top(fresh, 3);
  REQUIRE(top.size() == 3);
  CHECK(top[0] == 4);
  CHECK(top[1] == 5);
  CHECK(top[2] == 1);
  CHECK(r.top(fresh, 10).size() == 4);  // the batch used 4 distinct slots
  spex::IndexMat tie(1, 2);
  tie << 5, 4;  // equal tf and idf: the smaller id first
  CHECK(r.top(tie, 1)[0] == 4);
  spex::IndexMat bad(1, 1);
  bad << 6;
  CHECK_THROWS_WITH(r.top(bad, 1), Catch::Contains("expert id 6 is outside [0, 6)"));
}
