// Compact expert tables in files (io/compact_tables.hpp): saved as stored and loaded back bit
// for bit (mapped in place or copied), quantized on load from a float file exactly as
// set_storage quantizes, read by float layers where the dtype allows, and every malformed
// file rejected before anything is written. And a grown layer (ExpertIds::shells): its size and
// id scheme travel in its file, and a grown, partly frozen one resumes training bit for bit.
#include <cstring>

#include <catch2/catch.hpp>
#include <spex/io/io.hpp>

#include "io_util.hpp"
#include "test_util.hpp"

using namespace spex;
using spex_test::TempDir;

namespace {

ProductKeyLayerConfig config(TableStorage s = TableStorage::native) {
  ProductKeyLayerConfig c = spex_test::io_pk_config();
  c.d_in = 20;
  c.storage = s;
  return c;
}

template <class L>
RowMat<float> probe_output(const L& layer) {
  const RowMat<float> x = spex_test::randn_mat(12, layer.d_in(), 4).template cast<float>();
  RowMat<float> y(12, layer.d_out());
  layer.infer(x, y);
  return y;
}

/// The compact rows and scales, as bytes.
std::vector<unsigned char> bytes_of(const CompactTable& t) { return spex_test::compact_bytes(t); }

template <class L>
std::vector<std::vector<unsigned char>> tables_of(L& layer) {
  std::vector<std::vector<unsigned char>> out;
  for (const auto& [name, t] : layer.compact_tables()) out.push_back(bytes_of(*t));
  return out;
}

}  // namespace

TEST_CASE("compact layers save as stored and load back bit for bit, mapped or copied", "[io][compact]") {
  TempDir dir;
  for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
    INFO(to_string(s));
    Peer<float> a(config(s), 1);
    Pkm<float> k(config(s), 2);
    const std::string path = dir.path("c.safetensors");
    SafetensorsWriter().add_layer("p.", a).add_layer("k.", k).write(path);
    {
      SafetensorsFile f(path);
      CHECK(f.at("p.experts.down").dtype == (s == TableStorage::bf16 ? DType::BF16 : DType::I8));
      CHECK((f.find("p.experts.down.scale") != nullptr) == (s == TableStorage::int8));
      CHECK(f.find("k.experts.values") != nullptr);
    }
    for (bool map : {false, true}) {
      LoadOptions o;
      o.map = map;
      LoadReport r;
      Peer<float> b = load_layer<Peer<float>>(path, "p.", o, &r);
      CHECK(b.storage() == s);
      CHECK(tables_of(b) == tables_of(a));
      CHECK(probe_output(b) == probe_output(a));
      CHECK(b.experts().compact_down().is_view() == map);
      CHECK((map ? r.mapped : r.copied).size() >= 2);
      Pkm<float> kb = load_layer<Pkm<float>>(path, "k.", o);
      CHECK(tables_of(kb) == tables_of(k));
      CHECK(probe_output(kb) == probe_output(k));
    }
    // The mapped layer survives the file being replaced and removed; conversion copies it.
    LoadOptions o;
    o.map = true;
    Peer<float> m = load_layer<Peer<float>>(path, "p.", o);
    save_layer(path, Peer<float>(config(), 9), "p.");
    ::unlink(path.c_str());
    CHECK(probe_output(m) == probe_output(a));
    m.set_storage(TableStorage::native);
    CHECK_FALSE(std::as_const(m).experts().down_table().is_view());
  }
}

