// Layers in and out of safetensors files: strict and non-strict loads (all-or-nothing), dtype
// conversion, every layer kind built from its file alone, memory-mapped expert tables, and the
// metadata's version rules.
#include <catch2/catch.hpp>
#include <fstream>
#include <iterator>
#include <limits>
#include <utility>
#include <spex/io/io.hpp>
#include <spex/spex.hpp>

#include "io_util.hpp"
#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;
using spex_test::TempDir;

namespace {

using ReMoEf = MoE<float, ReluRouter<float>>;
using TopKf = MoE<float, TopKRouter<float>>;

ProductKeyLayerConfig pk_config() { return spex_test::io_pk_config(); }
MoEConfig moe_config() { return spex_test::io_moe_config(); }

// Every value of every parameter, in list order.
template <class L>
std::vector<std::vector<double>> values_of(const L& layer) {
  std::vector<std::vector<double>> out;
  for (const auto& p : layer.parameters()) out.push_back(spex_test::row_major_values<double>(p));
  return out;
}

template <class L>
RowMat<typename L::Scalar> infer(const L& layer, std::uint64_t seed = 3) {
  using T = typename L::Scalar;
  const RowMat<T> x = randn_mat(10, layer.d_in(), seed).template cast<T>();
  RowMat<T> y(10, layer.d_out());
  layer.infer(x, y);
  return y;
}

template <class L>
void check_round_trip(const L& a, L b, const TempDir& dir) {
  const std::string path = dir.path("layer.safetensors");
  save_layer(path, a, "block.");
  CHECK(values_of(b) != values_of(a));
  // Into an existing layer of the same config.
  const LoadReport r = load_into(path, b, "block.");
  CHECK(r.missing.empty());
  CHECK(r.copied.size() == a.parameters().size());
  CHECK(values_of(b) == values_of(a));
  CHECK(infer(b) == infer(a));
  // Built from the file alone.
  const L c = load_layer<L>(path, "block.");
  CHECK(config_to_json(c.config()) == config_to_json(a.config()));
  CHECK(values_of(c) == values_of(a));
  CHECK(infer(c) == infer(a));
}

}  // namespace

TEST_CASE("every layer kind: save, load into a layer and build from the file give identical outputs", "[io]") {
  TempDir dir;
  SECTION("Peer") { check_round_trip(Peer<float>(pk_config(), 1), Peer<float>(pk_config(), 2), dir); }
  SECTION("Peer double, per-head keys, sigmoid, layer norm") {
    ProductKeyLayerConfig cfg = pk_config();
    cfg.shared_keys = false;
    cfg.score = ScoreFn::sigmoid;
    cfg.norm = NormKind::layer;
    cfg.activation = kernels::Activation::silu;
    check_round_trip(Peer<double>(cfg, 1), Peer<double>(cfg, 2), dir);
  }
  SECTION("Pkm") { check_round_trip(Pkm<float>(pk_config(), 1), Pkm<float>(pk_config(), 2), dir); }
  SECTION("Peer and Pkm with an input RMSNorm and per-head tables, Peer with GLU experts") {
    ProductKeyLayerConfig cfg = pk_config();
    cfg.input_rmsnorm = cfg.per_head_tables = cfg.glu = true;
    Peer<float> a(cfg, 1);
    a.input_norm().gamma().setConstant(0.25f);  // not the initial zeros
    check_round_trip(a, Peer<float>(cfg, 2), dir);
    cfg.glu = false;
    check_round_trip(Pkm<float>(cfg, 1), Pkm<float>(cfg, 2), dir);
  }
  SECTION("Pkm with Memory+'s output head: SiLU-gated projection from d_value 5, sigmoid gate") {
    ProductKeyLayerConfig cfg = pk_config();
    cfg.silu_output = cfg.sigmoid_gate = true;
    cfg.d_value = 5;
    check_round_trip(Pkm<float>(cfg, 1), Pkm<float>(cfg, 2), dir);
  }
  SECTION("ReMoE, with its lambda") {
    ReMoEf a(moe_config(), 1);
    a.set_lambda(0.125);
    check_round_trip(a, ReMoEf(moe_config(), 2), dir);
    CHECK(load_layer<ReMoEf>(dir.path("layer.safetensors"), "block.").lambda() == 0.125);
  }
  SECTION("TopK MoE, GELU experts, granularity 2") {
    MoEConfig cfg = moe_config();
    cfg.ffn = FfnKind::gelu;
    cfg.granularity = 2;
    check_round_trip(TopKf(cfg, 1), TopKf(cfg, 2), dir);
  }
  SECTION("TopK MoE, DeepSeek-V3 routing: its selection bias and gated shared experts") {
    MoEConfig cfg = moe_config();
    cfg.score = ScoreFn::sigmoid;
    cfg.expert_bias = true;
    cfg.n_groups = 2;
    cfg.group_topk = 1;
    cfg.shared_experts = 2;
    cfg.shared_gate = true;
    TopKf a(cfg, 1);
    a.router().expert_bias() = randn_mat(cfg.n_experts, 1, 4).cast<float>();  // changes the selection
    check_round_trip(a, TopKf(cfg, 2), dir);
    CHECK(load_layer<TopKf>(dir.path("layer.safetensors"), "block.").router().expert_bias() == a.router().expert_bias());
  }
}

