#pragma once
// SafetensorsLoader: stages parameters, layers, optimizer state and states from one safetensors
// file, each validated at once, then commits all of them or none (the contract below).
// checkpoint.hpp says how a checkpoint uses it.
#include "checkpoint_state.hpp"

namespace spex {

/// Stages the restoration of parameters, layers, optimizers and states from one file, then
/// commits all of them at once. All-or-nothing contract:
///  - each staging call checks everything its part could fail on (names, shapes, dtypes,
///    values, conversions and roundings, scales, states) and allocates what writing it needs,
///    and throws spex::Error on any problem; nothing is written before commit();
///  - once a staging call has thrown, commit() refuses (writing nothing): make a new loader;
///  - commit() first checks that no staged object's storage was replaced since it was staged
///    (core/parameter.hpp, Lifetime), then writes every part, and nothing in that can fail.
/// A mapped table staged for a copy becomes an owned copy while staging (same values).
/// Thread safety: one thread per loader; the objects staged must not be used until commit().
class SafetensorsLoader {
 public:
  explicit SafetensorsLoader(const std::string& path) : file_(path) {}
  explicit SafetensorsLoader(SafetensorsFile file) : file_(std::move(file)) {}

  const SafetensorsFile& file() const { return file_; }
  const std::string& metadata(const std::string& key) const {
    const auto it = file_.metadata().find(key);
    SPEX_CHECK(it != file_.metadata().end(), file_.path() << ": no metadata '" << key << "'");
    return it->second;
  }
  bool has_metadata(const std::string& key) const { return file_.metadata().count(key) > 0; }

  /// `params` named as in the file; tensors starting with `scope` and matching no parameter
  /// are unexpected (an error when strict).
  template <class T>
  SafetensorsLoader& parameters(const ParameterList<T>& params, const std::string& scope = "", const LoadOptions& opt = {},
                                const std::vector<std::string>& read_elsewhere = {}) {
    return stage([&] {
      auto load = std::make_shared<ParameterLoad<T>>(file_.view(), file_.keep_alive(), params, scope, opt, file_.is_mapped_file(),
                                                     read_elsewhere);
      merge(load->report());
      checks_.push_back([load] { load->check_current("SafetensorsLoader::commit"); });
      actions_.push_back([load] { load->apply(); });
    });
  }

  /// A layer's parameters under `prefix`. When the file describes a layer at `prefix`, its kind
  /// and config must be this layer's (check_finite aside), and its state (ReMoE's lambda) is
  /// restored too.
  template <class L>
  SafetensorsLoader& layer(L& layer, const std::string& prefix = "", const LoadOptions& opt = {}) {
    return stage([&] { stage_layer(layer, prefix, opt); });
  }

  /// An optimizer's state written by SafetensorsWriter::add_optimizer(prefix, ...) for the same
  /// parameter list.
  template <class Opt>
  SafetensorsLoader& optimizer(Opt& opt, const std::string& prefix) {
    return optimizer(opt, prefix, opt.state(prefix));
  }
  /// The same for the part `state` of the optimizer's state list (opt.state(prefix)), and its
  /// step count: a file that holds only some of its tensors (dist/checkpoint.hpp).
  template <class Opt, class T>
  SafetensorsLoader& optimizer(Opt& opt, const std::string& prefix, const ParameterList<T>& state) {
    return stage([&] {
      const std::string where = file_.path() + ": optimizer '" + prefix + "'";
      nlohmann::json j = parse_state(prefix, where);
      const std::string kind = detail::string_field(j, "kind");
      SPEX_CHECK(kind == detail::OptimizerKind<Opt>::name,
                 where << ": the file holds the state of a " << printable(kind) << " optimizer, not " << detail::OptimizerKind<Opt>::name);
      if constexpr (detail::OptimizerKind<Opt>::has_steps) {
        const long t = detail::state_field<long>(j, "steps", where);
        SPEX_CHECK(t >= 0, where << ": steps = " << t << " must be >= 0");
        actions_.push_back([&opt, t] { opt.set_steps(t); });
      }
      parameters(state, prefix);
    });
  }

