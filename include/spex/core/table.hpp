#pragma once
// Storage of a big row-major table (PEER's u and v, PKM's values): either owned, or a
// read-only view of memory someone else keeps alive, such as a safetensors file mapped from
// disk. A view costs nothing to load (the pages come from the page cache on first touch and
// are shared by every process mapping the file); reading works the same on both. Writing
// (an optimizer step, loading other weights by copy) goes through mutable_data(), which first
// turns a view into an owned copy: "writable copies only when training".
//
// Tables read together may share one allocation, their rows side by side (side_by_side): a
// pick's row of every table is then one run of bytes, which a random-row gather reads faster
// than rows apart (docs/performance.md, "Gather kernels"). Row r of a table starts ld() values
// after row r - 1; ld() == cols() for a table of its own and for a view.
//
// Thread safety: const methods are safe to call concurrently; mutable_data() and adopt_view()
// are not (they may reallocate).
//
// Parameter lists record the table's epoch (stamp()); adopting a view, turning a view into an
// owned copy, assignment and destruction advance it, so a list taken before is refused instead
// of writing into released memory (core/storage_epoch.hpp).
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "check.hpp"
#include "memory.hpp"
#include "storage_epoch.hpp"
#include "types.hpp"

namespace spex {

template <class T>
class Table {
 public:
  using Matrix = RowMat<T>;
  using Stride = Eigen::OuterStride<>;
  using ConstMap = Eigen::Map<const Matrix, 0, Stride>;
  using Map = Eigen::Map<Matrix, 0, Stride>;

  Table() = default;
  /// An owned rows x cols table; values unspecified (fill them before use). Huge pages are
  /// requested before the first touch (core/memory.hpp).
  Table(Index rows, Index cols) : Table(rows, cols, allocate(rows, cols), 0, cols) {}

  /// Tables of `rows` rows and cols[i] columns in one allocation, row r of every table side by
  /// side (table i's row starts cols[0] + ... + cols[i - 1] values into the run), so ld() is the
  /// sum of cols; values unspecified. Each table keeps the allocation alive.
  static std::vector<Table> side_by_side(Index rows, const std::vector<Index>& cols) {
    SPEX_CHECK(!cols.empty(), "Table::side_by_side needs at least one table");
    Index ld = 0;
    for (Index c : cols) {
      SPEX_CHECK(c >= 1, "Table::side_by_side: columns " << c << " (every table needs at least 1)");
      ld += c;
    }
    const std::shared_ptr<T> block = allocate(rows, ld);
    std::vector<Table> out;
    Index offset = 0;
    for (Index c : cols) {
      out.push_back(Table(rows, c, block, offset, ld));
      offset += c;
    }
    return out;
  }

