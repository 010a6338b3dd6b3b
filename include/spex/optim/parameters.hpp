#pragma once
// Parameter groups and gradient utilities over the named parameter lists layers hand out
// (core/parameter.hpp): per-group learning rates (the PKM reference trains its value tables
// with their own constant lr), and global-norm gradient clipping over dense and row-sparse
// gradients together.
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "../core/check.hpp"
#include "../core/parameter.hpp"

namespace spex {

/// Parameters stepped with one learning rate (a multiple of the optimizer's).
template <class T>
struct ParamGroup {
  std::string name;
  ParameterList<T> params;
  double lr_scale = 1.0;
};

/// Splits `params` into the ones `pick` selects (group `name`, lr_scale) and the rest ("rest",
/// 1.0): e.g. expert tables vs everything else.
template <class T>
std::vector<ParamGroup<T>> split_groups(const ParameterList<T>& params, const std::string& name, double lr_scale,
                                        const std::function<bool(const Parameter<T>&)>& pick) {
  std::vector<ParamGroup<T>> g{{name, {}, lr_scale}, {"rest", {}, 1.0}};
  for (const auto& p : params) (pick(p) ? g[0] : g[1]).params.push_back(p);
  return g;
}

/// L2 norm of all gradients: dense ones (a lazily zeroed one counts as zero) and the rows a
/// row-sparse one holds (each row once, duplicates already summed).
template <class T>
double grad_norm(const ParameterList<T>& params) {
  double s = 0;
  for (const auto& p : params) {
    if (p.grad && !p.grad_is_zero()) s += p.grad_map().template cast<double>().squaredNorm();
    if (p.sparse_grad) s += p.sparse_grad->values().template cast<double>().squaredNorm();
  }
  return std::sqrt(s);
}

/// Scales every gradient by max_norm / (norm + 1e-6) when the global norm exceeds max_norm
/// (PyTorch's clip_grad_norm_). Returns the norm before clipping. A non-finite norm throws.
template <class T>
double clip_grad_norm(ParameterList<T>& params, double max_norm) {
  SPEX_CHECK(max_norm > 0, "max_norm = " << max_norm << " must be > 0");
  const double norm = grad_norm(params);
  SPEX_CHECK(std::isfinite(norm), "the gradient norm is " << norm << ": a gradient holds NaN or Inf");
  if (norm <= max_norm) return norm;
  const T scale = T(max_norm / (norm + 1e-6));
  for (auto& p : params) {
    if (p.grad && !p.grad_is_zero()) p.grad_map() *= scale;
    if (p.sparse_grad) p.sparse_grad->values() *= scale;
  }
  return norm;
}

}  // namespace spex
