#pragma once
// Product-key memory's value-only experts (Lample et al. 2019): slot i holds one vector v_i and
// a token with retrieved ids e_j and gates g_j gets y = sum_j g_j v_{e_j} (EmbeddingBag with
// per-sample weights in the reference). PKM "retrieves memory vectors instead of functions".
// For inference the table may be stored compact (bf16, or int8 with a scale per row:
// core/compact_table.hpp); training needs it as T.
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>

#include "../core/check.hpp"
#include "../core/compact_table.hpp"
#include "../core/memory.hpp"
#include "../core/parameter.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../core/sparse_rows.hpp"
#include "../core/table.hpp"
#include "../core/types.hpp"
#include "../kernels/gather.hpp"
#include "../metrics/flops.hpp"

namespace spex {

/// A value table that several Pkm layers read (Memory+'s shared values; docs/pkm.md, "A value
/// pool shared by layers"): one table, one row-sparse gradient that every layer reading it adds
/// to in backward, listed once (parameters()) so that one optimizer state steps it. Shared by
/// std::shared_ptr: the layers (and their gradients) keep it alive. Native T storage only.
/// Under expert parallelism a pool is sharded as the layers' tables are (rows(): slot
/// first + i * step is row i; dist::sharded_value_pool builds it for a communicator).
/// Usage: examples/snippets/memory_layers.cpp (compiled and run by the test suite).
/// Thread safety: the layers reading it must not run backward concurrently (they add to one
/// gradient).
template <class T = float>
class ValuePool {
 public:
  /// n_slots x d_value values ~ N(0, 1/d_value), drawn from `seed` row by row; a shard (`rows`)
  /// holds its rows of those same values.
  ValuePool(Index n_slots, Index d_value, std::uint64_t seed, RowStride rows = {}) : n_slots_(n_slots), rows_(rows) {
    SPEX_CHECK(n_slots >= 1 && d_value >= 1, "ValuePool(" << n_slots << ", " << d_value << ") needs positive sizes");
    SPEX_CHECK(rows.block == 1 && rows.step >= 1 && rows.first >= 0 && rows.first < rows.step && rows.first < n_slots,
               "ValuePool: a shard (first " << rows.first << ", step " << rows.step << ", block " << rows.block << ") of " << n_slots
                                             << " slots needs block 1 and 0 <= first < min(step, n_slots)");
    table_ = Table<T>(rows.rows_of(n_slots), d_value);
    Rng rng(seed);
    fill_normal(table_.mutable_matrix(), 1.0 / std::sqrt(double(d_value)), rng, n_slots, rows);
    grad_ = SparseRowGrad<T>(table_.rows(), d_value);
  }
  /// The slots of the whole pool (of every shard).
  Index n_slots() const { return n_slots_; }
  Index d_value() const { return table_.cols(); }
  /// The slots this process holds (all of them unless sharded): row i is slot first + i * step.
  RowStride rows() const { return rows_; }
  /// This process's rows (rows().rows_of(n_slots()) x d_value).
  const Table<T>& table() const { return table_; }
  /// The values (this process's rows), writable (loading weights).
  typename Table<T>::Map values() { return table_.mutable_matrix(); }
  /// The gradient every layer reading the pool adds to (of this process's rows).
  SparseRowGrad<T>& grad() { return grad_; }
  const SparseRowGrad<T>& grad() const { return grad_; }
  void zero_grad() { grad_.zero(); }
  /// prefix + "experts.values" with the pool's gradient: put it once into the optimizer's list,
  /// next to the layers' own parameters (which do not list the table). The name has the
  /// component "experts." of expert tables, so sharded checkpoints and gradient norms treat a
  /// sharded pool as the shards' (dist/partition.hpp, is_sharded_name).
  ParameterList<T> parameters(const std::string& prefix = "") { return {sparse_parameter<T>(prefix + "experts.values", table_, &grad_)}; }
  /// Read-only, without the gradient (saving).
  ParameterList<const T> parameters(const std::string& prefix = "") const { return {table_parameter<T>(prefix + "experts.values", table_)}; }

