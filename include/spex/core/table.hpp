#pragma once
// Storage of a big row-major table (PEER's u and v, PKM's values): either owned, or a
// read-only view of memory someone else keeps alive, such as a safetensors file mapped from
// disk. A view costs nothing to load (the pages come from the page cache on first touch and
// are shared by every process mapping the file); reading works the same on both. Writing
// (an optimizer step, loading other weights by copy) goes through mutable_data(), which first
// turns a view into an owned copy: "writable copies only when training".
//
// Thread safety: const methods are safe to call concurrently; mutable_data() and adopt_view()
// are not (they may reallocate).
//
// Parameter lists record the table's epoch (stamp()); adopting a view, turning a view into an
// owned copy, assignment and destruction advance it, so a list taken before is refused instead
// of writing into released memory (core/storage_epoch.hpp).
#include <algorithm>
#include <memory>

#include "check.hpp"
#include "memory.hpp"
#include "storage_epoch.hpp"
#include "types.hpp"

namespace spex {

template <class T>
class Table {
 public:
  using Matrix = RowMat<T>;
  using ConstMap = Eigen::Map<const Matrix>;

  Table() = default;
  /// An owned rows x cols table; values unspecified (fill them before use). Huge pages are
  /// requested before the first touch (core/memory.hpp).
  Table(Index rows, Index cols) : owned_(rows, cols) {
    advise_huge_pages(owned_.data(), sizeof(T) * static_cast<std::size_t>(owned_.size()));
  }

  Index rows() const { return view_ ? view_rows_ : owned_.rows(); }
  Index cols() const { return view_ ? view_cols_ : owned_.cols(); }
  Index size() const { return rows() * cols(); }
  const T* data() const { return view_ ? view_ : owned_.data(); }
  ConstMap matrix() const { return ConstMap(data(), rows(), cols()); }
  /// True while the table reads someone else's memory (see adopt_view).
  bool is_view() const { return view_ != nullptr; }
  /// The epoch of this table's storage, for parameter lists (see the top of this file).
  StorageStamp stamp() const { return epoch_.stamp(StampKind::table); }

  /// Writable storage; a view is first copied into an owned table (once).
  T* mutable_data() { return mutable_matrix().data(); }
  Matrix& mutable_matrix() {
    if (view_) {
      Matrix copy(view_rows_, view_cols_);
      advise_huge_pages(copy.data(), sizeof(T) * static_cast<std::size_t>(copy.size()));
      std::copy(view_, view_ + size(), copy.data());
      owned_.swap(copy);
      release_view();
      epoch_.advance();
    }
    return owned_;
  }

  /// A new owned table of `rows` rows (at least rows()) whose first rows() rows are this one's
  /// (copied once) and whose other rows are unspecified (fill them). This table is unchanged, so
  /// a caller can build every grown table before replacing any (all-or-nothing).
  Table grown(Index rows) const {
    SPEX_CHECK(rows >= this->rows(), "grown(" << rows << ") from a table of " << this->rows() << " rows");
    Table t(rows, cols());
    std::copy(data(), data() + size(), t.owned_.data());
    return t;
  }

  /// Reads `data` (rows x cols, row-major, contiguous) in place from now on; `keep_alive` owns
  /// that memory and is held as long as the view is. The owned storage is released. The shape
  /// must be the table's.
  void adopt_view(const T* data, Index rows, Index cols, std::shared_ptr<const void> keep_alive) {
    SPEX_CHECK(data != nullptr && keep_alive != nullptr, "adopt_view needs data and the owner that keeps it alive");
    SPEX_CHECK(rows == this->rows() && cols == this->cols(), "adopt_view: a " << rows << " x " << cols << " view for a "
                                                                               << this->rows() << " x " << this->cols() << " table");
    Matrix().swap(owned_);
    epoch_.advance();
    view_ = data;
    view_rows_ = rows;
    view_cols_ = cols;
    keep_alive_ = std::move(keep_alive);
  }

 private:
  void release_view() {
    view_ = nullptr;
    view_rows_ = view_cols_ = 0;
    keep_alive_.reset();
  }

  Matrix owned_;
  const T* view_ = nullptr;
  Index view_rows_ = 0, view_cols_ = 0;
  std::shared_ptr<const void> keep_alive_;
  StorageEpoch epoch_;
};

}  // namespace spex
