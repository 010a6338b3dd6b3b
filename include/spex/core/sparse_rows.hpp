#pragma once
// Row-sparse gradients for expert tables: only the rows a batch retrieved are stored, each
// once, however many tokens or heads picked it. A 1M-row table never gets a dense gradient.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../kernels/vector.hpp"
#include "check.hpp"
#include "parallel.hpp"
#include "types.hpp"

namespace spex {

/// Gradient of an (n_rows x width) table that is zero outside a set of rows.
/// rows()[s] is the table row held in values().row(s); a row appears once. Rows are kept in
/// the order they were first touched. Accumulates until zero(); zero() costs O(rows touched).
/// A row lookup table of n_rows int32 (4 bytes per table row) makes find-or-add O(1).
/// Rows [0, frozen_rows()) are frozen (a grown layer's old experts), and with a trainable-row
/// filter (set_trainable_rows: sparse memory finetuning) so is every row outside it:
/// accumulate_rows and add_row drop them, slot() refuses them, so the gradient never holds one.
/// Thread safety: none; writers coordinate through RowScatterPlan (see accumulate_rows).
///
/// Usage: examples/snippets/building_blocks.cpp (compiled and run by the test suite).
template <class T>
class SparseRowGrad {
 public:
  SparseRowGrad() = default;
  SparseRowGrad(Index n_rows, Index width, Index frozen_rows = 0) {
    reset(n_rows, width);
    set_frozen_rows(frozen_rows);
  }

  /// Re-shapes for a table of n_rows x width and clears (no frozen rows).
  void reset(Index n_rows, Index width) {
    SPEX_CHECK(n_rows >= 0 && width >= 0, "table shape " << n_rows << " x " << width << " is negative");
    SPEX_CHECK(n_rows <= Index(INT32_MAX),
               "a row-sparse gradient covers at most 2^31 - 1 table rows, the table has " << n_rows
                   << " (training a product-key layer needs n_experts <= 2^31 - 1; infer has no such limit)");
    n_rows_ = n_rows;
    width_ = width;
    frozen_rows_ = 0;
    trainable_.clear();
    trainable_list_.clear();
    slot_of_row_.assign(static_cast<std::size_t>(n_rows), -1);
    rows_.clear();
    values_.resize(0, width);
  }

  Index n_rows() const { return n_rows_; }
  /// Rows [0, frozen_rows()) never get a gradient.
  Index frozen_rows() const { return frozen_rows_; }
  /// Freezes rows [0, n) (0 <= n <= n_rows); clears the gradient.
  void set_frozen_rows(Index n) {
    SPEX_CHECK(n >= 0 && n <= n_rows_, "frozen rows = " << n << " must be in [0, " << n_rows_ << "]");
    zero();
    frozen_rows_ = n;
  }
  /// Whether `row` never gets a gradient: below frozen_rows(), or outside the trainable-row filter.
  bool frozen(Index row) const {
    return row < frozen_rows_ || (!trainable_.empty() && row < n_rows_ && !trainable_[static_cast<std::size_t>(row)]);
  }
  /// Only `rows` (each in [0, n_rows)) may hold a gradient from now on (besides the frozen prefix,
  /// which stays frozen); clears the gradient. Costs O(rows + the previous filter's rows) after
  /// the first call (n_rows bytes). Typical: a new set per training step.
  void set_trainable_rows(const std::vector<Index>& rows) {
    for (Index r : rows) SPEX_CHECK(r >= 0 && r < n_rows_, "trainable row " << r << " is outside [0, " << n_rows_ << ")");
    zero();
    if (trainable_.empty()) trainable_.assign(static_cast<std::size_t>(n_rows_) + 1, 0);  // + 1: non-empty for 0 rows
    for (Index r : trainable_list_) trainable_[static_cast<std::size_t>(r)] = 0;
    trainable_list_ = rows;
    for (Index r : rows) trainable_[static_cast<std::size_t>(r)] = 1;
  }
  /// Removes the trainable-row filter (every row past the frozen prefix trains again).
  void clear_trainable_rows() {
    zero();
    trainable_.clear();
    trainable_list_.clear();
  }
  /// Whether a trainable-row filter is set.
  bool filtered() const { return !trainable_.empty(); }
  Index width() const { return width_; }
  /// Number of rows holding a gradient.
  Index nnz_rows() const { return static_cast<Index>(rows_.size()); }
  const std::vector<Index>& rows() const { return rows_; }
  /// nnz_rows() x width: values().row(s) is the gradient of table row rows()[s].
  auto values() { return values_.topRows(nnz_rows()); }
  auto values() const { return values_.topRows(nnz_rows()); }