 private:
  Index n_slots_ = 0;
  RowStride rows_;
  Table<T> table_;
  SparseRowGrad<T> grad_;
};

/// Thread safety: const methods; distinct caches and grads per concurrent caller.
template <class T = float, class Arch = default_arch>
class ValueExperts {
 public:
  /// A slot's value does not depend on the token: a sharded layer sends the owners no x.
  static constexpr bool kReadsInput = false;
  struct Cache {
    RowScatterPlan plan;
  };
  struct Grads {
    SparseRowGrad<T> values;
    std::shared_ptr<ValuePool<T>> pool;  // pooled experts: backward adds to the pool's gradient instead
    /// The gradient backward adds to.
    SparseRowGrad<T>& target() { return pool ? pool->grad() : values; }
    const SparseRowGrad<T>& target() const { return pool ? pool->grad() : values; }
    /// Clears the gradient (a pooled layer's: the pool's, which every layer reading it shares).
    void zero() { target().zero(); }
    /// Experts [0, frozen_rows()) get no gradient (make_grads).
    Index frozen_rows() const { return target().frozen_rows(); }
    /// f(SparseRowGrad&) for each table's gradient.
    template <class F>
    void for_each_table(F&& f) {
      f(target());
    }
  };

  /// Throws unless `g` was made for a table of this shape (`what` names it).
  void check_grads(const Grads& g, const char* what) const {
    SPEX_CHECK(g.pool == pool_, what << (pool_ ? " were not made for this layer's value pool" : " were made for a layer reading a value pool")
                                     << ": grads were made by another layer");
    check_sparse_grad(g.target(), table(), what, "experts.values");
  }

  ValueExperts() = default;
  /// N slots of d_out; values ~ N(0, 1/d_out) (the PKM reference's N(0, v_dim^-1/2)). Stored
  /// compact, the table is the same draws rounded or quantized block by block.
  ValueExperts(Index n_slots, Index d_out, Rng& rng, TableStorage storage = TableStorage::native)
      : storage_(checked_storage<T>(storage)) {
    checked_size(n_slots, d_out);
    Rng r = rng.split(13);
    if (storage == TableStorage::native) {
      draw_native(n_slots, d_out, r, RowStride{});
    } else {
      cvalues_ = make_compact(storage, n_slots, d_out, normal_rows(d_out, 1.0 / std::sqrt(double(d_out)), r), "experts.values");
    }
  }
  /// The shard `rows` of the N slots the constructor above draws from `rng` (row i is slot
  /// rows.first + i * rows.step), with the same values; native storage (dist/).
  ValueExperts(Index n_slots, Index d_out, Rng& rng, RowStride rows) {
    checked_size(n_slots, d_out);
    Rng r = rng.split(13);
    draw_native(n_slots, d_out, r, rows);
  }
  /// The experts of a layer reading `pool` (its table and its gradient; native storage).
  explicit ValueExperts(std::shared_ptr<ValuePool<T>> pool) : pool_(std::move(pool)) {
    SPEX_CHECK(pool_ != nullptr, "ValueExperts: the value pool is null");
  }
  /// The pool this layer reads, or null.
  const std::shared_ptr<ValuePool<T>>& pool() const { return pool_; }
  /// Table allocated, values unspecified: for loaders that fill or map every row.
  ValueExperts(Index n_slots, Index d_out, TableStorage storage = TableStorage::native) : storage_(checked_storage<T>(storage)) {
    checked_size(n_slots, d_out);
    if (storage == TableStorage::native) values_ = Table<T>(n_slots, d_out);
    else cvalues_ = CompactTable(storage, n_slots, d_out);
  }

  Index n_experts() const { return compact() ? cvalues_.rows() : table().rows(); }
  Index d_out() const { return compact() ? cvalues_.cols() : table().cols(); }

  /// Grows to n_new slots (at least n_experts()): rows 0 .. N - 1 stay, the new rows are drawn
  /// as at construction (rng's split 13). The table is copied once. Native tables only.
  void grow(Index n_new, Rng& rng) { grow(n_experts(), n_new, rng, RowStride{}); }
  /// A shard's growth (dist/): as NeuronExperts::grow(n_old, n_new, rng, rows).
  void grow(Index n_old, Index n_new, Rng& rng, RowStride rows) {
    require_native("grow");
    SPEX_CHECK(!pool_, "grow: the layer reads a shared value pool, which other layers read too; it cannot grow");
    SPEX_CHECK(rows.rows_of(n_old) == n_experts(), "ValueExperts::grow: the shard holds " << n_experts() << " rows, not its "
                                                                                          << rows.rows_of(n_old) << " of " << n_old);
    SPEX_CHECK(n_new >= n_old, "ValueExperts::grow(" << n_new << ") below the " << n_old << " slots it has");
    Rng r = rng.split(13);
    const Index local = rows.rows_of(n_new);
    Table<T> grown = values_.grown(local);
    fill_normal(grown.mutable_matrix().bottomRows(local - n_experts()), 1.0 / std::sqrt(double(d_out())), r, n_new - n_old, rows.from(n_old));
    values_ = std::move(grown);
  }