  /// A copy with rows of its own (contiguous, whatever the original's ld()); a view stays a
  /// view of the same memory.
  Table(const Table& o) : view_(o.view_), rows_(o.rows_), cols_(o.cols_), ld_(o.ld_), keep_alive_(o.keep_alive_) {
    if (view_ || o.size() == 0) return;
    Table t(rows_, cols_);
    t.copy_rows_from(o, rows_);
    *this = std::move(t);
  }
  Table& operator=(const Table& o) {
    if (this != &o) *this = Table(o);
    return *this;
  }
  /// A move leaves `o` empty.
  Table(Table&& o) noexcept
      : block_(std::move(o.block_)), owned_(std::exchange(o.owned_, nullptr)), view_(std::exchange(o.view_, nullptr)),
        rows_(std::exchange(o.rows_, 0)), cols_(std::exchange(o.cols_, 0)), ld_(std::exchange(o.ld_, 0)),
        keep_alive_(std::move(o.keep_alive_)), epoch_(std::move(o.epoch_)) {}
  Table& operator=(Table&& o) noexcept {
    if (this != &o) {
      block_ = std::move(o.block_);
      owned_ = std::exchange(o.owned_, nullptr);
      view_ = std::exchange(o.view_, nullptr);
      rows_ = std::exchange(o.rows_, 0);
      cols_ = std::exchange(o.cols_, 0);
      ld_ = std::exchange(o.ld_, 0);
      keep_alive_ = std::move(o.keep_alive_);
      epoch_ = std::move(o.epoch_);
    }
    return *this;
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  /// The distance between the starts of two rows, in values (cols() unless side by side).
  Index ld() const { return ld_; }
  Index size() const { return rows_ * cols_; }
  const T* data() const { return view_ ? view_ : owned_; }
  ConstMap matrix() const { return ConstMap(data(), rows_, cols_, Stride(ld_)); }
  /// True while the table reads someone else's memory (see adopt_view).
  bool is_view() const { return view_ != nullptr; }
  /// The epoch of this table's storage, for parameter lists (see the top of this file).
  StorageStamp stamp() const { return epoch_.stamp(StampKind::table); }

  /// Writable storage (rows ld() apart); a view is first copied into an owned table (once).
  T* mutable_data() {
    if (view_) {
      Table copy(rows_, cols_);
      copy.copy_rows_from(*this, rows_);
      block_ = std::move(copy.block_);
      owned_ = copy.owned_;
      ld_ = cols_;
      release_view();
      epoch_.advance();
    }
    return owned_;
  }
  Map mutable_matrix() {
    T* p = mutable_data();
    return Map(p, rows_, cols_, Stride(ld_));
  }

  /// Copies the first `n` rows of `src` (same columns) into this owned table, each row at its
  /// table's ld().
  void copy_rows_from(const Table& src, Index n) {
    SPEX_CHECK(!view_ && src.cols_ == cols_ && n <= rows_ && n <= src.rows_,
               "Table::copy_rows_from: " << n << " rows of " << src.cols_ << " columns into an owned table of " << rows_ << " x " << cols_);
    const T* from = src.data();
    for (Index r = 0; r < n; ++r) std::copy(from + r * src.ld_, from + r * src.ld_ + cols_, owned_ + r * ld_);
  }

  /// A new owned table of `rows` rows (at least rows()) whose first rows() rows are this one's
  /// (copied once) and whose other rows are unspecified (fill them). This table is unchanged, so
  /// a caller can build every grown table before replacing any (all-or-nothing).
  Table grown(Index rows) const {
    SPEX_CHECK(rows >= this->rows(), "grown(" << rows << ") from a table of " << this->rows() << " rows");
    Table t(rows, cols());
    t.copy_rows_from(*this, rows_);
    return t;
  }

  /// Reads `data` (rows x cols, row-major, contiguous) in place from now on; `keep_alive` owns
  /// that memory and is held as long as the view is. The owned storage is released (freed once
  /// no table side by side holds it either). The shape must be the table's.
  void adopt_view(const T* data, Index rows, Index cols, std::shared_ptr<const void> keep_alive) {
    SPEX_CHECK(data != nullptr && keep_alive != nullptr, "adopt_view needs data and the owner that keeps it alive");
    SPEX_CHECK(rows == this->rows() && cols == this->cols(), "adopt_view: a " << rows << " x " << cols << " view for a "
                                                                               << this->rows() << " x " << this->cols() << " table");
    block_.reset();
    owned_ = nullptr;
    epoch_.advance();
    view_ = data;
    ld_ = cols;
    keep_alive_ = std::move(keep_alive);
  }

 private:
  Table(Index rows, Index cols, std::shared_ptr<T> block, Index offset, Index ld)
      : block_(std::move(block)), owned_(block_ ? block_.get() + offset : nullptr), rows_(rows), cols_(cols), ld_(ld) {}

  /// rows x ld values, 64-byte aligned, huge pages advised; null when empty.
  static std::shared_ptr<T> allocate(Index rows, Index ld) {
    SPEX_CHECK(rows >= 0 && ld >= 0, "Table(" << rows << ", " << ld << ") needs sizes >= 0");
    const std::size_t values = static_cast<std::size_t>(checked_mul(rows, ld, "a table's size"));
    if (values == 0) return nullptr;
    const std::size_t bytes = ((values * sizeof(T) + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    advise_huge_pages(p, bytes);
    return std::shared_ptr<T>(static_cast<T*>(p), [](T* q) { std::free(q); });
  }

  void release_view() {
    view_ = nullptr;
    keep_alive_.reset();
  }

  std::shared_ptr<T> block_;  // owned storage, shared by tables side by side
  T* owned_ = nullptr;        // row 0 of this table inside block_
  const T* view_ = nullptr;
  Index rows_ = 0, cols_ = 0, ld_ = 0;
  std::shared_ptr<const void> keep_alive_;
  StorageEpoch epoch_;
};

}  // namespace spex
