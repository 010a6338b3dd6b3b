// safetensors: dtype conversions (exhaustively at every rounding boundary), the writer's
// layout, and a corpus of malformed files built byte by byte, each rejected with a spex::Error
// naming the problem.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <spex/io/safetensors.hpp>
#include <string>
#include <vector>

#include "io_util.hpp"

using namespace spex;
using spex_test::image;
using spex_test::TempDir;

namespace {

// The value of the next representable number above the positive finite pattern b.
double next_up(std::uint16_t b, bool f16) { return f16 ? from_f16(std::uint16_t(b + 1)) : from_bf16(std::uint16_t(b + 1)); }

void check_rounding_boundaries(bool f16) {
  const auto enc = [&](double x) { return f16 ? to_f16(x) : to_bf16(x); };
  const auto dec = [&](std::uint16_t b) { return f16 ? from_f16(b) : from_bf16(b); };
  const std::uint16_t inf = f16 ? 0x7C00 : 0x7F80;
  for (std::uint32_t b = 0; b < inf; ++b) {
    const double v = dec(std::uint16_t(b));
    REQUIRE(enc(v) == b);                        // exact values round-trip
    REQUIRE(enc(-v) == (b | 0x8000u));
    // Above the largest finite value, IEEE rounding acts as if the next binade continued.
    const double hi = b + 1 == inf ? v + (v - dec(std::uint16_t(b - 1))) : next_up(std::uint16_t(b), f16);
    const double mid = v + (hi - v) / 2;         // exact in double
    const std::uint16_t even = (b % 2 == 0) ? std::uint16_t(b) : std::uint16_t(b + 1);
    REQUIRE(enc(mid) == even);                   // ties to even (b + 1 == inf: overflow to inf)
    REQUIRE(enc(std::nextafter(mid, 0.0)) == b);
    REQUIRE(enc(std::nextafter(mid, 1e300)) == b + 1);
  }
  CHECK(enc(std::numeric_limits<double>::infinity()) == inf);
  CHECK(enc(1e300) == inf);
  CHECK(std::isnan(dec(enc(std::nan("")))));
  CHECK(enc(-0.0) == 0x8000);
  CHECK(enc(1e-300) == 0);  // underflow to +0
}

}  // namespace

TEST_CASE("F16 and BF16: every value round-trips and every midpoint rounds to even") {
  check_rounding_boundaries(true);
  check_rounding_boundaries(false);
  // double -> bf16 directly, not through float (which would round twice): a value just above
  // a bf16 midpoint that float rounds down onto the midpoint.
  const double mid = (1.0 + (1.0 + std::ldexp(1.0, -7))) / 2;  // midpoint of 1 and its successor
  const double above = mid + std::ldexp(1.0, -40);              // rounds to mid in float
  REQUIRE(double(float(above)) == mid);
  CHECK(to_bf16(above) == to_bf16(1.0 + std::ldexp(1.0, -7)));
}

TEST_CASE("write_safetensors: aligned layout the reference accepts, values of every dtype read back") {
  TempDir dir;
  const std::vector<double> d = {1.5, -2.25, 3.0, 1e-3, 65504.0, -0.0};
  const std::vector<float> f = {0.1f, -7.f, 1e30f};
  const std::vector<std::int64_t> ids = {0, -5, 1LL << 40};
  const std::vector<std::int32_t> small = {7};
  std::vector<TensorSource> ts = {
      {"f32", DType::F32, {3}, f.data(), DType::F32},
      {"from_double.bf16", DType::BF16, {2, 3}, d.data(), DType::F64},
      {"f64", DType::F64, {3, 2}, d.data(), DType::F64},
      {"ids", DType::I64, {3}, ids.data(), DType::I64},
      {"f16", DType::F16, {6}, d.data(), DType::F64},
      {"i32", DType::I32, {}, small.data(), DType::I32},
      {"empty", DType::F32, {0, 4}, nullptr, DType::F32},
  };
  const std::string path = dir.path("all.safetensors");
  write_safetensors(path, ts, {{"note", "hello"}});

  SafetensorsFile file(path);
  CHECK((8 + file.view().header_bytes()) % 64 == 0);
  CHECK(file.metadata().at("note") == "hello");
  REQUIRE(file.tensors().size() == 7);
  for (const auto& t : file.tensors())  // each tensor aligned to its element size
    CHECK(reinterpret_cast<std::uintptr_t>(file.data(t)) % dtype_size(t.dtype) == 0);
  std::vector<double> back(6);
  convert_from_bytes(file.data(file.at("f64")), DType::F64, back.data(), 6);
  CHECK(back == d);
  convert_from_bytes(file.data(file.at("f16")), DType::F16, back.data(), 6);
  for (int i = 0; i < 6; ++i) CHECK(back[i] == from_f16(to_f16(d[i])));
  CHECK(file.at("from_double.bf16").shape == std::vector<std::int64_t>{2, 3});
  std::vector<std::int64_t> ids_back(3);
  std::memcpy(ids_back.data(), file.data(file.at("ids")), 24);
  CHECK(ids_back == ids);
  CHECK(file.at("i32").shape.empty());
  CHECK(file.at("empty").bytes() == 0);
  std::vector<float> f_back(3);
  std::memcpy(f_back.data(), file.data(file.at("f32")), 12);
  CHECK(f_back == f);
}

