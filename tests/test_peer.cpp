#include <set>

#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>
#include <spex/optim/adam.hpp>
#include <spex/optim/sgd.hpp>

#include "peer_reference.hpp"
#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;
using kernels::Activation;

namespace {

ProductKeyLayerConfig small_config(ScoreFn score, NormKind norm, Activation act, bool shared) {
  ProductKeyLayerConfig cfg;
  cfg.d_in = 6;
  cfg.d_out = 5;
  cfg.n_keys = 5;
  cfg.heads = 2;
  cfg.top_k = 3;
  cfg.d_key = 4;
  cfg.score = score;
  cfg.norm = norm;
  cfg.activation = act;
  cfg.shared_keys = shared;
  cfg.query_bias = true;
  cfg.learn_keys = true;  // the gradient checks cover the sub-keys
  return cfg;
}

// Training forward and eval forward against the reference that scores all N keys.
template <class Layer>
void check_forward(Layer& layer, const RowMat<double>& x) {
  typename Layer::Cache cache;
  RowMat<double> y(x.rows(), layer.d_out());
  layer.forward(x, y, cache);
  const auto ref = spex_test::reference_forward(layer, x, true);
  CHECK(cache.retrieval.ids == ref.ids);
  CHECK((y - ref.y).cwiseAbs().maxCoeff() < 1e-10);
  CHECK((cache.retrieval.gates - ref.gates).cwiseAbs().maxCoeff() < 1e-12);
  CHECK(cache.retrieval.ids.minCoeff() >= 0);
  CHECK(cache.retrieval.ids.maxCoeff() < layer.n_experts());
  // Eval mode uses the running statistics the training pass just updated.
  RowMat<double> y_eval(x.rows(), layer.d_out());
  layer.infer(x, y_eval);
  const auto ref_eval = spex_test::reference_forward(layer, x, false);
  CHECK((y_eval - ref_eval.y).cwiseAbs().maxCoeff() < 1e-10);
}

// Central differences of L = sum(w .* y) for every trainable entry and every entry of x.
template <class Layer>
void check_gradients(Layer& layer, const RowMat<double>& x) {
  const Index b = x.rows();
  const RowMat<double> w = randn_mat(b, layer.d_out(), 99);
  typename Layer::Cache cache;
  auto grads = layer.make_grads();
  RowMat<double> y(b, layer.d_out()), dx(b, layer.d_in());
  layer.forward(x, y, cache);
  const IndexMat ids = cache.retrieval.ids;
  layer.backward(w, dx, cache, grads);

  auto loss = [&](const RowMat<double>& xin) {
    typename Layer::Cache c;
    RowMat<double> yy(b, layer.d_out());
    layer.forward(xin, yy, c);
    REQUIRE(c.retrieval.ids == ids);  // the selection must not move under the perturbation
    return (yy.array() * w.array()).sum();
  };
  const double eps = 1e-6;
  auto fd_check = [&](double& v, double analytic, const std::string& what) {
    const double saved = v;
    v = saved + eps;
    const double lp = loss(x);
    v = saved - eps;
    const double lm = loss(x);
    v = saved;
    CAPTURE(what);
    CHECK(analytic == Approx((lp - lm) / (2 * eps)).epsilon(1e-5).margin(1e-7));
  };
  std::set<Index> picked;  // the table rows the batch read
  for (Index t = 0; t < ids.rows(); ++t)
    for (Index j = 0; j < ids.cols(); ++j) picked.insert(spex_test::reference_row(layer, ids(t, j), j));
  for (const auto& p : layer.parameters(grads)) {
    if (!p.trainable()) continue;
    RowMat<double> g = p.grad ? RowMat<double>(p.grad_map()) : p.sparse_grad->to_dense();
    if (p.sparse_grad) {  // only the rows retrieved in the batch, each once
      std::set<Index> rows(p.sparse_grad->rows().begin(), p.sparse_grad->rows().end());
      CHECK(rows == picked);
      CHECK(Index(p.sparse_grad->rows().size()) == Index(rows.size()));
    }
    auto v = p.value_map();
    for (Index r = 0; r < p.rows; ++r)
      for (Index c = 0; c < p.cols; ++c) fd_check(v(r, c), g(r, c), p.name + "(" + std::to_string(r) + "," + std::to_string(c) + ")");
  }
  for (Index r = 0; r < b; ++r)
    for (Index c = 0; c < x.cols(); ++c) {
      RowMat<double> xp = x, xm = x;
      xp(r, c) += eps;
      xm(r, c) -= eps;
      CAPTURE(r, c);
      CHECK(dx(r, c) == Approx((loss(xp) - loss(xm)) / (2 * eps)).epsilon(1e-5).margin(1e-7));
    }
}

const ScoreFn kScores[] = {ScoreFn::softmax, ScoreFn::sigmoid, ScoreFn::relu};
const NormKind kNorms[] = {NormKind::none, NormKind::batch, NormKind::layer};

}  // namespace