TEST_CASE("quantize on load equals set_storage on the float layer, and compact files load as float", "[io][compact]") {
  TempDir dir;
  const Peer<float> f(config(), 3);
  save_layer(dir.path("f32.safetensors"), f);
  for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
    INFO(to_string(s));
    Peer<float> expect = f;
    expect.set_storage(s);
    for (bool map : {false, true}) {
      LoadOptions o;
      o.storage = s;
      o.map = map;
      Peer<float> q = load_layer<Peer<float>>(dir.path("f32.safetensors"), "", o);
      CHECK(q.storage() == s);
      CHECK(tables_of(q) == tables_of(expect));
      CHECK(probe_output(q) == probe_output(expect));
    }
    // load_into a compact layer of the same config; the file's storage need not match.
    Peer<float> into(config(s), 8);
    load_into(dir.path("f32.safetensors"), into);
    CHECK(tables_of(into) == tables_of(expect));
    // Back to float: a compact file loads as float with the values the compact layer computes with.
    save_layer(dir.path("c.safetensors"), expect);
    LoadOptions as_float;
    as_float.storage = TableStorage::native;
    Peer<float> back = load_layer<Peer<float>>(dir.path("c.safetensors"), "", as_float);
    Peer<float> expect_back = expect;
    expect_back.set_storage(TableStorage::native);
    CHECK(back.experts().down() == expect_back.experts().down());
    CHECK(probe_output(back) == probe_output(expect_back));
  }
  // A float file saved as BF16 maps in place into a bf16 layer.
  save_layer(dir.path("bf.safetensors"), f, "", DType::BF16);
  LoadOptions o;
  o.storage = TableStorage::bf16;
  o.map = true;
  LoadReport r;
  Peer<float> b = load_layer<Peer<float>>(dir.path("bf.safetensors"), "", o, &r);
  CHECK(r.mapped == std::vector<std::string>{"experts.down", "experts.up"});
  Peer<float> expect = f;
  expect.set_storage(TableStorage::bf16);
  CHECK(tables_of(b) == tables_of(expect));
  // An int8 layer from a bf16 file quantizes the bf16 values.
  o.storage = TableStorage::int8;
  Peer<float> i8 = load_layer<Peer<float>>(dir.path("bf.safetensors"), "", o);
  expect.set_storage(TableStorage::int8);
  CHECK(tables_of(i8) == tables_of(expect));
}

TEST_CASE("malformed compact files are rejected before anything is written", "[io][compact]") {
  TempDir dir;
  Peer<float> src(config(TableStorage::int8), 1);
  const auto& down = src.experts().compact_down();
  const Index n = down.rows(), d = down.cols();
  auto write = [&](std::vector<TensorSource> extra, const std::string& name) {
    SafetensorsWriter w;
    w.add(src.parameters());
    for (auto& t : extra) w.add_tensor(t);
    w.write(dir.path(name));
    return dir.path(name);
  };
  const auto& up = src.experts().compact_up();
  const TensorSource up_rows{"experts.up", DType::I8, {n, up.cols()}, up.i8(), DType::I8, up.ld()};
  const TensorSource up_scale{"experts.up.scale", DType::F32, {n}, up.scales(), DType::F32};
  const TensorSource down_rows{"experts.down", DType::I8, {n, d}, down.i8(), DType::I8, down.ld()};
  std::vector<float> bad_scale(down.scales(), down.scales() + n);
  bad_scale[3] = -1.f;
  Peer<float> target(config(TableStorage::int8), 7);
  const auto before = tables_of(target);
  auto rejects = [&](const std::string& path, const char* message) {
    CHECK_THROWS_WITH(load_into(path, target), Catch::Contains(message));
    CHECK(tables_of(target) == before);
  };
  rejects(write({up_rows, up_scale, down_rows}, "no_scale.safetensors"), "needs its scales 'experts.down.scale' as F32");
  rejects(write({up_rows, up_scale, down_rows, TensorSource{"experts.down.scale", DType::F32, {n}, bad_scale.data(), DType::F32}},
                "neg_scale.safetensors"),
          "holds the scale -1 at row 3; a scale must be in [0, FLT_MAX / 127");
  rejects(write({up_rows, up_scale, TensorSource{"experts.down", DType::I8, {n, d - 1}, down.i8(), DType::I8, down.ld()},
                 TensorSource{"experts.down.scale", DType::F32, {n}, down.scales(), DType::F32}},
                "shape.safetensors"),
          "has shape");
  rejects(write({up_rows, up_scale}, "missing.safetensors"), "missing from the file: experts.down");
  // Quantizing on load checks every value first, whatever check_finite says.
  Peer<float> f(config(), 2);
  f.experts().down()(5, 1) = std::numeric_limits<float>::infinity();
  save_layer(dir.path("inf.safetensors"), f);
  LoadOptions no_check;
  no_check.check_finite = false;
  CHECK_THROWS_WITH(load_into(dir.path("inf.safetensors"), target, "", no_check), Catch::Contains("holds a value at flat index 101 (row 5) that int8 storage cannot hold"));
  CHECK(tables_of(target) == before);
  // A float layer reads int8 tables only with their scales; LoadOptions::storage must be the layer's.
  Peer<float> native(config(), 1);
  const auto native_before = native.experts().down();
  CHECK_THROWS_WITH(load_into(dir.path("no_scale.safetensors"), native), Catch::Contains("'experts.down' is I8 and needs its scales"));
  CHECK(native.experts().down() == native_before);
  save_layer(dir.path("i8.safetensors"), src);
  LoadOptions bf;
  bf.storage = TableStorage::bf16;
  CHECK_THROWS_WITH(load_into(dir.path("i8.safetensors"), target, "", bf), Catch::Contains("LoadOptions::storage"));
}

