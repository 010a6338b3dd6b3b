// Inputs a careless or unlucky caller can reach: non-finite values, caches and grads from
// another layer, stale caches, aliased buffers, out-of-range settings, overflowing sizes.
// Each must give spex::Error naming the argument (or a defined, documented result), never
// undefined behaviour, and a failed call must leave the layer as it was.
#include <limits>

#include <spex/spex.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

ProductKeyLayerConfig pk_config(Index d = 6, Index d_key = 4) {
  ProductKeyLayerConfig cfg;
  cfg.d_in = d;
  cfg.n_keys = 5;
  cfg.heads = 2;
  cfg.top_k = 3;
  cfg.d_key = d_key;
  cfg.learn_keys = true;
  return cfg;
}

MoEConfig moe_config(Index d = 5) {
  MoEConfig cfg;
  cfg.d_in = d;
  cfg.n_experts = 4;
  cfg.hidden = 6;
  cfg.experts_per_token = 2;
  cfg.router_init_std = 0.5;
  return cfg;
}

using ReMoE = MoE<double, ReluRouter<double>>;
using TopKMoE = MoE<double, TopKRouter<double>>;

// Runs forward + backward with dx given and returns (y, dx).
template <class Layer>
std::pair<RowMat<double>, RowMat<double>> step(Layer& layer, const RowMat<double>& x, const RowMat<double>& dy,
                                               typename Layer::Grads& g) {
  typename Layer::Cache c;
  RowMat<double> y(x.rows(), layer.d_out()), dx(x.rows(), layer.d_in());
  layer.forward(x, y, c);
  layer.backward(dy, dx, c, g);
  return {y, dx};
}

}  // namespace

TEST_CASE("TopK router: a token with non-finite logits is an error, never an out-of-bounds write", "[hardening][remoe]") {
  MoEConfig cfg = moe_config();
  cfg.check_finite = false;
  TopKMoE moe(cfg, 1);
  RowMat<double> x = randn_mat(6, 5, 1), y(6, 5);
  TopKMoE::Cache c;
  moe.router().weight().row(2).setConstant(kNaN);  // weights after a diverged step
  CHECK_THROWS_WITH(moe.forward(x, y, c), Catch::Contains("router logit of token 0") && Catch::Contains("router.weight"));
  TopKMoE fresh(cfg, 1);
  x(3, 1) = kNaN;  // NaN x with check_finite off
  CHECK_THROWS_WITH(fresh.forward(x, y, c), Catch::Contains("router logit of token 3"));
  ReMoE relu(cfg, 1);
  ReMoE::Cache rc;
  CHECK_THROWS_WITH(relu.forward(x, y, rc), Catch::Contains("router logit of token 3"));
  cfg.router_init_std = kNaN;
  CHECK_THROWS_WITH(TopKMoE(cfg, 1), Catch::Contains("router_init_std = nan"));
}

TEST_CASE("product-key retrieval: NaN sub-keys or queries are errors naming the token", "[hardening][peer]") {
  ProductKeyLayerConfig cfg = pk_config();
  cfg.check_finite = false;
  Peer<double> peer(cfg, 1);
  RowMat<double> x = randn_mat(4, 6, 2), y(4, 6);
  Peer<double>::Cache c;
  x(3, 5) = kNaN;
  // The user's x(3, 5), not an internal query row, is what the message points at.
  CHECK_THROWS_WITH(peer.forward(x, y, c), Catch::Contains("query projection of token 3") && Catch::Contains("x or query.weight"));
  x(3, 5) = 0.5;
  peer.retrieval().keys(0).sub_keys(0).setConstant(kNaN);
  CHECK_THROWS_WITH(peer.infer(x, y, c), Catch::Contains("fewer than top_k = 3 finite retrieval scores"));
}