  /// Slot of `row`, adding it (zeroed) if absent.
  Index slot(Index row) {
    const Index before = nnz_rows();
    const Index s = slot_unset(row);
    if (s >= before) values_.row(s).setZero();
    return s;
  }

  /// Slot of `row`, adding it with its values left unset: the caller writes every new row
  /// (accumulate_rows does, and so skips a memset of every new row).
  Index slot_unset(Index row) {
    SPEX_CHECK(row >= 0 && row < n_rows_ && !frozen(row),
               "row " << row << " is outside [0, " << n_rows_ << ")" << (row >= 0 && row < n_rows_ ? " or frozen" : ""));
    std::int32_t& s = slot_of_row_[static_cast<std::size_t>(row)];
    if (s < 0) {
      s = static_cast<std::int32_t>(rows_.size());
      rows_.push_back(row);
      if (values_.rows() < nnz_rows()) grow(nnz_rows());
    }
    return s;
  }

  /// How many lookups ahead a caller looking up many random rows asks for them (prefetch_slot):
  /// the lookup entries of a large table sit on random lines.
  static constexpr Index kLookupsAhead = 16;
  /// Hints the cache to fetch the lookup entry of `row` (any value): a caller about to look up
  /// many random rows (accumulate_rows, zero) asks for them kLookupsAhead ahead.
  void prefetch_slot(Index row) const {
    if (row >= 0 && row < n_rows_) __builtin_prefetch(&slot_of_row_[static_cast<std::size_t>(row)], 1, 3);
  }

  /// Slot of `row`, or -1.
  Index find(Index row) const {
    return (row >= 0 && row < n_rows_) ? slot_of_row_[static_cast<std::size_t>(row)] : -1;
  }

  /// Adds g[0..width) to the gradient of `row` (nothing for a frozen row).
  void add_row(Index row, const T* g) {
    if (frozen(row) && row >= 0) return;
    const Index s = slot(row);
    kernels::axpy(T(1), g, values_.row(s).data(), static_cast<std::size_t>(width_));
  }

  /// Makes room for `n` rows (at most n_rows) without reallocating later.
  void reserve(Index n) {
    n = std::min(n, n_rows_);
    if (values_.rows() < n) grow(n);
    rows_.reserve(static_cast<std::size_t>(n));
  }

  /// Clears the gradient (keeps the memory).
  void zero() {
    const Index n = nnz_rows();
    for (Index i = 0; i < n; ++i) {
      if (i + kLookupsAhead < n) prefetch_slot(rows_[static_cast<std::size_t>(i + kLookupsAhead)]);
      slot_of_row_[static_cast<std::size_t>(rows_[static_cast<std::size_t>(i)])] = -1;
    }
    rows_.clear();
  }

  /// table.row(r) -= lr * grad(r) for the rows held.
  void apply_sgd(MatRef<T> table, T lr) const {
    check_shape(table, n_rows_, width_, "table");
    for (Index s = 0; s < nnz_rows(); ++s) table.row(rows_[s]) -= lr * values_.row(s);
  }

  /// The dense n_rows x width gradient (tests and small tables).
  RowMat<T> to_dense() const {
    RowMat<T> d = RowMat<T>::Zero(n_rows_, width_);
    for (Index s = 0; s < nnz_rows(); ++s) d.row(rows_[s]) = values_.row(s);
    return d;
  }

