#include <spex/kernels/optim.hpp>

#include "test_util.hpp"

using namespace spex;

TEMPLATE_TEST_CASE("adam_update matches the scalar twin", "[kernels]", float, double) {
  using T = TestType;
  for (bool with_grad : {true, false})
    for (std::size_t off : {0, 1})
      for (std::size_t n : spex_test::kernel_lengths<T>()) {
        CAPTURE(with_grad, n, off);
        auto w = spex_test::randn<T>(n, 1 + n, off), w_ref = w;
        const auto g = spex_test::randn<T>(n, 2 + n, off);
        auto m = spex_test::randn<T>(n, 3 + n, off), m_ref = m;
        auto v = spex_test::randn<T>(n, 4 + n, off);
        for (auto& x : v) x = x * x;
        auto v_ref = v;
        const kernels::AdamStep<T> a{T(0.9), T(0.99), T(0.01), T(1.3), T(1e-8), T(0.001), T(0.02)};
        kernels::adam_update(w.data() + off, with_grad ? g.data() + off : nullptr, m.data() + off, v.data() + off, n, a);
        kernels::scalar::adam_update(w_ref.data() + off, with_grad ? g.data() + off : nullptr, m_ref.data() + off,
                                     v_ref.data() + off, n, a);
        for (std::size_t i = 0; i < w.size(); ++i) {
          CHECK(w[i] == Approx(w_ref[i]).epsilon(1e-5).margin(1e-6));
          CHECK(m[i] == Approx(m_ref[i]).epsilon(1e-5).margin(1e-7));
          CHECK(v[i] == Approx(v_ref[i]).epsilon(1e-5).margin(1e-7));
        }
      }
}
