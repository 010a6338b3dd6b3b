#pragma once
// Parameter groups and gradient utilities over the named parameter lists layers hand out
// (core/parameter.hpp): groups with their own learning rate and weight decay (the PKM
// reference trains its value tables with their own lr), built from any number of predicates,
// and global-norm gradient clipping over dense and row-sparse gradients together.
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "../core/check.hpp"
#include "../core/parameter.hpp"

namespace spex {

/// Parameters stepped with one learning rate and weight decay. Unset fields take the
/// optimizer's: lr = lr (when set) else the optimizer's lr * lr_scale (which follows a
/// schedule that changes the optimizer's lr); weight_decay likewise.
template <class T>
struct ParamGroup {
  std::string name;
  ParameterList<T> params;
  double lr_scale = 1.0;
  std::optional<double> lr;
  std::optional<double> weight_decay;

  /// The learning rate and weight decay of this group under an optimizer's settings.
  double effective_lr(double optimizer_lr) const { return lr ? *lr : optimizer_lr * lr_scale; }
  double effective_weight_decay(double optimizer_wd) const { return weight_decay ? *weight_decay : optimizer_wd; }
};

/// All of `params` in one group with the optimizer's settings.
template <class T>
std::vector<ParamGroup<T>> single_group(const ParameterList<T>& params) {
  return {ParamGroup<T>{"all", params, 1.0, std::nullopt, std::nullopt}};
}

/// `params` with every parameter that `pick` selects frozen whole: its gradient is dropped
/// from the list, so an optimizer made from it steps neither it nor any state for it, and
/// grad_norm and clipping do not count it (backward still computes its gradient: a layer's own
/// freeze(), e.g. Peer::freeze, also saves that work). Any parameter of any block can be frozen
/// this way: the Linear and Norm around a grown PEER block as well as the block's retrieval.
///   Adam<float> adam(frozen(model_params, [](const auto& p) { return p.name.rfind("block.experts.", 0) != 0; }), cfg);
template <class T, class Pick>
ParameterList<T> frozen(ParameterList<T> params, Pick pick) {
  for (auto& p : params)
    if (pick(static_cast<const Parameter<T>&>(p))) {
      p.grad = nullptr;
      p.sparse_grad = nullptr;
      p.frozen_rows = 0;
    }
  return params;
}

/// One rule of make_groups: parameters that `pick` selects go to group `name`.
template <class T>
struct GroupRule {
  std::string name;
  std::function<bool(const Parameter<T>&)> pick;
  double lr_scale = 1.0;
  std::optional<double> lr;
  std::optional<double> weight_decay;
};

/// Throws unless the group's settings are usable (finite, >= 0), naming the group.
template <class T>
void check_group(const ParamGroup<T>& g) {
  const std::string group = "group '" + g.name + "': ";
  check_at_least(g.lr_scale, 0, group + "lr_scale");
  if (g.lr) check_at_least(*g.lr, 0, group + "lr");
  if (g.weight_decay) check_at_least(*g.weight_decay, 0, group + "weight_decay");
}

/// Splits `params` by rules: each parameter goes to the first rule that picks it; the ones no
/// rule picks go to a last group `rest_name` with the optimizer's settings (left out when
/// empty). Groups come in rule order, one per rule, even when empty.
template <class T>
std::vector<ParamGroup<T>> make_groups(const ParameterList<T>& params, const std::vector<GroupRule<T>>& rules,
                                       const std::string& rest_name = "rest") {
  std::vector<ParamGroup<T>> groups;
  for (const auto& r : rules) {
    SPEX_CHECK(bool(r.pick), "group rule '" << r.name << "' has no predicate");
    groups.push_back(ParamGroup<T>{r.name, {}, r.lr_scale, r.lr, r.weight_decay});
    check_group(groups.back());
  }
  ParamGroup<T> rest{rest_name, {}, 1.0, std::nullopt, std::nullopt};
  for (const auto& p : params) {
    std::size_t i = 0;
    while (i < rules.size() && !rules[i].pick(p)) ++i;
    (i < rules.size() ? groups[i] : rest).params.push_back(p);
  }
  if (!rest.params.empty()) groups.push_back(std::move(rest));
  return groups;
}

namespace detail {
/// What every optimizer checks of its groups: usable settings, no parameter twice, and a
/// row-sparse gradient that never holds a frozen row (its own frozen rows are the parameter's;
/// the optimizers rely on it and skip no rows of it).
template <class T>
void check_groups(const std::vector<ParamGroup<T>>& groups) {
  ParameterList<T> all;
  for (const auto& g : groups) {
    check_group(g);
    check_current(g.params, "optimizer");
    for (const auto& p : g.params)
      SPEX_CHECK(!p.sparse_grad || p.sparse_grad->frozen_rows() == p.frozen_rows,
                 "parameter '" << p.name << "' has " << p.frozen_rows << " frozen rows, its row-sparse gradient "
                               << p.sparse_grad->frozen_rows() << ": take the list from the layer's parameters(grads)");
    all.insert(all.end(), g.params.begin(), g.params.end());
  }
  check_unique_names(all);
}

/// An optimizer's per-parameter state as named tensors "<prefix><kind>.<parameter name>", for
/// checkpoints: one buffer per parameter in group order for each kind ("m" and "v", or
/// "momentum"); empty buffers (parameters without state) are skipped. V is T or const T.
template <class V, class T, class Buffers>
ParameterList<V> state_tensors(const std::vector<ParamGroup<T>>& groups, const std::string& prefix, const char* kind,
                               Buffers& buffers, const char* kind2 = nullptr, Buffers* buffers2 = nullptr) {
  ParameterList<V> out;
  std::size_t i = 0;
  for (const auto& g : groups)
    for (const auto& p : g.params) {
      if (buffers[i].size() > 0) out.push_back(dense_parameter<V>(prefix + kind + "." + p.name, buffers[i], nullptr));
      if (buffers2 && (*buffers2)[i].size() > 0)
        out.push_back(dense_parameter<V>(prefix + kind2 + "." + p.name, (*buffers2)[i], nullptr));
      ++i;
    }
  return out;
}
}  // namespace detail

namespace detail {
/// The gradient of a dense parameter's rows that are not frozen.
template <class T>
auto trainable_grad(const Parameter<T>& p) {
  return p.grad_map().bottomRows(p.rows - p.frozen_rows);
}
}  // namespace detail

/// L2 norm of all gradients: dense ones (rows not frozen) and the rows a row-sparse one holds
/// (each row once, duplicates already summed).
template <class T>
double grad_norm(const ParameterList<T>& params) {
  check_current(params, "grad_norm");
  double s = 0;
  for (const auto& p : params) {
    if (p.grad) s += detail::trainable_grad(p).template cast<double>().squaredNorm();
    if (p.sparse_grad) s += p.sparse_grad->values().template cast<double>().squaredNorm();
  }
  return std::sqrt(s);
}

/// clip_grad_norm with the norm given: for a norm computed over more than `params` (the
/// gradients of a model sharded over processes: dist::clip_grad_norm).
template <class T>
double clip_grad_norm_to(const ParameterList<T>& params, double norm, double max_norm) {
  check_positive(max_norm, "max_norm");
  check_current(params, "clip_grad_norm");
  SPEX_CHECK(std::isfinite(norm), "the gradient norm is " << norm << ": a gradient holds NaN or Inf");
  if (norm <= max_norm) return norm;
  const T scale = T(max_norm / (norm + 1e-6));
  for (const auto& p : params) {
    if (p.grad) detail::trainable_grad(p) *= scale;
    if (p.sparse_grad) p.sparse_grad->values() *= scale;
  }
  return norm;
}

/// Scales every gradient by max_norm / (norm + 1e-6) when the global norm exceeds max_norm
/// (PyTorch's clip_grad_norm_). Returns the norm before clipping. A non-finite norm throws,
/// leaving the gradients unchanged.
template <class T>
double clip_grad_norm(const ParameterList<T>& params, double max_norm) {
  check_current(params, "clip_grad_norm");
  return clip_grad_norm_to(params, grad_norm(params), max_norm);
}

}  // namespace spex
