#pragma once
// A named view of one parameter tensor and its gradient, the list every layer hands to
// optimizers and to serialization. Views alias the layer's and the grads' storage.
//
// Lifetime rule: a Parameter points into the layer object and into the Grads object it was
// taken with. Forward, backward, zero_grads(), loads that copy and optimizer steps never move
// that storage, so a list (and an optimizer made from it) stays valid across them. These
// replace it, and make every list taken before stale: a mapped load (LoadOptions::map) and
// set_storage() (the expert tables), grow() and freeze() (shapes, frozen rows), assigning,
// moving or destroying the layer or the Grads. A layer's list records the epochs of its storage
// (core/storage_epoch.hpp); optimizers' step(), zero_grads, grad_norm, clipping, loaders and
// writers check them first and refuse a stale list with a spex::Error naming the parameter and
// what replaced it: take the list again and make the optimizer again (then load its state).
#include <algorithm>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include "check.hpp"
#include "sparse_rows.hpp"
#include "storage_epoch.hpp"
#include "table.hpp"
#include "types.hpp"

namespace spex {

/// The epochs of the storage a Parameter points into, when its list was taken
/// (core/storage_epoch.hpp): the layer's, the expert table's and the gradients'. Lists built
/// by hand from a user's own matrices track nothing.
struct ParameterStamps {
  StorageStamp layer, table, grads;

  /// The first stamp that is no longer current, or null.
  const StorageStamp* stale() const {
    for (const StorageStamp* s : {&layer, &table, &grads})
      if (!s->current()) return s;
    return nullptr;
  }
};

/// Throws spex::Error unless the storage behind parameter `name` is still the one its list was
/// taken of; `user` names the caller.
inline void check_current(const std::string& name, const ParameterStamps& stamps, const char* user) {
  const StorageStamp* s = stamps.stale();
  SPEX_CHECK(!s, user << ": parameter '" << name << "' points into storage replaced since its list was taken ("
                      << to_string(s->kind()) << "); take the list again (layer.parameters(grads)) and make again what holds it "
                                                 "(the optimizer, then load its state; the loader or writer)");
}

/// One parameter: `rows x cols` row-major values at `value`, row r at `value + r * ld` (ld ==
/// cols but for an expert table that lies side by side with others in memory: Table::ld());
/// its gradient is dense (`grad`, same shape, contiguous), row-sparse (`sparse_grad`), or
/// absent (both null: a buffer such as BatchNorm's running statistics, listed for saving, never
/// stepped). `Parameter<const T>` is the read-only form a const layer hands out (never with
/// gradients). Walk the values by row (row(), value_map()), never as one flat array.
///
/// Frozen rows: rows [0, frozen_rows) are left unchanged by training (a grown product-key
/// layer's old experts and sub-key rows): backward writes no gradient for them (a row-sparse
/// gradient never holds them, a dense one keeps them zero), optimizers step neither them nor
/// their state, and grad_norm does not count them.
template <class T>
struct Parameter {
  using Scalar = std::remove_const_t<T>;
  using ValueMap = Eigen::Map<std::conditional_t<std::is_const<T>::value, const RowMat<Scalar>, RowMat<Scalar>>, 0, Eigen::OuterStride<>>;

  std::string name;
  T* value = nullptr;
  Index rows = 0, cols = 0;
  /// The distance between the starts of two rows of value, in values (>= cols; 0, as in a
  /// list built by hand without it: cols). Read it through row_stride().
  Index ld = 0;
  Scalar* grad = nullptr;
  SparseRowGrad<Scalar>* sparse_grad = nullptr;
  /// The table storage behind `value` when it can read a mapped file in place (expert tables;
  /// io/ uses it for memory-mapped loading), else null.
  Table<Scalar>* table = nullptr;
  /// Rows [0, frozen_rows) are frozen (see above); 0: none. With a row-sparse gradient, the
  /// gradient's own (SparseRowGrad::frozen_rows), which never holds them.
  Index frozen_rows = 0;
  /// The epochs of the storage behind value, table, grad and sparse_grad (Lifetime, above).
  ParameterStamps stamps;

