// Growing a product-key layer's expert pool (ExpertIds::shells): the id scheme is a bijection
// whose ids do not depend on n, retrieval stays exact against exhaustive search after several
// growths, and every existing expert keeps its id, its table rows and its sub-key rows. Freezing
// (FrozenSet): frozen rows get no gradient, optimizers leave them and their state bit-identical,
// the other gradients and dx are unchanged.
#include <set>
#include <type_traits>

#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>
#include <spex/optim/adam.hpp>
#include <spex/optim/sgd.hpp>
#include <spex/select/exhaustive.hpp>

#include "test_util.hpp"

using namespace spex;

namespace {

/// Product-key search against exhaustive search over the explicit keys in id order.
void check_exact(const ProductKeys<float>& pk, const RowMat<float>& q, Index k) {
  RowMat<float> s_ref(q.rows(), k), s(q.rows(), k);
  IndexMat ids_ref(q.rows(), k), ids(q.rows(), k);
  ExhaustiveTopK<float>().search(pk.full_keys(), q, k, s_ref, ids_ref);
  ProductKeys<float>::Workspace ws;
  pk.search(q, k, s, ids, ws);
  CHECK(ids == ids_ref);
  CHECK((s - s_ref).cwiseAbs().maxCoeff() < 1e-4);
}

ProductKeyLayerConfig grow_config(Index n) {
  ProductKeyLayerConfig c;
  c.d_in = 24;
  c.n_keys = n;
  c.heads = 2;
  c.top_k = 4;
  c.d_key = 12;
  c.expert_ids = ExpertIds::shells;
  return c;
}

}  // namespace

TEST_CASE("expert ids: both schemes are bijections, shell ids do not depend on n", "[grow]") {
  for (Index n : {1, 2, 3, 7, 40}) {
    for (ExpertIds s : {ExpertIds::row_major, ExpertIds::shells}) {
      std::set<Index> seen;
      for (Index i1 = 0; i1 < n; ++i1)
        for (Index i2 = 0; i2 < n; ++i2) {
          const Index id = expert_id(s, i1, i2, n);
          REQUIRE(id >= 0);
          REQUIRE(id < n * n);
          REQUIRE(seen.insert(id).second);
          Index a = -1, b = -1;
          expert_pair(s, id, n, a, b);
          REQUIRE(a == i1);
          REQUIRE(b == i2);
          if (s == ExpertIds::shells) {
            REQUIRE(id == expert_id(s, i1, i2, n + 5));  // the same id in a larger pool
            REQUIRE(id < (std::max(i1, i2) + 1) * (std::max(i1, i2) + 1));
          }
        }
    }
  }
}

TEST_CASE("shell-numbered product keys stay exact through several growths", "[grow]") {
  Rng rng(4);
  ProductKeys<float> pk(5, 16, 11, ExpertIds::shells);
  for (Index n : {5, 9, 16, 23}) {
    const RowMat<float> c1 = pk.sub_keys(0), c2 = pk.sub_keys(1);
    pk.grow(n, 100 + n);
    CHECK(pk.n() == n);
    CHECK(pk.sub_keys(0).topRows(c1.rows()) == c1);  // old rows untouched
    CHECK(pk.sub_keys(1).topRows(c2.rows()) == c2);
    RowMat<float> q(37, 16);
    fill_normal(q, 1.0, rng);
    for (Index k : {Index(1), Index(4), std::min<Index>(n, 12)}) check_exact(pk, q, k);
  }
  // Grown rows are seeded: growing alike gives the same rows, another seed other rows.
  ProductKeys<float> a(5, 16, 11, ExpertIds::shells), b(5, 16, 11, ExpertIds::shells);
  a.grow(9, 3);
  b.grow(9, 3);
  CHECK(a.sub_keys(0) == b.sub_keys(0));
  b = ProductKeys<float>(5, 16, 11, ExpertIds::shells);
  b.grow(9, 4);
  CHECK(a.sub_keys(0).bottomRows(4) != b.sub_keys(0).bottomRows(4));
  ProductKeys<float> rm(5, 16, 11);
  CHECK_THROWS_WITH(rm.grow(6, 1), Catch::Contains("row_major") && Catch::Contains("shells"));
  CHECK_THROWS_WITH(a.grow(8, 1), Catch::Contains("n_new = 8"));
}