TEST_CASE("product top-k: every method is defined for k beyond the candidate lists", "[hardening][kernels]") {
  // The pruned scan used to read a[i], b[j] past ka, kb when k > ka or k > kb.
  const double a[2] = {3, 1}, b[3] = {2, 1, 0};
  const std::int64_t ia[2] = {4, 0}, ib[3] = {1, 2, 0};
  kernels::ProductTopKScratch<double> scratch;
  for (std::size_t k : {4, 6, 9}) {
    std::vector<double> ref_v(k), v(k);
    std::vector<std::int64_t> ref_i(k), id(k);
    kernels::product_topk(kernels::ProductTopK::full, a, ia, 2, b, ib, 3, 5, k, ref_v.data(), ref_i.data(), scratch);
    for (auto m : {kernels::ProductTopK::pruned, kernels::ProductTopK::heap}) {
      CAPTURE(k, kernels::to_string(m));
      kernels::product_topk(m, a, ia, 2, b, ib, 3, 5, k, v.data(), id.data(), scratch);
      if (m == kernels::ProductTopK::heap) {
        CHECK(id == ref_i);
      } else {  // pruned keeps only (i+1)(j+1) <= k: a correct prefix, then padding
        for (std::size_t j = 0; j < k; ++j) CHECK((id[j] == ref_i[j] || id[j] == -1));
      }
    }
    if (k > 6) CHECK(ref_i[k - 1] == -1);  // only 2 x 3 pairs exist
  }
}

TEST_CASE("caches and grads from another layer are errors, not heap overflows", "[hardening]") {
  Peer<double> a(pk_config(6, 4), 1), b(pk_config(6, 8), 2);
  const RowMat<double> x = randn_mat(5, 6, 3), dy = randn_mat(5, 6, 4);
  RowMat<double> y(5, 6), dx(5, 6);
  Peer<double>::Cache ca;
  auto ga = a.make_grads(), gb = b.make_grads();
  a.forward(x, y, ca);
  CHECK_THROWS_WITH(b.backward(dy, dx, ca, gb), Catch::Contains("filled by another layer object"));
  CHECK_THROWS_WITH(a.backward(dy, dx, ca, gb), Catch::Contains("grads were made by another layer"));
  CHECK_THROWS_WITH(a.parameters(gb), Catch::Contains("grads were made by another layer"));
  // Another N: the expert gradients do not fit either.
  ProductKeyLayerConfig big = pk_config(6, 4);
  big.n_keys = 7;
  Peer<double> c(big, 1);
  auto gc = c.make_grads();
  CHECK_THROWS_WITH(a.backward(dy, dx, ca, gc), Catch::Contains("grads were made by another layer"));
  Pkm<double> pa(pk_config(6, 4), 1), pb(big, 1);
  auto gpb = pb.make_grads();
  Pkm<double>::Cache cpa;
  pa.forward(x, y, cpa);
  CHECK_THROWS_WITH(pa.backward(dy, dx, cpa, gpb), Catch::Contains("grads were made by another layer"));
  ProductKeyLayerConfig narrow = pk_config(6, 4);
  narrow.d_out = 3;
  Pkm<double> pc(narrow, 1);
  auto gpc = pc.make_grads();  // the same retrieval, another value width
  CHECK_THROWS_WITH(pa.backward(dy, dx, cpa, gpc), Catch::Contains("experts.values"));
  // A copy of a layer is another layer for the caches.
  Peer<double> copy = a;
  CHECK_THROWS_WITH(copy.backward(dy, dx, ca, ga), Catch::Contains("another layer object"));
  ReMoE m1(moe_config(6), 1);
  MoEConfig wide = moe_config(6);
  wide.n_experts = 6;
  ReMoE m2(wide, 1);
  ReMoE::Cache cm;
  auto gm2 = m2.make_grads();
  m1.forward(x, y, cm);
  CHECK_THROWS_WITH(m2.backward(dy, dx, cm, gm2), Catch::Contains("another layer object"));
  CHECK_THROWS_WITH(m1.backward(dy, dx, cm, gm2), Catch::Contains("grads were made by another layer"));
}

