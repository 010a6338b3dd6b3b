#pragma once
// SafetensorsWriter: parameters, layers with their configs, optimizer state and any states and
// strings of the caller's, collected and written as one safetensors file (safetensors.hpp's
// write_safetensors: atomic, fsync'd). checkpoint.hpp says how a checkpoint uses it.
#include "checkpoint_state.hpp"

namespace spex {

/// Collects tensors and metadata, then writes one safetensors file (write_safetensors: atomic,
/// fsync'd by default). Holds pointers to the objects added: they must outlive write().
/// Thread safety: one thread per writer; the objects added must not change during write().
class SafetensorsWriter {
 public:
  /// Parameters (and buffers) named prefix + their names, stored as `dtype` (default: as in
  /// memory; F16/BF16 round to nearest even).
  template <class P>
  SafetensorsWriter& add(const ParameterList<P>& params, const std::string& prefix = "", std::optional<DType> dtype = {}) {
    check_current(params, "SafetensorsWriter::add");
    auto t = tensor_sources(params, prefix, dtype.value_or(dtype_of<std::remove_const_t<P>>()));
    tensors_.insert(tensors_.end(), t.begin(), t.end());
    for (const auto& p : params) stamps_.emplace_back(prefix + p.name, p.stamps);
    return *this;
  }
  /// A layer: its parameters under `prefix` and its kind, config and state in the metadata, so
  /// load_layer<L>(path, prefix) can build it from the file alone. Compact expert tables are
  /// written as stored (io/compact_tables.hpp); `dtype` applies to the parameters of T.
  template <class L>
  SafetensorsWriter& add_layer(const std::string& prefix, const L& layer, std::optional<DType> dtype = {}) {
    SPEX_CHECK(!layers_.contains(prefix), "add_layer: a layer with prefix '" << prefix << "' was already added");
    add(layer.parameters(prefix), "", dtype);
    if constexpr (detail::has_compact_tables<L>) {
      auto t = tensor_sources(layer.compact_tables(prefix));
      tensors_.insert(tensors_.end(), t.begin(), t.end());
    }
    layers_[prefix] = layer_entry(layer);
    return *this;
  }
  /// An optimizer's state under `prefix` (Adam: "<prefix>m.<name>", "<prefix>v.<name>" and the
  /// step count; SGD: "<prefix>momentum.<name>").
  template <class Opt>
  SafetensorsWriter& add_optimizer(const std::string& prefix, const Opt& opt) {
    add(opt.state(prefix));
    nlohmann::json j = {{"kind", detail::OptimizerKind<Opt>::name}};
    if constexpr (detail::OptimizerKind<Opt>::has_steps) j["steps"] = opt.steps();
    return set_metadata(prefix, j.dump());
  }
  SafetensorsWriter& add_state(const std::string& key, const LambdaController& c) {
    return set_metadata(key, detail::state_json(c.state()).dump());
  }
  SafetensorsWriter& add_state(const std::string& key, const Rng& r) { return set_metadata(key, detail::state_json(r.state()).dump()); }
  /// Any tensor (e.g. I64 indices).
  SafetensorsWriter& add_tensor(TensorSource t) {
    tensors_.push_back(std::move(t));
    return *this;
  }
  SafetensorsWriter& set_metadata(const std::string& key, std::string value) {
    SPEX_CHECK(key != kMetadataKey, "metadata key '" << kMetadataKey << "' is spex's own (layers)");
    SPEX_CHECK(!metadata_.count(key), "metadata key '" << key << "' set twice");
    metadata_[key] = std::move(value);
    return *this;
  }
  /// Writes the file. Throws spex::Error, writing nothing, when the storage of a parameter added
  /// was replaced since (core/parameter.hpp, Lifetime).
  void write(const std::string& path, const WriteOptions& opt = {}) const {
    for (const auto& [name, stamps] : stamps_) check_current(name, stamps, "SafetensorsWriter::write");
    auto metadata = metadata_;
    if (!layers_.empty()) {
      SpexMetadata m;
      m.layers = layers_;
      metadata[kMetadataKey] = m.dump();
    }
    write_safetensors(path, tensors_, metadata, opt);
  }

 private:
  std::vector<TensorSource> tensors_;
  std::vector<std::pair<std::string, ParameterStamps>> stamps_;  // of the parameters added, checked by write()
  std::map<std::string, std::string> metadata_;
  nlohmann::json layers_ = nlohmann::json::object();
};

}  // namespace spex
