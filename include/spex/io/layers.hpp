#pragma once
// One-call saving and loading of layers (weights + config):
//   save_layer("peer.safetensors", peer);                          // weights, kind, config
//   auto p = load_layer<Peer<float>>("peer.safetensors");          // built from the file alone
//   LoadOptions o; o.map = true;
//   auto m = load_layer<Peer<float>>("peer.safetensors", "", o);   // expert tables read in place
//   load_into("peer.safetensors", peer);                           // into an existing layer
// Several layers in one file: SafetensorsWriter::add_layer with a prefix each, then
// load_layer<L>(path, prefix). These are free functions rather than static members
// (Peer<float>::load) so that the layers stay free of the JSON dependency io/ brings.
#include <string>

#include "checkpoint.hpp"

namespace spex {

namespace detail {
/// Builds layers for loaders: Peer and Pkm with their expert tables allocated but not filled
/// (a 4 GiB table is neither initialized nor touched before the load maps or fills it).
struct LayerFactory {
  template <class L>
  static L make_unfilled(const typename L::Config& cfg) {
    if constexpr (std::is_same<typename L::Config, ProductKeyLayerConfig>::value) return L(cfg, Unfilled{});
    else return L(cfg);
  }
};
}  // namespace detail

/// Writes `layer` (weights, kind, config) to `path`, stored as `dtype` (default: as in memory).
template <class L>
void save_layer(const std::string& path, const L& layer, const std::string& prefix = "", std::optional<DType> dtype = {}) {
  SafetensorsWriter().add_layer(prefix, layer, dtype).write(path);
}

/// The layer saved at `prefix` of the file, built from its recorded config. Every parameter
/// must be in the file (also when opt.strict is false, which then only tolerates tensors
/// the layer does not have). With opt.map, expert tables stored as the layer stores them are
/// read in place. opt.storage picks the layer's table storage (Peer, Pkm): a float file then
/// loads as bf16 or int8 tables (quantized on load), a compact one as float.
template <class L>
L load_layer(const SafetensorsFile& file, const std::string& prefix = "", LoadOptions opt = {}, LoadReport* report = nullptr) {
  const SpexMetadata meta = SpexMetadata::parse(file.metadata(), file.path());
  if (!meta.layers.contains(prefix)) {
    std::string have;
    for (const auto& kv : meta.layers.items()) have += (have.empty() ? "'" : ", '") + kv.key() + "'";
    SPEX_CHECK(false, file.path() << ": no layer recorded at prefix '" << prefix << "'; the file records "
                                  << (have.empty() ? std::string("no layers (saved without add_layer / save_layer?)") : "layers at " + have));
  }
  const std::string where = file.path() + ": layer '" + prefix + "'";
  auto entry = read_layer_entry<L>(meta.layers[prefix], meta.minor, where);
  if (opt.storage) {
    if constexpr (detail::has_compact_tables<L>) entry.config.storage = *opt.storage;
    else SPEX_CHECK(false, where << ": LoadOptions::storage applies to Peer and Pkm only");
  }
  // The file's config decides how much memory the layer takes: every parameter must be in the
  // file, so a config whose parameters need more values than the file's tensors hold (a
  // corrupted or hostile file) is rejected before anything is allocated.
  double in_file = 0;
  for (const auto& t : file.tensors())
    if (t.name.compare(0, prefix.size(), prefix) == 0) in_file += double(t.elements());
  const double wanted = LayerKind<L>::parameter_values(entry.config);
  SPEX_CHECK(wanted <= in_file, where << ": the config describes parameters of " << wanted << " values, the file holds "
                                      << in_file << " under this prefix"
                                      << detail::config_hints(entry.config, detail::tensor_rows(file, prefix)));
  L layer = detail::LayerFactory::make_unfilled<L>(entry.config);
  SafetensorsLoader loader(file);
  loader.layer(layer, prefix, opt);
  const LoadReport r = loader.commit();
  SPEX_CHECK(r.missing.empty(), where << ": the file lacks " << detail::join(r.missing));
  if (report) *report = r;
  return layer;
}
template <class L>
L load_layer(const std::string& path, const std::string& prefix = "", LoadOptions opt = {}, LoadReport* report = nullptr) {
  return load_layer<L>(SafetensorsFile(path), prefix, opt, report);
}

/// Loads the weights (and ReMoE's lambda) saved at `prefix` into an existing layer of the same
/// config; all-or-nothing.
template <class L>
LoadReport load_into(const std::string& path, L& layer, const std::string& prefix = "", const LoadOptions& opt = {}) {
  SafetensorsLoader loader(path);
  loader.layer(layer, prefix, opt);
  return loader.commit();
}

}  // namespace spex