TEST_CASE("backward needs a training forward of the same layer as the cache's last pass", "[hardening]") {
  ReMoE moe(moe_config(), 3);
  const RowMat<double> x1 = randn_mat(6, 5, 1), x2 = randn_mat(6, 5, 2), dy = randn_mat(6, 5, 3);
  RowMat<double> y(6, 5), dx(6, 5);
  ReMoE::Cache c;
  auto g = moe.make_grads();
  CHECK_THROWS_WITH(moe.backward(dy, dx, c, g), Catch::Contains("holds no forward pass"));
  moe.forward(x1, y, c);
  moe.infer(x2, y, c);
  CHECK_THROWS_WITH(moe.backward(dy, dx, c, g), Catch::Contains("last pass was infer()"));
  // A training forward that throws leaves the cache unusable, not stale.
  moe.forward(x1, y, c);
  RowMat<double> bad = x2;
  bad(0, 0) = kInf;
  CHECK_THROWS(moe.forward(bad, y, c));
  CHECK_THROWS_WITH(moe.backward(dy, dx, c, g), Catch::Contains("the last one threw"));
  Peer<double> peer(pk_config(), 1);
  Peer<double>::Cache pc;
  auto pg = peer.make_grads();
  RowMat<double> px = randn_mat(6, 6, 4), py(6, 6), pdx(6, 6);
  peer.forward(px, py, pc);
  peer.infer(randn_mat(6, 6, 5), py, pc);
  CHECK_THROWS_WITH(peer.backward(randn_mat(6, 6, 6), pdx, pc, pg), Catch::Contains("infer()"));
  CHECK_THROWS_WITH(peer.backward(RowMat<double>(0, 6), pdx, pc, pg), Catch::Contains("infer()"));
  peer.forward(px, py, pc);
  CHECK_THROWS_WITH(peer.backward(RowMat<double>(0, 6), pdx, pc, pg), Catch::Contains("dy has 0 rows"));
}

TEST_CASE("dx may be dy itself, other overlaps are errors", "[hardening]") {
  const RowMat<double> x = randn_mat(7, 6, 1), dy = randn_mat(7, 6, 2);
  auto check_in_place = [&](auto& layer) {
    using L = std::decay_t<decltype(layer)>;
    auto g1 = layer.make_grads(), g2 = layer.make_grads();
    const auto ref = step(layer, x, dy, g1);
    typename L::Cache c;
    RowMat<double> y(7, 6), buf = dy;
    layer.forward(x, y, c);
    layer.backward(buf, buf, c, g2);  // dx written over dy
    CHECK((buf - ref.second).cwiseAbs().maxCoeff() == 0);
    const auto p1 = layer.parameters(g1), p2 = layer.parameters(g2);
    for (std::size_t i = 0; i < p1.size(); ++i)
      if (p1[i].grad) CHECK((p1[i].grad_map() - p2[i].grad_map()).cwiseAbs().maxCoeff() == 0);
    // In-place inference, and a y that overlaps x one row down.
    RowMat<double> inplace = x, y_ref(7, 6);
    layer.infer(x, y_ref);
    layer.infer(inplace, inplace);
    CHECK((inplace - y_ref).cwiseAbs().maxCoeff() == 0);
    RowMat<double> big = RowMat<double>::Zero(8, 6);
    big.topRows(7) = x;
    CHECK_THROWS_WITH(layer.infer(big.topRows(7), big.bottomRows(7)), Catch::Contains("y overlaps x"));
    layer.forward(x, y, c);
    RowMat<double> dbuf = RowMat<double>::Zero(8, 6);
    dbuf.topRows(7) = dy;
    CHECK_THROWS_WITH(layer.backward(dbuf.topRows(7), dbuf.bottomRows(7), c, g2), Catch::Contains("dx overlaps dy"));
  };
  Peer<double> peer(pk_config(), 1);
  check_in_place(peer);
  Pkm<double> pkm(pk_config(), 2);
  check_in_place(pkm);
  ReMoE remoe(moe_config(6), 3);
  remoe.set_lambda(0.2);
  check_in_place(remoe);
  TopKMoE topk(moe_config(6), 4);
  check_in_place(topk);
  Rng rng(5);
  Linear<double> lin(6, 6, true, rng);
  auto gl = lin.make_grads();
  RowMat<double> dx(7, 6), buf = dy;
  lin.backward(x, dy, dx, gl);
  lin.backward(x, buf, buf, gl);
  CHECK((buf - dx).cwiseAbs().maxCoeff() == 0);
}