  SafetensorsLoader& state(LambdaController& c, const std::string& key) {
    return stage([&] {
      const std::string where = file_.path() + ": state '" + key + "'";
      const nlohmann::json j = parse_state(key, where, "LambdaController");
      LambdaController::State s;
      s.lambda = detail::state_field<double>(j, "lambda", where);
      s.alpha = detail::state_field<double>(j, "alpha", where);
      s.target = detail::state_field<double>(j, "target", where);
      s.min_lambda = detail::state_field<double>(j, "min_lambda", where);
      s.max_lambda = detail::state_field<double>(j, "max_lambda", where);
      s.steps = detail::state_field<long>(j, "steps", where);
      s.steps_at_min = detail::state_field<long>(j, "steps_at_min", where);
      s.steps_at_max = detail::state_field<long>(j, "steps_at_max", where);
      s.consecutive_at_bound = detail::state_field<long>(j, "consecutive_at_bound", where);
      // The smoothed rule's fields: absent in files written before it existed (the sign rule).
      if (j.contains("rule")) {
        const std::string rule = detail::state_field<std::string>(j, "rule", where);
        SPEX_CHECK(rule == to_string(LambdaRule::sign) || rule == to_string(LambdaRule::smoothed),
                   where << ": state field 'rule' = '" << printable(rule) << "' is not sign or smoothed");
        s.rule = rule == to_string(LambdaRule::sign) ? LambdaRule::sign : LambdaRule::smoothed;
        s.smoothing = detail::state_field<double>(j, "smoothing", where);
        s.band = detail::state_field<double>(j, "band", where);
        s.average = detail::state_field<double>(j, "average", where);
      }
      LambdaController probe;
      try {
        probe.set_state(s);
      } catch (const Error& e) {
        SPEX_CHECK(false, where << ": " << e.what());
      }
      actions_.push_back([&c, s] { c.set_state(s); });
    });
  }

  SafetensorsLoader& state(Rng& r, const std::string& key) {
    return stage([&] {
      const std::string where = file_.path() + ": state '" + key + "'";
      const nlohmann::json j = parse_state(key, where, "Rng");
      Rng::State s;
      s.counter = detail::state_field<std::uint64_t>(j, "counter", where);
      s.spare = detail::state_field<double>(j, "spare", where);
      s.has_spare = detail::state_field<bool>(j, "has_spare", where);
      actions_.push_back([&r, s] { r.set_state(s); });
    });
  }

  /// Throws unless commit() would write every part: no staging call failed, and no staged
  /// object's storage was replaced since (a caller committing several loaders at once checks
  /// them all first: dist/checkpoint.hpp).
  void check_ready() const {
    SPEX_CHECK(!failed_, file_.path() << ": a staging call of this loader threw; nothing was written, and this loader cannot "
                                         "commit: stage the load again with a new SafetensorsLoader");
    for (auto& c : checks_) c();
  }

  /// Writes every staged part; returns what was copied, mapped, missing and unexpected. Throws,
  /// writing nothing, when a staging call failed or a staged object's storage was replaced
  /// since it was staged.
  LoadReport commit() {
    check_ready();
    for (auto& a : actions_) a();
    actions_.clear();
    checks_.clear();
    return report_;
  }

 private:
  // Runs a staging step; if it throws, the loader can no longer commit.
  template <class F>
  SafetensorsLoader& stage(F&& f) {
    try {
      f();
    } catch (...) {
      failed_ = true;
      throw;
    }
    return *this;
  }

