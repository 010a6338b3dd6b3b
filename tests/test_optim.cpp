#include <memory>

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
    return {Parameter<double>{"w", w.data(), 3, 4, 4, gw.data(), nullptr, nullptr, 0, {}},
            Parameter<double>{"table", table.data(), 10, 3, 3, nullptr, &gt, nullptr, 0, {}}};
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

TEST_CASE("Adam and AdamW equal torch.optim.Adam/AdamW's formula on dense parameters", "[optim]") {
  for (bool decoupled : {true, false}) {
    Toy toy;
    AdamConfig cfg{0.01, 0.9, 0.99, 0.05, 0.1, decoupled};  // a large eps: its placement shows
    Adam<double> opt(toy.params(), cfg);
    RowMat<double> w = toy.w, mw = RowMat<double>::Zero(3, 4), vw = mw;
    for (int step = 1; step <= 3; ++step) {
      toy.set_grads(step);
      for (Index r = 0; r < 3; ++r)
        for (Index c = 0; c < 4; ++c) {
          double gv = toy.gw(r, c);
          if (decoupled)
            w(r, c) *= 1 - 0.01 * 0.1;
          else
            gv += 0.1 * w(r, c);
          mw(r, c) = 0.9 * mw(r, c) + 0.1 * gv;
          vw(r, c) = 0.99 * vw(r, c) + 0.01 * gv * gv;
          // torch: denom = sqrt(v) / sqrt(1 - b2^t) + eps; p -= lr / (1 - b1^t) * m / denom
          const double denom = std::sqrt(vw(r, c)) / std::sqrt(1 - std::pow(0.99, step)) + 0.05;
          w(r, c) -= 0.01 / (1 - std::pow(0.9, step)) * mw(r, c) / denom;
        }
      opt.step();
      CHECK((toy.w - w).cwiseAbs().maxCoeff() < 1e-12);
      CHECK((opt.first_moment(0) - mw).cwiseAbs().maxCoeff() < 1e-14);
    }
  }
}

