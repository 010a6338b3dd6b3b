// Training checkpoints: N steps, save, load into fresh objects, N more steps must equal 2N
// uninterrupted steps bit for bit, for every layer kind and both optimizers; a checkpoint that
// does not fit is rejected with nothing changed.
#include <catch2/catch.hpp>
#include <spex/io/io.hpp>
#include <spex/spex.hpp>

#include "io_util.hpp"

using namespace spex;
using spex_test::TempDir;

namespace {

using ReMoEf = MoE<float, ReluRouter<float>>;
using TopKf = MoE<float, TopKRouter<float>>;

template <class L, bool kDeepSeek = false>
typename L::Config config() {
  if constexpr (std::is_same<typename L::Config, ProductKeyLayerConfig>::value) {
    return spex_test::io_pk_config();
  } else {
    MoEConfig c = spex_test::io_moe_config();
    if (kDeepSeek) {  // sigmoid scores, a selection bias moved every step, groups, gated shared experts
      c.score = ScoreFn::sigmoid;
      c.renormalize = true;
      c.route_scale = 1.5;
      c.expert_bias = true;
      c.n_groups = 2;
      c.group_topk = 1;
      c.shared_experts = 1;
      c.shared_hidden = 4;
      c.shared_gate = true;
    }
    return c;
  }
}

template <class Opt>
Opt make_optimizer(const ParameterList<float>& params) {
  if constexpr (std::is_same<Opt, Adam<float>>::value) {
    AdamConfig c;
    c.lr = 1e-2;
    c.weight_decay = 1e-3;
    return Opt(params, c);
  } else {
    SgdConfig c;
    c.lr = 1e-2;
    c.momentum = 0.9;
    c.weight_decay = 1e-3;
    return Opt(params, c);
  }
}

// A layer learning a fixed random map by MSE, fed by its own data RNG: everything a run's
// future depends on is in the layer, the optimizer, the lambda controller and the RNG.
template <class L, class Opt, bool kDeepSeek = false>
struct Run {
  L layer;
  typename L::Grads grads;
  ParameterList<float> params;
  Opt opt;
  LambdaController ctl;
  Rng data;
  typename L::Cache cache;
  RowMat<float> x, y, target, dy;
  static constexpr bool kReMoE = std::is_same<L, ReMoEf>::value;

  explicit Run(std::uint64_t seed)
      : layer(config<L, kDeepSeek>(), seed), grads(layer.make_grads()), params(layer.parameters(grads)),
        opt(make_optimizer<Opt>(params)),
        ctl(LambdaController::for_small_batches(0.5, 0.8, 0.05, 1e-4)),  // its moving average must resume too
        data(seed + 1000) {}

  double step() {
    const Index b = 24, d = 8;
    x.resize(b, d);
    fill_normal(x, 1.0, data);
    target = (x.array() * 1.7).sin().matrix();
    y.resize(b, d);
    if constexpr (kReMoE) layer.set_lambda(ctl.lambda());
    layer.forward(x, y, cache);
    dy = (y - target) / float(b);
    zero_grads(params);
    layer.backward(dy, cache, grads);
    opt.step();
    if constexpr (kReMoE) ctl.update(layer.stats(cache).sparsity);
    if constexpr (kDeepSeek) layer.update_expert_bias(layer.expert_load(cache), 0.01);
    return (y - target).squaredNorm();
  }

  void save(const std::string& path, long step) const {
    SafetensorsWriter()
        .add_layer("layer.", layer)
        .add_optimizer("optim.", opt)
        .add_state("lambda", ctl)
        .add_state("data.rng", data)
        .set_metadata("data.step", std::to_string(step))
        .write(path);
  }
  long load(const std::string& path) {
    SafetensorsLoader ld(path);
    ld.layer(layer, "layer.").optimizer(opt, "optim.").state(ctl, "lambda").state(data, "data.rng");
    const long step = std::stol(ld.metadata("data.step"));
    ld.commit();
    return step;
  }
  std::vector<std::vector<float>> values() const {
    std::vector<std::vector<float>> out;
    for (const auto& p : std::as_const(layer).parameters()) out.push_back(spex_test::row_major_values<float>(p));
    for (const auto& p : opt.state()) out.emplace_back(p.value, p.value + p.size());
    return out;
  }
};

// A run of 2n steps against one saved after n steps and resumed; with `threads`, the two
// halves of the interrupted run use that many threads each (results never depend on them).
template <class L, class Opt, bool kDeepSeek = false>
void check_resume(std::pair<int, int> threads = {0, 0}) {
  TempDir dir;
  const int n = 12, threads_before = max_threads();
  Run<L, Opt, kDeepSeek> straight(7);
  std::vector<double> losses;
  for (int i = 0; i < 2 * n; ++i) losses.push_back(straight.step());

  if (threads.first > 0) set_num_threads(threads.first);
  Run<L, Opt, kDeepSeek> first(7);
  for (int i = 0; i < n; ++i) REQUIRE(first.step() == losses[i]);
  first.save(dir.path("ckpt.safetensors"), n);

  if (threads.second > 0) set_num_threads(threads.second);
  Run<L, Opt, kDeepSeek> resumed(12345);  // other weights, other data stream: all replaced by the load
  REQUIRE(resumed.load(dir.path("ckpt.safetensors")) == n);
  for (int i = n; i < 2 * n; ++i) REQUIRE(resumed.step() == losses[i]);
  CHECK(resumed.values() == straight.values());
  if constexpr (Run<L, Opt, kDeepSeek>::kReMoE) {
    CHECK(resumed.ctl.lambda() == straight.ctl.lambda());
    CHECK(resumed.ctl.steps() == 2 * n);
  }
  if constexpr (std::is_same<Opt, Adam<float>>::value) CHECK(resumed.opt.steps() == 2 * n);
  set_num_threads(threads_before);
}

}  // namespace

