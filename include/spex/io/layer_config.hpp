#pragma once
// Layer configurations in a file's __metadata__, so a layer can be built from the file alone.
//
// Format (documented in docs/file_format.md): the metadata key "spex" holds a JSON document
//   {"format": "spex", "version": [1, 5],
//    "layers": {"<prefix>": {"kind": "Peer" | "Pkm" | "ReMoE" | "TopKMoE",
//                            "dtype": "F32" | "F64",
//                            "config": {<every Config field by its C++ name>},
//                            "state": {"lambda": <double>}   (ReMoE only)}}}
// Enum fields are strings (to_string of the enum: "gelu_erf", "softmax", "batch", "swiglu",
// "l1_lb", ...). A config field that is absent takes the Config's default, except where a
// version changed a default: in a 1.0 file an absent learn_keys reads as true (1.0 had no such
// field and trained the sub-keys) and an absent penalty as l1_lb (1.0's default). 1.2 added
// "storage" (native, bf16, int8: how a Peer or Pkm stores its expert tables; io/compact_tables.hpp)
// and "expert_ids" (row_major, shells: ExpertIds in select/product_keys.hpp); 1.3 the frozen set
// of a Peer or Pkm ("frozen_keys", "frozen_sub_keys", "frozen_query": FrozenSet); 1.4 the TopK
// router's options and shared experts of an MoE ("score", "route_scale", "expert_bias",
// "n_groups", "group_topk", "group_score_experts", "seq_aux_coeff", "seq_len", "shared_experts",
// "shared_hidden", "shared_gate") and the ReLU router's "revive_zero_expert_tokens"; 1.5 a Peer's
// or Pkm's "norm_per_half", "input_rmsnorm", "per_head_tables", "silu_output", "sigmoid_gate", "d_value", a
// Pkm's "shared_values" and a Peer's "glu".
// Compatibility rule: a file of another major version is rejected. A file of a newer minor
// version may carry fields this reader does not know: they are ignored (minor versions only
// add optional fields). In a file of this reader's minor version or older, an unknown field is
// an error (a typo or a corrupted file must not be silently dropped).
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "../core/check.hpp"
#include "../layers/moe.hpp"
#include "../layers/peer.hpp"
#include "../layers/pkm.hpp"
#include "dtype.hpp"

