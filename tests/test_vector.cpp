#include <spex/kernels/vector.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn;

TEMPLATE_TEST_CASE("dot, sum and max match the scalar twins on every length and misalignment", "[kernels]", float,
                   double) {
  using T = TestType;
  for (std::size_t off : {0, 1})
    for (std::size_t n : spex_test::kernel_lengths<T>()) {
      CAPTURE(n, off);
      const auto x = randn<T>(n, 1 + n, off), y = randn<T>(n, 2 + n, off);
      const T* px = x.data() + off;
      const T* py = y.data() + off;
      const double scale = std::sqrt(double(n)) + 1;
      CHECK(kernels::dot(px, py, n) == Approx(kernels::scalar::dot(px, py, n)).margin(spex_test::tol<T>() * scale));
      CHECK(kernels::sum(px, n) == Approx(kernels::scalar::sum(px, n)).margin(spex_test::tol<T>() * scale));
      CHECK(kernels::max(px, n) == kernels::scalar::max(px, n));
    }
}

TEMPLATE_TEST_CASE("axpy and scale match the scalar twins", "[kernels]", float, double) {
  using T = TestType;
  for (std::size_t off : {0, 1})
    for (std::size_t n : spex_test::kernel_lengths<T>()) {
      CAPTURE(n, off);
      const auto x = randn<T>(n, 3 + n, off);
      auto y = randn<T>(n, 4 + n, off), y_ref = y;
      kernels::axpy(T(0.75), x.data() + off, y.data() + off, n);
      kernels::scalar::axpy(T(0.75), x.data() + off, y_ref.data() + off, n);
      for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == Approx(y_ref[i]).margin(spex_test::tol<T>()));
      kernels::scale(T(-1.5), y.data() + off, n);
      kernels::scalar::scale(T(-1.5), y_ref.data() + off, n);
      for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == Approx(y_ref[i]).margin(spex_test::tol<T>()));
    }
}

TEST_CASE("max skips NaN and is -inf on an empty range", "[kernels]") {
  std::vector<float> v(37, -5.f);
  v[3] = std::numeric_limits<float>::quiet_NaN();
  v[20] = 2.f;
  v[36] = std::numeric_limits<float>::quiet_NaN();
  CHECK(kernels::max(v.data(), v.size()) == 2.f);
  CHECK(kernels::max(v.data(), 0) == -std::numeric_limits<float>::infinity());
}

TEMPLATE_TEST_CASE("nonzero_bits sets the bit of every entry that is not 0, NaN included, on every length to 64", "[kernels]", float,
                   double) {
  using T = TestType;
  std::vector<T> x(65);
  for (std::size_t off : {0, 1})
    for (std::size_t n = 0; n <= 64; ++n) {
      CAPTURE(n, off);
      // Zeros (+0 and -0), values, a NaN and an infinity, in a pattern that moves with n.
      std::uint64_t want = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t kind = (i * 7 + n) % 6;
        T& v = x[off + i];
        v = kind == 0 ? T(0) : kind == 1 ? -T(0) : kind == 2 ? std::numeric_limits<T>::quiet_NaN()
            : kind == 3 ? std::numeric_limits<T>::infinity() : kind == 4 ? T(1e-30) : T(-2.5);
        if (kind >= 2) want |= std::uint64_t(1) << i;
      }
      CHECK(kernels::nonzero_bits(x.data() + off, n) == want);
      CHECK(kernels::scalar::nonzero_bits(x.data() + off, n) == want);
    }
}

TEMPLATE_TEST_CASE("scale_to matches the scalar twin", "[kernels]", float, double) {
  using T = TestType;
  for (std::size_t off : {0, 1})
    for (std::size_t n : spex_test::kernel_lengths<T>()) {
      CAPTURE(n, off);
      const auto x = randn<T>(n, 5 + n, off);
      std::vector<T> y(n + off, T(7)), y_ref(n + off, T(7));
      kernels::scale_to(T(-0.25), x.data() + off, y.data() + off, n);
      kernels::scalar::scale_to(T(-0.25), x.data() + off, y_ref.data() + off, n);
      CHECK(y == y_ref);
    }
}

TEMPLATE_TEST_CASE("scale_to_stream writes scale_to's values at every alignment", "[kernels]", float, double) {
  using T = TestType;
  for (std::size_t off : {0, 1, 3})
    for (std::size_t n : spex_test::kernel_lengths<T>()) {
      CAPTURE(n, off);
      const auto x = randn<T>(n, 6 + n, off);
      std::vector<T> y(n + off + 1, T(7)), y_ref(n + off + 1, T(7));
      kernels::scale_to_stream(T(-0.75), x.data() + off, y.data() + off, n);
      kernels::stream_fence();
      kernels::scalar::scale_to(T(-0.75), x.data() + off, y_ref.data() + off, n);
      CHECK(y == y_ref);  // and nothing outside [off, off + n) written
    }
}
