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