  template <class L>
  void stage_layer(L& layer, const std::string& prefix, const LoadOptions& opt) {
    const SpexMetadata meta = SpexMetadata::parse(file_.metadata(), file_.path());
    if (meta.layers.contains(prefix)) {
      const std::string where = file_.path() + ": layer '" + prefix + "'";
      const auto entry = read_layer_entry<L>(meta.layers[prefix], meta.minor, where);
      check_same_config(normalized(entry.config), normalized(layer.config()), where);
      SPEX_CHECK(!opt.storage || !detail::has_compact_tables<L> || *opt.storage == storage_of(layer),
                 where << ": LoadOptions::storage asks for other tables than the layer's (set_storage, or load_layer)");
      if constexpr (LayerKind<L>::has_lambda) {
        check_range(entry.lambda, 0, kMaxLambda, "lambda in the file");
        actions_.push_back([&layer, lambda = entry.lambda] { layer.set_lambda(lambda); });
      }
    }
    try {
      if constexpr (detail::has_compact_tables<L>) {
        auto tables = std::make_shared<CompactTableLoad>(file_.view(), file_.keep_alive(), layer.compact_tables(prefix), opt,
                                                         file_.is_mapped_file());
        parameters(layer.parameters(prefix), prefix, opt, tables->names());
        merge(tables->report());
        actions_.push_back([tables] { tables->apply(); });
        return;
      }
      parameters(layer.parameters(prefix), prefix, opt);
    } catch (const Error& e) {
      const std::string hints = detail::config_hints(layer.config(), detail::tensor_rows(file_, prefix));
      if (hints.empty()) throw;
      throw Error(e.what() + hints);
    }
  }

  nlohmann::json parse_state(const std::string& key, const std::string& where, const char* kind = nullptr) const {
    return detail::guard_json(where, [&] { return parse_state_unguarded(key, where, kind); });
  }
  nlohmann::json parse_state_unguarded(const std::string& key, const std::string& where, const char* kind) const {
    const std::string& text = metadata(key);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      SPEX_CHECK(false, where << ": not valid JSON (" << e.what() << ")");
    }
    SPEX_CHECK(j.is_object(), where << ": not a JSON object");
    if (kind) SPEX_CHECK(detail::string_field(j, "kind") == kind, where << ": holds " << detail::string_field(j, "kind", "?") << ", not " << kind);
    return j;
  }

  static ProductKeyLayerConfig normalized(const ProductKeyLayerConfig& c) { return detail::resolve(c); }
  template <class L>
  static TableStorage storage_of(const L& layer) {
    if constexpr (detail::has_compact_tables<L>) return layer.storage();
    else return TableStorage::native;
  }
  static MoEConfig normalized(MoEConfig c) {
    validate(c);
    if (c.d_out == 0) c.d_out = c.d_in;
    if (c.hidden == 0) c.hidden = 4 * c.d_in;
    return c;
  }

  template <class C>
  static void check_same_config(const C& in_file, const C& in_layer, const std::string& where) {
    nlohmann::json a = config_to_json(in_file), b = config_to_json(in_layer);
    for (const char* free_field : {"check_finite", "storage"}) {  // how a layer checks and stores, not what it computes
      a.erase(free_field);
      b.erase(free_field);
    }
    std::string diff;
    for (const auto& kv : a.items())
      if (kv.value() != b[kv.key()]) diff += "\n  " + kv.key() + ": file " + kv.value().dump() + ", layer " + b[kv.key()].dump();
    SPEX_CHECK(diff.empty(), where << ": the file's config differs from the layer's" << diff);
  }

  void merge(const LoadReport& r) {
    auto add = [](std::vector<std::string>& to, const std::vector<std::string>& from) { to.insert(to.end(), from.begin(), from.end()); };
    add(report_.copied, r.copied);
    add(report_.mapped, r.mapped);
    add(report_.missing, r.missing);
    add(report_.unexpected, r.unexpected);
  }

  SafetensorsFile file_;
  std::vector<std::function<void()>> checks_;   // run by commit() before any action: may throw
  std::vector<std::function<void()>> actions_;  // cannot fail
  LoadReport report_;
  bool failed_ = false;
};

}  // namespace spex