TEST_CASE("a grown layer saves its size and id scheme and loads back equal", "[io][grow]") {
  TempDir dir;
  ProductKeyLayerConfig c = config();
  c.expert_ids = ExpertIds::shells;
  Peer<float> p(c, 1);
  p.grow(9, 4);
  save_layer(dir.path("g.safetensors"), p);
  const Peer<float> q = load_layer<Peer<float>>(dir.path("g.safetensors"));
  CHECK(q.config().n_keys == 9);
  CHECK(q.config().expert_ids == ExpertIds::shells);
  CHECK(config_to_json(q.config()) == config_to_json(p.config()));
  CHECK(probe_output(q) == probe_output(p));
  CHECK(q.experts().down() == p.experts().down());
  // A layer of the original size cannot take the grown file.
  Peer<float> small(c, 1);
  CHECK_THROWS_WITH(load_into(dir.path("g.safetensors"), small), Catch::Contains("n_keys"));
}

namespace {

// A grown, partly frozen Peer trained with Adam (MSE to a fixed map, data from `rng`).
struct GrownRun {
  Peer<float> layer;
  Peer<float>::Grads grads;
  ParameterList<float> params;
  Adam<float> adam;
  GrownRun(Peer<float> l, const AdamConfig& c)
      : layer(std::move(l)), grads(layer.make_grads()), params(layer.parameters(grads)), adam(params, c) {}
  void train(int steps, Rng& rng) {
    Peer<float>::Cache c;
    RowMat<float> x(24, 20), y(24, 20);
    for (int s = 0; s < steps; ++s) {
      fill_normal(x, 1.0, rng);
      layer.forward(x, y, c);
      const RowMat<float> dy = (y - (1.3f * x.array()).sin().matrix()) / 24.f;
      zero_grads(params);
      layer.backward(dy, c, grads);
      adam.step();
    }
  }
};

}  // namespace

TEST_CASE("a grown, partly frozen layer saves its frozen set and resumes bit for bit", "[io][grow][freeze]") {
  TempDir dir;
  ProductKeyLayerConfig c = config();
  c.expert_ids = ExpertIds::shells;
  const AdamConfig ac{1e-2, 0.9, 0.999, 1e-8, 1e-3, true};
  Peer<float> base(c, 1);
  base.freeze(FrozenSet{6, true, true});
  base.grow(8, 2);
  GrownRun straight(base, ac);
  Rng data(5);
  straight.train(3, data);
  const std::string path = dir.path("grown.safetensors");
  SafetensorsWriter().add_layer("layer.", straight.layer).add_optimizer("optim.", straight.adam).add_state("data", data).write(path);
  straight.train(3, data);

  // Resumed from the file alone: size, id scheme and frozen set come from it.
  const Peer<float> loaded = load_layer<Peer<float>>(path, "layer.");
  CHECK(loaded.config().n_keys == 8);
  CHECK(loaded.frozen().keys == 6);
  CHECK(loaded.frozen().query);
  GrownRun resumed(loaded, ac);
  Rng data2(0);
  SafetensorsLoader(path).optimizer(resumed.adam, "optim.").state(data2, "data").commit();
  resumed.train(3, data2);
  const auto a = std::as_const(straight.layer).parameters(), b = std::as_const(resumed.layer).parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i].value_map() == b[i].value_map());
  for (std::size_t i = 0; i < straight.params.size(); ++i) CHECK(straight.adam.first_moment(i) == resumed.adam.first_moment(i));
  CHECK(resumed.adam.steps() == 6);

  // Into an existing layer, the frozen set must match (it decides what training changes).
  Peer<float> unfrozen(c, 1);
  unfrozen.grow(8, 2);
  CHECK_THROWS_WITH(load_into(path, unfrozen, "layer."), Catch::Contains("frozen_keys"));
}
