#pragma once
// What the safetensors writer and loader share: which layers may hold compact tables, the
// optimizers' kinds, the JSON form of the lambda controller's and the RNG's states (doubles with
// 17 significant digits: read back bit for bit), and the typed reading of their fields.
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "../core/random.hpp"
#include "../optim/adam.hpp"
#include "../optim/sgd.hpp"
#include "../select/sparsity.hpp"
#include "compact_tables.hpp"
#include "layer_config.hpp"
#include "parameter_load.hpp"
#include "safetensors.hpp"

namespace spex {

namespace detail {
/// Peer and Pkm: layers whose expert tables may be stored compact.
template <class L>
constexpr bool has_compact_tables = std::is_same<typename L::Config, ProductKeyLayerConfig>::value;

template <class Opt>
struct OptimizerKind;
template <class T, class Arch>
struct OptimizerKind<Adam<T, Arch>> {
  static constexpr const char* name = "Adam";
  static constexpr bool has_steps = true;
};
template <class T>
struct OptimizerKind<Sgd<T>> {
  static constexpr const char* name = "Sgd";
  static constexpr bool has_steps = false;
};

inline nlohmann::json state_json(const LambdaController::State& s) {
  return {{"kind", "LambdaController"}, {"lambda", s.lambda}, {"alpha", s.alpha}, {"target", s.target},
          {"min_lambda", s.min_lambda}, {"max_lambda", s.max_lambda}, {"steps", s.steps}, {"steps_at_min", s.steps_at_min},
          {"steps_at_max", s.steps_at_max}, {"consecutive_at_bound", s.consecutive_at_bound},
          {"rule", to_string(s.rule)}, {"smoothing", s.smoothing}, {"band", s.band}, {"average", s.average}};
}
inline nlohmann::json state_json(const Rng::State& s) {
  return {{"kind", "Rng"}, {"counter", s.counter}, {"spare", s.spare}, {"has_spare", s.has_spare}};
}

/// Field `name` of a state object, with the type checked; throws naming `where`.
template <class V>
V state_field(const nlohmann::json& j, const char* name, const std::string& where) {
  SPEX_CHECK(j.contains(name), where << ": state has no field '" << name << "'");
  const auto& f = j[name];
  if constexpr (std::is_same<V, bool>::value) SPEX_CHECK(f.is_boolean(), where << ": state field '" << name << "' is not a boolean");
  else if constexpr (std::is_integral<V>::value) SPEX_CHECK(f.is_number_integer(), where << ": state field '" << name << "' is not an integer");
  else if constexpr (std::is_same<V, std::string>::value) SPEX_CHECK(f.is_string(), where << ": state field '" << name << "' is not a string");
  else SPEX_CHECK(f.is_number(), where << ": state field '" << name << "' is not a number");
  return f.get<V>();
}
}  // namespace detail

}  // namespace spex