TEST_CASE("PEER forward equals the all-keys reference in every mode", "[peer]") {
  for (ScoreFn s : kScores)
    for (NormKind nk : kNorms)
      for (Activation a : {Activation::relu, Activation::gelu_erf, Activation::gelu_tanh})
        for (bool shared : {true, false}) {
          CAPTURE(to_string(s), to_string(nk), kernels::to_string(a), shared);
          Peer<double> peer(small_config(s, nk, a, shared), 7);
          check_forward(peer, randn_mat(9, 6, 3));
        }
}

TEST_CASE("PEER forward on larger shapes, float, and a batch of one in eval mode", "[peer]") {
  ProductKeyLayerConfig cfg;
  cfg.d_in = 24;
  cfg.d_out = 17;
  cfg.n_experts = 16 * 16;
  cfg.heads = 3;
  cfg.top_k = 8;
  cfg.d_key = 10;
  Peer<double> peer(cfg, 5);
  check_forward(peer, randn_mat(40, 24, 4));

  Peer<float> pf(cfg, 5);
  const RowMat<double> xd = randn_mat(40, 24, 4);
  RowMat<float> x = xd.cast<float>(), y(40, 17);
  Peer<float>::Cache cache;
  pf.forward(x, y, cache);
  const auto ref = spex_test::reference_forward(pf, x.cast<double>(), true);
  Index same = 0;
  for (Index t = 0; t < 40; ++t) same += cache.retrieval.ids.row(t) == ref.ids.row(t);
  CHECK(same >= 38);  // float rounding may reorder a near-tie in a row or two
  for (Index t = 0; t < 40; ++t)
    if (cache.retrieval.ids.row(t) == ref.ids.row(t))
      CHECK((y.row(t).cast<double>() - ref.y.row(t)).cwiseAbs().maxCoeff() < 1e-4);

  RowMat<double> one = randn_mat(1, 24, 8), y1(1, 17);
  peer.infer(one, y1);
  CHECK((y1 - spex_test::reference_forward(peer, one, false).y).cwiseAbs().maxCoeff() < 1e-10);
}

TEST_CASE("PEER gradients match finite differences in every mode", "[peer][gradcheck]") {
  for (ScoreFn s : kScores)
    for (NormKind nk : kNorms)
      for (int variant = 0; variant < 2; ++variant) {
        const Activation a = variant == 0 ? Activation::gelu_erf : Activation::relu;
        const bool shared = variant == 0;
        CAPTURE(to_string(s), to_string(nk), kernels::to_string(a), shared);
        Peer<double> peer(small_config(s, nk, a, shared), 11 + variant);
        check_gradients(peer, randn_mat(6, 6, 21 + variant));
      }
}