TEST_CASE("Peer and Pkm grow in place: old experts keep ids, rows and sub-keys, retrieval exact", "[grow]") {
  Peer<float> p(grow_config(6), 1);
  Pkm<float> k(grow_config(6), 2);
  Rng rng(5);
  for (Index n : {9, 14}) {
    const Index n0 = p.config().n_keys, big0 = n0 * n0;
    const RowMat<float> down = p.experts().down(), up = p.experts().up(), values = k.experts().values();
    const RowMat<float> c1 = p.retrieval().keys(0).sub_keys(0);
    auto old_grads = p.make_grads();
    p.grow(n, 10 + n);
    k.grow(n, 20 + n);
    CHECK(p.n_experts() == n * n);
    CHECK(p.config().n_keys == n);
    CHECK(p.experts().down().topRows(big0) == down);
    CHECK(p.experts().up().topRows(big0) == up);
    CHECK(k.experts().values().topRows(big0) == values);
    CHECK(p.retrieval().keys(0).sub_keys(0).topRows(n0) == c1);
    CHECK_THROWS_WITH(p.check_grads(old_grads), Catch::Contains("grads were made by another layer"));
    // Retrieval of the grown layer: exhaustive over the keys in shell order.
    RowMat<float> x(20, 24), y(20, 24);
    fill_normal(x, 1.0, rng);
    Peer<float>::Cache c;
    p.infer(x, y, c);
    const Index dk = p.config().d_key;
    RowMat<float> q = Eigen::Map<const RowMat<float>>(c.retrieval.q.data(), 20 * 2, dk);
    check_exact(p.retrieval().keys(0), q, 4);
    // A training step on the grown layer with gradients made again.
    auto g = p.make_grads();
    p.forward(x, y, c);
    p.backward(y, c, g);
    CHECK(g.experts.up.nnz_rows() > 0);
  }
  // Seeded: the same growth twice gives the same layer.
  Peer<float> a(grow_config(6), 1), b(grow_config(6), 1);
  a.grow(10, 7);
  b.grow(10, 7);
  CHECK(a.experts().down() == b.experts().down());
  CHECK(a.retrieval().keys(0).sub_keys(1) == b.retrieval().keys(0).sub_keys(1));
}

TEST_CASE("grow refuses what would renumber, shrink or touch compact tables", "[grow]") {
  ProductKeyLayerConfig rm = grow_config(6);
  rm.expert_ids = ExpertIds::row_major;
  Peer<float> p(rm, 1);
  CHECK_THROWS_WITH(p.grow(8, 1), Catch::Contains("Peer::grow") && Catch::Contains("row_major"));
  CHECK(p.n_experts() == 36);
  Peer<float> s(grow_config(6), 1);
  CHECK_THROWS_WITH(s.grow(5, 1), Catch::Contains("n_new = 5"));
  s.grow(6, 1);  // no change
  CHECK(s.n_experts() == 36);
  ProductKeyLayerConfig compact = grow_config(6);
  compact.storage = TableStorage::bf16;
  Pkm<float> k(compact, 1);
  CHECK_THROWS_WITH(k.grow(8, 1), Catch::Contains("bf16"));
  ProductKeyLayerConfig bad = grow_config(6);
  bad.expert_ids = ExpertIds(5);
  CHECK_THROWS_WITH(Peer<float>(bad, 1), Catch::Contains("expert_ids = 5"));
}

