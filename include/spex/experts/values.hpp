#pragma once
// Product-key memory's value-only experts (Lample et al. 2019): slot i holds one vector v_i and
// a token with retrieved ids e_j and gates g_j gets y = sum_j g_j v_{e_j} (EmbeddingBag with
// per-sample weights in the reference). PKM "retrieves memory vectors instead of functions".
// For inference the table may be stored compact (bf16, or int8 with a scale per row:
// core/compact_table.hpp); training needs it as T.
#include <cmath>
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
    void zero() { values.zero(); }
    /// Experts [0, frozen_rows()) get no gradient (make_grads).
    Index frozen_rows() const { return values.frozen_rows(); }
    /// f(SparseRowGrad&) for each table's gradient.
    template <class F>
    void for_each_table(F&& f) {
      f(values);
    }
  };

  /// Throws unless `g` was made for a table of this shape (`what` names it).
  void check_grads(const Grads& g, const char* what) const { check_sparse_grad(g.values, values_, what, "experts.values"); }

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
  /// Table allocated, values unspecified: for loaders that fill or map every row.
  ValueExperts(Index n_slots, Index d_out, TableStorage storage = TableStorage::native) : storage_(checked_storage<T>(storage)) {
    checked_size(n_slots, d_out);
    if (storage == TableStorage::native) values_ = Table<T>(n_slots, d_out);
    else cvalues_ = CompactTable(storage, n_slots, d_out);
  }

  Index n_experts() const { return compact() ? cvalues_.rows() : values_.rows(); }
  Index d_out() const { return compact() ? cvalues_.cols() : values_.cols(); }

  /// Grows to n_new slots (at least n_experts()): rows 0 .. N - 1 stay, the new rows are drawn
  /// as at construction (rng's split 13). The table is copied once. Native tables only.
  void grow(Index n_new, Rng& rng) { grow(n_experts(), n_new, rng, RowStride{}); }
  /// A shard's growth (dist/): as NeuronExperts::grow(n_old, n_new, rng, rows).
  void grow(Index n_old, Index n_new, Rng& rng, RowStride rows) {
    require_native("grow");
    SPEX_CHECK(rows.rows_of(n_old) == n_experts(), "ValueExperts::grow: the shard holds " << n_experts() << " rows, not its "
                                                                                          << rows.rows_of(n_old) << " of " << n_old);
    SPEX_CHECK(n_new >= n_old, "ValueExperts::grow(" << n_new << ") below the " << n_old << " slots it has");
    Rng r = rng.split(13);
    const Index local = rows.rows_of(n_new);
    Table<T> grown = values_.grown(local);
    auto fresh = grown.mutable_matrix().bottomRows(local - n_experts());
    fill_normal(fresh, 1.0 / std::sqrt(double(d_out())), r, n_new - n_old, rows.from(n_old));
    values_ = std::move(grown);
  }

  /// How the table is stored: native (T, trainable) or compact (bf16, int8; inference).
  TableStorage storage() const { return storage_; }
  /// Converts the table to storage `s` in place (NeuronExperts::set_storage).
  void set_storage(TableStorage s) {
    checked_storage<T>(s);
    if (s == storage_) return;
    if constexpr (std::is_same<T, float>::value) convert_table(values_, cvalues_, s, "experts.values");
    storage_ = s;
  }
  /// The compact table (empty while stored native).
  const CompactTable& compact_values() const { return cvalues_; }
  CompactTable& compact_values() { return cvalues_; }
  /// Bytes the table takes (rows and int8 scales).
  std::size_t table_bytes() const {
    return compact() ? cvalues_.bytes() : sizeof(T) * static_cast<std::size_t>(values_.size());
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
  RowMat<T>& values() {
    require_native("values()");
    return values_.mutable_matrix();
  }
  const Table<T>& values_table() const { return native_table(); }
  Grads make_grads(Index frozen_rows = 0) const {
    require_native("make_grads");
    return Grads{SparseRowGrad<T>(n_experts(), d_out(), frozen_rows)};
  }
  /// "<prefix>values" with its row-sparse gradient in g (or none); nothing while compact.
  ParameterList<T> parameters(const std::string& prefix, Grads* g) {
    if (compact()) return {};
    return {sparse_parameter<T>(prefix + "values", values_, g ? &g->values : nullptr)};
  }
  /// Read-only: never copies a mapped table.
  ParameterList<const T> parameters(const std::string& prefix) const {
    if (compact()) return {};
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
      else kernels::gather_axpy<Arch>(values_.data(), d, row_ptr(ids, t), row_ptr(gates, t), m, &y(t, 0), d);
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
      kernels::gather_dot<Arch>(values_.data(), d, row_ptr(ids, t), m, row_ptr(dy, t), d, &dgates(t, 0));
    });
    accumulate_rows<Arch>(ids, gates, dy, g.values, c.plan);
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
      else kernels::gather_axpy<Arch>(values_.data(), d, ids + p, gates + p, m, &y(t, 0), d);
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
      kernels::gather_dot<Arch>(values_.data(), d, ids + p, static_cast<std::size_t>(begin[t + 1] - p), row_ptr(dy, t), d,
                                dgates + p);
    });
    accumulate_rows<Arch>(ids, gates, token, begin[b], dy, g.values, c.plan);
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
    return values_;
  }
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

  Table<T> values_;          // native storage
  CompactTable cvalues_;     // compact storage
  TableStorage storage_ = TableStorage::native;
};

}  // namespace spex
