#include <spex/nn/linear.hpp>
#include <spex/nn/norm.hpp>
#include <spex/optim/adam.hpp>
#include <spex/optim/param_groups.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;

TEST_CASE("Linear forward and backward match the formulas and finite differences", "[nn][gradcheck]") {
  Rng rng(1);
  Linear<double> lin(5, 3, true, rng);
  const RowMat<double> x = randn_mat(4, 5, 2), w = randn_mat(4, 3, 3);
  RowMat<double> y(4, 3);
  lin.forward(x, y);
  CHECK((y - ((x * lin.weight().transpose()).rowwise() + lin.bias().transpose())).cwiseAbs().maxCoeff() < 1e-12);
  auto g = lin.make_grads();
  RowMat<double> dx = RowMat<double>::Constant(4, 5, 7.0);  // assigned, not added to
  lin.backward(x, w, dx, g);
  auto loss = [&](const RowMat<double>& xin) {
    RowMat<double> yy(4, 3);
    lin.forward(xin, yy);
    return (yy.array() * w.array()).sum();
  };
  const double eps = 1e-6;
  for (Index r = 0; r < 3; ++r)
    for (Index c = 0; c < 5; ++c) {
      const double v = lin.weight()(r, c);
      lin.weight()(r, c) = v + eps;
      const double lp = loss(x);
      lin.weight()(r, c) = v - eps;
      const double lm = loss(x);
      lin.weight()(r, c) = v;
      CHECK(g.weight(r, c) == Approx((lp - lm) / (2 * eps)).epsilon(1e-6));
    }
  CHECK((g.bias - w.colwise().sum().transpose()).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((dx - w * lin.weight()).cwiseAbs().maxCoeff() < 1e-12);
  CHECK_THROWS_WITH(lin.forward(RowMat<double>::Ones(2, 4), y), Catch::Contains("in_features = 5"));
}

TEST_CASE("Norm gradients match finite differences in training and eval", "[nn][gradcheck]") {
  for (NormKind kind : {NormKind::batch, NormKind::layer})
    for (bool training : {true, false}) {
      CAPTURE(to_string(kind), training);
      Norm<double> norm(kind, 6, 3);
      norm.weight() = randn_mat(6, 1, 4);
      norm.bias() = randn_mat(6, 1, 5);
      const RowMat<double> x = randn_mat(7, 6, 6), w = randn_mat(7, 6, 7);
      if (kind == NormKind::batch) {  // non-trivial running statistics for eval
        norm.running_mean() = randn_mat(6, 1, 8);
        norm.running_var() = randn_mat(6, 1, 9).cwiseAbs().array() + 0.5;
      }
      typename Norm<double>::Cache cache;
      RowMat<double> y(7, 6), dx(7, 6);
      const Vec<double> rm = norm.running_mean(), rv = norm.running_var();
      auto forward = [&](const RowMat<double>& xin, RowMat<double>& out, typename Norm<double>::Cache& c) {
        norm.forward(xin, out, c, training);
        if (kind == NormKind::batch) {  // keep the running statistics fixed across evaluations
          norm.running_mean() = rm;
          norm.running_var() = rv;
        }
      };
      forward(x, y, cache);
      auto g = norm.make_grads();
      norm.backward(w, dx, cache, g);
      auto loss = [&](const RowMat<double>& xin) {
        typename Norm<double>::Cache c;
        RowMat<double> yy(7, 6);
        forward(xin, yy, c);
        return (yy.array() * w.array()).sum();
      };
      const double eps = 1e-6;
      for (Index r = 0; r < 7; ++r)
        for (Index c = 0; c < 6; ++c) {
          RowMat<double> xp = x, xm = x;
          xp(r, c) += eps;
          xm(r, c) -= eps;
          CHECK(dx(r, c) == Approx((loss(xp) - loss(xm)) / (2 * eps)).epsilon(1e-5).margin(1e-8));
        }
      for (Index f = 0; f < 6; ++f) {
        const double v = norm.weight()(f);
        norm.weight()(f) = v + eps;
        const double lp = loss(x);
        norm.weight()(f) = v - eps;
        const double lm = loss(x);
        norm.weight()(f) = v;
        CHECK(g.weight(f) == Approx((lp - lm) / (2 * eps)).epsilon(1e-5).margin(1e-8));
      }
      // The inference forward agrees with the eval-mode training forward.
      if (!training) {
        RowMat<double> y2(7, 6);
        norm.forward(x, y2);
        CHECK((y2 - y).cwiseAbs().maxCoeff() < 1e-12);
      }
    }
}

TEST_CASE("BatchNorm updates running statistics like PyTorch", "[nn]") {
  Norm<double> bn(NormKind::batch, 2, 0, 1e-5, 0.1);
  RowMat<double> x(3, 2), y(3, 2);
  x << 1, 10, 2, 20, 6, 30;
  typename Norm<double>::Cache c;
  bn.forward(x, y, c, true);
  // mean (3, 20), unbiased var (7, 100)
  CHECK(bn.running_mean()(0) == Approx(0.3));
  CHECK(bn.running_mean()(1) == Approx(2.0));
  CHECK(bn.running_var()(0) == Approx(0.9 + 0.1 * 7));
  CHECK(bn.running_var()(1) == Approx(0.9 + 0.1 * 100));
  CHECK(y.col(0).mean() == Approx(0.0).margin(1e-12));
}

TEST_CASE("Linear and Norm list their parameters like the layers, and spex::frozen freezes any of them", "[nn][optim]") {
  Rng rng(3);
  Linear<double> lin(4, 3, true, rng);
  Norm<double> bn(NormKind::batch, 3);
  auto lg = lin.make_grads();
  auto ng = bn.make_grads();
  ParameterList<double> params = lin.parameters(lg, "proj.");
  append_parameters(params, bn.parameters(ng, "norm."));
  REQUIRE(params.size() == 6);
  const char* names[] = {"proj.weight", "proj.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"};
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i].name == names[i]);
  CHECK(params[0].value == lin.weight().data());
  CHECK(params[0].grad == lg.weight.data());
  CHECK(params[0].rows == 3);
  CHECK(params[0].cols == 4);
  CHECK(params[3].grad == ng.bias.data());
  CHECK(!params[4].trainable());
  CHECK(lin.parameters().size() == 2);
  CHECK(static_cast<const Norm<double>&>(bn).parameters("n.")[1].name == "n.bias");
  CHECK(Norm<double>(NormKind::layer, 3).parameters().size() == 2);  // no running statistics
  CHECK(Norm<double>(NormKind::none, 3).parameters().empty());

  // Freeze the projection: its gradients exist, but the optimizer and the norm ignore them.
  const auto list = frozen(params, [](const Parameter<double>& p) { return p.name.rfind("proj.", 0) == 0; });
  CHECK(!list[0].trainable());
  CHECK(!list[1].trainable());
  CHECK(list[2].trainable());
  lg.weight.setConstant(1.0);
  lg.bias.setConstant(1.0);
  ng.weight.setConstant(2.0);
  ng.bias.setConstant(0.0);
  CHECK(grad_norm(list) == Approx(std::sqrt(3 * 4.0)));
  const RowMat<double> w0 = lin.weight();
  const Vec<double> b0 = lin.bias(), nw0 = bn.weight();
  AdamConfig ac;
  ac.lr = 0.1;
  Adam<double> adam(list, ac);
  adam.step();
  CHECK(lin.weight() == w0);
  CHECK(lin.bias() == b0);
  CHECK((bn.weight() - nw0).cwiseAbs().minCoeff() > 0.05);  // stepped by about lr
  CHECK(adam.state("adam.").size() == 4);  // m and v of norm.weight and norm.bias only
}