namespace {

// A layer grown from n0 to n with learned sub-keys, the n0^2 old experts frozen as `f` says;
// `extras`: with an input RMSNorm and per-head tables (and GLU experts for Peer).
template <class L>
L grown_frozen(Index n0, Index n, FrozenSet f, std::uint64_t seed, bool extras = false) {
  ProductKeyLayerConfig c = grow_config(n0);
  c.learn_keys = true;
  c.input_rmsnorm = c.per_head_tables = extras;
  c.glu = extras && std::is_same<L, Peer<float>>::value;
  L layer(c, seed);
  layer.freeze(f);
  layer.grow(n, seed + 1);
  return layer;
}

template <class L>
std::vector<RowMat<float>> values_of(const L& layer) {
  std::vector<RowMat<float>> out;
  for (const auto& p : layer.parameters()) out.push_back(p.value_map());
  return out;
}

/// Trains `layer` `steps` steps with `opt` on its parameter list `params` (MSE to a fixed map).
template <class L, class Opt>
void train(L& layer, typename L::Grads& g, const ParameterList<float>& params, Opt& opt, int steps, std::uint64_t seed) {
  Rng rng(seed);
  typename L::Cache c;
  RowMat<float> x(32, 24), y(32, 24);
  for (int s = 0; s < steps; ++s) {
    fill_normal(x, 1.0, rng);
    layer.forward(x, y, c);
    const RowMat<float> dy = (y - x.array().sin().matrix()) / 32.f;
    zero_grads(params);
    layer.backward(dy, c, g);
    opt.step();
  }
}

}  // namespace

TEMPLATE_TEST_CASE("frozen experts, sub-key rows and query stay bit-identical through training, the rest learns",
                   "[grow][freeze]", Peer<float>, Pkm<float>) {
  for (int variant = 0; variant < 4; ++variant) {
    const bool query = variant % 2 == 0, extras = variant >= 2;
    CAPTURE(query, extras);
    TestType layer = grown_frozen<TestType>(4, 7, FrozenSet{4, true, query}, 3, extras);
    CHECK(layer.frozen_experts() == 16);
    CHECK(layer.frozen_rows() == (extras ? 32 : 16));  // per-head tables: 2 heads' rows per expert
    const std::vector<RowMat<float>> before = values_of(layer);
    auto g = layer.make_grads();
    const ParameterList<float> params = layer.parameters(g);
    for (const auto& p : params) {  // the list says what is frozen
      const bool q = p.name.rfind("query.", 0) == 0 || p.name.rfind("norm.", 0) == 0 || p.name.rfind("input_norm.", 0) == 0;
      if (q) CHECK(p.trainable() == (!query && p.name.find("running") == std::string::npos));
      if (p.name.rfind("keys.", 0) == 0) CHECK(p.frozen_rows == 4);
      if (p.name.rfind("experts.", 0) == 0) CHECK(p.frozen_rows == layer.frozen_rows());
    }
    Adam<float> adam(params, AdamConfig{1e-2, 0.9, 0.999, 1e-8, 1e-3, true});
    train(layer, g, params, adam, 5, 9);
    // The gradient of the last step holds no frozen row.
    for (const auto& p : params)
      if (p.sparse_grad) {
        CHECK(p.sparse_grad->nnz_rows() > 0);
        for (Index r : p.sparse_grad->rows()) CHECK(r >= layer.frozen_rows());
      }
    const std::vector<RowMat<float>> after = values_of(layer);
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      INFO(p.name << ", query frozen " << query);
      const bool q = p.name.rfind("query.", 0) == 0 || p.name.rfind("norm.", 0) == 0 || p.name.rfind("input_norm.", 0) == 0;
      if (q) {
        if (query) CHECK(after[i] == before[i]);  // weights and running statistics
        else CHECK(after[i] != before[i]);
        continue;
      }
      const Index fr = p.frozen_rows;
      REQUIRE(fr > 0);
      CHECK(after[i].topRows(fr) == before[i].topRows(fr));
      CHECK(after[i].bottomRows(p.rows - fr) != before[i].bottomRows(p.rows - fr));
      // Adam's moments of the frozen rows were never written.
      CHECK(adam.first_moment(i).topRows(fr).isZero(0));
      CHECK(adam.second_moment(i).topRows(fr).isZero(0));
    }
  }
}

