// Growing a product-key layer's expert pool (ExpertIds::shells): the id scheme is a bijection
// whose ids do not depend on n, retrieval stays exact against exhaustive search after several
// growths, and every existing expert keeps its id, its table rows and its sub-key rows.
#include <set>

#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>
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