TEST_CASE("PEER backward accumulates across calls until zeroed", "[peer]") {
  Peer<double> peer(small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true), 3);
  const RowMat<double> x = randn_mat(8, 6, 1), dy = randn_mat(8, 5, 2);
  RowMat<double> y(8, 5);
  Peer<double>::Cache cache;
  auto g1 = peer.make_grads(), g2 = peer.make_grads();
  peer.forward(x, y, cache);
  peer.backward(dy, cache, g1);
  peer.backward(dy, cache, g2);
  peer.backward(dy, cache, g2);
  CHECK((g2.retrieval.query.weight - 2 * g1.retrieval.query.weight).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g2.experts.up.to_dense() - 2 * g1.experts.up.to_dense()).cwiseAbs().maxCoeff() < 1e-12);
  g2.zero();
  CHECK(g2.experts.up.nnz_rows() == 0);
  CHECK(g2.retrieval.query.weight.cwiseAbs().maxCoeff() == 0);
}

TEST_CASE("PEER with k = 1 and a fixed selection is a dense MLP with h hidden units", "[peer]") {
  // [P] Eq. 8: with k = 1 the softmax gate is 1 and f(x) = V act(W^T x) over the h picked experts.
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::none, Activation::gelu_erf, true);
  cfg.top_k = 1;
  cfg.heads = 4;
  Peer<double> peer(cfg, 2);
  const RowMat<double> x = randn_mat(5, 6, 6);
  RowMat<double> y(5, 5);
  Peer<double>::Cache cache;
  peer.forward(x, y, cache);
  for (Index t = 0; t < 5; ++t) {
    RowMat<double> w(4, 6), v(5, 4);
    for (Index h = 0; h < 4; ++h) {
      w.row(h) = peer.experts().down().row(cache.retrieval.ids(t, h));
      v.col(h) = peer.experts().up().row(cache.retrieval.ids(t, h)).transpose();
    }
    Vec<double> hidden = w * x.row(t).transpose();
    for (Index h = 0; h < 4; ++h) hidden(h) = kernels::scalar::activate(Activation::gelu_erf, hidden(h));
    CHECK((v * hidden - y.row(t).transpose()).cwiseAbs().maxCoeff() < 1e-12);
  }
}

TEST_CASE("PEER is deterministic for a seed", "[peer]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true);
  Peer<float> a(cfg, 42), b(cfg, 42), c(cfg, 43);
  const RowMat<float> x = randn_mat(7, 6, 5).cast<float>();
  RowMat<float> ya(7, 5), yb(7, 5), yc(7, 5);
  a.infer(x, ya);
  b.infer(x, yb);
  c.infer(x, yc);
  CHECK(ya == yb);
  CHECK(ya != yc);
}

TEST_CASE("PEER names every parameter", "[peer]") {
  Peer<float> peer(small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, false), 1);
  std::set<std::string> names;
  for (const auto& p : peer.parameters()) names.insert(p.name);
  for (const char* n : {"query.weight", "query.bias", "norm.weight", "norm.bias", "norm.running_mean",
                        "norm.running_var", "keys.h0.c1", "keys.h1.c2", "experts.down", "experts.up"})
    CHECK(names.count(n) == 1);
  // A user-chosen prefix, and the same names read-only from a const layer.
  const Peer<float>& cpeer = peer;
  const ParameterList<const float> ro = cpeer.parameters("block1.ffn.");
  CHECK(ro.size() == names.size());
  CHECK(find_parameter(ro, "block1.ffn.experts.up") != nullptr);
  CHECK(parameter(ro, "block1.ffn.experts.up").value == peer.experts().up().data());
  CHECK_THROWS_WITH(parameter(ro, "experts.up"), Catch::Contains("no parameter named 'experts.up'") &&
                                                     Catch::Contains("block1.ffn.experts.down"));
}