  /// How the table is stored: native (T, trainable) or compact (bf16, int8; inference).
  TableStorage storage() const { return storage_; }
  /// Converts the table to storage `s` in place (NeuronExperts::set_storage).
  void set_storage(TableStorage s) {
    checked_storage<T>(s);
    if (s == storage_) return;
    SPEX_CHECK(!pool_, "set_storage: the layer reads a shared value pool (native storage only)");
    if constexpr (std::is_same<T, float>::value) convert_table(values_, cvalues_, s, "experts.values");
    storage_ = s;
  }
  /// The compact table (empty while stored native).
  const CompactTable& compact_values() const { return cvalues_; }
  CompactTable& compact_values() { return cvalues_; }
  /// Bytes the table takes (rows and int8 scales).
  std::size_t table_bytes() const {
    return compact() ? cvalues_.bytes() : sizeof(T) * static_cast<std::size_t>(values_.size());  // a pooled layer owns none
  }
  /// The compact table by name ("<prefix>values"); none while stored native.
  CompactTableList compact_tables(const std::string& prefix) {
    if (!compact()) return {};
    return {{prefix + "values", &cvalues_}};
  }
  ConstCompactTableList compact_tables(const std::string& prefix) const {
    if (!compact()) return {};
    return {{prefix + "values", &cvalues_}};
  }

  /// Forward FLOPs per token with `picks` (expert, gate) pairs: gate * value added into y.
  FlopCount flops_per_token(Index picks) const { return flops_per_token(picks, 0, d_out()); }
  static FlopCount flops_per_token(Index picks, Index /*d_in*/, Index d_out, bool /*glu: never*/ = false) {
    FlopCount f;
    f.experts = double(picks) * flops::linear(1, d_out);
    return f;
  }
  /// The table (N x d_out). Reading never copies; the writable form copies a memory-mapped
  /// table into owned memory first (core/table.hpp).
  /// Compact storage: compact_values().
  typename Table<T>::ConstMap values() const { return native_table().matrix(); }
  typename Table<T>::Map values() {
    require_native("values()");
    return pool_ ? pool_->values() : values_.mutable_matrix();
  }
  const Table<T>& values_table() const { return native_table(); }
  Grads make_grads(Index frozen_rows = 0) const {
    require_native("make_grads");
    if (pool_) {
      SPEX_CHECK(frozen_rows == 0, "a layer reading a shared value pool has no frozen experts of its own");
      return Grads{SparseRowGrad<T>(), pool_};
    }
    return Grads{SparseRowGrad<T>(n_experts(), d_out(), frozen_rows), nullptr};
  }
  /// "<prefix>values" with its row-sparse gradient in g (or none); nothing while compact, nor
  /// for a pooled layer (the pool lists its table once: ValuePool::parameters).
  ParameterList<T> parameters(const std::string& prefix, Grads* g) {
    if (compact() || pool_) return {};
    return {sparse_parameter<T>(prefix + "values", values_, g ? &g->values : nullptr)};
  }
  /// Read-only: never copies a mapped table.
  ParameterList<const T> parameters(const std::string& prefix) const {
    if (compact() || pool_) return {};
    return {table_parameter<T>(prefix + "values", values_)};
  }

  /// y (B x d_out, assigned) = sum_j gates(t, j) v_{ids(t, j)}.
  void forward(CIndexMatRef ids, CMatRef<T> gates, MatRef<T> y) const {
    check_inputs(ids, gates);
    check_shape(y, ids.rows(), d_out(), "y");
    const std::size_t m = static_cast<std::size_t>(ids.cols()), d = static_cast<std::size_t>(d_out());
    parallel_for(ids.rows(), [&](Index t, int) {
      y.row(t).setZero();
      if (compact()) rows_axpy(row_ptr(ids, t), row_ptr(gates, t), m, &y(t, 0));
      else kernels::gather_axpy<Arch>(table().data(), static_cast<std::size_t>(table().ld()), row_ptr(ids, t), row_ptr(gates, t), m, &y(t, 0), d);
    });
  }