TEST_CASE("BatchNorm running statistics are saved and restored with the weights", "[io]") {
  TempDir dir;
  Peer<float> a(pk_config(), 1);
  Peer<float>::Cache c;
  RowMat<float> x = randn_mat(16, 8, 5).cast<float>(), y(16, 8);
  for (int i = 0; i < 3; ++i) a.forward(x, y, c);  // moves the running statistics
  save_layer(dir.path("bn.safetensors"), a);
  const auto b = load_layer<Peer<float>>(dir.path("bn.safetensors"));
  CHECK(parameter(b.parameters(), "norm.running_mean").value_map() == parameter(a.parameters(), "norm.running_mean").value_map());
  CHECK(parameter(b.parameters(), "norm.running_var").value_map() == parameter(a.parameters(), "norm.running_var").value_map());
  CHECK(infer(b) == infer(a));
}

TEST_CASE("a strict load lists every problem in one error and writes nothing", "[io]") {
  TempDir dir;
  const Peer<float> a(pk_config(), 1);
  Peer<float> b(pk_config(), 2);
  const auto before = values_of(b);
  const auto params = a.parameters();
  RowMat<float> wrong(3, 3);
  wrong.setZero();
  SafetensorsWriter w;
  for (const auto& p : params)
    if (p.name != "keys.c2" && p.name != "query.weight") w.add(ParameterList<const float>{p});
  w.add_tensor({"query.weight", DType::F32, {3, 3}, wrong.data(), DType::F32});
  w.add_tensor({"extra.weight", DType::F32, {3, 3}, wrong.data(), DType::F32});
  w.write(dir.path("bad.safetensors"));

  CHECK_THROWS_WITH(load_into(dir.path("bad.safetensors"), b),
                    Catch::Contains("missing from the file: keys.c2") && Catch::Contains("not in the layer: extra.weight") &&
                        Catch::Contains("'query.weight' has shape [3, 3], the parameter is 8 x 8"));
  CHECK(values_of(b) == before);

  // Non-strict: loads what matches and reports the rest; a shape mismatch stays an error.
  LoadOptions lenient;
  lenient.strict = false;
  CHECK_THROWS_WITH(load_into(dir.path("bad.safetensors"), b, "", lenient), Catch::Contains("query.weight"));
  CHECK(values_of(b) == before);
  SafetensorsWriter w2;
  for (const auto& p : params)
    if (p.name != "keys.c2") w2.add(ParameterList<const float>{p});
  w2.add_tensor({"extra.weight", DType::F32, {3, 3}, wrong.data(), DType::F32});
  w2.write(dir.path("partial.safetensors"));
  const LoadReport r = load_into(dir.path("partial.safetensors"), b, "", lenient);
  CHECK(r.missing == std::vector<std::string>{"keys.c2"});
  CHECK(r.unexpected == std::vector<std::string>{"extra.weight"});
  CHECK(parameter(b.parameters(), "keys.c1").value_map() == parameter(params, "keys.c1").value_map());
  CHECK(parameter(b.parameters(), "keys.c2").value_map() != parameter(params, "keys.c2").value_map());
  // load_layer needs every parameter even when lenient.
  save_layer(dir.path("full.safetensors"), a);
  CHECK_NOTHROW(load_layer<Peer<float>>(dir.path("full.safetensors"), "", lenient));
}

