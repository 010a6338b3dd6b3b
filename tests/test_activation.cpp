#include <cmath>
#include <limits>
#include <type_traits>

#include <spex/kernels/activation.hpp>

#include "test_util.hpp"

using namespace spex;
using kernels::Activation;
using spex_test::randn;

namespace {
const Activation kAll[] = {Activation::identity, Activation::relu, Activation::gelu_tanh,
                           Activation::gelu_erf, Activation::silu, Activation::sigmoid};
}

TEMPLATE_TEST_CASE("SIMD activations, derivatives and backward match the scalar twins", "[kernels]", float, double) {
  using T = TestType;
  // The SIMD functions (xsimd's erf, tanh, exp) round differently from the scalar ones (std::);
  // in double they agree to 2.4e-8 relative at worst (GELU-erf, over 2^20 N(0, 9) values).
  constexpr bool kDouble = std::is_same<T, double>::value;
  constexpr double kRel = kDouble ? 1e-7 : 1e-5, kAbs = kDouble ? 1e-12 : 1e-6;
  for (Activation a : kAll)
    for (std::size_t off : {0, 1})
      for (std::size_t n : spex_test::kernel_lengths<T>()) {
        CAPTURE(kernels::to_string(a), n, off);
        auto x = randn<T>(n, 10 + n, off);
        for (auto& v : x) v *= T(3);  // cover the tails of erf, tanh and exp
        const auto dy = randn<T>(n, 20 + n, off);
        std::vector<T> y(n + off), y_ref(n + off), dx(n + off), dx_ref(n + off), d(n + off);
        kernels::activate(a, x.data() + off, y.data() + off, n);
        kernels::derivative(a, x.data() + off, d.data() + off, n);
        kernels::scalar::activate(a, x.data() + off, y_ref.data() + off, n);
        kernels::activate_backward(a, x.data() + off, dy.data() + off, dx.data() + off, n);
        kernels::scalar::activate_backward(a, x.data() + off, dy.data() + off, dx_ref.data() + off, n);
        for (std::size_t i = off; i < n + off; ++i) {
          CHECK(y[i] == Approx(y_ref[i]).epsilon(kRel).margin(kAbs));
          CHECK(dx[i] == Approx(dx_ref[i]).epsilon(kRel).margin(kAbs));
          CHECK(d[i] == Approx(kernels::scalar::derivative(a, x[i])).epsilon(kRel).margin(kAbs));
        }
      }
}

TEMPLATE_TEST_CASE("activations and derivatives stay finite and reach their limits for huge and infinite inputs",
                   "[kernels]", float, double) {
  // GELU-tanh's derivative once returned NaN for |x| > 5e19 in float: x^2 overflowed and met
  // (1 - tanh^2) = 0. Every activation, scalar and SIMD, on values up to +-inf.
  using T = TestType;
  const T big = std::numeric_limits<T>::max(), inf = std::numeric_limits<T>::infinity();
  const std::vector<T> xs{T(-1e3), T(-1e10), T(-5e19), T(-1e30), -big, -inf, T(1e3), T(1e10), T(5e19), T(1e30), big, inf};
  for (Activation a : kAll) {
    std::vector<T> y(xs.size()), dy(xs.size(), T(1)), dx(xs.size()), ys(xs.size()), dxs(xs.size()), d(xs.size());
    kernels::activate(a, xs.data(), y.data(), xs.size());
    kernels::derivative(a, xs.data(), d.data(), xs.size());
    kernels::activate_backward(a, xs.data(), dy.data(), dx.data(), xs.size());
    kernels::scalar::activate(a, xs.data(), ys.data(), xs.size());
    kernels::scalar::activate_backward(a, xs.data(), dy.data(), dxs.data(), xs.size());
    for (std::size_t i = 0; i < xs.size(); ++i) {
      CAPTURE(kernels::to_string(a), xs[i]);
      const bool pos = xs[i] > 0;
      // Limits: identity/relu/GELU/SiLU -> x (or 0 below), sigmoid -> 1 or 0; derivatives 1 or 0.
      T want_y = pos ? xs[i] : T(0), want_d = pos ? T(1) : T(0);
      if (a == Activation::identity) want_y = xs[i], want_d = T(1);
      if (a == Activation::sigmoid) want_y = pos ? T(1) : T(0), want_d = T(0);
      CHECK(ys[i] == want_y);
      CHECK(y[i] == want_y);
      CHECK(dxs[i] == want_d);
      CHECK(dx[i] == want_d);
      CHECK(d[i] == want_d);
    }
    // NaN stays NaN.
    const T nan = std::numeric_limits<T>::quiet_NaN();
    CHECK(std::isnan(kernels::scalar::activate(a, nan)));
    if (a != Activation::relu && a != Activation::identity) CHECK(std::isnan(kernels::scalar::derivative(a, nan)));
  }
}

TEST_CASE("activation derivatives match central differences", "[kernels]") {
  for (Activation a : kAll)
    for (double x : {-3.1, -0.7, -0.05, 0.05, 0.4, 2.2}) {
      CAPTURE(kernels::to_string(a), x);
      const double h = 1e-6;
      const double fd = (kernels::scalar::activate(a, x + h) - kernels::scalar::activate(a, x - h)) / (2 * h);
      CHECK(kernels::scalar::derivative(a, x) == Approx(fd).epsilon(1e-7).margin(1e-8));
    }
}

