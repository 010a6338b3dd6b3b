#include <spex/kernels/gather.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn;

TEMPLATE_TEST_CASE("gather_dot, gather_axpy and scatter_axpy match the scalar twins", "[kernels]", float, double) {
  using T = TestType;
  const std::size_t rows = 13;
  for (std::size_t off : {0, 1})
    for (std::size_t d : spex_test::kernel_lengths<T>()) {
      if (d > 1000) continue;
      for (std::size_t m : {0, 1, 2, 5, 8}) {
        CAPTURE(d, m, off);
        const std::size_t ld = d + 3;  // rows need not be packed
        const auto table = randn<T>(rows * ld, 7 + d, off);
        const auto x = randn<T>(d, 8 + d, off);
        // Ids repeat (duplicates must accumulate) and are in no particular order.
        std::vector<std::int64_t> ids(m);
        for (std::size_t r = 0; r < m; ++r) ids[r] = static_cast<std::int64_t>((r * 5 + 3) % 7);
        const auto alpha = randn<T>(m, 9 + m);
        const T* tp = table.data() + off;

        std::vector<T> out(m), out_ref(m);
        kernels::gather_dot(tp, ld, ids.data(), m, x.data() + off, d, out.data());
        kernels::scalar::gather_dot(tp, ld, ids.data(), m, x.data() + off, d, out_ref.data());
        for (std::size_t r = 0; r < m; ++r) CHECK(out[r] == Approx(out_ref[r]).margin(spex_test::tol<T>() * 40));

        auto y = randn<T>(d, 11 + d, off), y_ref = y;
        kernels::gather_axpy(tp, ld, ids.data(), alpha.data(), m, y.data() + off, d);
        kernels::scalar::gather_axpy(tp, ld, ids.data(), alpha.data(), m, y_ref.data() + off, d);
        for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == Approx(y_ref[i]).margin(spex_test::tol<T>() * 10));

        auto t = table, t_ref = table;
        kernels::scatter_axpy(t.data() + off, ld, ids.data(), alpha.data(), m, x.data() + off, d);
        kernels::scalar::scatter_axpy(t_ref.data() + off, ld, ids.data(), alpha.data(), m, x.data() + off, d);
        for (std::size_t i = 0; i < t.size(); ++i) CHECK(t[i] == Approx(t_ref[i]).margin(spex_test::tol<T>() * 10));
      }
    }
}

TEST_CASE("gather_dot reads exactly the listed rows", "[kernels]") {
  // Row i of the table is all i: the dot with a vector of ones is i * d.
  const std::size_t rows = 50, d = 37;
  std::vector<float> table(rows * d);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < d; ++j) table[i * d + j] = float(i);
  std::vector<float> ones(d, 1.f), out(4);
  const std::int64_t ids[] = {49, 0, 17, 17};
  kernels::gather_dot(table.data(), d, ids, 4, ones.data(), d, out.data());
  CHECK(out[0] == 49.f * d);
  CHECK(out[1] == 0.f);
  CHECK(out[2] == 17.f * d);
  CHECK(out[3] == 17.f * d);
}