TEST_CASE("freezing leaves the other gradients and dx as they were, and SGD skips frozen rows", "[grow][freeze]") {
  // Query trainable: the frozen layer's gradients of trainable rows and its dx equal the
  // unfrozen layer's exactly; the frozen rows get none.
  Peer<float> open = grown_frozen<Peer<float>>(4, 6, FrozenSet{}, 5);
  Peer<float> frozen = open;
  frozen.freeze(FrozenSet{4, true, false});
  RowMat<float> x = spex_test::randn_mat(16, 24, 3).cast<float>(), y1(16, 24), y2(16, 24), dx1(16, 24), dx2(16, 24);
  Peer<float>::Cache c1, c2;
  auto g1 = open.make_grads();
  auto g2 = frozen.make_grads();
  open.forward(x, y1, c1);
  frozen.forward(x, y2, c2);
  REQUIRE(y1 == y2);
  open.backward(y1, dx1, c1, g1);
  frozen.backward(y2, dx2, c2, g2);
  CHECK(dx1 == dx2);
  CHECK(g1.retrieval.query.weight == g2.retrieval.query.weight);
  const RowMat<float> k1 = g1.retrieval.keys[0], k2 = g2.retrieval.keys[0];
  CHECK(k2.topRows(4).isZero(0));
  CHECK(k1.topRows(4) != k2.topRows(4));
  CHECK(k1.bottomRows(2) == k2.bottomRows(2));
  const RowMat<float> d1 = g1.experts.up.to_dense(), d2 = g2.experts.up.to_dense();
  CHECK(d2.topRows(16).isZero(0));
  CHECK(d1.bottomRows(20) == d2.bottomRows(20));

  // Gradients made before the freeze are refused.
  Peer<float> again = open;
  auto stale = again.make_grads();
  again.freeze(FrozenSet{4, true, true});
  again.forward(x, y1, c1);
  CHECK_THROWS_WITH(again.backward(y1, c1, stale), Catch::Contains("make_grads() again"));

  // SGD with momentum on a frozen layer: frozen rows and their buffers untouched.
  auto g = frozen.make_grads();
  const ParameterList<float> params = frozen.parameters(g);
  const std::vector<RowMat<float>> before = values_of(frozen);
  Sgd<float> sgd(params, SgdConfig{0.05, 0.9, 1e-3, false});
  train(frozen, g, params, sgd, 4, 2);
  const std::vector<RowMat<float>> after = values_of(frozen);
  for (std::size_t i = 0; i < params.size(); ++i)
    if (params[i].frozen_rows > 0) {
      const Index fr = params[i].frozen_rows;
      CHECK(after[i].topRows(fr) == before[i].topRows(fr));
      CHECK(sgd.momentum_buffer(i).topRows(fr).isZero(0));
      CHECK(after[i].bottomRows(params[i].rows - fr) != before[i].bottomRows(params[i].rows - fr));
    }
}

TEST_CASE("a frozen query network still passes the exact input gradient (finite differences)", "[grow][freeze]") {
  ProductKeyLayerConfig cfg = grow_config(4);
  Peer<double> p(cfg, 2);
  p.freeze(FrozenSet{4, true, true});
  p.grow(5, 3);
  const RowMat<double> x = spex_test::randn_mat(6, 24, 8), w = spex_test::randn_mat(6, 24, 9);
  RowMat<double> y(6, 24), dx(6, 24);
  Peer<double>::Cache c;
  auto g = p.make_grads();
  p.forward(x, y, c);
  p.backward(w, dx, c, g);  // loss = sum(w .* y)
  CHECK(g.retrieval.query.weight.isZero(0));
  CHECK(g.retrieval.norm.weight.isZero(0));
  const double eps = 1e-6;
  double worst = 0;
  for (Index t = 0; t < 6; ++t)
    for (Index i = 0; i < 24; i += 5) {
      RowMat<double> xp = x, xm = x, yp(6, 24), ym(6, 24);
      xp(t, i) += eps;
      xm(t, i) -= eps;
      p.forward(xp, yp, c);  // frozen: BatchNorm uses its running statistics, no batch coupling
      p.forward(xm, ym, c);
      const double fd = ((yp - ym).array() * w.array()).sum() / (2 * eps);
      worst = std::max(worst, std::abs(fd - dx(t, i)) / std::max(1.0, std::abs(fd)));
    }
  CHECK(worst < 1e-7);
}