  ValueMap value_map() const { return ValueMap(value, rows, cols, Eigen::OuterStride<>(row_stride())); }
  /// The distance between the starts of two rows: ld, or cols when ld is 0.
  Index row_stride() const { return ld > 0 ? ld : cols; }
  /// Row r of the values.
  T* row(Index r) const { return value + r * row_stride(); }
  /// Whether the values are one contiguous array (rows cols apart).
  bool contiguous() const { return row_stride() == cols || rows <= 1; }
  Eigen::Map<RowMat<Scalar>> grad_map() const { return Eigen::Map<RowMat<Scalar>>(grad, rows, cols); }
  bool trainable() const { return grad != nullptr || sparse_grad != nullptr; }
  /// Entries of the trainable rows [frozen_rows, rows); contiguous values (a dense parameter's)
  /// start them at value + frozen_entries().
  Index trainable_entries() const { return (rows - frozen_rows) * cols; }
  Index frozen_entries() const { return frozen_rows * cols; }
  Index size() const { return rows * cols; }
};

template <class T>
using ParameterList = std::vector<Parameter<T>>;

/// A dense parameter (any Eigen matrix or vector) with its same-shaped gradient, or none (null:
/// a buffer such as running statistics); rows [0, frozen_rows) frozen.
template <class T, class M>
Parameter<T> dense_parameter(std::string name, M& value, std::remove_const_t<M>* grad, Index frozen_rows = 0) {
  if (grad) check_shape(*grad, value.rows(), value.cols(), "gradient of a dense parameter");
  SPEX_CHECK(frozen_rows >= 0 && frozen_rows <= Index(value.rows()),
             "frozen rows = " << frozen_rows << " of '" << name << "' must be in [0, " << value.rows() << "]");
  return Parameter<T>{std::move(name), value.data(), Index(value.rows()), Index(value.cols()), Index(value.cols()),
                      grad ? grad->data() : nullptr, nullptr, nullptr, frozen_rows, {}};
}

/// A table whose gradient is row-sparse (or none when grad is null); its frozen rows are the
/// gradient's (SparseRowGrad::frozen_rows).
template <class T>
Parameter<T> sparse_parameter(std::string name, RowMat<T>& table, SparseRowGrad<T>* grad) {
  if (grad)
    SPEX_CHECK(grad->n_rows() == table.rows() && grad->width() == table.cols(),
               "the row-sparse gradient of '" << name << "' is for a " << grad->n_rows() << " x " << grad->width()
                                              << " table, the table is " << table.rows() << " x " << table.cols());
  return Parameter<T>{std::move(name), table.data(), table.rows(), table.cols(), table.cols(), nullptr, grad, nullptr,
                      grad ? grad->frozen_rows() : 0, {}};
}

/// A Table (core/table.hpp) with its row-sparse gradient (or none). A mapped table is copied
/// into owned memory first: the list hands out writable values (rows table.ld() apart).
template <class T>
Parameter<T> sparse_parameter(std::string name, Table<T>& table, SparseRowGrad<T>* grad) {
  if (grad)
    SPEX_CHECK(grad->n_rows() == table.rows() && grad->width() == table.cols(),
               "the row-sparse gradient of '" << name << "' is for a " << grad->n_rows() << " x " << grad->width()
                                              << " table, the table is " << table.rows() << " x " << table.cols());
  T* value = table.mutable_data();
  Parameter<T> p{std::move(name), value, table.rows(), table.cols(), table.ld(), nullptr, grad, nullptr,
                 grad ? grad->frozen_rows() : 0, {}};
  p.table = &table;
  p.stamps.table = table.stamp();
  return p;
}

/// The read-only form of a Table (never copies a mapped one).
template <class T>
Parameter<const T> table_parameter(std::string name, const Table<T>& table) {
  Parameter<const T> p{std::move(name), table.data(), table.rows(), table.cols(), table.ld(), nullptr, nullptr, nullptr, 0, {}};
  p.stamps.table = table.stamp();
  return p;
}

/// Records in every entry of `list` the epochs of the layer (and of the Grads, when given) it
/// points into: what a layer's parameters() does before handing a list out.
template <class T>
ParameterList<T> stamped(ParameterList<T> list, const StorageEpoch& layer, const StorageEpoch* grads = nullptr) {
  for (auto& p : list) {
    p.stamps.layer = layer.stamp(StampKind::layer);
    if (grads) p.stamps.grads = grads->stamp(StampKind::grads);
  }
  return list;
}

/// Throws spex::Error unless every entry's storage is still the one the list was taken of.
template <class T>
void check_current(const ParameterList<T>& list, const char* user) {
  for (const auto& p : list) check_current(p.name, p.stamps, user);
}

/// Appends `more` to `list` with `prefix` before each name ("block3." + "query.weight").
template <class T>
void append_parameters(ParameterList<T>& list, const ParameterList<T>& more, const std::string& prefix = "") {
  for (auto p : more) {
    p.name = prefix + p.name;
    list.push_back(std::move(p));
  }
}

/// Same list with `prefix` before each name.
template <class T>
ParameterList<T> prefixed(ParameterList<T> list, const std::string& prefix) {
  for (auto& p : list) p.name = prefix + p.name;
  return list;
}

/// The read-only form of a list (drops the gradients).
template <class T>
ParameterList<const T> read_only(const ParameterList<T>& list) {
  ParameterList<const T> out;
  out.reserve(list.size());
  for (const auto& p : list) {
    out.push_back(Parameter<const T>{p.name, p.value, p.rows, p.cols, p.ld, nullptr, nullptr, nullptr, 0,
                                     ParameterStamps{p.stamps.layer, p.stamps.table, StorageStamp()}});
  }
  return out;
}

/// The parameter called `name`, or null.
template <class T>
Parameter<T>* find_parameter(ParameterList<T>& list, const std::string& name) {
  for (auto& p : list)
    if (p.name == name) return &p;
  return nullptr;
}
template <class T>
const Parameter<T>* find_parameter(const ParameterList<T>& list, const std::string& name) {
  for (const auto& p : list)
    if (p.name == name) return &p;
  return nullptr;
}

/// The parameter called `name`; throws spex::Error listing the names the list has.
template <class T>
const Parameter<T>& parameter(const ParameterList<T>& list, const std::string& name) {
  const Parameter<T>* p = find_parameter(list, name);
  if (!p) {
    std::string names;
    for (std::size_t i = 0; i < list.size(); ++i) names += (i ? ", " : "") + list[i].name;
    SPEX_CHECK(false, "no parameter named '" << name << "'; the list has: " << (names.empty() ? "(none)" : names));
  }
  return *p;
}

/// Throws if two parameters share a name (two layers listed without distinct prefixes).
template <class T>
void check_unique_names(const ParameterList<T>& list) {
  std::unordered_set<std::string> seen;
  for (const auto& p : list)
    SPEX_CHECK(seen.insert(p.name).second,
               "parameter name '" << p.name << "' appears twice: give each layer its own prefix, e.g. parameters(grads, \"block1.\")");
}

/// Clears every gradient of the list (dense ones set to zero, row-sparse ones emptied): one
/// call per optimizer step, since backward accumulates. Frozen rows are zeroed too (they hold
/// zero already when only backward wrote them).
template <class T>
void zero_grads(const ParameterList<T>& list) {
  check_current(list, "zero_grads");
  for (const auto& p : list) {
    if (p.grad) std::fill(p.grad, p.grad + p.size(), std::remove_const_t<T>(0));
    if (p.sparse_grad) p.sparse_grad->zero();
  }
}

}  // namespace spex