TEST_CASE("write_safetensors rejects bad requests and leaves no file behind") {
  TempDir dir;
  const std::vector<float> f = {1, 2};
  const std::string path = dir.path("x.safetensors");
  CHECK_THROWS_WITH(write_safetensors(path, {{"a", DType::F32, {2}, f.data(), DType::F32}, {"a", DType::F32, {2}, f.data(), DType::F32}}),
                    Catch::Contains("'a' given twice"));
  CHECK_THROWS_WITH(write_safetensors(path, {{"a", DType::I64, {2}, f.data(), DType::F32}}), Catch::Contains("cannot store F32 data as I64"));
  CHECK_THROWS_WITH(write_safetensors(path, {{"__metadata__", DType::F32, {2}, f.data(), DType::F32}}), Catch::Contains("__metadata__"));
  CHECK_THROWS_AS(write_safetensors(dir.path("no/such/dir/x.safetensors"), {}), Error);
  CHECK(dir.files().empty());
}

// ---------------------------------------------------------------------------------------------
// The malformed corpus: each file differs from a valid one in one way.

TEST_CASE("malformed files: every defect is a spex::Error naming it") {
  const std::string ok_entry = R"("w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const std::string data8(8, '\0');
  struct Case {
    const char* what;
    std::string bytes;
    const char* message;
  };
  std::string huge_len(8, '\xff');
  const std::vector<Case> corpus = {
      {"empty file", "", "truncated"},
      {"7 bytes", std::string(7, '\0'), "truncated"},
      {"header length beyond the file", huge_len + "{}", "runs past the end"},
      {"header length one past the file", image("{}", "").substr(0, 9) + "", "runs past the end"},
      {"header not JSON", image("{not json}", ""), "not valid JSON"},
      {"header a JSON array", image("[1, 2]", ""), "not a JSON object"},
      {"header truncated JSON", image(R"({"w": {"dtype": "F32")", ""), "not valid JSON"},
      {"trailing non-space after JSON", image("{} x", ""), "not valid JSON"},
      {"invalid UTF-8 in a name", image("{\"w\xff\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}}", ""), "not valid JSON"},
      {"duplicate tensor names", image("{" + ok_entry + ", " + ok_entry + "}", data8), "'w' twice"},
      {"duplicate key in an entry", image(R"({"w": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", data8), "'dtype' twice"},
      {"entry not an object", image(R"({"w": 3})", ""), "not an object"},
      {"unknown entry key", image(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}})", data8), "unknown key 'x'"},
      {"missing data_offsets", image(R"({"w": {"dtype": "F32", "shape": [2]}})", data8), "needs dtype, shape and data_offsets"},
      {"unknown dtype", image(R"({"w": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}})", data8), "unknown dtype"},
      {"dtype not a string", image(R"({"w": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}})", data8), "unknown dtype"},
      {"negative dimension", image(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", data8), "non-negative integer"},
      {"fractional dimension", image(R"({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})", data8), "non-negative integer"},
      {"shape not an array", image(R"({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", data8), "not an array"},
      {"shape product overflows", image(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", data8), "overflows"},
      {"byte count overflows", image(R"({"w": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", data8), "overflows"},
      {"offsets out of order", image(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", data8), "out of order"},
      {"offsets negative", image(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", data8), "two non-negative integers"},
      {"three offsets", image(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}})", data8), "two non-negative integers"},
      {"size not dtype x shape", image(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", data8), "needs 12"},
      {"outside the data section", image(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", data8), "outside the data section"},
      {"overlapping tensors", image(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", data8), "overlaps"},
      {"gap between tensors", image(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}})", data8), "gap of 2 bytes"},
      {"gap at the start", image(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", data8), "gap of 4 bytes"},
      {"trailing garbage", image("{" + ok_entry + "}", data8 + "xyz"), "3 trailing bytes"},
      {"truncated data", image("{" + ok_entry + "}", data8.substr(0, 5)), "outside the data section"},
      {"metadata not an object", image(R"({"__metadata__": [1]})", ""), "__metadata__ must be an object"},
      {"metadata value not a string", image(R"({"__metadata__": {"a": 1}})", ""), "'a' is not a string"},
      {"nested too deep", image(R"({"w": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}})", data8), "nests deeper"},
  };
  for (const auto& c : corpus) {
    INFO(c.what);
    CHECK_THROWS_WITH(SafetensorsView(reinterpret_cast<const unsigned char*>(c.bytes.data()), c.bytes.size(), "case.safetensors"),
                      Catch::Contains(c.message) && Catch::Contains("case.safetensors"));
  }
  // Sanity: the valid neighbours of the corpus parse.
  const std::string good = image("{" + ok_entry + R"(, "__metadata__": {"k": "v"}})", data8);
  CHECK_NOTHROW(SafetensorsView(reinterpret_cast<const unsigned char*>(good.data()), good.size()));
  const std::string padded = image("{" + ok_entry + "}   ", data8);
  CHECK_NOTHROW(SafetensorsView(reinterpret_cast<const unsigned char*>(padded.data()), padded.size()));
  const std::string empty_tensors = image(R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "b": {"dtype": "BOOL", "shape": [0, 3], "data_offsets": [0, 0]}})", "");
  CHECK_NOTHROW(SafetensorsView(reinterpret_cast<const unsigned char*>(empty_tensors.data()), empty_tensors.size()));
}

TEST_CASE("SafetensorsFile: missing, empty and directory paths are errors naming the path") {
  TempDir dir;
  CHECK_THROWS_WITH(SafetensorsFile(dir.path("none.safetensors")), Catch::Contains("none.safetensors") && Catch::Contains("cannot open"));
  std::ofstream(dir.path("empty.safetensors")).close();
  CHECK_THROWS_WITH(SafetensorsFile(dir.path("empty.safetensors")), Catch::Contains("truncated"));
  CHECK_THROWS_WITH(SafetensorsFile(dir.path("")), Catch::Contains("not a regular file"));
}
