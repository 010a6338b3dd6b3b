// Parameter lists, optimizers and caches notice when the storage they point into is replaced
// (core/parameter.hpp, Lifetime rule; core/storage_epoch.hpp): grow, freeze, set_storage,
// assigning or destroying the layer or the Grads. Every use of a stale list is a spex::Error
// naming the parameter and what replaced it, and changes nothing; a list taken again works.
// (Mapped loads under a live optimizer: tests/test_io_reliability.cpp.)
#include <memory>

#include <spex/spex.hpp>

#include "io_util.hpp"
#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;

namespace {

// The io tests' small configs, with ids that can grow.
ProductKeyLayerConfig shells_config() {
  ProductKeyLayerConfig cfg = spex_test::io_pk_config();
  cfg.n_keys = 4;
  cfg.expert_ids = ExpertIds::shells;
  return cfg;
}

MoEConfig small_moe() { return spex_test::io_moe_config(); }

// One training step's backward into g (forward on fresh data).
template <class L>
void backward_once(L& layer, typename L::Grads& g, std::uint64_t seed) {
  const RowMat<double> x = randn_mat(7, layer.d_in(), seed), dy = randn_mat(7, layer.d_out(), seed + 1);
  RowMat<double> y(7, layer.d_out());
  typename L::Cache c;
  layer.forward(x, y, c);
  layer.backward(dy, c, g);
}

// Every value of a list, flattened, to see that a refused call changed nothing.
template <class T>
std::vector<double> values_of(const ParameterList<T>& list) {
  std::vector<double> out;
  for (const auto& p : list) {
    const auto v = spex_test::row_major_values<double>(p);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

}  // namespace

TEST_CASE("an optimizer made before grow() refuses to step, naming the parameter, and made again it trains", "[lifetime]") {
  Peer<double> layer(shells_config(), 1);
  auto g = layer.make_grads();
  Adam<double> adam(layer.parameters(g), AdamConfig{});
  Sgd<double> sgd(layer.parameters(g), SgdConfig{});
  backward_once(layer, g, 3);
  adam.step();
  layer.grow(6, 7);
  const auto before = values_of(layer.parameters());
  CHECK_THROWS_WITH(adam.step(), Catch::Contains("Adam::step: parameter 'query.weight' points into storage replaced") &&
                                     Catch::Contains("grown"));
  CHECK_THROWS_WITH(sgd.step(), Catch::Contains("Sgd::step: parameter 'query.weight'"));
  CHECK(adam.steps() == 1);  // refused before anything changed
  CHECK(values_of(layer.parameters()) == before);
  // The old lists are refused by every user of a list.
  CHECK_THROWS_WITH(zero_grads(adam.groups()[0].params), Catch::Contains("zero_grads"));
  CHECK_THROWS_WITH(grad_norm(adam.groups()[0].params), Catch::Contains("grad_norm"));
  CHECK_THROWS_WITH(clip_grad_norm(adam.groups()[0].params, 1.0), Catch::Contains("clip_grad_norm"));
  CHECK_THROWS_WITH(Adam<double>(adam.groups(), AdamConfig{}), Catch::Contains("optimizer: parameter"));
  // Made again from the grown layer, training goes on.
  auto g2 = layer.make_grads();
  Adam<double> again(layer.parameters(g2), AdamConfig{});
  backward_once(layer, g2, 5);
  CHECK_NOTHROW(again.step());
  CHECK(values_of(layer.parameters()) != before);
}

TEST_CASE("freeze and set_storage make earlier lists and caches stale", "[lifetime]") {
  Peer<double> layer(shells_config(), 1);
  auto g = layer.make_grads();
  Adam<double> adam(layer.parameters(g), AdamConfig{});
  const RowMat<double> x = randn_mat(7, 8, 1), dy = randn_mat(7, 8, 2);
  RowMat<double> y(7, 8);
  Peer<double>::Cache c;
  layer.forward(x, y, c);
  layer.freeze(FrozenSet{2, true, false});
  CHECK_THROWS_WITH(adam.step(), Catch::Contains("frozen"));
  auto g2 = layer.make_grads();
  // The cache of a pass before the freeze is refused (its results came from another layer state).
  CHECK_THROWS_WITH(layer.backward(dy, c, g2), Catch::Contains("another layer object"));

  Peer<float> f(shells_config(), 2);
  auto gf = f.make_grads();
  Adam<float> adam_f(f.parameters(gf), AdamConfig{});
  f.set_storage(TableStorage::bf16);
  CHECK_THROWS_WITH(adam_f.step(), Catch::Contains("converted (set_storage)"));
  f.set_storage(TableStorage::native);
  CHECK_THROWS(adam_f.step());  // the native tables are new ones
  f.set_storage(TableStorage::native);  // no change: nothing is replaced
  auto gf2 = f.make_grads();
  Adam<float> again(f.parameters(gf2), AdamConfig{});
  f.set_storage(TableStorage::native);
  CHECK_NOTHROW(again.step());
}

TEST_CASE("an optimizer whose Grads were destroyed or moved refuses to step instead of reading freed memory", "[lifetime]") {
  Peer<double> layer(shells_config(), 1);
  auto g = std::make_unique<Peer<double>::Grads>(layer.make_grads());
  Adam<double> adam(layer.parameters(*g), AdamConfig{});
  backward_once(layer, *g, 3);
  CHECK_NOTHROW(adam.step());
  Peer<double>::Grads moved(std::move(*g));
  CHECK_THROWS_WITH(adam.step(), Catch::Contains("Grads object was destroyed or moved"));
  g.reset();
  CHECK_THROWS_WITH(adam.step(), Catch::Contains("Grads object was destroyed or moved"));
  // A list taken from the Grads where they now live works.
  Adam<double> again(layer.parameters(moved), AdamConfig{});
  CHECK_NOTHROW(again.step());

  MoE<double> moe(small_moe(), 1);
  auto gm = std::make_unique<MoE<double>::Grads>(moe.make_grads());
  Sgd<double> sgd(moe.parameters(*gm), SgdConfig{});
  gm.reset();
  CHECK_THROWS_WITH(sgd.step(), Catch::Contains("'router.weight'") && Catch::Contains("Grads object"));
}

TEST_CASE("an optimizer over a layer that was assigned to or destroyed refuses to step", "[lifetime]") {
  auto layer = std::make_unique<MoE<double>>(small_moe(), 1);
  auto g = layer->make_grads();
  Adam<double> adam(layer->parameters(g), AdamConfig{});
  *layer = MoE<double>(small_moe(), 2);
  CHECK_THROWS_WITH(adam.step(), Catch::Contains("assigned"));
  Adam<double> again(layer->parameters(g), AdamConfig{});
  layer.reset();
  CHECK_THROWS_WITH(again.step(), Catch::Contains("'router.weight'"));

  auto peer = std::make_unique<Peer<double>>(shells_config(), 1);
  auto gp = peer->make_grads();
  Sgd<double> sgd(peer->parameters(gp), SgdConfig{});
  peer.reset();
  CHECK_THROWS(sgd.step());
}

TEST_CASE("lists built by hand track nothing and stay usable, and a layer's lists survive what keeps storage", "[lifetime]") {
  RowMat<double> w = randn_mat(3, 4, 1), gw = RowMat<double>::Ones(3, 4);
  Adam<double> adam(ParameterList<double>{dense_parameter<double>("w", w, &gw)}, AdamConfig{});
  CHECK_NOTHROW(adam.step());
  // Forward, backward, zero_grads, steps and infer keep the storage: the list stays current.
  Peer<double> layer(shells_config(), 1);
  auto g = layer.make_grads();
  const auto list = layer.parameters(g);
  Adam<double> a2(list, AdamConfig{});
  for (int s = 0; s < 3; ++s) {
    zero_grads(list);
    backward_once(layer, g, 10 + s);
    CHECK_NOTHROW(a2.step());
  }
  RowMat<double> y(4, 8);
  layer.infer(randn_mat(4, 8, 9), y);
  CHECK_NOTHROW(a2.step());
}