TEST_CASE("PEER rejects bad configurations and inputs with clear errors", "[peer]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true);
  auto make = [](ProductKeyLayerConfig c) { Peer<float> p(c); };
  ProductKeyLayerConfig c1 = cfg;
  c1.n_keys = 0;
  c1.n_experts = 50;
  CHECK_THROWS_WITH(make(c1), Catch::Contains("n_experts = 50 is not a perfect square"));
  ProductKeyLayerConfig c2 = cfg;
  c2.top_k = 6;
  CHECK_THROWS_WITH(make(c2), Catch::Contains("top_k = 6"));
  ProductKeyLayerConfig c3 = cfg;
  c3.d_key = 5;
  CHECK_THROWS_WITH(make(c3), Catch::Contains("d_key = 5"));
  ProductKeyLayerConfig c4 = cfg;
  c4.d_in = 0;
  CHECK_THROWS_WITH(make(c4), Catch::Contains("d_in = 0"));

  Peer<float> peer(cfg, 1);
  Peer<float>::Cache cache;
  RowMat<float> x = RowMat<float>::Ones(4, 7), y(4, 5);
  CHECK_THROWS_WITH(peer.forward(x, y, cache), Catch::Contains("x has 7 columns, expected d_in = 6"));
  RowMat<float> x6 = randn_mat(4, 6, 1).cast<float>();
  x6(2, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(peer.forward(x6, y, cache), Catch::Contains("x holds a non-finite value"));
  RowMat<float> one = RowMat<float>::Ones(1, 6), y1(1, 5);
  CHECK_THROWS_WITH(peer.forward(one, y1, cache), Catch::Contains("at least 2 tokens"));
  RowMat<float> ok = randn_mat(4, 6, 2).cast<float>();
  peer.forward(ok, y, cache);
  auto g = peer.make_grads();
  RowMat<float> dy_bad = RowMat<float>::Ones(3, 5);
  CHECK_THROWS_WITH(peer.backward(dy_bad, cache, g), Catch::Contains("dy has 3 rows"));
}

TEST_CASE("PKM forward equals the reference and its gradients match finite differences", "[peer][gradcheck]") {
  for (ScoreFn s : kScores)
    for (NormKind nk : kNorms) {
      CAPTURE(to_string(s), to_string(nk));
      ProductKeyLayerConfig cfg = small_config(s, nk, Activation::identity, nk != NormKind::layer);
      Pkm<double> pkm(cfg, 4);
      check_forward(pkm, randn_mat(9, 6, 8));
      check_gradients(pkm, randn_mat(6, 6, 9));
    }
}

TEST_CASE("fixed sub-keys: no gradient, untouched by training, everything else as with learned keys", "[peer]") {
  for (bool shared : {true, false}) {
    CAPTURE(shared);
    ProductKeyLayerConfig learned = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, shared);
    ProductKeyLayerConfig fixed = learned;
    fixed.learn_keys = false;
    Peer<double> a(learned, 3), b(fixed, 3);
    const RowMat<double> x = randn_mat(9, 6, 4), dy = randn_mat(9, 5, 5);
    auto ga = a.make_grads();
    auto gb = b.make_grads();
    CHECK(ga.retrieval.keys.size() == (shared ? 2u : 4u));
    CHECK(gb.retrieval.keys.empty());
    Peer<double>::Cache ca, cb;
    RowMat<double> ya(9, 5), yb(9, 5), dxa(9, 6), dxb(9, 6);
    a.forward(x, ya, ca);
    b.forward(x, yb, cb);
    CHECK(ya == yb);
    a.backward(dy, dxa, ca, ga);
    b.backward(dy, dxb, cb, gb);
    CHECK(dxa == dxb);
    const auto pa = a.parameters(ga), pb = b.parameters(gb);
    REQUIRE(pa.size() == pb.size());
    std::vector<RowMat<double>> keys_before;
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CAPTURE(pa[i].name);
      const bool key = pa[i].name.find("keys.") == 0;
      CHECK(pb[i].trainable() == (pa[i].trainable() && !key));  // running statistics are buffers in both
      if (key) CHECK(pa[i].trainable());
      if (key) keys_before.push_back(pb[i].value_map());
      else if (pa[i].grad) CHECK(pa[i].grad_map() == pb[i].grad_map());
    }
    // Adam steps every trainable parameter; the fixed keys keep every bit.
    Adam<double> opt(pb, AdamConfig{});
    for (int step = 0; step < 3; ++step) {
      zero_grads(pb);
      b.forward(x, yb, cb);
      b.backward(dy, dxb, cb, gb);
      opt.step();
    }
    std::size_t k = 0;
    for (const auto& p : b.parameters())
      if (p.name.find("keys.") == 0) CHECK(RowMat<double>(p.value_map()) == keys_before[k++]);
    CHECK(k == keys_before.size());
  }
}

