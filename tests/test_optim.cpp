#include <spex/optim/adam.hpp>
#include <spex/optim/sgd.hpp>

#include "test_util.hpp"

using namespace spex;

namespace {

// A dense 3 x 4 parameter and a 10 x 3 table with a row-sparse gradient on rows 2 and 7.
struct Toy {
  RowMat<double> w = RowMat<double>::Zero(3, 4), gw = RowMat<double>::Zero(3, 4);
  RowMat<double> table = RowMat<double>::Zero(10, 3);
  SparseRowGrad<double> gt{10, 3};
  Toy() {
    Rng rng(1);
    fill_normal(w, 1.0, rng);
    fill_normal(table, 1.0, rng);
  }
  ParameterList<double> params() {
    return {Parameter<double>{"w", w.data(), 3, 4, gw.data(), nullptr},
            Parameter<double>{"table", table.data(), 10, 3, nullptr, &gt}};
  }
  void set_grads(int step) {
    Rng rng(100 + step);
    fill_normal(gw, 1.0, rng);
    gt.zero();
    RowMat<double> g(2, 3);
    fill_normal(g, 1.0, rng);
    gt.add_row(7, &g(0, 0));
    gt.add_row(2, &g(1, 0));
  }
};

}  // namespace

TEST_CASE("SGD with momentum equals its formula on dense and row-sparse parameters", "[optim]") {
  for (bool nesterov : {false, true}) {
    Toy toy;
    SgdConfig cfg{0.1, 0.9, 0.01, nesterov};
    Sgd<double> opt(toy.params(), cfg);
    RowMat<double> w = toy.w, t = toy.table, bw = RowMat<double>::Zero(3, 4), bt = RowMat<double>::Zero(10, 3);
    for (int step = 0; step < 3; ++step) {
      toy.set_grads(step);
      auto ref = [&](RowMat<double>& p, RowMat<double>& b, Index r, const double* g) {
        for (Index c = 0; c < p.cols(); ++c) {
          const double d = g[c] + 0.01 * p(r, c);
          b(r, c) = 0.9 * b(r, c) + d;
          p(r, c) -= 0.1 * (nesterov ? d + 0.9 * b(r, c) : b(r, c));
        }
      };
      for (Index r = 0; r < 3; ++r) ref(w, bw, r, &toy.gw(r, 0));
      for (Index s = 0; s < 2; ++s) ref(t, bt, toy.gt.rows()[s], &toy.gt.values()(s, 0));
      opt.step();
      CHECK((toy.w - w).cwiseAbs().maxCoeff() < 1e-14);
      CHECK((toy.table - t).cwiseAbs().maxCoeff() < 1e-14);
    }
  }
}

TEST_CASE("Adam and AdamW equal their formulas; sparse rows are stepped lazily", "[optim]") {
  for (bool decoupled : {true, false}) {
    Toy toy;
    AdamConfig cfg{0.01, 0.9, 0.99, 1e-8, 0.1, decoupled};
    Adam<double> opt(toy.params(), cfg);
    RowMat<double> w = toy.w, t = toy.table;
    RowMat<double> mw = RowMat<double>::Zero(3, 4), vw = mw, mt = RowMat<double>::Zero(10, 3), vt = mt;
    for (int step = 1; step <= 3; ++step) {
      toy.set_grads(step);
      auto ref = [&](RowMat<double>& p, RowMat<double>& m, RowMat<double>& v, Index r, const double* g) {
        for (Index c = 0; c < p.cols(); ++c) {
          double gv = g[c];
          if (decoupled)
            p(r, c) *= 1 - 0.01 * 0.1;
          else
            gv += 0.1 * p(r, c);
          m(r, c) = 0.9 * m(r, c) + 0.1 * gv;
          v(r, c) = 0.99 * v(r, c) + 0.01 * gv * gv;
          const double mh = m(r, c) / (1 - std::pow(0.9, step)), vh = v(r, c) / (1 - std::pow(0.99, step));
          p(r, c) -= 0.01 * mh / (std::sqrt(vh) + 1e-8);
        }
      };
      for (Index r = 0; r < 3; ++r) ref(w, mw, vw, r, &toy.gw(r, 0));
      for (Index s = 0; s < 2; ++s) ref(t, mt, vt, toy.gt.rows()[s], &toy.gt.values()(s, 0));
      opt.step();
      CHECK((toy.w - w).cwiseAbs().maxCoeff() < 1e-12);
      CHECK((toy.table - t).cwiseAbs().maxCoeff() < 1e-12);
      CHECK((opt.first_moment(1) - mt).cwiseAbs().maxCoeff() < 1e-14);
    }
  }
}

TEST_CASE("lazy Adam leaves untouched rows and their moments bit-identical", "[optim]") {
  Toy toy;
  Adam<double> opt(toy.params(), AdamConfig{0.01, 0.9, 0.999, 1e-8, 0.01, true});
  toy.set_grads(0);
  opt.step();
  const RowMat<double> before = toy.table, m_before = opt.first_moment(1), v_before = opt.second_moment(1);
  // The next gradient touches row 4 only.
  toy.gt.zero();
  const double g[3] = {1, -2, 3};
  toy.gt.add_row(4, g);
  toy.gw.setZero();
  opt.step();
  for (Index r = 0; r < 10; ++r) {
    CAPTURE(r);
    if (r == 4) {
      CHECK(toy.table.row(r) != before.row(r));
      continue;
    }
    CHECK(toy.table.row(r) == before.row(r));
    CHECK(opt.first_moment(1).row(r) == m_before.row(r));
    CHECK(opt.second_moment(1).row(r) == v_before.row(r));
  }
}

TEST_CASE("parameter groups scale the learning rate", "[optim]") {
  Toy toy;
  toy.set_grads(0);
  const RowMat<double> w0 = toy.w, t0 = toy.table;
  auto groups = split_groups<double>(toy.params(), "tables", 10.0, [](const Parameter<double>& p) { return p.sparse_grad != nullptr; });
  CHECK(groups[0].params.size() == 1);
  CHECK(groups[0].params[0].name == "table");
  Sgd<double> opt(groups, SgdConfig{0.1});
  opt.step();
  CHECK(((w0 - toy.w) - 0.1 * toy.gw).cwiseAbs().maxCoeff() < 1e-14);
  const Index r = toy.gt.rows()[0];
  CHECK(((t0.row(r) - toy.table.row(r)) - 1.0 * toy.gt.values().row(0)).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("global-norm clipping covers dense and row-sparse gradients", "[optim]") {
  Toy toy;
  toy.set_grads(0);
  auto params = toy.params();
  const double norm = std::sqrt(toy.gw.squaredNorm() + toy.gt.values().squaredNorm());
  CHECK(grad_norm(params) == Approx(norm));
  const RowMat<double> gw = toy.gw;
  CHECK(clip_grad_norm(params, 10 * norm) == Approx(norm));
  CHECK(toy.gw == gw);  // under the limit: untouched
  clip_grad_norm(params, 0.5);
  CHECK(grad_norm(params) == Approx(0.5).epsilon(1e-5));
  toy.gw(0, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(clip_grad_norm(params, 1.0), Catch::Contains("NaN"));
}