TEST_CASE("freeze refuses what it cannot freeze, and grad_norm counts only trainable rows", "[grow][freeze]") {
  Peer<float> p(grow_config(4), 1);
  CHECK_THROWS_WITH(p.freeze(FrozenSet{5, true, false}), Catch::Contains("frozen.keys = 5"));
  ProductKeyLayerConfig rm = grow_config(4);
  rm.expert_ids = ExpertIds::row_major;
  Peer<float> r(rm, 1);
  CHECK_THROWS_WITH(r.freeze(FrozenSet{2, true, false}), Catch::Contains("shells"));
  r.freeze(FrozenSet{4, true, true});  // all experts: any numbering
  CHECK(r.frozen_experts() == 16);
  CHECK(p.frozen_experts() == 0);  // the failed freeze changed nothing

  RowMat<float> v = RowMat<float>::Zero(3, 2), gr(3, 2);
  gr << 100, 100, 3, 4, 0, 0;
  ParameterList<float> list{dense_parameter<float>("w", v, &gr, 1)};
  CHECK(grad_norm(list) == Approx(5.0));
  clip_grad_norm(list, 1.0);
  CHECK(gr(0, 0) == 100);  // frozen rows untouched
  CHECK(gr.bottomRows(2).norm() == Approx(1.0).epsilon(1e-5));
  SparseRowGrad<float> sg(5, 2, 3);
  const float one[2] = {1, 1};
  sg.add_row(1, one);  // frozen: dropped
  sg.add_row(4, one);
  CHECK(sg.nnz_rows() == 1);
  CHECK_THROWS_WITH(sg.slot(2), Catch::Contains("frozen"));
}

TEMPLATE_TEST_CASE("sparse memory finetuning: only the experts set each step train, the rest and their Adam state stay bit-identical",
                   "[grow][freeze]", Peer<float>, Pkm<float>) {
  for (bool per_head : {false, true}) {
    CAPTURE(per_head);
    ProductKeyLayerConfig c = grow_config(6);
    c.per_head_tables = per_head;
    TestType layer(c, 4);
    layer.freeze(FrozenSet{0, true, true});  // the retrieval frozen: only expert rows may learn
    const std::vector<RowMat<float>> before = values_of(layer);
    auto g = layer.make_grads();
    const ParameterList<float> params = layer.parameters(g);
    Adam<float> adam(params, AdamConfig{1e-2, 0.9, 0.999, 1e-8, 0, true});
    TfIdfSlotRanking ranking(layer.n_experts());
    Rng rng(3);
    typename TestType::Cache cache;
    RowMat<float> x(32, 24), y(32, 24);
    for (int b = 0; b < 3; ++b) {  // background: what the layer must not forget
      fill_normal(x, 1.0, rng);
      layer.infer(x, y, cache);
      ranking.add_background(cache.retrieval.ids);
    }
    std::set<Index> trained;  // experts set trainable at some step
    for (int step = 0; step < 4; ++step) {
      fill_normal(x, 1.0, rng);
      x.array() += 0.5f;  // new data
      layer.forward(x, y, cache);
      const std::vector<Index> top = ranking.top(cache.retrieval.ids, 5);
      CHECK(top.size() == 5);
      trained.insert(top.begin(), top.end());
      layer.set_trainable_experts(g, top);
      zero_grads(params);
      layer.backward((y - x.array().sin().matrix()) / 32.f, cache, g);
      for (const auto& p : params)
        if (p.sparse_grad) {
          // Each set expert was used by this batch: its row, or the rows of the heads that used it.
          if (per_head) CHECK((p.sparse_grad->nnz_rows() >= 5 && p.sparse_grad->nnz_rows() <= 10));
          else CHECK(p.sparse_grad->nnz_rows() == 5);
          for (Index r : p.sparse_grad->rows()) CHECK(std::count(top.begin(), top.end(), r / (per_head ? 2 : 1)) == 1);
        }
      adam.step();
    }
    const std::vector<RowMat<float>> after = values_of(layer);
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      INFO(p.name);
      if (!p.sparse_grad) {
        CHECK(after[i] == before[i]);  // the frozen retrieval
        continue;
      }
      for (Index r = 0; r < p.rows; ++r) {
        const bool set = trained.count(r / (per_head ? 2 : 1)) > 0;
        if (!set) {
          CHECK(after[i].row(r) == before[i].row(r));
          CHECK(adam.first_moment(i).row(r).isZero(0));
        }
      }
    }
    CHECK_THROWS_WITH(layer.set_trainable_experts(g, {layer.n_experts()}), Catch::Contains("is outside [0, n_experts"));
    layer.clear_trainable_experts(g);
    for (const auto& p : params)
      if (p.sparse_grad) CHECK_FALSE(p.sparse_grad->filtered());
  }
}