TEST_CASE("non-finite values in a file are an error naming the tensor, nothing is written", "[io]") {
  TempDir dir;
  Peer<double> a(pk_config(), 1);
  Peer<float> b(pk_config(), 2);
  const auto before = values_of(b);
  a.parameters()[0].value[5] = std::numeric_limits<double>::quiet_NaN();
  save_layer(dir.path("nan.safetensors"), a);
  // (a Peer<double> file into a Peer<float>: the kinds match, the dtype converts)
  CHECK_THROWS_WITH(load_into(dir.path("nan.safetensors"), b), Catch::Contains("'query.weight' holds a non-finite value at flat index 5"));
  CHECK(values_of(b) == before);
  // A finite double beyond float's range becomes Inf on conversion: also an error.
  a.parameters()[0].value[5] = 1e300;
  save_layer(dir.path("big.safetensors"), a);
  CHECK_THROWS_WITH(load_into(dir.path("big.safetensors"), b), Catch::Contains("after conversion from F64"));
  // Even unchecked: check_finite spares the file's values, never an overflow the conversion makes.
  LoadOptions unchecked;
  unchecked.check_finite = false;
  CHECK_THROWS_WITH(load_into(dir.path("big.safetensors"), b, "", unchecked),
                    Catch::Contains("'query.weight' holds a finite F64 value at flat index 5 beyond the range"));
  CHECK(values_of(b) == before);
}

TEST_CASE("stored as F64, F16 or BF16, weights load into float layers rounded to nearest even", "[io]") {
  TempDir dir;
  const Peer<double> a(pk_config(), 1);
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16}) {
    INFO(to_string(t));
    save_layer(dir.path("t.safetensors"), a, "", t);
    SafetensorsFile f(dir.path("t.safetensors"));
    CHECK(f.at("experts.down").dtype == t);
    const auto b = load_layer<Peer<float>>(f);
    const auto pa = a.parameters();
    const auto pb = b.parameters();
    for (std::size_t i = 0; i < pa.size(); ++i)
      for (Index j = 0; j < pa[i].size(); ++j) {
        const double v = pa[i].row(j / pa[i].cols)[j % pa[i].cols];
        const double expect = t == DType::F16 ? from_f16(to_f16(v)) : t == DType::BF16 ? from_bf16(to_bf16(v)) : double(float(v));
        REQUIRE(double(pb[i].row(j / pb[i].cols)[j % pb[i].cols]) == float(expect));
      }
  }
}