TEST_CASE("a training forward that throws leaves BatchNorm's running statistics unchanged", "[hardening][peer]") {
  ProductKeyLayerConfig cfg = pk_config();
  cfg.check_finite = false;
  Peer<float> peer(cfg, 1);
  Peer<float>::Cache c;
  RowMat<float> x = randn_mat(6, 6, 1).cast<float>(), y(6, 6);
  peer.forward(x, y, c);
  const Vec<float> mean = peer.retrieval().norm().running_mean(), var = peer.retrieval().norm().running_var();
  RowMat<float> nan_x = x;
  nan_x(2, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS(peer.forward(nan_x, y, c));
  // A finite batch whose variance overflows float would make running_var inf for good.
  RowMat<float> huge = x * 1e20f;
  CHECK_THROWS_WITH(peer.forward(huge, y, c), Catch::Contains("BatchNorm") || Catch::Contains("query projection"));
  CHECK(peer.retrieval().norm().running_mean() == mean);
  CHECK(peer.retrieval().norm().running_var() == var);
  // The layer still works: a normal batch after the failures.
  peer.forward(x, y, c);
  CHECK(y.allFinite());
  CHECK(peer.retrieval().norm().running_var().allFinite());
}

TEST_CASE("lambda is bounded: set_lambda rejects absurd values, the controller cannot overflow", "[hardening][remoe]") {
  ReMoE moe(moe_config(), 1);
  CHECK_THROWS_WITH(moe.set_lambda(1e40), Catch::Contains("lambda = 1e+40"));
  CHECK_THROWS_WITH(moe.set_lambda(kNaN), Catch::Contains("lambda = nan"));
  LambdaController ctl(0.875);
  for (int i = 0; i < 2000; ++i) ctl.update(0.5);  // a target the router never reaches
  CHECK(ctl.lambda() == ctl.state().max_lambda);
  CHECK(std::isfinite(ctl.lambda()));
  CHECK(ctl.consecutive_steps_at_bound() > 1800);  // 1e-8 * 1.2^127 > 100: the rest sit at the bound
  CHECK(ctl.state().steps_at_max > 1800);
  for (int i = 0; i < 2000; ++i) ctl.update(1.0);  // a dead router
  CHECK(ctl.lambda() == ctl.state().min_lambda);
  CHECK(ctl.lambda() >= 1e-12);
  ctl.update(0.5);
  CHECK(ctl.consecutive_steps_at_bound() == 0);
  CHECK_THROWS_WITH(LambdaController(0.5, 1e-8, kInf), Catch::Contains("alpha = inf"));
  CHECK_THROWS_WITH(ctl.set_clamp(0.0, 1.0), Catch::Contains("lambda bounds"));
  CHECK_THROWS_WITH(ctl.update(kNaN), Catch::Contains("measured sparsity"));
}

TEST_CASE("ReMoE with an unreachable sparsity target trains for 1000 steps without NaN", "[hardening][remoe]") {
  // A bias-free ReLU router on zero-mean isotropic inputs stays near 50% active, far from
  // the 75% target: the paper's controller grows lambda forever; ours stops at its bound.
  MoEConfig cfg = moe_config();
  cfg.experts_per_token = 1;
  MoE<float, ReluRouter<float>> moe(cfg, 2);
  LambdaController ctl(LambdaController::target_for(1, 4));
  MoE<float, ReluRouter<float>>::Cache c;
  auto g = moe.make_grads();
  const auto params = moe.parameters(g);
  Sgd<float> opt(params, SgdConfig{0.01});
  Rng rng(3);
  RowMat<float> x(32, 5), y(32, 5);
  for (int s = 0; s < 1000; ++s) {
    fill_normal(x, 1.0, rng);
    moe.set_lambda(ctl.lambda());
    moe.forward(x, y, c);
    zero_grads(params);
    moe.backward(y / 32.0f, c, g);
    opt.step();
    ctl.update(moe.stats(c).sparsity);
  }
  CHECK(ctl.lambda() == ctl.state().max_lambda);
  for (const auto& p : params) CHECK(p.value_map().allFinite());
}

TEST_CASE("every config field is validated, sizes never overflow", "[hardening]") {
  auto peer = [](ProductKeyLayerConfig c) { Peer<float> p(c); };
  auto cfg = pk_config();
  auto with = [&](auto f) {
    ProductKeyLayerConfig c = cfg;
    f(c);
    return c;
  };
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.d_in = -1; })), Catch::Contains("d_in = -1"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.heads = -2; })), Catch::Contains("heads = -2"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.n_keys = -5; })), Catch::Contains("n_keys = -5"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.n_keys = Index(1) << 32; })), Catch::Contains("n_keys = 4294967296"));
  CHECK_THROWS_WITH(peer(with([](auto& c) {
                      c.n_keys = 0;
                      c.n_experts = Index(1) << 62;
                    })),
                    Catch::Contains("exceeds 2^40"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.score = ScoreFn(7); })), Catch::Contains("score = 7"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.norm = NormKind(9); })), Catch::Contains("norm = 9"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.activation = kernels::Activation(42); })), Catch::Contains("activation = 42"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.norm_eps = kNaN; })), Catch::Contains("norm_eps"));
  CHECK_THROWS_WITH(peer(with([](auto& c) { c.norm_momentum = 2; })), Catch::Contains("norm_momentum"));
  CHECK_THROWS_WITH(peer(with([](auto& c) {
                      c.heads = Index(1) << 40;
                      c.d_key = Index(1) << 24;  // heads * d_key = 2^64
                    })),
                    Catch::Contains("heads * d_key") && Catch::Contains("overflows"));

  auto moe = [](MoEConfig c) { ReMoE m(c); };
  auto mwith = [&](auto f) {
    MoEConfig c = moe_config();
    f(c);
    return c;
  };
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.hidden = -4; })), Catch::Contains("hidden = -4"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.d_in = -3; })), Catch::Contains("d_in = -3"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.n_experts = -1; })), Catch::Contains("n_experts = -1"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.ffn = FfnKind(5); })), Catch::Contains("ffn = 5"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.penalty = Penalty(4); })), Catch::Contains("penalty = 4"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.aux_coeff = kInf; })), Catch::Contains("aux_coeff = inf"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) { c.capacity_factor = kNaN; })), Catch::Contains("capacity_factor"));
  CHECK_THROWS_WITH(moe(mwith([](auto& c) {
                      c.n_experts = Index(1) << 40;
                      c.granularity = Index(1) << 30;
                    })),
                    Catch::Contains("n_experts * granularity"));
  CHECK_THROWS_WITH(Norm<float>(NormKind::layer, 8, -2), Catch::Contains("group = -2"));
  CHECK_THROWS_WITH(Norm<float>(NormKind::batch, 8, 0, 1e-5f, std::numeric_limits<float>::infinity()),
                    Catch::Contains("momentum"));
  // Training needs a row lookup table per expert table; it says where the limit comes from.
  CHECK_THROWS_WITH(SparseRowGrad<float>(Index(1) << 31, 4), Catch::Contains("n_experts <= 2^31 - 1"));
}

