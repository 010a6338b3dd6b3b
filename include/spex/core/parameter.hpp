#pragma once
// A named view of one parameter tensor and its gradient, the list every layer hands to
// optimizers (and later to serialization). Views alias the layer's and the grads' storage.
#include <string>
#include <vector>

#include "sparse_rows.hpp"
#include "types.hpp"

namespace spex {

/// One parameter: `rows x cols` row-major values at `value`; its gradient is dense (`grad`,
/// same shape), row-sparse (`sparse_grad`), or absent (both null: a buffer such as BatchNorm's
/// running statistics, listed for saving, never stepped). Some dense gradients are zeroed
/// lazily (FfnExperts): while `*stale` is true the dense gradient reads as zero, whatever
/// `grad` holds; grad_is_zero() tells.
template <class T>
struct Parameter {
  std::string name;
  T* value = nullptr;
  Index rows = 0, cols = 0;
  T* grad = nullptr;
  SparseRowGrad<T>* sparse_grad = nullptr;
  const bool* stale = nullptr;

  bool grad_is_zero() const { return stale != nullptr && *stale; }

  Eigen::Map<RowMat<T>> value_map() const { return Eigen::Map<RowMat<T>>(value, rows, cols); }
  Eigen::Map<RowMat<T>> grad_map() const { return Eigen::Map<RowMat<T>>(grad, rows, cols); }
  bool trainable() const { return grad != nullptr || sparse_grad != nullptr; }
};

template <class T>
using ParameterList = std::vector<Parameter<T>>;

/// A dense parameter (any Eigen matrix or vector) with its same-shaped gradient, or none (null:
/// a buffer such as running statistics); `stale` marks a lazily zeroed gradient.
template <class T, class M>
Parameter<T> dense_parameter(std::string name, M& value, M* grad, const bool* stale = nullptr) {
  return Parameter<T>{std::move(name), value.data(), Index(value.rows()), Index(value.cols()),
                      grad ? grad->data() : nullptr, nullptr, stale};
}

/// A table whose gradient is row-sparse (or none when grad is null).
template <class T>
Parameter<T> sparse_parameter(std::string name, RowMat<T>& table, SparseRowGrad<T>* grad) {
  return Parameter<T>{std::move(name), table.data(), table.rows(), table.cols(), nullptr, grad, nullptr};
}

/// Appends `more` to `list` with `prefix` before each name ("block3." + "peer.query.weight").
template <class T>
void append_parameters(ParameterList<T>& list, const ParameterList<T>& more, const std::string& prefix = "") {
  for (auto p : more) {
    p.name = prefix + p.name;
    list.push_back(std::move(p));
  }
}

}  // namespace spex