TEST_CASE("FLOPs per token: the documented count, from the layer and from its config alike", "[peer]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true);
  // d_in 6, d_out 5, n 5, h 2, k 3, d_key 4, query bias, BatchNorm.
  const Peer<double> peer(cfg, 1);
  const FlopCount f = peer.flops_per_token();
  CHECK(f.query == 2 * 6 * 8 + 8 + 2 * 8);        // query GEMM, bias, norm's scale and shift
  CHECK(f.keys == 2 * 2 * 5 * 4);                 // 2 heads x (5 rows x 2 halves of 2) multiply-adds
  CHECK(f.select == 2 * (3 * 3 + 3));             // k^2 candidate sums + k scores per head
  CHECK(f.experts == 6 * (2 * 6 + 2 * 5 + 2));    // u . x, act, gate, axpy into y per pick
  CHECK(f.router == 0);
  CHECK(f.total() == Peer<double>::flops_per_token(cfg).total());
  const Pkm<double> pkm(cfg, 1);
  CHECK(pkm.flops_per_token().experts == 6 * 2 * 5);
  CHECK(pkm.flops_per_token().query == f.query);
  cfg.n_keys = 10;  // sub-key scores grow with n = sqrt(N); nothing else does
  CHECK(Peer<double>::flops_per_token(cfg).keys == 2 * f.keys);
  CHECK(Peer<double>::flops_per_token(cfg).total() - f.total() == f.keys);
}

TEST_CASE("input RMSNorm, per-head tables and GLU experts: forward equals the reference, gradients finite differences", "[peer][gradcheck]") {
  for (int mask = 1; mask < 8; ++mask)
    for (NormKind nk : {NormKind::batch, NormKind::none}) {
      ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, nk, Activation::gelu_erf, mask % 2 == 0);
      cfg.input_rmsnorm = mask & 1;
      cfg.per_head_tables = mask & 2;
      cfg.glu = mask & 4;
      CAPTURE(cfg.input_rmsnorm, cfg.per_head_tables, cfg.glu, to_string(nk));
      Peer<double> peer(cfg, 30 + mask);
      CHECK(peer.table_rows() == (cfg.per_head_tables ? 2 * 25 : 25));
      CHECK(peer.experts().n_experts() == peer.table_rows());
      if (cfg.input_rmsnorm) peer.input_norm().gamma() = randn_mat(6, 1, 40 + mask).col(0) * 0.3;  // a gain other than 1
      check_forward(peer, randn_mat(9, 6, 3 + mask));
      check_gradients(peer, randn_mat(6, 6, 21 + mask));
      if (!cfg.glu) {
        cfg.score = ScoreFn::relu;
        Pkm<double> pkm(cfg, 50 + mask);
        if (cfg.input_rmsnorm) pkm.input_norm().gamma() = randn_mat(6, 1, 60 + mask).col(0) * 0.3;
        check_forward(pkm, randn_mat(9, 6, 8 + mask));
        check_gradients(pkm, randn_mat(6, 6, 9 + mask));
      }
    }
}

