#include <spex/kernels/activation.hpp>

#include "test_util.hpp"

using namespace spex;
using kernels::Activation;
using spex_test::randn;

namespace {
const Activation kAll[] = {Activation::identity, Activation::relu, Activation::gelu_tanh,
                           Activation::gelu_erf, Activation::silu, Activation::sigmoid};
}

TEMPLATE_TEST_CASE("SIMD activations and derivatives match the scalar twins", "[kernels]", float, double) {
  using T = TestType;
  for (Activation a : kAll)
    for (std::size_t off : {0, 1})
      for (std::size_t n : spex_test::kernel_lengths<T>()) {
        CAPTURE(kernels::to_string(a), n, off);
        auto x = randn<T>(n, 10 + n, off);
        for (auto& v : x) v *= T(3);  // cover the tails of erf, tanh and exp
        const auto dy = randn<T>(n, 20 + n, off);
        std::vector<T> y(n + off), y_ref(n + off), dx(n + off), dx_ref(n + off);
        kernels::activate(a, x.data() + off, y.data() + off, n);
        kernels::scalar::activate(a, x.data() + off, y_ref.data() + off, n);
        kernels::activate_backward(a, x.data() + off, dy.data() + off, dx.data() + off, n);
        kernels::scalar::activate_backward(a, x.data() + off, dy.data() + off, dx_ref.data() + off, n);
        for (std::size_t i = off; i < n + off; ++i) {
          CHECK(y[i] == Approx(y_ref[i]).epsilon(1e-5).margin(1e-6));
          CHECK(dx[i] == Approx(dx_ref[i]).epsilon(1e-5).margin(1e-6));
        }
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
