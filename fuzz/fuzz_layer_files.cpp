// Structure-aware libFuzzer target for the layer loaders. Random bytes rarely get past the
// safetensors parser (fuzz_safetensors.cpp covers that); here the input is a list of decisions
// that mutate valid layer files the way a corrupted or hostile file would: config and state
// fields set to extremes or to other JSON types, shapes swapped or blown up, dtypes changed,
// values and int8 scales at the float limits, tensors dropped, duplicated or renamed. Every
// resulting file goes through every loader (built from the file, mapped, quantized on load,
// loaded into an existing layer) and, when it loads, through inference and a training step.
// Each must succeed or throw spex::Error: a crash, a leak, a sanitizer report, another
// exception (std::bad_alloc) or an allocation over -malloc_limit_mb is a finding.
// Build and run: scripts/fuzz.sh SECONDS layer_files.
#include <fuzzer/FuzzedDataProvider.h>
#include <unistd.h>

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <spex/io/io.hpp>
#include <string>
#include <vector>

#include "layer_loads.hpp"

namespace {

using layer_loads::moe_config;
using layer_loads::pk_config;
using layer_loads::ReMoEf;
using layer_loads::TopKf;

// One file as the mutations see it: tensors with raw little-endian bytes, and metadata.
struct Tensor {
  std::string name, dtype;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};
struct Model {
  std::vector<Tensor> tensors;
  nlohmann::json metadata = nlohmann::json::object();
};

// A layer's file, as bytes (written once to a temporary file and read back).
template <class L>
std::vector<unsigned char> file_of(const L& layer) {
  char path[] = "/tmp/spex-fuzz-XXXXXX";
  const int fd = ::mkstemp(path);
  if (fd < 0) std::abort();
  ::close(fd);
  spex::save_layer(path, layer);
  const spex::SafetensorsFile f(path);
  std::vector<unsigned char> bytes(f.view().data_bytes() + f.view().header_bytes() + 8);
  FILE* in = std::fopen(path, "rb");
  if (!in || std::fread(bytes.data(), 1, bytes.size(), in) != bytes.size()) std::abort();
  std::fclose(in);
  ::unlink(path);
  return bytes;
}

Model model_of(const std::vector<unsigned char>& bytes) {
  auto shared = std::make_shared<const std::vector<unsigned char>>(bytes);
  const auto f = spex::SafetensorsFile::from_memory(shared, "base");
  Model m;
  for (const auto& t : f.tensors()) {
    const unsigned char* p = f.data(t);
    m.tensors.push_back(Tensor{t.name, spex::to_string(t.dtype), t.shape, std::vector<unsigned char>(p, p + t.bytes())});
  }
  for (const auto& kv : f.metadata()) m.metadata[kv.first] = kv.second;
  return m;
}

// The bases: every layer kind and table storage the loaders build.
const std::vector<Model>& bases() {
  static const std::vector<Model> b = [] {
    std::vector<Model> out;
    out.push_back(model_of(file_of(spex::Peer<float>(pk_config(), 1))));
    out.push_back(model_of(file_of(spex::Peer<float>(pk_config(spex::TableStorage::int8), 2))));
    out.push_back(model_of(file_of(spex::Peer<float>(pk_config(spex::TableStorage::bf16), 3))));
    out.push_back(model_of(file_of(spex::Pkm<double>(pk_config(), 4))));
    ReMoEf remoe(moe_config(), 5);
    remoe.set_lambda(0.01);
    out.push_back(model_of(file_of(remoe)));
    out.push_back(model_of(file_of(TopKf(moe_config(), 6))));
    return out;
  }();
  return b;
}

const std::int64_t kInts[] = {0, 1, -1, 2, 3, 5, 7, 64, 65536, std::int64_t(1) << 21, (std::int64_t(1) << 31) - 1,
                              std::int64_t(1) << 31, std::int64_t(1) << 36, std::int64_t(1) << 40, std::int64_t(1) << 62,
                              std::numeric_limits<std::int64_t>::max(), std::numeric_limits<std::int64_t>::min()};
const double kDoubles[] = {0.0, -0.0, 1e-300, 1e-45, 0.5, 1.0, 1e30, 1e38, 3.397e38, double(FLT_MAX), 1e300, -1e38,
                           std::numeric_limits<double>::max(), std::numeric_limits<double>::denorm_min()};
const float kFloats[] = {0.f, -0.f, 1e-45f, 1e-38f, 1.f, 65504.f, 70000.f, 1e30f, 1e38f, 2.675e36f, 2.68e36f, 3.397e38f, FLT_MAX,
                         -FLT_MAX, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::quiet_NaN()};
const char* kDtypes[] = {"F64", "F32", "F16", "BF16", "I8", "I32", "I64", "U8", "BOOL", "F8_E4M3"};

// A JSON value of any type, often an extreme one.
nlohmann::json any_value(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 0: return in.PickValueInArray(kInts);
    case 1: return in.PickValueInArray(kDoubles);
    case 2: return in.ConsumeBool();
    case 3: return nullptr;
    case 4: return in.ConsumeRandomLengthString(24);
    case 5: return nlohmann::json::array({in.PickValueInArray(kInts), in.PickValueInArray(kInts)});
    case 6: return nlohmann::json::object();
    default: return in.ConsumeIntegralInRange<std::int64_t>(-4, 70);
  }
}

