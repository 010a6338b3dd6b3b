#include <cstring>
#include <limits>

#include <spex/kernels/compact.hpp>
#include <spex/kernels/gather.hpp>
#include <spex/kernels/transpose.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn;

TEMPLATE_TEST_CASE("gather_dot, gather_axpy and scatter_axpy match the scalar twins", "[kernels]", float, double) {
  using T = TestType;
  const std::size_t rows = 13;
  for (std::size_t off : {0, 1})
    for (std::size_t d : spex_test::kernel_lengths<T>()) {
      if (d > 1000) continue;
      for (std::size_t m : {0, 1, 2, 3, 5, 8, 11}) {  // passes of four rows and every tail
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

TEMPLATE_TEST_CASE("gather_dot (and gather_dot_cached) give a row the same bits wherever it stands in the list", "[kernels]", float, double) {
  // The kernel walks four rows per pass and the tail one by one: a row's dot must not depend on
  // which of them reads it (a token's result would then depend on its pick order or count).
  using T = TestType;
  const std::size_t rows = 9, d = 77;
  const auto table = randn<T>(rows * d, 21);
  const auto x = randn<T>(d, 22);
  for (std::size_t m = 1; m <= 9; ++m) {
    std::vector<std::int64_t> ids(m);
    for (std::size_t r = 0; r < m; ++r) ids[r] = static_cast<std::int64_t>(r);
    std::vector<T> out(m), alone(1);
    kernels::gather_dot(table.data(), d, ids.data(), m, x.data(), d, out.data());
    std::vector<T> cached(m);  // gather_dot_cached (no prefetches) sums as gather_dot does
    kernels::gather_dot_cached(table.data(), d, ids.data(), m, x.data(), d, cached.data());
    for (std::size_t r = 0; r < m; ++r) {
      kernels::gather_dot(table.data(), d, ids.data() + r, 1, x.data(), d, alone.data());
      CAPTURE(m, r);
      CHECK(out[r] == alone[0]);
      CHECK(cached[r] == out[r]);
    }
  }
}

TEST_CASE("bfloat16 and int8 dots give a row the same bits wherever it stands in the list", "[kernels]") {
  // As for float: four rows per pass, the tail one by one, each row summed in one order.
  const std::size_t rows = 9, d = 77;
  spex::Rng rng(23);
  std::vector<std::uint16_t> bf(rows * d);
  std::vector<std::int8_t> q(rows * d);
  std::vector<float> scale(rows);
  for (std::size_t i = 0; i < rows * d; ++i) {
    bf[i] = std::uint16_t(0x3c00 + rng.below(0x0800)) ^ std::uint16_t(rng.below(2) << 15);
    q[i] = std::int8_t(int(rng.below(255)) - 127);
  }
  for (std::size_t r = 0; r < rows; ++r) scale[r] = float(0.02 + 0.001 * double(r));
  const auto x = randn<float>(d, 24);
  for (std::size_t m = 1; m <= 9; ++m) {
    std::vector<std::int64_t> ids(m);
    for (std::size_t r = 0; r < m; ++r) ids[r] = static_cast<std::int64_t>(rows - 1 - r);
    std::vector<float> out_bf(m), out_q(m), alone(1);
    kernels::gather_dot_bf16(bf.data(), d, ids.data(), m, x.data(), d, out_bf.data());
    kernels::gather_dot_i8(q.data(), d, scale.data(), ids.data(), m, x.data(), d, out_q.data());
    for (std::size_t r = 0; r < m; ++r) {
      CAPTURE(m, r);
      kernels::gather_dot_bf16(bf.data(), d, ids.data() + r, 1, x.data(), d, alone.data());
      CHECK(out_bf[r] == alone[0]);
      kernels::gather_dot_i8(q.data(), d, scale.data(), ids.data() + r, 1, x.data(), d, alone.data());
      CHECK(out_q[r] == alone[0]);
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

// Compact rows (kernels/compact.hpp): every length, misaligned tables, x and y, repeated ids;
// against the scalar twins and against the float kernels on the widened table (bfloat16 -> float
// and int8 * scale are exact, so only the summation order and FMA contraction may differ).
TEST_CASE("bfloat16 and int8 gathers match their scalar twins and the float gathers on the widened rows", "[kernels]") {
  const std::size_t rows = 11;
  spex::Rng rng(3);
  for (std::size_t off : {0, 1, 3})
    for (std::size_t d : spex_test::kernel_lengths<float>()) {
      for (std::size_t m : {0, 1, 2, 5, 9, 70}) {  // 70: the axpy's two sweeps of rows
        CAPTURE(d, m, off);
        const std::size_t ld = d + 5;
        std::vector<std::uint16_t> bf(rows * ld + off);
        std::vector<std::int8_t> q(rows * ld + off);
        std::vector<float> bf_wide(rows * ld), q_wide(rows * ld), scale(rows);
        for (std::size_t r = 0; r < rows; ++r) scale[r] = float(0.01 + 0.003 * double(r));
        for (std::size_t i = 0; i < rows * ld; ++i) {
          bf[off + i] = std::uint16_t(0x3c00 + rng.below(0x0800)) ^ std::uint16_t(rng.below(2) << 15);  // |v| in [2^-7, 2^8)
          q[off + i] = std::int8_t(int(rng.below(255)) - 127);
          bf_wide[i] = kernels::scalar::bf16_to_float(bf[off + i]);
          q_wide[i] = float(q[off + i]) * scale[i / ld];
        }
        const auto x = spex_test::randn<float>(d, 5 + d, off);
        std::vector<std::int64_t> ids(m);
        for (std::size_t r = 0; r < m; ++r) ids[r] = static_cast<std::int64_t>((r * 4 + 2) % 7);  // repeats
        const auto alpha = spex_test::randn<float>(m, 6 + m);
        // Bound on the rounding of a sum of d products of magnitude <= |row| |x|.
        const auto bound = [&](const std::vector<float>& wide, std::int64_t id) {
          double s = 0;
          for (std::size_t i = 0; i < d; ++i) s += std::abs(double(wide[std::size_t(id) * ld + i]) * x[off + i]);
          return 1e-5 * s + 1e-30;
        };
        std::vector<float> out(m), twin(m), ref(m);
        kernels::gather_dot_bf16(bf.data() + off, ld, ids.data(), m, x.data() + off, d, out.data());
        kernels::scalar::gather_dot_bf16(bf.data() + off, ld, ids.data(), m, x.data() + off, d, twin.data());
        kernels::scalar::gather_dot(bf_wide.data(), ld, ids.data(), m, x.data() + off, d, ref.data());
        for (std::size_t r = 0; r < m; ++r) {
          CHECK(std::abs(out[r] - twin[r]) <= bound(bf_wide, ids[r]));
          CHECK(std::abs(twin[r] - ref[r]) <= bound(bf_wide, ids[r]));  // the float kernel on the widened rows
        }
        kernels::gather_dot_i8(q.data() + off, ld, scale.data(), ids.data(), m, x.data() + off, d, out.data());
        kernels::scalar::gather_dot_i8(q.data() + off, ld, scale.data(), ids.data(), m, x.data() + off, d, twin.data());
        kernels::scalar::gather_dot(q_wide.data(), ld, ids.data(), m, x.data() + off, d, ref.data());
        for (std::size_t r = 0; r < m; ++r) {
          CHECK(std::abs(out[r] - twin[r]) <= bound(q_wide, ids[r]));
          CHECK(std::abs(twin[r] - ref[r]) <= bound(q_wide, ids[r]));  // scale applied once vs per element
        }
        // Bound on the rounding of y[i] + sum_r alpha[r] row_r[i].
        const auto axpy_bound = [&](const std::vector<float>& wide, const std::vector<float>& y0, std::size_t i) {
          double s = std::abs(double(y0[i]));
          if (i >= off)
            for (std::size_t r = 0; r < m; ++r) s += std::abs(double(alpha[r]) * wide[std::size_t(ids[r]) * ld + i - off]);
          return 1e-5 * s + 1e-30;
        };
        auto y = spex_test::randn<float>(d, 7 + d, off), y_twin = y, y_ref = y;
        auto y0 = y;
        kernels::gather_axpy_bf16(bf.data() + off, ld, ids.data(), alpha.data(), m, y.data() + off, d);
        kernels::scalar::gather_axpy_bf16(bf.data() + off, ld, ids.data(), alpha.data(), m, y_twin.data() + off, d);
        kernels::scalar::gather_axpy(bf_wide.data(), ld, ids.data(), alpha.data(), m, y_ref.data() + off, d);
        for (std::size_t i = 0; i < y.size(); ++i) {
          CHECK(std::abs(y[i] - y_twin[i]) <= axpy_bound(bf_wide, y0, i));
          CHECK(std::abs(y_twin[i] - y_ref[i]) <= axpy_bound(bf_wide, y0, i));
        }
        y = spex_test::randn<float>(d, 8 + d, off), y_twin = y, y_ref = y;
        y0 = y;
        kernels::gather_axpy_i8(q.data() + off, ld, scale.data(), ids.data(), alpha.data(), m, y.data() + off, d);
        kernels::scalar::gather_axpy_i8(q.data() + off, ld, scale.data(), ids.data(), alpha.data(), m, y_twin.data() + off, d);
        kernels::scalar::gather_axpy(q_wide.data(), ld, ids.data(), alpha.data(), m, y_ref.data() + off, d);
        for (std::size_t i = 0; i < y.size(); ++i) {
          CHECK(std::abs(y[i] - y_twin[i]) <= axpy_bound(q_wide, y0, i));
          CHECK(std::abs(y_twin[i] - y_ref[i]) <= axpy_bound(q_wide, y0, i));
        }
      }
    }
}

TEST_CASE("bfloat16 widening is exact and int8 rows read only their own scale", "[kernels]") {
  CHECK(kernels::scalar::bf16_to_float(0x3f80) == 1.0f);
  CHECK(kernels::scalar::bf16_to_float(0xc040) == -3.0f);
  CHECK(kernels::scalar::bf16_to_float(0x7f80) == std::numeric_limits<float>::infinity());
  // Row i of an int8 table is all 1 with scale i: the dot with ones is i * d.
  const std::size_t rows = 40, d = 37;
  std::vector<std::int8_t> q(rows * d, 1);
  std::vector<float> scale(rows), ones(d, 1.f), out(3);
  for (std::size_t i = 0; i < rows; ++i) scale[i] = float(i);
  const std::int64_t ids[] = {39, 0, 17};
  kernels::gather_dot_i8(q.data(), d, scale.data(), ids, 3, ones.data(), d, out.data());
  CHECK(out[0] == 39.f * d);
  CHECK(out[1] == 0.f);
  CHECK(out[2] == 17.f * d);
}

TEMPLATE_TEST_CASE("transpose_rows writes each row as a column, leaving the rest of dst alone", "[kernels]", float, double) {
  using T = TestType;
  // Whole 16 x 16 tiles, their edges in either direction, and one row or one column.
  for (std::size_t n : {0, 1, 15, 16, 17, 40})
    for (std::size_t m : {0, 1, 16, 31, 48, 513}) {
      CAPTURE(n, m);
      const std::size_t rows_ld = m + 5, ld_dst = n + 3;
      const auto source = randn<T>(n * rows_ld + 1, 3 + n + m);
      // Rows in a scrambled order, as the tokens of an expert are.
      auto row = [&](std::size_t j) { return source.data() + ((j * 7) % (n == 0 ? 1 : n)) * rows_ld + (n % 2); };
      std::vector<T> dst(m * ld_dst, T(-7));
      kernels::transpose_rows(row, n, m, dst.data(), ld_dst);
      std::size_t wrong = 0, touched = 0;
      for (std::size_t i = 0; i < m; ++i)
        for (std::size_t c = 0; c < ld_dst; ++c) {
          const T got = dst[i * ld_dst + c];
          if (c < n) wrong += got != row(c)[i];
          else touched += got != T(-7);
        }
      CHECK(wrong == 0);
      CHECK(touched == 0);
    }
}

TEMPLATE_TEST_CASE("transpose_rows_axpy adds each scaled column to its own row with the bits of axpy", "[kernels]", float, double) {
  using T = TestType;
  for (std::size_t n : {0, 1, 15, 16, 17, 40, 513})
    for (std::size_t m : {0, 1, 16, 31, 48, 130}) {
      CAPTURE(n, m);
      const std::size_t rows_ld = m + 5, out_ld = n + 3;
      const auto source = randn<T>(n * rows_ld + 1, 5 + n + m);
      const auto scales = randn<T>(m, 6 + n);
      auto row = [&](std::size_t j) { return source.data() + ((j * 7) % (n == 0 ? 1 : n)) * rows_ld + (n % 2); };
      // Output rows in a scrambled order, as an expert's tokens' rows of y are, with a border
      // that must stay as it was.
      std::vector<T> out = randn<T>(m * out_ld + 1, 7 + n + m), expected = out;
      // (7 and every m here are coprime: distinct rows, as the kernel asks.)
      auto out_row = [&](std::vector<T>& v, std::size_t i) { return v.data() + ((i * 7) % (m == 0 ? 1 : m)) * out_ld + 1; };
      std::vector<T> column(n);
      for (std::size_t i = 0; i < m; ++i) {
        for (std::size_t j = 0; j < n; ++j) column[j] = row(j)[i];
        kernels::axpy(scales[i], column.data(), out_row(expected, i), n);
      }
      kernels::transpose_rows_axpy<default_arch, T>(row, n, m, [&](std::size_t i) { return scales[i]; },
                                                    [&](std::size_t i) { return out_row(out, i); });
      std::size_t wrong = 0;
      for (std::size_t k = 0; k < out.size(); ++k) wrong += std::memcmp(&out[k], &expected[k], sizeof(T)) != 0;
      CHECK(wrong == 0);
    }
}