TEST_CASE("LayerNorm over each product half of a head's query: reference and finite differences", "[peer][gradcheck]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::relu, NormKind::layer, Activation::gelu_erf, false);
  cfg.norm_per_half = true;
  Pkm<double> pkm(cfg, 4);
  CHECK(pkm.retrieval().norm().group() == 2);
  pkm.retrieval().norm().weight() = randn_mat(8, 1, 3).col(0);
  check_forward(pkm, randn_mat(9, 6, 5));
  check_gradients(pkm, randn_mat(6, 6, 6));
}

TEST_CASE("GLU experts are a product of two neurons, and Pkm refuses them by name", "[peer]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::none, Activation::silu, true);
  cfg.glu = true;
  Peer<double> peer(cfg, 3);
  // With w = u and act = identity, the expert computes (u . x)^2 v.
  cfg.activation = Activation::identity;
  Peer<double> square(cfg, 3);
  square.experts().down_linear() = square.experts().down();
  const RowMat<double> x = randn_mat(5, 6, 2);
  Peer<double>::Cache c;
  RowMat<double> y(5, 5);
  square.infer(x, y, c);
  RowMat<double> want = RowMat<double>::Zero(5, 5);
  for (Index t = 0; t < 5; ++t)
    for (Index j = 0; j < c.retrieval.ids.cols(); ++j) {
      const Index e = c.retrieval.ids(t, j);
      const double a = square.experts().down().row(e).dot(x.row(t));
      want.row(t) += c.retrieval.gates(t, j) * a * a * square.experts().up().row(e);
    }
  CHECK((y - want).cwiseAbs().maxCoeff() < 1e-12);
  CHECK(peer.flops_per_token().experts > Peer<double>::flops_per_token(small_config(ScoreFn::softmax, NormKind::none, Activation::silu, true)).experts);
  cfg.glu = true;
  CHECK_THROWS_WITH(Pkm<double>(cfg, 1), Catch::Contains("glu = true is for Peer"));
}

TEST_CASE("input RMSNorm: a zero row maps to zero, the gain is frozen with the query network", "[peer]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true);
  cfg.input_rmsnorm = true;
  Peer<double> peer(cfg, 5);
  RowMat<double> x = randn_mat(4, 6, 1), y(4, 5);
  x.row(2).setZero();
  peer.infer(x, y);
  CHECK(y.allFinite());
  auto g = peer.make_grads();
  bool listed = false;
  for (const auto& p : peer.parameters(g))
    if (p.name == "input_norm.gamma") listed = p.trainable() && p.rows == 6;
  CHECK(listed);
  peer.freeze({0, true, true});
  auto gf = peer.make_grads();
  for (const auto& p : peer.parameters(gf))
    if (p.name == "input_norm.gamma") CHECK_FALSE(p.trainable());
}