// A random leaf (or object member) of j, replaced by f(old).
template <class F>
void replace_somewhere(nlohmann::json& j, FuzzedDataProvider& in, F&& f, int depth = 0) {
  if ((j.is_object() || j.is_array()) && !j.empty() && depth < 6 && in.ConsumeIntegralInRange(0, 5) != 0) {
    auto it = j.begin();
    std::advance(it, in.ConsumeIntegralInRange<std::size_t>(0, j.size() - 1));
    replace_somewhere(*it, in, f, depth + 1);
    return;
  }
  j = f(j);
}

void mutate_document(nlohmann::json& doc, FuzzedDataProvider& in);

// The spex metadata (the layer entries) as JSON; the mutations edit it and write it back.
void mutate_layer_entry(Model& m, FuzzedDataProvider& in) {
  if (!m.metadata.contains("spex")) return;
  nlohmann::json doc = nlohmann::json::parse(m.metadata["spex"].get<std::string>(), nullptr, false);
  if (doc.is_discarded()) return;
  try {  // an earlier mutation may have changed the document's shape: then this one does nothing
    mutate_document(doc, in);
  } catch (const nlohmann::json::exception&) {
  }
  m.metadata["spex"] = doc.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void mutate_document(nlohmann::json& doc, FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange(0, 3)) {
    case 0:  // one config field to an extreme or small integer (the most telling mutation)
      if (doc.contains("layers") && doc["layers"].contains("") && doc["layers"][""].contains("config")) {
        auto& cfg = doc["layers"][""]["config"];
        if (!cfg.empty()) {
          auto it = cfg.begin();
          std::advance(it, in.ConsumeIntegralInRange<std::size_t>(0, cfg.size() - 1));
          *it = in.ConsumeBool() ? nlohmann::json(in.PickValueInArray(kInts)) : any_value(in);
        }
      }
      break;
    case 1:
      replace_somewhere(doc, in, [&](const nlohmann::json&) { return any_value(in); });
      break;
    case 2:  // another format version
      doc["version"] = {in.ConsumeIntegralInRange(0, 3), in.ConsumeIntegralInRange(-1, 9)};
      break;
    default:  // the layer under another prefix, or a second entry
      if (doc.contains("layers") && doc["layers"].contains("")) doc["layers"][in.ConsumeRandomLengthString(6)] = doc["layers"][""];
  }
}

std::size_t dtype_bytes(const std::string& d) {
  spex::DType t;
  return spex::parse_dtype(d, t) ? spex::dtype_size(t) : 1;
}

std::uint64_t elements(const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 1;
  for (auto s : shape) n *= static_cast<std::uint64_t>(std::max<std::int64_t>(s, 0));
  return n;
}