TEST_CASE("results do not depend on the number of threads", "[hardening][determinism]") {
  const int saved = max_threads();
  auto run = [](auto& layer, int threads) {
    set_num_threads(threads);
    const Index b = 130, d = layer.d_in();  // large enough for several GEMM blocks and tasks
    const RowMat<float> x = randn_mat(b, d, 1).cast<float>(), dy = randn_mat(b, d, 2).cast<float>();
    auto g = layer.make_grads();
    typename std::decay_t<decltype(layer)>::Cache c;
    RowMat<float> y(b, d), dx(b, d);
    layer.forward(x, y, c);
    layer.backward(dy, dx, c, g);
    std::vector<RowMat<float>> out{y, dx};
    for (const auto& p : layer.parameters(g)) out.push_back(p.grad ? RowMat<float>(p.grad_map()) : p.sparse_grad ? p.sparse_grad->to_dense() : RowMat<float>());
    return out;
  };
  auto check = [&](auto make) {
    auto l1 = make(), l2 = make(), l3 = make();
    const auto r1 = run(l1, 1), r2 = run(l2, 2), r3 = run(l3, 3);
    for (std::size_t i = 0; i < r1.size(); ++i) {
      CAPTURE(i);
      CHECK(r1[i] == r2[i]);
      CHECK(r1[i] == r3[i]);
    }
  };
  ProductKeyLayerConfig shared = pk_config(128, 32), per_head = pk_config(128, 32);
  shared.n_keys = per_head.n_keys = 64;
  shared.heads = per_head.heads = 16;
  per_head.shared_keys = false;
  check([&] { return Peer<float>(shared, 1); });
  check([&] { return Peer<float>(per_head, 1); });
  check([&] { return Pkm<float>(per_head, 2); });
  check([&] {
    MoE<float, ReluRouter<float>> m(moe_config(96), 3);
    m.set_lambda(0.1);
    return m;
  });
  check([&] { return MoE<float, TopKRouter<float>>(moe_config(96), 4); });
  set_num_threads(saved);
}