TEST_CASE("a padded batch with a token mask trains exactly as its real tokens alone", "[peer]") {
  for (NormKind nk : {NormKind::batch, NormKind::layer}) {
    CAPTURE(to_string(nk));
    ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, nk, Activation::gelu_erf, true);
    cfg.input_rmsnorm = true;
    Peer<double> padded(cfg, 8), alone(cfg, 8);
    const RowMat<double> x = randn_mat(10, 6, 31), dy = randn_mat(10, 5, 32);
    TokenMask mask(10);
    mask << true, true, false, true, true, true, false, false, true, true;
    RowMat<double> xr(7, 6), dyr(7, 5);
    for (Index r = 0, i = 0; r < 10; ++r)
      if (mask(r)) {
        xr.row(i) = x.row(r);
        dyr.row(i++) = dy.row(r);
      }
    Peer<double>::Cache pc, ac;
    auto pg = padded.make_grads();
    auto ag = alone.make_grads();
    RowMat<double> y(10, 5), yr(7, 5), dx(10, 6), dxr(7, 6);
    padded.forward(x, y, pc, mask);
    alone.forward(xr, yr, ac);
    padded.backward(dy, dx, pc, pg);  // the padded rows' dy is not zero: the mask makes it so
    alone.backward(dyr, dxr, ac, ag);
    for (Index r = 0, i = 0; r < 10; ++r) {
      if (mask(r)) {
        CHECK((y.row(r) - yr.row(i)).cwiseAbs().maxCoeff() < 1e-12);
        CHECK((dx.row(r) - dxr.row(i++)).cwiseAbs().maxCoeff() < 1e-12);
      } else {
        CHECK(dx.row(r).isZero(0));
      }
    }
    const auto pp = padded.parameters(pg), ap = alone.parameters(ag);
    for (std::size_t i = 0; i < pp.size(); ++i) {
      CAPTURE(pp[i].name);
      CHECK((RowMat<double>(pp[i].value_map()) - RowMat<double>(ap[i].value_map())).cwiseAbs().maxCoeff() < 1e-13);  // running statistics
      if (!pp[i].trainable()) continue;
      const RowMat<double> a = pp[i].sparse_grad ? pp[i].sparse_grad->to_dense() : RowMat<double>(pp[i].grad_map());
      const RowMat<double> b = ap[i].sparse_grad ? ap[i].sparse_grad->to_dense() : RowMat<double>(ap[i].grad_map());
      CHECK((a - b).cwiseAbs().maxCoeff() < 1e-12);
    }
    TokenMask short_mask(3);
    short_mask.setConstant(true);
    CHECK_THROWS_WITH(padded.forward(x, y, pc, short_mask), Catch::Contains("the token mask has 3 entries, x has 10 rows"));
  }
}

TEST_CASE("Memory+'s output head (SiLU-gated projection, sigmoid gate): reference and finite differences", "[peer][gradcheck]") {
  for (int mask = 1; mask < 4; ++mask) {
    ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true);
    cfg.silu_output = mask & 1;
    cfg.sigmoid_gate = mask & 2;
    if (cfg.silu_output) cfg.d_value = 7;  // the memory's width differs from d_out = 5
    CAPTURE(cfg.silu_output, cfg.sigmoid_gate);
    Pkm<double> pkm(cfg, 70 + mask);
    Peer<double> peer(cfg, 80 + mask);
    const RowMat<double> x = randn_mat(8, 6, 90 + mask);
    for (int which = 0; which < 2; ++which) {
      // y from the experts' output m (the layer without a head, same retrieval and tables).
      ProductKeyLayerConfig plain = cfg;
      plain.silu_output = plain.sigmoid_gate = false;
      plain.d_out = cfg.d_value ? cfg.d_value : cfg.d_out;
      plain.d_value = 0;
      RowMat<double> y(8, 5), m(8, plain.d_out);
      const GatedOutput<double>* head;
      if (which == 0) {
        Pkm<double> bare(plain, 70 + mask);  // the same draws: the head is drawn last
        pkm.infer(x, y);
        bare.infer(x, m);
        head = &pkm.output_head();
      } else {
        Peer<double> bare(plain, 80 + mask);
        peer.infer(x, y);
        bare.infer(x, m);
        head = &peer.output_head();
      }
      RowMat<double> want = m;
      if (cfg.silu_output) {
        const RowMat<double> a = (x * head->silu_linear().weight().transpose()).rowwise() + head->silu_linear().bias().transpose();
        const RowMat<double> h = m.array() * (a.array() / (1 + (-a.array()).exp()));
        want = (h * head->projection().weight().transpose()).rowwise() + head->projection().bias().transpose();
      }
      if (cfg.sigmoid_gate)
        for (Index t = 0; t < 8; ++t)
          want.row(t) /= 1 + std::exp(-(head->gate().weight().row(0).dot(x.row(t)) + head->gate().bias()(0)));
      CHECK((y - want).cwiseAbs().maxCoeff() < 1e-12);
    }
    check_gradients(pkm, randn_mat(6, 6, 21 + mask));
    check_gradients(peer, randn_mat(6, 6, 31 + mask));
  }
  ProductKeyLayerConfig bad = small_config(ScoreFn::softmax, NormKind::batch, Activation::gelu_erf, true);
  bad.d_value = 9;
  CHECK_THROWS_WITH(Pkm<double>(bad, 1), Catch::Contains("d_value = 9 differs from d_out = 5") && Catch::Contains("silu_output"));
}