 private:
  void grow(Index n) {  // never beyond the table's row count
    const Index cap = std::max<Index>(n, std::min<Index>(2 * values_.rows(), n_rows_));
    values_.conservativeResize(cap, width_);
  }

  Index n_rows_ = 0, width_ = 0, frozen_rows_ = 0;
  std::vector<unsigned char> trainable_;  // the filter (n_rows + 1 flags), or empty: none
  std::vector<Index> trainable_list_;     // the rows set in it
  std::vector<std::int32_t> slot_of_row_;
  std::vector<Index> rows_;
  RowMat<T> values_;
};

/// Throws unless `g` is a gradient for `table` (same rows and width), naming the parameter.
template <class T, class TableT>
void check_sparse_grad(const SparseRowGrad<T>& g, const TableT& table, const char* what, const char* param) {
  SPEX_CHECK(g.n_rows() == table.rows() && g.width() == table.cols(),
             what << " holds a gradient of " << param << " for a " << g.n_rows() << " x " << g.width()
                  << " table, the layer's is " << table.rows() << " x " << table.cols() << ": grads were made by another layer");
}

/// Groups occurrences (a token's use of a table row) by the gradient row they add to, so the
/// rows can be accumulated in parallel, each by one thread, in a fixed order (deterministic,
/// whatever the thread count). Fill `slot` (one entry per occurrence: its row, or -1 to skip),
/// then group(n_slots): the occurrences of row s are order[offsets[s] .. offsets[s + 1]),
/// ascending. Reused across calls, it stops allocating once it has seen the largest batch.
struct RowScatterPlan {
  std::vector<Index> slot;       // per occurrence
  std::vector<Index> offsets;    // per slot, into order (CSR)
  std::vector<Index> order;      // occurrences grouped by slot, ascending within a slot
  std::vector<Index> cursor;     // per slot, filling position