  /// From dy (B x d_out): dgates (B x m, assigned) = v . dy; grads.values accumulate g dy.
  void backward(CIndexMatRef ids, CMatRef<T> gates, CMatRef<T> dy, MatRef<T> dgates, Grads& g, Cache& c) const {
    require_native("backward");
    check_inputs(ids, gates);
    check_shape(dy, ids.rows(), d_out(), "dy");
    check_shape(dgates, ids.rows(), ids.cols(), "dgates");
    const std::size_t m = static_cast<std::size_t>(ids.cols()), d = static_cast<std::size_t>(d_out());
    parallel_for(ids.rows(), [&](Index t, int) {
      kernels::gather_dot<Arch>(table().data(), static_cast<std::size_t>(table().ld()), row_ptr(ids, t), m, row_ptr(dy, t), d, &dgates(t, 0));
    });
    accumulate_rows<Arch>(ids, gates, dy, g.target(), c.plan);
  }

  /// The same for tokens with pick lists of their own lengths (an expert shard's received
  /// requests, dist/): y's token t sums the picks [begin[t], begin[t + 1]) of ids and gates.
  void forward_grouped(const Index* begin, const Index* ids, const T* gates, MatRef<T> y) const {
    const Index b = y.rows();
    check_shape(y, b, d_out(), "y");
    check_pick_lists(b, begin, ids, n_experts());
    const std::size_t d = static_cast<std::size_t>(d_out());
    parallel_for(b, [&](Index t, int) {
      const Index p = begin[t];
      const std::size_t m = static_cast<std::size_t>(begin[t + 1] - p);
      y.row(t).setZero();
      if (compact()) rows_axpy(ids + p, gates + p, m, &y(t, 0));
      else kernels::gather_axpy<Arch>(table().data(), static_cast<std::size_t>(table().ld()), ids + p, gates + p, m, &y(t, 0), d);
    });
  }

  /// backward() for forward_grouped(): token[p] is pick p's token; dgates gets begin[B] values.
  void backward_grouped(const Index* begin, const Index* ids, const Index* token, const T* gates, CMatRef<T> dy, T* dgates,
                        Grads& g, Cache& c) const {
    require_native("backward");
    const Index b = dy.rows();
    check_shape(dy, b, d_out(), "dy");
    check_pick_lists(b, begin, ids, n_experts());
    const std::size_t d = static_cast<std::size_t>(d_out());
    parallel_for(b, [&](Index t, int) {
      const Index p = begin[t];
      kernels::gather_dot<Arch>(table().data(), static_cast<std::size_t>(table().ld()), ids + p, static_cast<std::size_t>(begin[t + 1] - p), row_ptr(dy, t), d,
                                dgates + p);
    });
    accumulate_rows<Arch>(ids, gates, token, begin[b], dy, g.target(), c.plan);
  }

 private:
  bool compact() const { return storage_ != TableStorage::native; }

  /// A native table holding the rows `rows` of N slots, drawn as N(0, 1/d_out).
  void draw_native(Index n_slots, Index d_out, Rng& r, RowStride rows) {
    values_ = Table<T>(rows.rows_of(n_slots), d_out);
    fill_normal(values_.mutable_matrix(), 1.0 / std::sqrt(double(d_out)), r, n_slots, rows);
  }

  void require_native(const char* what) const {
    SPEX_CHECK(!compact(), "ValueExperts::" << what << ": the table is stored as " << to_string(storage_)
                                             << " (inference only); training needs it as T: set_storage(TableStorage::native)");
  }
  const Table<T>& native_table() const {
    require_native("values()");
    return table();
  }
  /// The native table: this layer's, or the pool's.
  const Table<T>& table() const { return pool_ ? pool_->table() : values_; }
  void rows_axpy(const Index* ids, const T* alpha, std::size_t m, T* y) const {
    if constexpr (std::is_same<T, float>::value) gather_axpy<Arch>(cvalues_, ids, alpha, m, y);
  }

  void check_inputs(const CIndexMatRef& ids, const CMatRef<T>& gates) const {
    check_shape(gates, ids.rows(), ids.cols(), "gates");
    check_ids(ids, n_experts());
  }

  static void checked_size(Index n_slots, Index d_out) {
    SPEX_CHECK(n_slots >= 1 && d_out >= 1, "ValueExperts(" << n_slots << ", " << d_out << ") needs positive sizes");
  }

  std::shared_ptr<ValuePool<T>> pool_;  // set: the table is the pool's (values_ stays empty)
  Table<T> values_;          // native storage
  CompactTable cvalues_;     // compact storage
  TableStorage storage_ = TableStorage::native;
};

}  // namespace spex