TEST_CASE("load_into rejects a file whose layer config differs, naming the fields", "[io]") {
  TempDir dir;
  ProductKeyLayerConfig cfg = pk_config();
  save_layer(dir.path("p.safetensors"), Peer<float>(cfg, 1));
  cfg.activation = kernels::Activation::relu;  // same shapes, different function
  Peer<float> b(cfg, 2);
  const auto before = values_of(b);
  CHECK_THROWS_WITH(load_into(dir.path("p.safetensors"), b), Catch::Contains("activation: file \"gelu_erf\", layer \"relu\""));
  CHECK(values_of(b) == before);
  cfg.activation = kernels::Activation::gelu_erf;
  cfg.check_finite = false;  // a run-time choice, not the model: may differ
  Peer<float> c(cfg, 2);
  CHECK_NOTHROW(load_into(dir.path("p.safetensors"), c));
  CHECK_THROWS_WITH(load_layer<Pkm<float>>(dir.path("p.safetensors")), Catch::Contains("kind 'Peer', not Pkm"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(dir.path("p.safetensors"), "block."), Catch::Contains("layers at ''"));
}

TEST_CASE("several layers in one file, each built from its prefix", "[io]") {
  TempDir dir;
  const Peer<float> p(pk_config(), 1);
  const Pkm<float> k(pk_config(), 2);
  const TopKf m(moe_config(), 3);
  SafetensorsWriter().add_layer("b0.", p).add_layer("b1.", k).add_layer("b2.", m).set_metadata("note", "x").write(dir.path("m.safetensors"));
  SafetensorsFile f(dir.path("m.safetensors"));
  CHECK(infer(load_layer<Peer<float>>(f, "b0.")) == infer(p));
  CHECK(infer(load_layer<Pkm<float>>(f, "b1.")) == infer(k));
  CHECK(infer(load_layer<TopKf>(f, "b2.")) == infer(m));
  CHECK_THROWS_WITH(load_layer<TopKf>(f, "b1."), Catch::Contains("kind 'Pkm'"));
}

TEST_CASE("mapped loading reads expert tables in place, training copies them once, side by side", "[io]") {
  TempDir dir;
  const std::string path = dir.path("peer.safetensors");
  const Peer<float> a(pk_config(), 1);
  save_layer(path, a);
  LoadOptions mapped;
  mapped.map = true;
  LoadReport r;
  Peer<float> b = load_layer<Peer<float>>(path, "", mapped, &r);
  CHECK(r.mapped == std::vector<std::string>{"experts.down", "experts.up"});
  REQUIRE(std::as_const(b).experts().down_table().is_view());
  CHECK(std::as_const(b).experts().down_table().ld() == b.experts().d_in());  // the file's layout: tables apart
  {
    SafetensorsFile f(path);  // the same pages: the table points into the file's data
    const auto* first = reinterpret_cast<const float*>(f.data(f.at("experts.down")));
    CHECK(std::equal(first, first + a.experts().down().size(), std::as_const(b).experts().down().data()));
  }
  const RowMat<float> y = infer(a);
  CHECK(infer(b) == y);
  // Replacing the file (save writes a new file and renames it) leaves the mapped layer intact.
  save_layer(path, Peer<float>(pk_config(), 9));
  ::unlink(path.c_str());
  CHECK(infer(b) == y);
  // A copy of the layer shares the view; writable access copies the table into owned memory.
  Peer<float> c = b;
  auto params = b.parameters();
  CHECK_FALSE(std::as_const(b).experts().down_table().is_view());
  CHECK_FALSE(std::as_const(b).experts().up_table().is_view());
  CHECK(std::as_const(b).experts().up().data() == std::as_const(b).experts().down().data() + b.experts().d_in());  // side by side
  CHECK(std::as_const(c).experts().down_table().is_view());
  CHECK(infer(b) == y);
  CHECK(infer(c) == y);
  // PKM too; a BF16 file cannot be mapped into a float layer: it is converted.
  save_layer(dir.path("pkm.safetensors"), Pkm<float>(pk_config(), 4));
  Pkm<float> k = load_layer<Pkm<float>>(dir.path("pkm.safetensors"), "", mapped);
  CHECK(std::as_const(k).experts().values_table().is_view());
  save_layer(dir.path("bf.safetensors"), Pkm<float>(pk_config(), 4), "", DType::BF16);
  load_layer<Pkm<float>>(dir.path("bf.safetensors"), "", mapped, &r);
  CHECK(r.mapped.empty());
}

TEST_CASE("tensors that do not fit a layer name the config field that would explain them, and strict = false is suggested only where it is safe", "[io]") {
  TempDir dir;
  // The tensors of one config under the metadata of another (hand-made exports do this).
  const auto write = [&](const auto& tensors_of, const auto& config_of) {
    const std::string doc = nlohmann::json{{"format", "spex"}, {"version", {1, kFormatMinor}}, {"layers", {{"", layer_entry(config_of)}}}}.dump();
    write_safetensors(dir.path("m.safetensors"), tensor_sources(tensors_of.parameters()), {{"spex", doc}});
    return dir.path("m.safetensors");
  };
  ProductKeyLayerConfig per_head = pk_config();
  per_head.shared_keys = false;
  const Peer<float> heads(per_head, 1), shared(pk_config(), 1);
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(heads, shared)),
                    Catch::Contains("config field 'shared_keys': the file's tensors are those of false") &&
                        Catch::Contains("the layer has true") && !Catch::Contains("strict = false"));
  ProductKeyLayerConfig no_norm = pk_config();
  no_norm.norm = NormKind::none;
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(Peer<float>(no_norm, 1), shared)),
                    Catch::Contains("config field 'norm': the file's tensors are those of none") && Catch::Contains("the layer has batch"));
  ProductKeyLayerConfig bias = pk_config();
  bias.query_bias = true;
  // One tensor too many: skipping it is safe, so strict = false is suggested, with the field.
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(Peer<float>(bias, 1), shared)),
                    Catch::Contains("1 problem loading") && Catch::Contains("0 missing, 1 unexpected") &&
                        Catch::Contains("config field 'query_bias'") && Catch::Contains("strict = false skips"));
  ProductKeyLayerConfig tables = pk_config();
  tables.per_head_tables = true;
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(Peer<float>(tables, 1), shared)),
                    Catch::Contains("config field 'per_head_tables': the file's tensors are those of true") &&
                        Catch::Contains("the layer has false"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(shared, Peer<float>(tables, 1))),
                    Catch::Contains("config field 'per_head_tables': the file's tensors are those of false"));
  ProductKeyLayerConfig extras = pk_config();
  extras.input_rmsnorm = extras.glu = true;
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(Peer<float>(extras, 1), shared)),
                    Catch::Contains("config field 'input_rmsnorm'") && Catch::Contains("config field 'glu'"));
  ProductKeyLayerConfig head = pk_config();
  head.silu_output = head.sigmoid_gate = true;
  CHECK_THROWS_WITH(load_layer<Pkm<float>>(write(Pkm<float>(head, 1), Pkm<float>(pk_config(), 1))),
                    Catch::Contains("config field 'silu_output'") && Catch::Contains("config field 'sigmoid_gate'"));
  MoEConfig gated = moe_config();
  gated.shared_experts = 1;
  gated.shared_gate = true;
  MoEConfig plain = moe_config();
  plain.shared_experts = 1;
  CHECK_THROWS_WITH(load_layer<TopKf>(write(TopKf(gated, 1), TopKf(plain, 1))), Catch::Contains("config field 'shared_gate'"));
}