TEST_CASE("a value pool shared by two Pkm layers: one table, one gradient summed from both, listed once", "[peer]") {
  ProductKeyLayerConfig cfg = small_config(ScoreFn::softmax, NormKind::batch, Activation::identity, false);
  cfg.silu_output = true;  // Memory+: each layer its own query network, keys and output head
  cfg.d_value = 4;
  cfg.expert_ids = ExpertIds::shells;  // (what growth and partial freezing would need: refused for another reason)
  auto pool = std::make_shared<ValuePool<double>>(25, 4, 5);
  Pkm<double> a(cfg, pool, 1), b(cfg, pool, 2);
  CHECK(a.config().shared_values);
  // The same layers with their own copies of the table.
  ProductKeyLayerConfig own = cfg;
  Pkm<double> a_own(own, 1), b_own(own, 2);
  for (auto* l : {&a_own, &b_own}) {
    l->retrieval() = (l == &a_own ? a : b).retrieval();
    l->output_head() = (l == &a_own ? a : b).output_head();
    l->experts().values() = pool->values();
  }
  const RowMat<double> x = randn_mat(7, 6, 3), dy = randn_mat(7, 5, 4);
  Pkm<double>::Cache ca, cb, coa, cob;
  auto ga = a.make_grads();
  auto gb = b.make_grads();
  auto goa = a_own.make_grads();
  auto gob = b_own.make_grads();
  RowMat<double> ya(7, 5), yb(7, 5), yoa(7, 5), yob(7, 5);
  a.forward(x, ya, ca);
  b.forward(x, yb, cb);
  a_own.forward(x, yoa, coa);
  b_own.forward(x, yob, cob);
  CHECK(ya == yoa);
  CHECK(yb == yob);
  pool->zero_grad();
  a.backward(dy, ca, ga);
  b.backward(dy, cb, gb);
  a_own.backward(dy, coa, goa);
  b_own.backward(dy, cob, gob);
  CHECK((pool->grad().to_dense() - goa.experts.values.to_dense() - gob.experts.values.to_dense()).cwiseAbs().maxCoeff() < 1e-14);
  // The layers list no table; the pool lists it once, with its gradient: one optimizer state.
  ParameterList<double> params = a.parameters(ga, "a.");
  append_parameters(params, b.parameters(gb, "b."));
  append_parameters(params, pool->parameters("pool."));
  int tables = 0;
  for (const auto& p : params) tables += p.name.find("values") != std::string::npos;
  CHECK(tables == 1);
  const RowMat<double> before = pool->values();
  Sgd<double> sgd(params, SgdConfig{0.5});
  sgd.step();
  const RowMat<double> want = before - 0.5 * (goa.experts.values.to_dense() + gob.experts.values.to_dense());
  CHECK((pool->values() - want).cwiseAbs().maxCoeff() < 1e-14);
  // Refusals, by name.
  CHECK_THROWS_WITH(a.grow(6, 1), Catch::Contains("shared value pool"));
  CHECK_THROWS_WITH(a.freeze({3, true, false}), Catch::Contains("with shared_values"));
  auto small = std::make_shared<ValuePool<double>>(16, 4, 5);
  CHECK_THROWS_WITH(Pkm<double>(cfg, small, 1), Catch::Contains("the value pool is 16 x 4, the layer needs 25 x 4"));
  ProductKeyLayerConfig marked = cfg;
  marked.shared_values = true;
  CHECK_THROWS_WITH(Pkm<double>(marked, 1), Catch::Contains("build it with Pkm(cfg, pool, seed)"));
}