TEST_CASE("gemm refuses a C that shares memory with A or B instead of computing garbage", "[hardening][gemm]") {
  RowMat<double> a = randn_mat(40, 40, 1), b = randn_mat(40, 40, 2);
  const RowMat<double> a0 = a;
  CHECK_THROWS_WITH(gemm(a, a, b, false), Catch::Contains("C shares memory with A"));
  CHECK_THROWS_WITH(gemm(b, a, b, true), Catch::Contains("C shares memory with B"));
  CHECK_THROWS_WITH(gemm(a.topRows(20), a.bottomRows(40).topRows(20).leftCols(20), b.topRows(20), false),
                    Catch::Contains("C shares memory with A"));
  CHECK_THROWS_WITH(gemm(a, b, a.transpose(), false), Catch::Contains("C shares memory with B"));
  CHECK(a == a0);  // refused before anything was written
  // Disjoint parts of one buffer are fine.
  RowMat<double> big = randn_mat(80, 40, 3);
  RowMat<double> expect = big.topRows(40) * b;
  gemm(big.bottomRows(40), big.topRows(40), b, false);
  CHECK((big.bottomRows(40) - expect).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("a finite input that overflows inside the experts is an error, never a silent NaN output", "[hardening]") {
  using TopKMoE = MoE<float, TopKRouter<float>>;
  MoEConfig cfg = moe_config();
  RowMat<float> x = randn_mat(4, 5, 1).cast<float>() * 1e30f, y(4, 5);
  TopKMoE topk(cfg, 1);
  TopKMoE::Cache c;
  CHECK_THROWS_WITH(topk.infer(x, y, c), Catch::Contains("MoE: the output holds") && Catch::Contains("for a finite input"));
  CHECK_THROWS_WITH(topk.forward(x, y, c), Catch::Contains("the output holds"));
  auto g = topk.make_grads();
  CHECK_THROWS_WITH(topk.backward(RowMat<float>::Ones(4, 5), c, g), Catch::Contains("the last one threw"));
  // Product-key layers too (an input near float's limit).
  Peer<float> peer(pk_config(), 1);
  RowMat<float> big = randn_mat(4, 6, 2).cast<float>() * 3e37f, py(4, 6);
  try {  // the retrieval's scores or the output may overflow: an error, or a finite output, never a NaN
    peer.infer(big, py);
    CHECK(py.allFinite());
  } catch (const spex::Error&) {
  }
  // Ordinary inputs pass, and the check can be switched off with the input check.
  CHECK_NOTHROW(topk.infer(RowMat<float>(x / 1e30f), y, c));
  cfg.check_finite = false;
  TopKMoE unchecked(cfg, 1);
  CHECK_NOTHROW(unchecked.infer(x, y, c));
}

TEST_CASE("the lambda controller's step counter cannot overflow, from updates or from a state", "[hardening][remoe]") {
  LambdaController ctl(0.875);
  LambdaController::State s = ctl.state();
  s.steps = std::numeric_limits<long>::max();
  CHECK_THROWS_WITH(ctl.set_state(s), Catch::Contains("steps = 9223372036854775807"));
  s.steps = std::numeric_limits<long>::max() - 1;
  ctl.set_state(s);
  ctl.update(0.5);
  const LambdaController::State at_max = ctl.state();
  CHECK_THROWS_WITH(ctl.update(0.5), Catch::Contains("step count is at its maximum"));
  CHECK(ctl.state().steps == at_max.steps);
  CHECK(ctl.lambda() == at_max.lambda);
  s = LambdaController(0.875).state();
  s.steps = 3;
  s.steps_at_max = 4;  // more steps at a bound than steps
  CHECK_THROWS_WITH(ctl.set_state(s), Catch::Contains("steps_at_max = 4"));
}

TEST_CASE("stats, aux_loss and penalty_value of a cache that holds no pass are errors", "[hardening][remoe]") {
  ReMoE moe(moe_config(), 1);
  ReMoE::Cache c;
  CHECK_THROWS_WITH(moe.stats(c), Catch::Contains("MoE::stats: the cache holds no pass"));
  CHECK_THROWS_WITH(moe.aux_loss(c), Catch::Contains("holds no pass"));
  CHECK_THROWS_WITH(moe.penalty_value(c), Catch::Contains("holds no pass"));
  RowMat<double> y(6, 5);
  moe.infer(randn_mat(6, 5, 1), y, c);
  CHECK_NOTHROW(moe.stats(c));
  ReMoE other(moe_config(), 2);
  CHECK_THROWS_WITH(other.stats(c), Catch::Contains("another layer object"));
}

TEST_CASE("bf16 tables refuse finite floats beyond bf16's range instead of storing infinities", "[hardening][compact]") {
  Peer<float> layer(pk_config(), 1);
  layer.experts().up()(3, 2) = 3.4e38f;  // finite as float, rounds to infinity as bf16
  const RowMat<float> up = layer.experts().up();
  CHECK_THROWS_WITH(layer.set_storage(TableStorage::bf16), Catch::Contains("row 3") && Catch::Contains("column 2") &&
                                                               Catch::Contains("beyond bfloat16's largest finite value"));
  CHECK(layer.storage() == TableStorage::native);  // unchanged
  CHECK(layer.experts().up() == up);
  CHECK_NOTHROW(layer.set_storage(TableStorage::int8));  // int8 scales any finite row
  CompactTable t(TableStorage::bf16, 2, 2);
  const float ok[4] = {1, 2, 3, 4}, bad[4] = {1, 2, 3, 3.397e38f};  // above the midpoint of bf16's max and infinity
  t.set_rows(0, 2, ok);
  CHECK_THROWS_WITH(t.set_rows(0, 2, bad), Catch::Contains("row 1"));
  float row[2];
  t.get_row(0, row);
  CHECK(row[0] == 1);  // nothing written by the refused call
}