  /// Counting sort of the occurrences in `slot` by their slot in [0, n_slots).
  void group(Index n_slots) {
    const Index occ = Index(slot.size());
    offsets.assign(static_cast<std::size_t>(n_slots + 1), 0);
    for (Index o = 0; o < occ; ++o)
      if (slot[o] >= 0) ++offsets[slot[o] + 1];
    for (Index s = 0; s < n_slots; ++s) offsets[s + 1] += offsets[s];
    order.resize(static_cast<std::size_t>(offsets[n_slots]));
    cursor.assign(offsets.begin(), offsets.end() - 1);
    for (Index o = 0; o < occ; ++o)
      if (slot[o] >= 0) order[cursor[slot[o]]++] = o;
  }
};

/// New gradient rows of at least this many bytes in one accumulate_rows call are written with
/// non-temporal stores (kernels::scale_to_stream), which do not read the rows' lines first. With
/// two threads on an Intel Xeon VM, writing rows of 512 floats and reading them back once (an
/// optimizer's pass) took 0.72 ms with ordinary stores against 0.85 streamed at 8 MB, 1.65 against
/// 1.57 at 16 MB, and 7.95 against 5.4 at 64 MB (one PEER table's rows at batch 256): below a
/// few MB the caches keep the rows for the reader, above they do not.
constexpr std::size_t kStreamGradientBytes = std::size_t(16) << 20;

namespace detail {
/// grad.row(id(o)) += coef(o) * src.row(token(o)) for the occurrences o in [0, occ) with
/// id(o) >= 0 and not frozen, parallel over gradient rows, each row summed in occurrence order.
template <class Arch, class T, class IdOf, class CoefOf, class TokenOf>
void accumulate_occurrences(Index occ, IdOf id_of, CoefOf coef_of, TokenOf token_of, CMatRef<T> src,
                            SparseRowGrad<T>& grad, RowScatterPlan& plan) {
  check_shape(src, src.rows(), grad.width(), "src");
  plan.slot.resize(static_cast<std::size_t>(occ));
  grad.reserve(grad.nnz_rows() + occ);
  const Index first_new = grad.nnz_rows();
  constexpr Index ahead = SparseRowGrad<T>::kLookupsAhead;
  for (Index o = 0; o < occ; ++o) {
    if (o + ahead < occ) grad.prefetch_slot(id_of(o + ahead));
    const Index id = id_of(o);
    plan.slot[o] = id < 0 || grad.frozen(id) ? -1 : grad.slot_unset(id);
  }
  // Slots touched before this call are included too.
  const Index n_slots = grad.nnz_rows();
  plan.group(n_slots);
  const std::size_t w = static_cast<std::size_t>(grad.width());
  auto values = grad.values();
  // A row new in this call with one occurrence is written once and read next by the optimizer.
  const bool stream = double(n_slots - first_new) * double(w) * sizeof(T) >= double(kStreamGradientBytes);
  constexpr Index kRowsPerTask = 64;
  parallel_for((n_slots + kRowsPerTask - 1) / kRowsPerTask, [&](Index task, int) {
    for (Index s = task * kRowsPerTask; s < std::min(n_slots, (task + 1) * kRowsPerTask); ++s) {
      T* row = values.row(s).data();
      Index p = plan.offsets[s];
      if (s >= first_new) {  // a row new in this call has at least one occurrence: it sets the row
        const Index o = plan.order[p++];
        if (stream && p == plan.offsets[s + 1])
          kernels::scale_to_stream<Arch>(coef_of(o), row_ptr(src, token_of(o)), row, w);
        else
          kernels::scale_to<Arch>(coef_of(o), row_ptr(src, token_of(o)), row, w);
      }
      for (; p < plan.offsets[s + 1]; ++p) {
        const Index o = plan.order[p];
        kernels::axpy<Arch>(coef_of(o), row_ptr(src, token_of(o)), row, w);
      }
    }
    if (stream) kernels::stream_fence();
  });
}
}  // namespace detail

/// grad.row(ids(t, j)) += coef(t, j) * src.row(t) for every occurrence with ids(t, j) >= 0
/// and not frozen, parallel over gradient rows. ids and coef are B x m; src is B x width.
/// Each row is summed in token order, then slot order: the result does not depend on threads.
template <class Arch = default_arch, class T>
void accumulate_rows(no_deduce<CIndexMatRef> ids, no_deduce<CMatRef<T>> coef, no_deduce<CMatRef<T>> src,
                     SparseRowGrad<T>& grad, RowScatterPlan& plan) {
  const Index batch = ids.rows(), m = ids.cols();
  check_shape(coef, batch, m, "coef");
  check_shape(src, batch, grad.width(), "src");
  const auto token_of = [m](Index o) { return o / m; };
  if (ids.outerStride() == m && coef.outerStride() == m) {  // contiguous: no division per lookup
    const Index* id = ids.data();
    const T* c = coef.data();
    detail::accumulate_occurrences<Arch, T>(
        batch * m, [id](Index o) { return id[o]; }, [c](Index o) { return c[o]; }, token_of, src, grad, plan);
    return;
  }
  detail::accumulate_occurrences<Arch, T>(
      batch * m, [&](Index o) { return ids(o / m, o % m); }, [&](Index o) { return coef(o / m, o % m); }, token_of,
      src, grad, plan);
}

/// The same for occurrences listed one by one: grad.row(ids[o]) += coef[o] * src.row(token[o])
/// for o in [0, occ) (an expert shard's received requests, dist/). Rows summed in list order.
template <class Arch = default_arch, class T>
void accumulate_rows(const Index* ids, const T* coef, const Index* token, Index occ, no_deduce<CMatRef<T>> src,
                     SparseRowGrad<T>& grad, RowScatterPlan& plan) {
  for (Index o = 0; o < occ; ++o)
    SPEX_CHECK(token[o] >= 0 && token[o] < src.rows(), "occurrence " << o << " names token " << token[o] << " of " << src.rows());
  detail::accumulate_occurrences<Arch, T>(
      occ, [&](Index o) { return ids[o]; }, [&](Index o) { return coef[o]; }, [&](Index o) { return token[o]; }, src, grad,
      plan);
}

}  // namespace spex