namespace spex {

constexpr int kFormatMajor = 1, kFormatMinor = 5;
/// The __metadata__ key that holds spex's document.
constexpr const char* kMetadataKey = "spex";

namespace detail {

/// j[key] when j is an object holding a string there, else `fallback` (never throws: a file's
/// JSON may hold anything).
inline std::string string_field(const nlohmann::json& j, const char* key, const std::string& fallback = "") {
  if (!j.is_object()) return fallback;
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

/// Runs f, turning any nlohmann/json exception (a value of an unexpected type deep in a file's
/// JSON) into a spex::Error naming `where`: the checks before each access are the first line,
/// this is the second.
template <class F>
auto guard_json(const std::string& where, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const nlohmann::json::exception& e) {
    SPEX_CHECK(false, where << ": unexpected JSON (" << e.what() << ")");
  }
  return f();  // not reached
}

template <class E>
bool parse_enum(const std::string& s, E& out, int count) {
  for (int i = 0; i < count; ++i)
    if (s == to_string(E(i))) {
      out = E(i);
      return true;
    }
  return false;
}

/// Reads or writes one field of a config: the single list of fields both directions use.
struct ConfigToJson {
  nlohmann::json& j;
  template <class V>
  void operator()(const char* name, const V& v) {
    if constexpr (std::is_enum<V>::value) j[name] = to_string(v);
    else j[name] = v;
  }
};

struct ConfigFromJson {
  const nlohmann::json& j;
  const std::string& where;
  int seen = 0;
  template <class V>
  void operator()(const char* name, V& v) {
    if (!j.contains(name)) return;
    ++seen;
    const nlohmann::json& f = j[name];
    if constexpr (std::is_enum<V>::value) {
      SPEX_CHECK(f.is_string() && parse_enum(f.get<std::string>(), v, enum_count(v)),
                 where << ": config field '" << name << "' = " << f.dump() << " is not one of " << enum_values(v));
    } else if constexpr (std::is_same<V, bool>::value) {
      SPEX_CHECK(f.is_boolean(), where << ": config field '" << name << "' = " << f.dump() << " is not a boolean");
      v = f.get<bool>();
    } else if constexpr (std::is_integral<V>::value) {
      SPEX_CHECK(f.is_number_integer(), where << ": config field '" << name << "' = " << f.dump() << " is not an integer");
      v = f.get<V>();
    } else {
      SPEX_CHECK(f.is_number(), where << ": config field '" << name << "' = " << f.dump() << " is not a number");
      v = f.get<V>();
    }
  }
  /// The valid values of an enum field, for messages: "a", "b", "c".
  template <class E>
  static std::string enum_values(E v) {
    std::string out;
    for (int i = 0; i < enum_count(v); ++i) out += (i ? ", \"" : "\"") + std::string(to_string(E(i))) + "\"";
    return out;
  }
  static int enum_count(kernels::Activation) { return 6; }
  static int enum_count(ScoreFn) { return 3; }
  static int enum_count(NormKind) { return 3; }
  static int enum_count(FfnKind) { return 2; }
  static int enum_count(Penalty) { return 4; }
  static int enum_count(TableStorage) { return 3; }
  static int enum_count(ExpertIds) { return 2; }
};

template <class C, class F>
void for_each_field(C& c, F& f) {
  if constexpr (std::is_same<std::remove_const_t<C>, ProductKeyLayerConfig>::value) {
    f("d_in", c.d_in);
    f("d_out", c.d_out);
    f("n_keys", c.n_keys);
    f("n_experts", c.n_experts);
    f("heads", c.heads);
    f("top_k", c.top_k);
    f("d_key", c.d_key);
    f("activation", c.activation);
    f("score", c.score);
    f("norm", c.norm);
    f("norm_per_half", c.norm_per_half);
    f("shared_keys", c.shared_keys);
    f("learn_keys", c.learn_keys);
    f("query_bias", c.query_bias);
    f("input_rmsnorm", c.input_rmsnorm);
    f("per_head_tables", c.per_head_tables);
    f("glu", c.glu);
    f("silu_output", c.silu_output);
    f("sigmoid_gate", c.sigmoid_gate);
    f("d_value", c.d_value);
    f("shared_values", c.shared_values);
    f("check_finite", c.check_finite);
    f("norm_eps", c.norm_eps);
    f("norm_momentum", c.norm_momentum);
    f("storage", c.storage);
    f("expert_ids", c.expert_ids);
    f("frozen_keys", c.frozen.keys);
    f("frozen_sub_keys", c.frozen.sub_keys);
    f("frozen_query", c.frozen.query);
  } else {
    static_assert(std::is_same<std::remove_const_t<C>, MoEConfig>::value, "a layer Config");
    f("d_in", c.d_in);
    f("d_out", c.d_out);
    f("n_experts", c.n_experts);
    f("hidden", c.hidden);
    f("experts_per_token", c.experts_per_token);
    f("granularity", c.granularity);
    f("ffn", c.ffn);
    f("router_init_std", c.router_init_std);
    f("check_finite", c.check_finite);
    f("penalty", c.penalty);
    f("revive_zero_expert_tokens", c.revive_zero_expert_tokens);
    f("pre_softmax", c.pre_softmax);
    f("renormalize", c.renormalize);
    f("aux_coeff", c.aux_coeff);
    f("z_coeff", c.z_coeff);
    f("capacity_factor", c.capacity_factor);
    f("score", c.score);
    f("route_scale", c.route_scale);
    f("expert_bias", c.expert_bias);
    f("n_groups", c.n_groups);
    f("group_topk", c.group_topk);
    f("group_score_experts", c.group_score_experts);
    f("seq_aux_coeff", c.seq_aux_coeff);
    f("seq_len", c.seq_len);
    f("shared_experts", c.shared_experts);
    f("shared_hidden", c.shared_hidden);
    f("shared_gate", c.shared_gate);
  }
}

}  // namespace detail

namespace detail {
/// Values of a product-key layer's retrieval for a resolved config: the query network, the
/// norm's weights and statistics, and the sub-keys (2 halves of n x d_key / 2, per head or
/// shared).
inline double retrieval_values(const ProductKeyLayerConfig& r) {
  const double q = double(r.heads) * double(r.d_key);
  const double norm = r.norm == NormKind::batch ? 4 * q : r.norm == NormKind::layer ? 2 * q : 0;
  const double key_sets = r.shared_keys ? 1 : double(r.heads);
  const double dv = double(r.d_value), head = (r.silu_output ? dv * double(r.d_in + 1) + double(r.d_out) * (dv + 1) : 0) +
                                             (r.sigmoid_gate ? double(r.d_in + 1) : 0);
  return (r.input_rmsnorm ? double(r.d_in) : 0) + q * double(r.d_in) + (r.query_bias ? q : 0) + norm +
         key_sets * double(r.n_keys) * double(r.d_key) + head;
}

/// One line of config_hints: `field`, the value the file's tensors imply, the layer's value.
inline std::string config_hint(const char* field, const std::string& file, const std::string& layer) {
  return std::string("\n  config field '") + field + "': the file's tensors are those of " + file + ", the layer has " + layer;
}

/// `rows(name)` for config_hints: the first dimension of tensor prefix + name in `file`, or -1
/// when the file has no such tensor.
template <class File>
auto tensor_rows(const File& file, const std::string& prefix) {
  return [&file, prefix](const std::string& name) -> std::int64_t {
    const TensorInfo* t = file.find(prefix + name);
    return !t ? -1 : t->shape.empty() ? 1 : t->shape[0];
  };
}

/// When a file's tensors do not fit a layer, the config fields whose other value would explain
/// it: each such field with the value the tensors imply and the layer's. `rows(name)`: the first
/// dimension of tensor `name` under the layer's prefix in the file, -1 when absent.
template <class Rows>
std::string config_hints(const ProductKeyLayerConfig& config, Rows rows) {
  const ProductKeyLayerConfig c = resolve(config);
  auto has = [&](const char* name) { return rows(name) >= 0; };
  std::string out;
  auto hint = [&](const char* field, const std::string& file, const std::string& layer) { out += config_hint(field, file, layer); };
  const bool per_head = has("keys.h0.c1"), shared = has("keys.c1");
  if (c.shared_keys && per_head && !shared) hint("shared_keys", "false (keys.h<i>.c1/c2: sub-keys per head)", "true");
  if (!c.shared_keys && shared && !per_head) hint("shared_keys", "true (keys.c1/c2: one set of sub-keys)", "false");
  const bool running = has("norm.running_mean"), affine = has("norm.weight");
  const char* norm = c.norm == NormKind::batch ? "batch" : c.norm == NormKind::layer ? "layer" : "none";
  if (c.norm != NormKind::none && !affine) hint("norm", "none (no norm.* tensors)", norm);
  if (c.norm == NormKind::layer && running) hint("norm", "batch (norm.running_mean/var)", norm);
  if (c.norm == NormKind::batch && affine && !running) hint("norm", "layer (norm.weight/bias without running statistics)", norm);
  if (c.norm == NormKind::none && affine) hint("norm", running ? "batch (norm.* with running statistics)" : "layer (norm.weight/bias)", norm);
  if (c.query_bias != has("query.bias"))
    hint("query_bias", c.query_bias ? "false (no query.bias)" : "true (query.bias)", c.query_bias ? "true" : "false");
  if (c.input_rmsnorm != has("input_norm.gamma"))
    hint("input_rmsnorm", c.input_rmsnorm ? "false (no input_norm.gamma)" : "true (input_norm.gamma)", c.input_rmsnorm ? "true" : "false");
  if (c.silu_output != has("output.silu.weight"))
    hint("silu_output", c.silu_output ? "false (no output.silu.weight)" : "true (output.silu.*, output.proj.*)", c.silu_output ? "true" : "false");
  if (c.sigmoid_gate != has("output.gate.weight"))
    hint("sigmoid_gate", c.sigmoid_gate ? "false (no output.gate.weight)" : "true (output.gate.*)", c.sigmoid_gate ? "true" : "false");
  if (c.glu != has("experts.down_linear") && (has("experts.down") || has("experts.down_linear")))
    hint("glu", c.glu ? "false (no experts.down_linear)" : "true (experts.down_linear)", c.glu ? "true" : "false");
  const std::int64_t table = has("experts.up") ? rows("experts.up") : rows("experts.values");
  // table == heads * n_experts, without forming the product: a hostile file's config can hold
  // values whose product overflows.
  const bool heads_times_experts = c.n_experts > 0 && table >= 0 && table % c.n_experts == 0 && table / c.n_experts == c.heads;
  if (c.heads > 1 && (c.per_head_tables ? table == c.n_experts : heads_times_experts))
    hint("per_head_tables", c.per_head_tables ? "false (expert tables of n_experts = " + std::to_string(table) + " rows)"
                                              : "true (expert tables of heads * n_experts = " + std::to_string(table) + " rows)",
         c.per_head_tables ? "true" : "false");
  return out;
}
template <class Rows>
std::string config_hints(const MoEConfig& c, Rows rows) {
  auto has = [&](const char* name) { return rows(name) >= 0; };
  std::string out;
  auto hint = [&](const char* field, const std::string& file, const std::string& layer) { out += config_hint(field, file, layer); };
  if (c.expert_bias != has("router.expert_bias"))
    hint("expert_bias", c.expert_bias ? "false (no router.expert_bias)" : "true (router.expert_bias)", c.expert_bias ? "true" : "false");
  if ((c.shared_experts > 0) != has("shared.w1"))
    hint("shared_experts", c.shared_experts > 0 ? "0 (no shared.w1)" : ">= 1 (shared.w1)", std::to_string(c.shared_experts));
  else if (c.shared_gate != has("shared.gate.weight"))
    hint("shared_gate", c.shared_gate ? "false (no shared.gate.weight)" : "true (shared.gate.weight)", c.shared_gate ? "true" : "false");
  return out;
}

}  // namespace detail

/// The kind a layer type is recorded as, and the number of values all its parameters take for
/// a config (a valid file holds at least that many: what a loader checks before allocating).
template <class L>
struct LayerKind;
// Any dispatch: a sharded layer is recorded as the kind it shards (the same config).
template <class T, class Arch, class D>
struct LayerKind<Peer<T, Arch, D>> {
  static constexpr const char* name = "Peer";
  static constexpr bool has_lambda = false;
  static double parameter_values(const ProductKeyLayerConfig& c) {
    const ProductKeyLayerConfig r = detail::resolve(c);
    return detail::retrieval_values(r) + double(detail::table_rows(r)) * double((r.glu ? 2 : 1) * r.d_in + r.d_value);
  }
};
template <class T, class Arch, class D>
struct LayerKind<Pkm<T, Arch, D>> {
  static constexpr const char* name = "Pkm";
  static constexpr bool has_lambda = false;
  static double parameter_values(const ProductKeyLayerConfig& c) {
    const ProductKeyLayerConfig r = detail::resolve(c);
    return detail::retrieval_values(r) + (r.shared_values ? 0.0 : double(detail::table_rows(r)) * double(r.d_value));
  }
};
template <class T, class Router, class Arch, class D>
struct LayerKind<MoE<T, Router, Arch, D>> {
  static constexpr const char* name = Router::kRelu ? "ReMoE" : "TopKMoE";
  static constexpr bool has_lambda = Router::kRelu;
  static double parameter_values(const MoEConfig& c) {
    validate(c);
    const double e = double(c.total_experts()), h = double(c.expert_hidden()), h1 = c.ffn == FfnKind::swiglu ? 2 * h : h;
    const double sh = double(c.shared_experts) * double(c.shared_expert_hidden()), sh1 = c.ffn == FfnKind::swiglu ? 2 * sh : sh;
    return e * double(c.d_in) + (c.expert_bias ? e : 0) + e * (h1 * double(c.d_in) + double(c.output_width()) * h) +
           sh1 * double(c.d_in) + double(c.output_width()) * sh + (c.shared_gate ? double(c.d_in) : 0);
  }
};

template <class C>
nlohmann::json config_to_json(const C& c) {
  nlohmann::json j = nlohmann::json::object();
  detail::ConfigToJson w{j};
  detail::for_each_field(c, w);
  return j;
}

/// A Config from its JSON object; `minor` is the file's minor version (unknown fields: see the
/// compatibility rule above). Fields absent keep their defaults.
template <class C>
C config_from_json(const nlohmann::json& j, int minor, const std::string& where) {
  SPEX_CHECK(j.is_object(), where << ": config is not an object");
  C c;
  if (minor < 1) {  // 1.0's defaults where 1.1 changed them
    if constexpr (std::is_same<C, ProductKeyLayerConfig>::value) c.learn_keys = true;
    else c.penalty = Penalty::l1_lb;
  }
  detail::ConfigFromJson r{j, where};
  detail::for_each_field(c, r);
  if (r.seen != int(j.size()) && minor <= kFormatMinor) {
    C probe;
    nlohmann::json known = config_to_json(probe);
    for (const auto& kv : j.items())
      SPEX_CHECK(known.contains(kv.key()), where << ": unknown config field '" << kv.key() << "'");
  }
  return c;
}

/// The layer entry of a file (kind, dtype, config, state) for layer `l`.
template <class L>
nlohmann::json layer_entry(const L& l) {
  nlohmann::json e = {{"kind", LayerKind<L>::name},
                      {"dtype", to_string(dtype_of<typename L::Scalar>())},
                      {"config", config_to_json(l.config())}};
  if constexpr (LayerKind<L>::has_lambda) e["state"] = {{"lambda", l.lambda()}};
  return e;
}

/// What a file's entry for a layer of type L says: its config and, for ReMoE, its lambda.
template <class L>
struct LayerEntry {
  typename L::Config config;
  double lambda = 0.0;
};

/// Reads and checks the entry `e` (kind must be L's); `minor` as in config_from_json.
template <class L>
LayerEntry<L> read_layer_entry(const nlohmann::json& e, int minor, const std::string& where) {
  return detail::guard_json(where, [&] {
    SPEX_CHECK(e.is_object(), where << ": the layer entry is not an object");
    for (const auto& kv : e.items())
      SPEX_CHECK(minor > kFormatMinor || kv.key() == "kind" || kv.key() == "dtype" || kv.key() == "config" || kv.key() == "state",
                 where << ": unknown layer entry field '" << kv.key() << "'");
    const std::string kind = detail::string_field(e, "kind");
    SPEX_CHECK(kind == LayerKind<L>::name, where << ": the file holds a layer of kind '" << kind << "', not " << LayerKind<L>::name);
    SPEX_CHECK(e.contains("config"), where << ": the layer entry has no config");
    LayerEntry<L> out;
    out.config = config_from_json<typename L::Config>(e["config"], minor, where);
    if constexpr (LayerKind<L>::has_lambda) {
      if (e.contains("state")) {
        const auto& st = e["state"];
        SPEX_CHECK(st.is_object() && st.contains("lambda") && st["lambda"].is_number(), where << ": state must hold a number 'lambda'");
        out.lambda = st["lambda"].get<double>();
      }
    }
    return out;
  });
}

/// spex's metadata document of a file: {"format", "version", "layers"}; an empty one when the
/// file has none. Throws on another format, another major version or a malformed document.
struct SpexMetadata {
  int major = kFormatMajor, minor = kFormatMinor;
  nlohmann::json layers = nlohmann::json::object();

