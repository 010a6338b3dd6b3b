#include <atomic>
#include <chrono>
#include <set>
#include <thread>

#include <spex/core/check.hpp>
#include <spex/core/finite.hpp>
#include <spex/core/parallel.hpp>
#include <spex/core/random.hpp>
#include <spex/core/types.hpp>

#include "test_util.hpp"

using namespace spex;

TEST_CASE("SPEX_CHECK throws spex::Error with the message", "[core]") {
  auto f = [](int x) { SPEX_CHECK(x > 0, "x = " << x << " must be positive"); };
  CHECK_NOTHROW(f(1));
  CHECK_THROWS_AS(f(0), Error);
  CHECK_THROWS_WITH(f(-3), Catch::Contains("x = -3 must be positive"));
}

TEST_CASE("check_finite and check_shape name the argument", "[core]") {
  RowMat<float> m = RowMat<float>::Zero(3, 4);
  CHECK_NOTHROW(check_finite(m, "m"));
  m(2, 1) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(check_finite(m, "queries"), Catch::Contains("queries") && Catch::Contains("(2, 1)"));
  CHECK_THROWS_WITH(check_shape(m, 3, 5, "scores"), Catch::Contains("scores is 3 x 4, expected 3 x 5"));
}

TEST_CASE("find_non_finite finds the first NaN or Inf in matrices checked in blocks over the threads", "[core]") {
  // 300 x 512 (153,600 values) is checked as 5 blocks of 64 rows, 1 x 200,000 as one block and
  // 20,000 x 3 as 2 blocks of 10,922 rows: a non-finite value late in the last block is found,
  // and the first one when there are two.
  const int threads_before = max_threads();
  for (const int threads : {1, 2, 3}) {
    set_num_threads(threads);
    for (const auto& shape : {std::pair<Index, Index>{300, 512}, {1, 200000}, {20000, 3}}) {
      RowMat<float> m = RowMat<float>::Ones(shape.first, shape.second);
      CHECK(find_non_finite(m) == std::pair<Index, Index>{-1, -1});
      const Index last_row = shape.first - 1, last_col = shape.second - 1;
      m(last_row, last_col) = std::numeric_limits<float>::quiet_NaN();
      CHECK(find_non_finite(m) == std::pair<Index, Index>{last_row, last_col});
      const Index r = shape.first / 3, c = shape.second / 2;
      m(r, c) = -std::numeric_limits<float>::infinity();
      CHECK(find_non_finite(m) == std::pair<Index, Index>{r, c});
      const Eigen::Map<const RowMat<float>> view(m.data(), shape.first, shape.second);
      CHECK(find_non_finite(view.bottomRows(shape.first - r)) == std::pair<Index, Index>{0, c});
    }
  }
  set_num_threads(threads_before);
}

TEST_CASE("Rng is deterministic and its normals have the right moments", "[core]") {
  Rng a(42), b(42), c(43);
  for (int i = 0; i < 10; ++i) CHECK(a.next_u64() == b.next_u64());
  CHECK(Rng(42).next_u64() != c.next_u64());
  Rng r(7);
  const int n = 200000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    const double x = r.normal();
    s += x;
    s2 += x * x;
  }
  CHECK(s / n == Approx(0.0).margin(0.01));
  CHECK(s2 / n == Approx(1.0).epsilon(0.01));
  double u_min = 1, u_max = 0;
  for (int i = 0; i < 10000; ++i) {
    const double u = r.uniform(-2, 3);
    u_min = std::min(u_min, u);
    u_max = std::max(u_max, u);
  }
  CHECK(u_min >= -2);
  CHECK(u_max < 3);
  CHECK(u_min < -1.99);
  CHECK(u_max > 2.99);
}

TEST_CASE("parallel_for: a thread done with its own range takes the unclaimed indices of a slower one", "[core]") {
  const int threads_before = max_threads();
  set_num_threads(2);
  // Thread 0 is slowed: 5 ms an index, 160 ms for its range [0, 32), so that thread 1 gets a core
  // in time even on a busy machine. Without stealing, thread 0 would run all of it and thread 1
  // none.
  std::vector<std::atomic<int>> runner(64);
  for (auto& r : runner) r = -1;
  parallel_for(64, [&](Index i, int thread) {
    runner[static_cast<std::size_t>(i)] = thread;
    if (thread == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  });
  int taken_from_thread0 = 0;
  for (Index i = 0; i < 64; ++i) {
    CHECK(runner[static_cast<std::size_t>(i)] >= 0);
    if (i < 32 && runner[static_cast<std::size_t>(i)] == 1) ++taken_from_thread0;
  }
  if (max_threads() == 2) CHECK(taken_from_thread0 > 0);
  set_num_threads(threads_before);
}

TEST_CASE("parallel_for and parallel_for_dynamic visit every index once and rethrow the first error",
          "[core]") {
  auto check = [](auto&& loop) {
    for (const Index n : {Index(1), Index(7), Index(63), Index(64), Index(1000), Index(4099)}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<int> bad_thread{0};
      loop(n, [&](Index i, int thread) {
        if (thread < 0 || thread >= max_threads()) ++bad_thread;
        hits[static_cast<std::size_t>(i)]++;
      });
      CHECK(bad_thread.load() == 0);
      for (auto& h : hits) CHECK(h.load() == 1);
    }
    CHECK_THROWS_AS(loop(100, [](Index i, int) { SPEX_CHECK(i != 57, "bad index " << i); }), Error);
    loop(0, [](Index, int) { FAIL("called for an empty range"); });
  };
  const int threads_before = max_threads();
  for (const int threads : {1, 2, 3}) {
    set_num_threads(threads);
    check([](Index n, auto&& f) { parallel_for(n, f); });
    check([](Index n, auto&& f) { parallel_for_dynamic(n, f); });
  }
  set_num_threads(threads_before);
}
