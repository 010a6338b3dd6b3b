// The io surfaces under a user who saves, loads, maps and quantizes models with a live
// optimizer and hostile files: mapped loads never free what an optimizer uses, loads are
// all-or-nothing whatever part fails, conversions never make infinities, configs cannot make a
// loader allocate what the file does not hold, saved files keep their owner's privacy, and names
// from files never reach a terminal raw.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cfloat>
#include <limits>
#include <spex/io/io.hpp>
#include <spex/spex.hpp>

#include "io_util.hpp"
#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;
using spex_test::TempDir;

namespace {

LoadOptions lenient() {
  LoadOptions o;
  o.strict = false;
  return o;
}

ProductKeyLayerConfig stored_pk_config(TableStorage s = TableStorage::native) {
  ProductKeyLayerConfig c = spex_test::io_pk_config();
  c.storage = s;
  return c;
}

// Every value a layer holds (parameters and compact tables), as bytes.
template <class L>
std::vector<unsigned char> bytes_of(const L& layer) {
  std::vector<unsigned char> out;
  auto add = [&](const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    out.insert(out.end(), c, c + n);
  };
  for (const auto& p : layer.parameters())
    for (Index r = 0; r < p.rows; ++r) add(p.row(r), sizeof(*p.value) * std::size_t(p.cols));
  for (const auto& [name, t] : layer.compact_tables()) {
    const auto b = spex_test::compact_bytes(*t);
    add(b.data(), b.size());
  }
  return out;
}

void train_step(Peer<float>& layer, Peer<float>::Grads& g, Adam<float>& adam, std::uint64_t seed) {
  const RowMat<float> x = randn_mat(5, 8, seed).cast<float>(), dy = randn_mat(5, 8, seed + 1).cast<float>();
  RowMat<float> y(5, 8);
  Peer<float>::Cache c;
  layer.forward(x, y, c);
  g.zero();
  layer.backward(dy, c, g);
  adam.step();
}

mode_t mode_of(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

}  // namespace

TEST_CASE("a mapped load into a layer with a live optimizer: the optimizer refuses, nothing writes freed memory", "[io][lifetime]") {
  TempDir dir;
  Peer<float> trained(stored_pk_config(), 1);
  save_layer(dir.path("peer.safetensors"), trained);
  for (int via_loader = 0; via_loader < 2; ++via_loader) {
    Peer<float> layer(stored_pk_config(), 2);
    auto g = layer.make_grads();
    Adam<float> adam(layer.parameters(g), AdamConfig{});
    train_step(layer, g, adam, 3);
    LoadOptions map;
    map.map = true;
    if (via_loader) {
      SafetensorsLoader ld(dir.path("peer.safetensors"));
      ld.layer(layer, "", map);
      CHECK(ld.commit().mapped.size() == 2);
    } else {
      CHECK(load_into(dir.path("peer.safetensors"), layer, "", map).mapped.size() == 2);
    }
    CHECK(layer.experts().up_table().is_view());
    // The layer serves the mapped tables; training with the old optimizer is refused (it held
    // the tables that the load released), forward and backward first as a user would.
    RowMat<float> y(5, 8), y_trained(5, 8);
    const RowMat<float> x = randn_mat(5, 8, 9).cast<float>();
    layer.infer(x, y);
    trained.infer(x, y_trained);
    CHECK(y == y_trained);
    Peer<float>::Cache c;
    layer.forward(x, y, c);
    layer.backward(RowMat<float>::Ones(5, 8), c, g);
    CHECK_THROWS_WITH(adam.step(), Catch::Contains("'experts.down'") && Catch::Contains("a mapped load"));
    // Made again (the list copies the mapped tables into owned ones), training goes on.
    Adam<float> again(layer.parameters(g), AdamConfig{});
    CHECK_NOTHROW(again.step());
    CHECK_FALSE(layer.experts().up_table().is_view());
  }
}

TEST_CASE("int8 scales whose 127-fold overflows float are refused by every load", "[io][compact]") {
  TempDir dir;
  Peer<float> src(stored_pk_config(TableStorage::int8), 1);
  const auto& down = src.experts().compact_down();
  const auto& up = src.experts().compact_up();
  const Index n = down.rows();
  std::vector<float> huge(down.scales(), down.scales() + n);
  huge[4] = 1e38f;  // finite, but 127 * 1e38 is not
  SafetensorsWriter w;
  w.add(src.parameters());
  w.add_tensor({"experts.down", DType::I8, {n, down.cols()}, down.i8(), DType::I8, down.ld()});
  w.add_tensor({"experts.down.scale", DType::F32, {n}, huge.data(), DType::F32});
  w.add_tensor({"experts.up", DType::I8, {n, up.cols()}, up.i8(), DType::I8, up.ld()});
  w.add_tensor({"experts.up.scale", DType::F32, {n}, up.scales(), DType::F32});
  w.write(dir.path("huge.safetensors"));
  const char* message = "'experts.down.scale' holds the scale 1e+38 at row 4";
  Peer<float> native(stored_pk_config(), 2);
  const auto before_native = bytes_of(native);
  CHECK_THROWS_WITH(load_into(dir.path("huge.safetensors"), native), Catch::Contains(message));  // dequantized to float
  CHECK(bytes_of(native) == before_native);
  Peer<float> compact(stored_pk_config(TableStorage::int8), 3);
  const auto before_compact = bytes_of(compact);
  LoadOptions map;
  map.map = true;
  CHECK_THROWS_WITH(load_into(dir.path("huge.safetensors"), compact, "", map), Catch::Contains(message));  // mapped in place
  CHECK_THROWS_WITH(load_into(dir.path("huge.safetensors"), compact), Catch::Contains(message));           // copied
  CHECK(bytes_of(compact) == before_compact);
}

TEST_CASE("a checkpoint whose last part fails leaves every object bit-identical, and the loader cannot commit", "[io][checkpoint]") {
  TempDir dir;
  // An int8 table whose dequantized values are finite floats beyond bfloat16's range: loading it
  // into a bf16 layer fails in the rounding, after the Rng and the retrieval weights were staged.
  Peer<float> src(stored_pk_config(TableStorage::int8), 1);
  const auto& down = src.experts().compact_down();
  const auto& up = src.experts().compact_up();
  const Index n = down.rows();
  const auto down_bytes = spex_test::compact_bytes(down);  // the rows, then the scales
  std::vector<std::int8_t> rows(down_bytes.begin(), down_bytes.begin() + n * down.cols());
  std::vector<float> scales(down.scales(), down.scales() + n);
  rows[std::size_t(n - 1) * std::size_t(down.cols())] = 127;
  scales[n - 1] = 2.675e36f;  // within FLT_MAX / 127; 127 times it is 3.397e38, beyond bf16's 3.390e38
  Rng rng_saved(77);
  rng_saved.normal();
  SafetensorsWriter w;
  w.add(src.parameters());
  w.add_tensor({"experts.down", DType::I8, {n, down.cols()}, rows.data(), DType::I8});
  w.add_tensor({"experts.down.scale", DType::F32, {n}, scales.data(), DType::F32});
  w.add_tensor({"experts.up", DType::I8, {n, up.cols()}, up.i8(), DType::I8, up.ld()});
  w.add_tensor({"experts.up.scale", DType::F32, {n}, up.scales(), DType::F32});
  w.add_state("rng", rng_saved);
  w.write(dir.path("ckpt.safetensors"));

  Peer<float> layer(stored_pk_config(TableStorage::bf16), 2);
  Peer<float> other(stored_pk_config(), 3);
  Rng rng(5);
  const auto before_layer = bytes_of(layer), before_other = bytes_of(other);
  const Rng::State before_rng = rng.state();
  SafetensorsLoader ld(dir.path("ckpt.safetensors"));
  ld.state(rng, "rng");
  ld.parameters(other.parameters(), "", lenient());  // the retrieval weights, leniently
  CHECK_THROWS_WITH(ld.layer(layer), Catch::Contains("'experts.down'") && Catch::Contains("row " + std::to_string(n - 1)) &&
                                         Catch::Contains("bf16 storage cannot hold"));
  CHECK_THROWS_WITH(ld.commit(), Catch::Contains("a staging call of this loader threw; nothing was written"));
  CHECK(bytes_of(layer) == before_layer);
  CHECK(bytes_of(other) == before_other);
  CHECK(rng.state().counter == before_rng.counter);
  // The same file into an int8 layer loads (int8 holds it), and into a float layer too.
  Peer<float> int8_layer(stored_pk_config(TableStorage::int8), 4);
  CHECK_NOTHROW(load_into(dir.path("ckpt.safetensors"), int8_layer, "", lenient()));
}

TEST_CASE("a load staged before the layer's storage was replaced is refused at commit, writing nothing", "[io][lifetime]") {
  TempDir dir;
  ProductKeyLayerConfig cfg = stored_pk_config();
  cfg.expert_ids = ExpertIds::shells;
  Peer<float> a(cfg, 1);
  save_layer(dir.path("a.safetensors"), a);
  Peer<float> b(cfg, 2);
  SafetensorsLoader ld(dir.path("a.safetensors"));
  ld.parameters(b.parameters());
  b.grow(7, 3);  // the staged list now points into released tables
  const auto before = bytes_of(b);
  CHECK_THROWS_WITH(ld.commit(), Catch::Contains("SafetensorsLoader::commit: parameter"));
  CHECK(bytes_of(b) == before);
  // A writer holds pointers until write(): the same rule.
  Peer<float> c(cfg, 4);
  SafetensorsWriter w;
  w.add_layer("", c);
  c.grow(8, 1);
  CHECK_THROWS_WITH(w.write(dir.path("c.safetensors")), Catch::Contains("SafetensorsWriter::write: parameter"));
  CHECK_FALSE(::access(dir.path("c.safetensors").c_str(), F_OK) == 0);
}

TEST_CASE("saving refuses finite values the stored dtype cannot hold", "[io]") {
  TempDir dir;
  Peer<float> a(stored_pk_config(), 1);
  a.experts().up()(2, 3) = 3.397e38f;  // finite; above the midpoint of bf16's largest value and infinity
  CHECK_THROWS_WITH(save_layer(dir.path("bf16.safetensors"), a, "", DType::BF16),
                    Catch::Contains("'experts.up' holds 3.397e+38") && Catch::Contains("beyond the range of BF16"));
  a.experts().up()(2, 3) = 70000.f;
  CHECK_THROWS_WITH(save_layer(dir.path("f16.safetensors"), a, "", DType::F16), Catch::Contains("beyond the range of F16"));
  CHECK_NOTHROW(save_layer(dir.path("bf16.safetensors"), a, "", DType::BF16));
  CHECK(dir.files() == std::vector<std::string>{"bf16.safetensors"});  // no file left from the refused writes
}

TEST_CASE("a tensor of rows a stride apart is written contiguous, converted or not, and a stride shorter than a row is refused", "[io]") {
  TempDir dir;
  const float v[] = {0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23};  // 3 rows of 4: the tensor is the middle two columns
  write_safetensors(dir.path("s.safetensors"), {TensorSource{"t", DType::F32, {3, 2}, v + 1, DType::F32, 4}});
  SafetensorsFile f(dir.path("s.safetensors"));
  std::vector<float> got(6);
  std::memcpy(got.data(), f.data(f.at("t")), sizeof(float) * 6);
  CHECK(got == std::vector<float>{1, 2, 11, 12, 21, 22});
  CHECK_THROWS_WITH(write_safetensors(dir.path("short.safetensors"), {TensorSource{"t", DType::F32, {3, 2}, v, DType::F32, 1}}),
                    Catch::Contains("row_stride 1") && Catch::Contains("2 values"));
  // Converted: the rows gathered, then rounded; an overflow names its index in the tensor.
  write_safetensors(dir.path("f16.safetensors"), {TensorSource{"t", DType::F16, {3, 2}, v + 1, DType::F32, 4}});
  SafetensorsFile h(dir.path("f16.safetensors"));
  std::vector<float> half(6);
  convert_from_bytes(h.data(h.at("t")), DType::F16, half.data(), 6);
  CHECK(half == std::vector<float>{1, 2, 11, 12, 21, 22});
  float big[12];
  std::copy(v, v + 12, big);
  big[10] = 1e6f;  // row 2, column 1 of the tensor at v + 1: flat index 5, beyond F16's 65504
  CHECK_THROWS_WITH(write_safetensors(dir.path("big.safetensors"), {TensorSource{"t", DType::F16, {3, 2}, big + 1, DType::F32, 4}}),
                    Catch::Contains("at flat index 5") && Catch::Contains("F16"));
  CHECK(dir.files() == std::vector<std::string>{"f16.safetensors", "s.safetensors"});
}

TEST_CASE("a config that needs more values than the file holds is refused before anything is allocated", "[io]") {
  TempDir dir;
  const Peer<float> a(stored_pk_config(), 1);
  const nlohmann::json entry = layer_entry(a);
  auto bomb = [&](const char* field, std::int64_t value) {
    nlohmann::json e = entry;
    e["config"][field] = value;
    const std::string path = dir.path(std::string(field) + std::to_string(value) + ".safetensors");
    write_safetensors(path, tensor_sources(a.parameters()),
                      {{"spex", nlohmann::json{{"format", "spex"}, {"version", {kFormatMajor, kFormatMinor}}, {"layers", {{"", e}}}}.dump()}});
    return path;
  };
  // The query network alone would take 2^21 * 2 heads * 8 inputs = 32 M values (128 MiB) from a file of a few KB.
  CHECK_THROWS_WITH(load_layer<Peer<float>>(bomb("d_key", std::int64_t(1) << 21)), Catch::Contains("the config describes parameters of"));
  CHECK_THROWS_WITH(load_layer<Peer<float>>(bomb("d_key", std::int64_t(1) << 36)), Catch::Contains("the config describes parameters of"));
  CHECK_THROWS_AS(load_layer<Peer<float>>(bomb("heads", std::int64_t(1) << 30)), spex::Error);
  CHECK_THROWS_AS(load_layer<Pkm<float>>(bomb("heads", std::int64_t(1) << 30)), spex::Error);
  // The count is exact: the layer's own parameters, for every kind of layer and option.
  for (NormKind norm : {NormKind::none, NormKind::batch, NormKind::layer})
    for (bool shared : {true, false})
      for (bool bias : {false, true}) {
        ProductKeyLayerConfig c = stored_pk_config();
        c.norm = norm;
        c.shared_keys = shared;
        c.query_bias = bias;
        c.d_out = 5;
        auto count = [](const auto& layer) {
          double s = 0;
          for (const auto& p : layer.parameters()) s += double(p.size());
          return s;
        };
        CHECK(LayerKind<Peer<float>>::parameter_values(c) == count(Peer<float>(c, 1)));
        CHECK(LayerKind<Pkm<float>>::parameter_values(c) == count(Pkm<float>(c, 1)));
      }
  for (FfnKind ffn : {FfnKind::gelu, FfnKind::swiglu}) {
    MoEConfig m = spex_test::io_moe_config();
    m.ffn = ffn;
    m.granularity = 2;
    const MoE<float> moe(m, 1);
    double s = 0;
    for (const auto& p : moe.parameters()) s += double(p.size());
    CHECK(LayerKind<MoE<float>>::parameter_values(m) == s);
    m.expert_bias = true;  // a buffer of E values
    m.shared_experts = 2;
    m.shared_hidden = 5;
    m.shared_gate = true;
    const MoE<float, TopKRouter<float>> topk(m, 1);
    s = 0;
    for (const auto& p : topk.parameters()) s += double(p.size());
    CHECK(LayerKind<MoE<float, TopKRouter<float>>>::parameter_values(m) == s);
  }
}

TEST_CASE("saved files keep an existing file's mode, honour the umask, and write through symbolic links", "[io]") {
  TempDir dir;
  const Peer<float> a(stored_pk_config(), 1);
  const mode_t old_mask = ::umask(077);
  save_layer(dir.path("private.safetensors"), a);
  ::umask(old_mask);
  CHECK(mode_of(dir.path("private.safetensors")) == 0600);  // new under umask 077: owner only
  save_layer(dir.path("private.safetensors"), a);            // re-saved under another umask: keeps 0600
  CHECK(mode_of(dir.path("private.safetensors")) == 0600);
  ::chmod(dir.path("private.safetensors").c_str(), 0640);
  save_layer(dir.path("private.safetensors"), a);
  CHECK(mode_of(dir.path("private.safetensors")) == 0640);
  const mode_t mask = ::umask(022);
  save_layer(dir.path("new.safetensors"), a);
  ::umask(mask);
  CHECK(mode_of(dir.path("new.safetensors")) == 0644);
  // A link stays a link; the file it points to is replaced (also a dangling one's target is made).
  REQUIRE(::symlink("private.safetensors", dir.path("link.safetensors").c_str()) == 0);
  const Peer<float> b(stored_pk_config(), 2);
  save_layer(dir.path("link.safetensors"), b);
  struct stat st;
  REQUIRE(::lstat(dir.path("link.safetensors").c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  CHECK(mode_of(dir.path("private.safetensors")) == 0640);
  CHECK(bytes_of(load_layer<Peer<float>>(dir.path("private.safetensors"))) == bytes_of(b));
  REQUIRE(::symlink("target.safetensors", dir.path("dangling.safetensors").c_str()) == 0);
  save_layer(dir.path("dangling.safetensors"), b);
  CHECK(bytes_of(load_layer<Peer<float>>(dir.path("target.safetensors"))) == bytes_of(b));
  const std::vector<std::string> files{"dangling.safetensors", "link.safetensors", "new.safetensors", "private.safetensors",
                                       "target.safetensors"};
  CHECK(dir.files() == files);  // no temporary file left behind
}

TEST_CASE("saving to a directory or an empty path fails before writing, naming the destination", "[io]") {
  TempDir dir;
  const Peer<float> a(stored_pk_config(), 1);
  REQUIRE(::mkdir(dir.path("sub").c_str(), 0700) == 0);
  CHECK_THROWS_WITH(save_layer(dir.path("sub"), a), Catch::Contains("sub' is a directory; give the path of a file"));
  CHECK_THROWS_WITH(save_layer("", a), Catch::Contains("empty path"));
  CHECK_THROWS_WITH(save_layer(dir.path("missing/x.safetensors"), a), Catch::Contains("cannot create a file beside"));
  CHECK(dir.files() == std::vector<std::string>{"sub"});
  ::rmdir(dir.path("sub").c_str());
}

TEST_CASE("names from a file reach messages escaped: no control character, no bidirectional override", "[io]") {
  CHECK(printable("query.weight") == "query.weight");
  CHECK(printable("\x1b[2J\x1b[31mevil") == "\\x1b[2J\\x1b[31mevil");
  CHECK(printable("a\nb\tc\\") == "a\\nb\\tc\\\\");
  CHECK(printable("\x7f") == "\\x7f");
  CHECK(printable("\xc2\x9b" "31m") == "\\u{9b}31m");         // C1 CSI encoded in UTF-8
  CHECK(printable("x\xe2\x80\xaey") == "x\\u{202e}y");        // right-to-left override
  CHECK(printable("caf\xc3\xa9 \xe2\x9c\x93") == "caf\xc3\xa9 \xe2\x9c\x93");  // ordinary UTF-8 stays
  CHECK(printable("\xff\xc3") == "\\xff\\xc3");                // not UTF-8
  CHECK(printable("\xc0\xaf") == "\\xc0\\xaf");                // an overlong form
  TempDir dir;
  const Peer<float> a(stored_pk_config(), 1);
  const float v = 1;
  SafetensorsWriter w;
  w.add(a.parameters());
  w.add_tensor({"\x1b]0;owned\x07\x1b[2J", DType::F32, {1}, &v, DType::F32});
  w.write(dir.path("crafted.safetensors"));
  Peer<float> b(stored_pk_config(), 2);
  try {
    load_into(dir.path("crafted.safetensors"), b);
    FAIL("an unexpected tensor must be an error in a strict load");
  } catch (const spex::Error& e) {
    const std::string m = e.what();
    CHECK(m.find('\x1b') == std::string::npos);
    CHECK(m.find('\x07') == std::string::npos);
    CHECK(m.find("\\x1b]0;owned\\x07\\x1b[2J") != std::string::npos);
    CHECK(m.find("1 problem loading") != std::string::npos);
  }
}