TEMPLATE_TEST_CASE("a resumed run equals an uninterrupted one bit for bit (Adam)", "[io][checkpoint]", Peer<float>, Pkm<float>,
                   ReMoEf, TopKf) {
  check_resume<TestType, Adam<float>>();
}

TEST_CASE("a resumed run with DeepSeek-V3 routing (its selection bias moved every step, gated shared experts) equals an uninterrupted one bit for bit",
          "[io][checkpoint]") {
  check_resume<TopKf, Adam<float>, true>();
  check_resume<TopKf, Adam<float>, true>({2, 1});
}

TEMPLATE_TEST_CASE("a run saved with 1 thread and resumed with 2 (and back) equals an uninterrupted one bit for bit",
                   "[io][checkpoint][determinism]", Peer<float>, Pkm<float>, ReMoEf, TopKf) {
  check_resume<TestType, Adam<float>>({1, 2});
  check_resume<TestType, Adam<float>>({2, 1});
}

TEMPLATE_TEST_CASE("a resumed run equals an uninterrupted one bit for bit (SGD with momentum)", "[io][checkpoint]", Peer<float>,
                   Pkm<float>, ReMoEf, TopKf) {
  check_resume<TestType, Sgd<float>>();
}

TEST_CASE("a checkpoint that does not fit is rejected and changes nothing", "[io][checkpoint]") {
  TempDir dir;
  Run<ReMoEf, Adam<float>> a(1);
  for (int i = 0; i < 3; ++i) a.step();
  a.save(dir.path("a.safetensors"), 3);

  Run<ReMoEf, Adam<float>> b(2);
  b.step();
  const auto before = b.values();
  const auto lambda = b.ctl.lambda();
  const long steps = b.opt.steps();
  const auto unchanged = [&] {
    CHECK(b.values() == before);
    CHECK(b.ctl.lambda() == lambda);
    CHECK(b.opt.steps() == steps);
  };
  {  // every part valid but one: staged parts are not written
    SafetensorsLoader ld(dir.path("a.safetensors"));
    ld.layer(b.layer, "layer.").optimizer(b.opt, "optim.");
    CHECK_THROWS_WITH(ld.state(b.ctl, "data.rng"), Catch::Contains("holds Rng, not LambdaController"));
  }
  unchanged();
  {  // the state of an Adam into an SGD
    Run<ReMoEf, Sgd<float>> s(3);
    SafetensorsLoader ld(dir.path("a.safetensors"));
    CHECK_THROWS_WITH(ld.optimizer(s.opt, "optim."), Catch::Contains("state of a Adam optimizer, not Sgd"));
  }
  {  // a lambda controller state out of range
    SafetensorsWriter w;
    w.set_metadata("lambda", R"({"kind": "LambdaController", "lambda": -1, "alpha": 1.2, "target": 0.5, "min_lambda": 1e-12,
      "max_lambda": 100, "steps": 1, "steps_at_min": 0, "steps_at_max": 0, "consecutive_at_bound": 0})");
    w.write(dir.path("bad.safetensors"));
    SafetensorsLoader ld(dir.path("bad.safetensors"));
    CHECK_THROWS_WITH(ld.state(b.ctl, "lambda"), Catch::Contains("lambda = -1"));
  }
  {  // a state written before the smoothed rule existed: the sign rule
    SafetensorsWriter w;
    w.set_metadata("lambda", R"({"kind": "LambdaController", "lambda": 0.25, "alpha": 1.2, "target": 0.5, "min_lambda": 1e-12,
      "max_lambda": 100, "steps": 1, "steps_at_min": 0, "steps_at_max": 0, "consecutive_at_bound": 0})");
    w.write(dir.path("old.safetensors"));
    LambdaController c = LambdaController::for_small_batches(0.5);
    SafetensorsLoader ld(dir.path("old.safetensors"));
    ld.state(c, "lambda").commit();
    CHECK(c.rule() == LambdaRule::sign);
    CHECK(c.lambda() == 0.25);
  }
  {
    SafetensorsWriter w;
    w.set_metadata("lambda", R"({"kind": "LambdaController", "lambda": 0.25, "alpha": 1.2, "target": 0.5, "min_lambda": 1e-12,
      "max_lambda": 100, "steps": 1, "steps_at_min": 0, "steps_at_max": 0, "consecutive_at_bound": 0, "rule": "wobbly",
      "smoothing": 0.5, "band": 0.05, "average": -1})");
    w.write(dir.path("bad.safetensors"));
    SafetensorsLoader ld(dir.path("bad.safetensors"));
    CHECK_THROWS_WITH(ld.state(b.ctl, "lambda"), Catch::Contains("'rule' = 'wobbly'"));
    CHECK_THROWS_WITH(ld.state(b.data, "nothing"), Catch::Contains("no metadata 'nothing'"));
  }
  {  // optimizer state for other parameters (another layer config)
    Run<TopKf, Adam<float>> t(4);
    t.save(dir.path("t.safetensors"), 1);
    SafetensorsLoader ld(dir.path("t.safetensors"));
    CHECK_THROWS_WITH(ld.layer(b.layer, "layer."), Catch::Contains("kind 'TopKMoE', not ReMoE"));
  }
  unchanged();
}