TEST_CASE("metadata versions: other majors are rejected, newer minors may add fields, unknown fields are errors otherwise", "[io]") {
  TempDir dir;
  const Peer<float> a(pk_config(), 1);
  const auto params = a.parameters();
  const auto write = [&](const std::string& doc) {
    write_safetensors(dir.path("v.safetensors"), tensor_sources(params), {{"spex", doc}});
    return dir.path("v.safetensors");
  };
  nlohmann::json entry = layer_entry(a);
  const auto doc = [&](int major, int minor, const nlohmann::json& e) {
    return nlohmann::json{{"format", "spex"}, {"version", {major, minor}}, {"layers", {{"", e}}}}.dump();
  };
  CHECK(infer(load_layer<Peer<float>>(write(doc(1, 0, entry)))) == infer(a));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(doc(2, 0, entry))), Catch::Contains("format 2.0") && Catch::Contains("reads format 1.x"));
  nlohmann::json future = entry;
  future["config"]["expert_dropout"] = 0.1;
  future["hint"] = "x";
  CHECK_NOTHROW(load_layer<Peer<float>>(write(doc(1, kFormatMinor + 1, future))));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(doc(1, kFormatMinor, future))), Catch::Contains("unknown"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(doc(1, 0, future))), Catch::Contains("unknown"));
  // learn_keys came with 1.1: absent in a 1.0 file it reads as true (those layers trained their
  // sub-keys); absent in a 1.1 file it takes the default (false).
  nlohmann::json old_entry = entry;
  old_entry["config"].erase("learn_keys");
  CHECK(load_layer<Peer<float>>(write(doc(1, 0, old_entry))).config().learn_keys);
  CHECK_FALSE(load_layer<Peer<float>>(write(doc(1, 1, old_entry))).config().learn_keys);
  // Likewise MoE's penalty: 1.0's default was l1_lb, 1.1's is l1_lb_spare_top.
  const ReMoEf m(moe_config(), 3);
  const auto mparams = m.parameters();
  nlohmann::json moe_entry = layer_entry(m);
  moe_entry["config"].erase("penalty");
  const auto write_moe = [&](int minor) {
    const std::string d = nlohmann::json{{"format", "spex"}, {"version", {1, minor}}, {"layers", {{"", moe_entry}}}}.dump();
    write_safetensors(dir.path("m.safetensors"), tensor_sources(mparams), {{"spex", d}});
    return dir.path("m.safetensors");
  };
  CHECK(load_layer<ReMoEf>(write_moe(0)).config().penalty == Penalty::l1_lb);
  CHECK(load_layer<ReMoEf>(write_moe(1)).config().penalty == Penalty::l1_lb_spare_top);
  nlohmann::json partial = entry;
  partial["config"].erase("norm_momentum");  // absent: the default
  partial["config"].erase("n_keys");          // n_experts alone determines n
  CHECK(load_layer<Peer<float>>(write(doc(1, 0, partial))).config().norm_momentum == ProductKeyLayerConfig().norm_momentum);
  nlohmann::json bad = entry;
  bad["config"]["score"] = "softermax";
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(doc(1, 0, bad))), Catch::Contains("'score' = \"softermax\" is not one of \"softmax\", \"sigmoid\", \"relu\""));
  bad = entry;
  bad["config"]["heads"] = "8";
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(doc(1, 0, bad))), Catch::Contains("'heads' = \"8\" is not an integer"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write("{\"format\": \"other\"}")), Catch::Contains("not a spex document"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write("{oops")), Catch::Contains("not valid JSON"));
  // Values of unexpected JSON types anywhere are spex::Errors too (found by fuzzing: "format": {}).
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(R"({"format": {}, "version": [1, 0]})")), Catch::Contains("not a spex document"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(R"({"format": "spex", "version": [1, 0], "layers": {"": {"kind": [], "config": 1}}})")),
                    Catch::Contains("kind '', not Peer"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(R"({"format": "spex", "version": [1, 0], "layers": {"": {"kind": "Peer", "config": []}}})")),
                    Catch::Contains("config is not an object"));
  bad = entry;
  bad["config"]["top_k"] = 0;  // the layer's own validation names the field
  CHECK_THROWS_WITH(load_layer<Peer<float>>(write(doc(1, 0, bad))), Catch::Contains("top_k"));
}