TEST_CASE("masked BatchNorm: the real tokens' statistics, padded rows normalized with them, exact gradients", "[nn][gradcheck]") {
  const Index b = 9, f = 6;
  const RowMat<double> x = randn_mat(b, f, 11), w = randn_mat(b, f, 12);
  const std::vector<unsigned char> mask = {1, 1, 0, 1, 1, 0, 1, 0, 1};
  RowMat<double> real(6, f);
  for (Index r = 0, i = 0; r < b; ++r)
    if (mask[std::size_t(r)]) real.row(i++) = x.row(r);
  Norm<double> masked(NormKind::batch, f), plain(NormKind::batch, f);
  masked.weight() = plain.weight() = randn_mat(f, 1, 13);
  masked.bias() = plain.bias() = randn_mat(f, 1, 14);
  Norm<double>::Cache mc, pc;
  mc.mask = mask;
  RowMat<double> y(b, f), y_real(6, f);
  masked.forward(x, y, mc, true);
  plain.forward(real, y_real, pc, true);
  for (Index r = 0, i = 0; r < b; ++r)
    if (mask[std::size_t(r)]) CHECK((y.row(r) - y_real.row(i++)).cwiseAbs().maxCoeff() < 1e-13);
  CHECK((masked.running_mean() - plain.running_mean()).cwiseAbs().maxCoeff() < 1e-14);
  CHECK((masked.running_var() - plain.running_var()).cwiseAbs().maxCoeff() < 1e-14);
  // A padded row is normalized with the real tokens' statistics.
  const Vec<double> mean = real.colwise().mean().transpose();
  const Vec<double> var = (real.rowwise() - mean.transpose()).array().square().colwise().mean().transpose();
  for (Index c = 0; c < f; ++c)
    CHECK(y(2, c) == Approx(masked.weight()(c) * (x(2, c) - mean(c)) / std::sqrt(var(c) + 1e-5) + masked.bias()(c)).epsilon(1e-12));
  // Gradients of sum(w * y) over every row (padded ones too): finite differences.
  auto g = masked.make_grads();
  RowMat<double> dx(b, f);
  masked.backward(w, dx, mc, g);
  const Vec<double> rm = masked.running_mean(), rv = masked.running_var();
  auto loss = [&](const RowMat<double>& xin) {
    Norm<double>::Cache c;
    c.mask = mask;
    RowMat<double> yy(b, f);
    masked.forward(xin, yy, c, true);
    masked.running_mean() = rm;
    masked.running_var() = rv;
    return (yy.array() * w.array()).sum();
  };
  const double eps = 1e-6;
  for (Index r = 0; r < b; ++r)
    for (Index c = 0; c < f; ++c) {
      RowMat<double> xp = x, xm = x;
      xp(r, c) += eps;
      xm(r, c) -= eps;
      CAPTURE(r, c);
      CHECK(dx(r, c) == Approx((loss(xp) - loss(xm)) / (2 * eps)).epsilon(1e-5).margin(1e-8));
    }
  Norm<double>::Cache few;
  few.mask = {1, 0, 0, 0, 0, 0, 0, 0, 0};
  CHECK_THROWS_WITH(masked.forward(x, y, few, true), Catch::Contains("at least 2 real (masked-in) tokens, got 1"));
  few.mask = {1, 1};
  CHECK_THROWS_WITH(masked.forward(x, y, few, true), Catch::Contains("the token mask has 2 entries, the batch 9 tokens"));
}