void mutate_tensor(Model& m, FuzzedDataProvider& in) {
  if (m.tensors.empty()) return;
  Tensor& t = m.tensors[in.ConsumeIntegralInRange<std::size_t>(0, m.tensors.size() - 1)];
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 0: {  // swap shapes with another tensor (bytes follow the shape when they can)
      Tensor& u = m.tensors[in.ConsumeIntegralInRange<std::size_t>(0, m.tensors.size() - 1)];
      std::swap(t.shape, u.shape);
      break;
    }
    case 1:  // a dimension to an extreme; the data resized when it stays small
      if (!t.shape.empty()) {
        auto& d = t.shape[in.ConsumeIntegralInRange<std::size_t>(0, t.shape.size() - 1)];
        d = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::int64_t>(0, 80) : in.PickValueInArray(kInts);
        const std::uint64_t n = elements(t.shape);
        if (n <= 4096 && in.ConsumeBool()) t.bytes.resize(n * dtype_bytes(t.dtype));
      }
      break;
    case 2: {  // another dtype: converted by value, or reinterpreted with the size fixed up
      const std::string d = in.PickValueInArray(kDtypes);
      const std::uint64_t n = elements(t.shape);
      if (t.dtype == "F32" && (d == "F64" || d == "F16" || d == "BF16") && n <= 4096 && in.ConsumeBool()) {
        std::vector<float> v(n);
        const std::size_t copied = std::min<std::size_t>(t.bytes.size(), n * 4);
        if (copied > 0) std::memcpy(v.data(), t.bytes.data(), copied);
        std::vector<unsigned char> out(n * dtype_bytes(d));
        spex::DType to;
        spex::parse_dtype(d, to);
        spex::convert_to_bytes(v.data(), n, to, out.data());
        t.bytes = out;
      } else if (n <= 4096) {
        t.bytes.resize(n * dtype_bytes(d));
      }
      t.dtype = d;
      break;
    }
    case 3:  // a value at the float limits
      if (t.dtype == "F32" && t.bytes.size() >= 4) {
        const float v = in.PickValueInArray(kFloats);
        std::memcpy(&t.bytes[4 * in.ConsumeIntegralInRange<std::size_t>(0, t.bytes.size() / 4 - 1)], &v, 4);
      } else if (t.dtype == "F64" && t.bytes.size() >= 8) {
        const double v = in.PickValueInArray(kDoubles);
        std::memcpy(&t.bytes[8 * in.ConsumeIntegralInRange<std::size_t>(0, t.bytes.size() / 8 - 1)], &v, 8);
      } else if (!t.bytes.empty()) {
        t.bytes[in.ConsumeIntegralInRange<std::size_t>(0, t.bytes.size() - 1)] = in.ConsumeIntegral<unsigned char>();
      }
      break;
    case 4:  // every value of an F32 tensor (an int8 table's scales) at one limit
      if (t.dtype == "F32")
        for (std::size_t i = 0; i + 4 <= t.bytes.size(); i += 4) {
          const float v = in.PickValueInArray(kFloats);
          std::memcpy(&t.bytes[i], &v, 4);
        }
      break;
    case 5:  // dropped
      m.tensors.erase(m.tensors.begin() + (&t - m.tensors.data()));
      break;
    case 6: {  // duplicated under another name (maybe one the layer has)
      Tensor copy = t;
      copy.name = in.ConsumeBool() ? m.tensors[in.ConsumeIntegralInRange<std::size_t>(0, m.tensors.size() - 1)].name + ".scale"
                                   : in.ConsumeRandomLengthString(16);
      m.tensors.push_back(copy);
      break;
    }
    default:  // renamed
      t.name = in.ConsumeRandomLengthString(16);
  }
}

// The file of a model: tensors in order, offsets as they fall (a tensor whose bytes do not fit
// its dtype and shape makes the file invalid, which the parser must say).
std::vector<unsigned char> serialize(const Model& m) {
  nlohmann::json header = nlohmann::json::object();
  if (!m.metadata.empty()) header["__metadata__"] = m.metadata;
  std::uint64_t off = 0;
  for (const auto& t : m.tensors) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string json = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  json.append((64 - (8 + json.size()) % 64) % 64, ' ');
  std::vector<unsigned char> out(8);
  const std::uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), json.begin(), json.end());
  for (const auto& t : m.tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  Model m = bases()[in.ConsumeIntegralInRange<std::size_t>(0, bases().size() - 1)];
  const int mutations = in.ConsumeIntegralInRange(1, 4);
  for (int i = 0; i < mutations && in.remaining_bytes() > 0; ++i) {
    if (in.ConsumeBool()) mutate_layer_entry(m, in);
    else mutate_tensor(m, in);
  }
  auto bytes = std::make_shared<const std::vector<unsigned char>>(serialize(m));
  std::unique_ptr<spex::SafetensorsFile> file;
  try {
    file = std::make_unique<spex::SafetensorsFile>(spex::SafetensorsFile::from_memory(bytes, "fuzz"));
  } catch (const spex::Error&) {
    return 0;
  }
  layer_loads::product_key_layers(*file);
  layer_loads::moe_layers(*file);
  return 0;
}