TEST_CASE("a config larger than the file's tensors is rejected before the layer is allocated", "[io]") {
  TempDir dir;
  const Peer<float> a(pk_config(), 1);
  nlohmann::json entry = layer_entry(a);
  entry["config"]["n_keys"] = 40000;  // 1.6e9 experts: 100 GB of tables, from a 3 KB file
  entry["config"]["n_experts"] = 0;
  write_safetensors(dir.path("bomb.safetensors"), tensor_sources(a.parameters()),
                    {{"spex", nlohmann::json{{"format", "spex"}, {"version", {1, 0}}, {"layers", {{"", entry}}}}.dump()}});
  CHECK_THROWS_WITH(load_layer<Peer<float>>(dir.path("bomb.safetensors")), Catch::Contains("the config describes parameters of"));
  // The same image from memory.
  std::ifstream in(dir.path("bomb.safetensors"), std::ios::binary);
  auto bytes = std::make_shared<std::vector<unsigned char>>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  const SafetensorsFile f = SafetensorsFile::from_memory(bytes, "bomb in memory");
  CHECK_THROWS_WITH(load_layer<Peer<float>>(f), Catch::Contains("bomb in memory"));
}

TEST_CASE("layers reading one value pool: saved once beside them, loaded into pooled layers", "[io]") {
  TempDir dir;
  ProductKeyLayerConfig cfg = pk_config();
  cfg.silu_output = true;
  auto pool = std::make_shared<ValuePool<float>>(36, 8, 1);
  const Pkm<float> a(cfg, pool, 1), b(cfg, pool, 2);
  const std::string path = dir.path("memories.safetensors");
  SafetensorsWriter().add_layer("layers.0.", a).add_layer("layers.3.", b).add(static_cast<const ValuePool<float>&>(*pool).parameters("pool.")).write(path);
  // The table once: the layers' files hold no values.
  const SafetensorsFile f(path);
  CHECK(f.find("pool.experts.values") != nullptr);
  CHECK(f.find("layers.0.experts.values") == nullptr);
  auto pool2 = std::make_shared<ValuePool<float>>(36, 8, 9);
  Pkm<float> a2(cfg, pool2, 7), b2(cfg, pool2, 8);
  SafetensorsLoader loader(path);
  loader.layer(a2, "layers.0.").layer(b2, "layers.3.").parameters(pool2->parameters("pool."), "pool.");
  loader.commit();
  CHECK(infer(a2) == infer(a));
  CHECK(infer(b2) == infer(b));
  // load_layer cannot build a pooled layer alone, and says how to load it.
  CHECK_THROWS_WITH(load_layer<Pkm<float>>(path, "layers.0."), Catch::Contains("Pkm(cfg, pool, seed)"));
}