  static SpexMetadata parse(const std::map<std::string, std::string>& metadata, const std::string& where) {
    return detail::guard_json(where, [&] { return parse_unguarded(metadata, where); });
  }

 private:
  static SpexMetadata parse_unguarded(const std::map<std::string, std::string>& metadata, const std::string& where) {
    SpexMetadata m;
    const auto it = metadata.find(kMetadataKey);
    if (it == metadata.end()) return m;
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(it->second);
    } catch (const nlohmann::json::exception& e) {
      SPEX_CHECK(false, where << ": metadata '" << kMetadataKey << "' is not valid JSON (" << e.what() << ")");
    }
    SPEX_CHECK(detail::string_field(doc, "format") == "spex",
               where << ": metadata '" << kMetadataKey << "' is not a spex document (no \"format\": \"spex\")");
    const auto& v = doc.contains("version") ? doc["version"] : nlohmann::json();
    SPEX_CHECK(v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer(),
               where << ": metadata version must be [major, minor], got " << v.dump());
    m.major = v[0].get<int>();
    m.minor = v[1].get<int>();
    SPEX_CHECK(m.major == kFormatMajor, where << ": written in spex format " << m.major << "." << m.minor
                                              << ", this reader reads format " << kFormatMajor << ".x");
    for (const auto& kv : doc.items())
      SPEX_CHECK(m.minor > kFormatMinor || kv.key() == "format" || kv.key() == "version" || kv.key() == "layers",
                 where << ": unknown metadata field '" << kv.key() << "'");
    if (doc.contains("layers")) {
      m.layers = doc["layers"];
      SPEX_CHECK(m.layers.is_object(), where << ": metadata 'layers' is not an object");
    }
    return m;
  }


 public:
  std::string dump() const {
    return nlohmann::json{{"format", "spex"}, {"version", {major, minor}}, {"layers", layers}}.dump();
  }
};

}  // namespace spex