TEST_CASE("activations have their textbook values", "[kernels]") {
  CHECK(kernels::scalar::activate(Activation::relu, -2.0) == 0.0);
  CHECK(kernels::scalar::derivative(Activation::relu, 0.0) == 0.0);
  CHECK(kernels::scalar::activate(Activation::gelu_erf, 1.0) == Approx(0.8413447460685429));
  CHECK(kernels::scalar::activate(Activation::gelu_tanh, 1.0) == Approx(0.8411919906082768));
  CHECK(kernels::scalar::activate(Activation::silu, 1.0) == Approx(0.7310585786300049));
  CHECK(kernels::scalar::activate(Activation::sigmoid, 0.0) == 0.5);
  CHECK(kernels::scalar::activate(Activation::sigmoid, -1000.0) == 0.0);
}

TEMPLATE_TEST_CASE("softmax and its backward match the scalar twins and sum to one", "[kernels]", float, double) {
  using T = TestType;
  for (std::size_t off : {0, 1})
    for (std::size_t n : spex_test::kernel_lengths<T>()) {
      if (n == 0) continue;
      CAPTURE(n, off);
      auto x = randn<T>(n, 30 + n, off);
      for (auto& v : x) v *= T(4);
      const auto dy = randn<T>(n, 40 + n, off);
      std::vector<T> y(n + off), y_ref(n + off), dx(n + off), dx_ref(n + off);
      kernels::softmax(x.data() + off, y.data() + off, n);
      kernels::scalar::softmax(x.data() + off, y_ref.data() + off, n);
      kernels::softmax_backward(y.data() + off, dy.data() + off, dx.data() + off, n);
      kernels::scalar::softmax_backward(y_ref.data() + off, dy.data() + off, dx_ref.data() + off, n);
      double total = 0;
      for (std::size_t i = off; i < n + off; ++i) {
        CHECK(y[i] == Approx(y_ref[i]).epsilon(1e-5).margin(1e-7));
        CHECK(dx[i] == Approx(dx_ref[i]).epsilon(1e-4).margin(1e-6));
        total += y[i];
      }
      CHECK(total == Approx(1.0).epsilon(1e-5));
    }
}

TEST_CASE("softmax backward matches finite differences of a linear loss", "[kernels]") {
  const std::size_t n = 7;
  auto x = randn<double>(n, 5), w = randn<double>(n, 6);
  std::vector<double> y(n), dx(n);
  kernels::softmax(x.data(), y.data(), n);
  kernels::softmax_backward(y.data(), w.data(), dx.data(), n);
  for (std::size_t i = 0; i < n; ++i) {
    auto loss = [&](double delta) {
      auto xp = x;
      xp[i] += delta;
      std::vector<double> yp(n);
      kernels::scalar::softmax(xp.data(), yp.data(), n);
      return kernels::scalar::dot(yp.data(), w.data(), n);
    };
    CHECK(dx[i] == Approx((loss(1e-6) - loss(-1e-6)) / 2e-6).epsilon(1e-6).margin(1e-9));
  }
}

TEST_CASE("softmax handles -inf entries and an all -inf row", "[kernels]") {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {-inf, 0.f, -inf, std::log(3.f)}, y(4);
  kernels::softmax(x.data(), y.data(), 4);
  CHECK(y[0] == 0.f);
  CHECK(y[1] == Approx(0.25f));
  CHECK(y[3] == Approx(0.75f));
  std::vector<float> all(19, -inf), ya(19);
  kernels::softmax(all.data(), ya.data(), 19);
  for (float v : ya) CHECK(v == Approx(1.f / 19));
}

TEMPLATE_TEST_CASE("softmax, sigmoid and GELU's derivative are defined for arguments of any size (no undefined conversion in exp)",
                   "[kernels]", float, double) {
  using T = TestType;
  const T big = sizeof(T) == 4 ? T(3e38) : T(1e300);
  // Differences of -1e22 and beyond made xsimd's exp convert an out-of-range value to an
  // integer (undefined: UBSan reports it in the sanitizer build); the results equal the scalar twin's.
  std::vector<T> x = {T(0), T(-1e22), -big, T(1), T(-2.7e22), T(-700), T(-800), T(3), T(-1e30), T(2), T(0.5), T(-big / 2), T(1e-3),
                      T(-5e4), T(-1e10), T(4), T(-90)};
  std::vector<T> y(x.size()), ys(x.size());
  kernels::softmax(x.data(), y.data(), x.size());
  kernels::scalar::softmax(x.data(), ys.data(), x.size());
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(y[i] == Approx(ys[i]).margin(1e-7));
  // An infinite entry makes inf - inf = NaN inside: NaN out, as the scalar twin gives, and no
  // NaN converted to an integer.
  x[3] = std::numeric_limits<T>::infinity();
  x[7] = std::numeric_limits<T>::infinity();
  kernels::softmax(x.data(), y.data(), x.size());
  kernels::scalar::softmax(x.data(), ys.data(), x.size());
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(std::isnan(y[i]) == std::isnan(ys[i]));
  std::vector<T> z = {T(1e22), T(-1e22), big, -big, T(1e30), T(-1e30), T(0), T(100), T(-100), T(800), T(-800), T(5), T(-5), T(7), T(8), T(9), T(1)};
  std::vector<T> out(z.size()), out_s(z.size());
  for (Activation a : kAll) {
    kernels::activate(a, z.data(), out.data(), z.size());
    kernels::scalar::activate(a, z.data(), out_s.data(), z.size());
    for (std::size_t i = 0; i < z.size(); ++i) CHECK(out[i] == Approx(out_s[i]).margin(1e-6));
    const std::vector<T> ones(z.size(), T(1));
    kernels::activate_backward(a, z.data(), ones.data(), out.data(), z.size());
    kernels::scalar::activate_backward(a, z.data(), ones.data(), out_s.data(), z.size());
    for (std::size_t i = 0; i < z.size(); ++i) CHECK(out[i] == Approx(out_s[i]).margin(1e-6));
  }
}