TEST_CASE("Adam on row-sparse parameters equals torch.optim.SparseAdam, repeated rows included", "[optim]") {
  Toy toy;
  Adam<double> opt(toy.params(), AdamConfig{0.01, 0.9, 0.99, 0.05, 0.0, true});
  RowMat<double> t = toy.table, mt = RowMat<double>::Zero(10, 3), vt = mt;
  for (int step = 1; step <= 3; ++step) {
    toy.set_grads(step);
    // Row 7 is hit twice in this step (two tokens): SparseAdam coalesces, so do we.
    const double extra[3] = {0.5, -1.0, 2.0};
    toy.gt.add_row(7, extra);
    for (Index s = 0; s < toy.gt.nnz_rows(); ++s) {
      const Index r = toy.gt.rows()[s];
      for (Index c = 0; c < 3; ++c) {
        const double g = toy.gt.values()(s, c);
        // torch.optim.SparseAdam: exp_avg += (g - exp_avg) (1 - b1), the same for exp_avg_sq;
        // p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        mt(r, c) += (g - mt(r, c)) * (1 - 0.9);
        vt(r, c) += (g * g - vt(r, c)) * (1 - 0.99);
        const double step_size = 0.01 * std::sqrt(1 - std::pow(0.99, step)) / (1 - std::pow(0.9, step));
        t(r, c) -= step_size * mt(r, c) / (std::sqrt(vt(r, c)) + 0.05);
      }
    }
    opt.step();
    CHECK((toy.table - t).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((opt.first_moment(1) - mt).cwiseAbs().maxCoeff() < 1e-14);
    CHECK((opt.second_moment(1) - vt).cwiseAbs().maxCoeff() < 1e-14);
  }
}

TEST_CASE("optimizers reject out-of-range settings, naming them", "[optim]") {
  Toy toy;
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(Adam<double>(toy.params(), AdamConfig{inf}), Catch::Contains("Adam lr = inf"));
  CHECK_THROWS_WITH(Adam<double>(toy.params(), AdamConfig{nan}), Catch::Contains("Adam lr = nan"));
  CHECK_THROWS_WITH(Adam<double>(toy.params(), AdamConfig{0.1, 1.0}), Catch::Contains("beta1"));
  CHECK_THROWS_WITH(Adam<double>(toy.params(), AdamConfig{0.1, 0.9, 0.999, 0.0}), Catch::Contains("eps"));
  CHECK_THROWS_WITH(Sgd<double>(toy.params(), SgdConfig{0.1, inf}), Catch::Contains("SGD momentum = inf"));
  CHECK_THROWS_WITH(Sgd<double>(toy.params(), SgdConfig{-0.1}), Catch::Contains("SGD lr = -0.1"));
  CHECK_THROWS_WITH(Sgd<double>(toy.params(), SgdConfig{0.1, 0.0, nan}), Catch::Contains("weight_decay"));
  Adam<double> opt(toy.params(), AdamConfig{});
  CHECK_THROWS_WITH(opt.set_lr(-1), Catch::Contains("Adam lr = -1"));
  CHECK(opt.config().lr == 1e-3);  // unchanged by the rejected call
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

TEST_CASE("parameter groups: any number, from predicates, with their own lr and weight decay", "[optim]") {
  Toy toy;
  toy.set_grads(0);
  const RowMat<double> w0 = toy.w, t0 = toy.table;
  std::vector<GroupRule<double>> rules(2);
  rules[0].name = "tables";
  rules[0].pick = [](const Parameter<double>& p) { return p.sparse_grad != nullptr; };
  rules[0].lr_scale = 10.0;
  rules[1].name = "never";
  rules[1].pick = [](const Parameter<double>&) { return false; };
  rules[1].lr = 5.0;
  auto groups = make_groups<double>(toy.params(), rules);
  REQUIRE(groups.size() == 3);  // both rules (one empty) and the rest
  CHECK(groups[0].params.size() == 1);
  CHECK(groups[0].params[0].name == "table");
  CHECK(groups[1].params.empty());
  CHECK(groups[2].name == "rest");
  groups[2].weight_decay = 0.5;  // only the dense weight decays
  groups[2].lr = 0.2;            // an absolute lr wins over the optimizer's
  Sgd<double> opt(groups, SgdConfig{0.1});
  opt.step();
  CHECK(((w0 - toy.w) - 0.2 * (toy.gw + 0.5 * w0)).cwiseAbs().maxCoeff() < 1e-14);
  const Index r = toy.gt.rows()[0];
  CHECK(((t0.row(r) - toy.table.row(r)) - 1.0 * toy.gt.values().row(0)).cwiseAbs().maxCoeff() < 1e-14);
  // Bad settings and a parameter listed twice are errors naming them.
  groups[0].lr_scale = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(Sgd<double>(groups, SgdConfig{0.1}), Catch::Contains("group 'tables': lr_scale"));
  ParameterList<double> twice = toy.params();
  twice.push_back(twice[0]);
  CHECK_THROWS_WITH(Adam<double>(twice, AdamConfig{}), Catch::Contains("appears twice"));
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

TEST_CASE("Adam and SGD step values whose rows lie apart (ld > cols) exactly as the same rows contiguous", "[optim]") {
  // The toy's parameters, and the same values as columns 2..5 and 1..3 of wider rows (the
  // other columns must stay untouched).
  Toy contiguous, apart;
  RowMat<double> wide_w = RowMat<double>::Constant(3, 9, 7.0), wide_t = RowMat<double>::Constant(10, 5, 7.0);
  wide_w.middleCols(2, 4) = apart.w;
  wide_t.middleCols(1, 3) = apart.table;
  ParameterList<double> strided{Parameter<double>{"w", &wide_w(0, 2), 3, 4, 9, apart.gw.data(), nullptr, nullptr, 1, {}},
                                Parameter<double>{"table", &wide_t(0, 1), 10, 3, 5, nullptr, &apart.gt, nullptr, 0, {}}};
  ParameterList<double> plain = contiguous.params();
  plain[0].frozen_rows = 1;  // the dense one's first row frozen in both
  for (int kind = 0; kind < 2; ++kind) {
    INFO((kind == 0 ? "Adam" : "SGD"));
    std::unique_ptr<Adam<double>> adam_a, adam_b;
    std::unique_ptr<Sgd<double>> sgd_a, sgd_b;
    if (kind == 0) {
      adam_a = std::make_unique<Adam<double>>(plain, AdamConfig{0.01, 0.9, 0.99, 1e-8, 0.1, true});
      adam_b = std::make_unique<Adam<double>>(strided, AdamConfig{0.01, 0.9, 0.99, 1e-8, 0.1, true});
    } else {
      sgd_a = std::make_unique<Sgd<double>>(plain, SgdConfig{0.1, 0.9, 0.01, false});
      sgd_b = std::make_unique<Sgd<double>>(strided, SgdConfig{0.1, 0.9, 0.01, false});
    }
    for (int step = 0; step < 3; ++step) {
      contiguous.set_grads(step);
      apart.set_grads(step);
      if (kind == 0) {
        adam_a->step();
        adam_b->step();
      } else {
        sgd_a->step();
        sgd_b->step();
      }
      CHECK(RowMat<double>(wide_w.middleCols(2, 4)) == contiguous.w);
      CHECK(RowMat<double>(wide_t.middleCols(1, 3)) == contiguous.table);
    }
    CHECK(RowMat<double>(wide_w.leftCols(2)) == RowMat<double>::Constant(3, 2, 7.0));
    CHECK(RowMat<double>(wide_w.rightCols(3)) == RowMat<double>::Constant(3, 3, 7.0));
    CHECK(wide_t.col(0) == Vec<double>::Constant(10, 7.0));
    CHECK(RowMat<double>(wide_t.rightCols(1)) == RowMat<double>::Constant(10, 1, 7.0));
    CHECK(wide_w.row(0).segment(2, 4) == apart.w.row(0));  // frozen row unchanged
  }
  // A parameter built by hand without ld: rows cols apart.
  Parameter<double> by_hand;
  by_hand.name = "w";
  by_hand.value = contiguous.w.data();
  by_hand.rows = 3;
  by_hand.cols = 4;
  CHECK(by_hand.row(2) == contiguous.w.data() + 8);
  CHECK(by_hand.contiguous());
  CHECK(RowMat<double>(by_hand.value_map()) == contiguous.w);
}
