#pragma once
// A big row-major table stored compact, for inference: bfloat16 rows (half the bytes of float)
// or int8 rows with one float scale per row (a quarter, plus 4 bytes per row; symmetric
// per-row absmax, kernels/scalar/compact.hpp). Like Table, either owned or a read-only view
// of memory someone else keeps alive (a safetensors file mapped from disk). Rows are read by
// the compact gathers (kernels/compact.hpp), which widen them to float in registers.
//
// Training never sees these: it keeps float master tables (Table<T>). A layer stores its
// expert tables one way or the other (TableStorage), and converts between them on request.
//
// Thread safety: const methods are safe to call concurrently; set_rows(), the mutable
// accessors and adopt_view() are not.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../kernels/compact.hpp"
#include "../kernels/scalar/compact.hpp"
#include "check.hpp"
#include "memory.hpp"
#include "random.hpp"
#include "table.hpp"
#include "types.hpp"

namespace spex {

/// How a layer stores its expert tables: as its scalar T (trainable), bfloat16, or int8 with a
/// float scale per row (both inference only, T = float).
enum class TableStorage { native, bf16, int8 };

inline const char* to_string(TableStorage s) {
  switch (s) {
    case TableStorage::native: return "native";
    case TableStorage::bf16: return "bf16";
    case TableStorage::int8: return "int8";
  }
  return "?";
}

/// `s`, checked: a TableStorage, and native unless T is float (the compact gathers widen to float).
template <class T>
TableStorage checked_storage(TableStorage s) {
  SPEX_CHECK(s == TableStorage::native || s == TableStorage::bf16 || s == TableStorage::int8,
             "storage = " << int(s) << " is not a TableStorage");
  SPEX_CHECK(s == TableStorage::native || (std::is_same<T, float>::value), "compact tables (" << to_string(s) << ") need T = float");
  return s;
}

/// Bytes one row of `cols` values takes in storage `s` for a scalar of `native_size` bytes
/// (int8 counts its scale).
inline std::size_t row_bytes(TableStorage s, Index cols, std::size_t native_size) {
  const std::size_t c = static_cast<std::size_t>(cols);
  switch (s) {
    case TableStorage::native: return c * native_size;
    case TableStorage::bf16: return c * 2;
    case TableStorage::int8: return c + sizeof(float);
  }
  return 0;
}

/// Index of the first of n floats that compact storage `s` cannot hold, or -1: a value that is
/// not finite, or (bf16) a finite one that rounds to an infinity (beyond bfloat16's largest
/// finite value, about 3.39e38). An int8 row of finite values always quantizes to finite ones.
inline std::int64_t first_unstorable(TableStorage s, const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return std::int64_t(i);
    if (s == TableStorage::bf16 && !std::isfinite(kernels::scalar::bf16_to_float(kernels::scalar::float_to_bf16(x[i]))))
      return std::int64_t(i);
  }
  return -1;
}

class CompactTable {
 public:
  CompactTable() = default;
  /// An owned rows x cols table in storage `s` (bf16 or int8); values unspecified until
  /// set_rows() or a loader fills them. Huge pages are requested before the first touch.
  CompactTable(TableStorage s, Index rows, Index cols) : storage_(s), rows_(rows), cols_(cols) {
    SPEX_CHECK(s != TableStorage::native, "CompactTable holds bf16 or int8 rows, not native ones");
    SPEX_CHECK(rows >= 1 && cols >= 1, "CompactTable(" << rows << ", " << cols << ") needs positive sizes");
    if (s == TableStorage::bf16) {
      bf16_.resize(rows, cols);
      advise_huge_pages(bf16_.data(), 2 * static_cast<std::size_t>(bf16_.size()));
    } else {
      i8_.resize(rows, cols);
      advise_huge_pages(i8_.data(), static_cast<std::size_t>(i8_.size()));
      scale_.resize(rows);
    }
  }

  TableStorage storage() const { return storage_; }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  bool empty() const { return rows_ == 0; }
  /// Bytes held: the rows and, for int8, the scales.
  std::size_t bytes() const { return static_cast<std::size_t>(rows_) * row_bytes(storage_, cols_, 0); }
  /// True while the table reads someone else's memory (see adopt_view).
  bool is_view() const { return view_rows_ != nullptr; }

  /// The bfloat16 rows (rows x cols, row-major); bf16 storage only.
  const std::uint16_t* bf16() const {
    SPEX_CHECK(storage_ == TableStorage::bf16, "the table is stored as " << to_string(storage_) << ", not bf16");
    return view_rows_ ? static_cast<const std::uint16_t*>(view_rows_) : bf16_.data();
  }
  /// The int8 rows and their scales (one per row); int8 storage only.
  const std::int8_t* i8() const {
    SPEX_CHECK(storage_ == TableStorage::int8, "the table is stored as " << to_string(storage_) << ", not int8");
    return view_rows_ ? static_cast<const std::int8_t*>(view_rows_) : i8_.data();
  }
  const float* scales() const {
    SPEX_CHECK(storage_ == TableStorage::int8, "the table is stored as " << to_string(storage_) << ", not int8");
    return view_scale_ ? view_scale_ : scale_.data();
  }

  /// Rows [first, first + n) from n x cols floats `src` (row-major, contiguous): rounded to
  /// bfloat16 or quantized to int8. A value the storage cannot hold (first_unstorable: not
  /// finite, or beyond bfloat16's range) is an error naming `what`, its row and column, and
  /// nothing is written. Copies a view first.
  void set_rows(Index first, Index n, const float* src, const char* what = "table") {
    SPEX_CHECK(first >= 0 && n >= 0 && first + n <= rows_, "set_rows(" << first << ", " << n << ") on " << rows_ << " rows");
    const std::size_t c = static_cast<std::size_t>(cols_);
    const std::int64_t bad = first_unstorable(storage_, src, static_cast<std::size_t>(n) * c);
    SPEX_CHECK(bad < 0, what << ": row " << (first + Index(std::size_t(bad) / c)) << " holds " << src[bad] << " at column "
                             << std::size_t(bad) % c << ", which " << to_string(storage_) << " cannot hold ("
                             << (std::isfinite(src[bad]) ? "beyond bfloat16's largest finite value 3.39e38" : "not finite") << ")");
    own();
    for (Index r = 0; r < n; ++r) {
      const float* x = src + static_cast<std::size_t>(r) * c;
      if (storage_ == TableStorage::bf16) {
        std::uint16_t* q = bf16_.data() + static_cast<std::size_t>(first + r) * c;
        for (std::size_t i = 0; i < c; ++i) q[i] = kernels::scalar::float_to_bf16(x[i]);
      } else {
        scale_[first + r] = kernels::scalar::quantize_row_i8(x, c, i8_.data() + static_cast<std::size_t>(first + r) * c);
      }
    }
  }

  /// Row r as floats (the values the gathers compute with) into out (cols values).
  void get_row(Index r, float* out) const {
    SPEX_CHECK(r >= 0 && r < rows_, "get_row(" << r << ") on " << rows_ << " rows");
    const std::size_t c = static_cast<std::size_t>(cols_), o = static_cast<std::size_t>(r) * c;
    if (storage_ == TableStorage::bf16) {
      const std::uint16_t* row = bf16() + o;
      for (std::size_t i = 0; i < c; ++i) out[i] = kernels::scalar::bf16_to_float(row[i]);
    } else {
      const float s = scales()[r];
      const std::int8_t* row = i8() + o;
      for (std::size_t i = 0; i < c; ++i) out[i] = s * float(row[i]);
    }
  }

  /// Writable raw storage for loaders that copy stored rows as they are (a view is copied
  /// first): the bf16 or int8 rows, and the int8 scales.
  void* mutable_rows() {
    own();
    return storage_ == TableStorage::bf16 ? static_cast<void*>(bf16_.data()) : static_cast<void*>(i8_.data());
  }
  float* mutable_scales() {
    SPEX_CHECK(storage_ == TableStorage::int8, "the table is stored as " << to_string(storage_) << ", it has no scales");
    own();
    return scale_.data();
  }

  /// Reads `rows` (and, for int8, `scales`) in place from now on, in this table's storage and
  /// shape; `keep_alive` owns that memory. The owned storage is released.
  void adopt_view(const void* rows, const float* scales, std::shared_ptr<const void> keep_alive) {
    SPEX_CHECK(rows != nullptr && keep_alive != nullptr, "adopt_view needs data and the owner that keeps it alive");
    SPEX_CHECK((storage_ == TableStorage::int8) == (scales != nullptr), "adopt_view: int8 rows need their scales, bf16 rows have none");
    RowMat<std::uint16_t>().swap(bf16_);
    RowMat<std::int8_t>().swap(i8_);
    Vec<float>().swap(scale_);
    view_rows_ = rows;
    view_scale_ = scales;
    keep_alive_ = std::move(keep_alive);
  }

 private:
  // A view becomes an owned copy before anything writes.
  void own() {
    if (!view_rows_) return;
    CompactTable copy(storage_, rows_, cols_);
    const std::size_t n = static_cast<std::size_t>(rows_ * cols_);
    if (storage_ == TableStorage::bf16) {
      std::memcpy(copy.bf16_.data(), view_rows_, 2 * n);
    } else {
      std::memcpy(copy.i8_.data(), view_rows_, n);
      std::memcpy(copy.scale_.data(), view_scale_, sizeof(float) * static_cast<std::size_t>(rows_));
    }
    *this = std::move(copy);
  }

  TableStorage storage_ = TableStorage::native;
  Index rows_ = 0, cols_ = 0;
  RowMat<std::uint16_t> bf16_;
  RowMat<std::int8_t> i8_;
  Vec<float> scale_;
  const void* view_rows_ = nullptr;
  const float* view_scale_ = nullptr;
  std::shared_ptr<const void> keep_alive_;
};

/// out[r] = table[ids[r]] . x for r < m (x: cols floats): the compact gather-dot for the
/// table's storage.
template <class Arch = default_arch>
void gather_dot(const CompactTable& t, const Index* ids, std::size_t m, const float* x, float* out) {
  const std::size_t c = static_cast<std::size_t>(t.cols());
  if (t.storage() == TableStorage::bf16) kernels::gather_dot_bf16<Arch>(t.bf16(), c, ids, m, x, c, out);
  else kernels::gather_dot_i8<Arch>(t.i8(), c, t.scales(), ids, m, x, c, out);
}

/// y += sum_r alpha[r] table[ids[r]] for r < m (y: cols floats).
template <class Arch = default_arch>
void gather_axpy(const CompactTable& t, const Index* ids, const float* alpha, std::size_t m, float* y) {
  const std::size_t c = static_cast<std::size_t>(t.cols());
  if (t.storage() == TableStorage::bf16) kernels::gather_axpy_bf16<Arch>(t.bf16(), c, ids, alpha, m, y, c);
  else kernels::gather_axpy_i8<Arch>(t.i8(), c, t.scales(), ids, alpha, m, y, c);
}

/// A compact copy of `rows` x `cols` floats produced block by block: fill(first, n, buf) writes
/// rows [first, first + n) into buf (n x cols). The full float table never exists at once.
template <class Fill>
CompactTable make_compact(TableStorage s, Index rows, Index cols, Fill&& fill, const char* what) {
  CompactTable t(s, rows, cols);
  constexpr Index kBlock = 256;
  std::vector<float> buf(static_cast<std::size_t>(std::min(rows, kBlock) * cols));
  for (Index first = 0; first < rows; first += kBlock) {
    const Index n = std::min(kBlock, rows - first);
    fill(first, n, buf.data());
    t.set_rows(first, n, buf.data(), what);
  }
  return t;
}

/// Compact tables by name, as an expert module lists them (the counterpart of a ParameterList).
using CompactTableList = std::vector<std::pair<std::string, CompactTable*>>;
using ConstCompactTableList = std::vector<std::pair<std::string, const CompactTable*>>;

/// A fill for make_compact: rows of `cols` values N(0, stddev^2), drawn in fill_normal's order
/// (so a compact table is the rounding of the native one made from the same Rng).
inline auto normal_rows(Index cols, double stddev, Rng& rng) {
  return [cols, stddev, &rng](Index, Index n, float* out) {
    for (Index i = 0; i < n * cols; ++i) out[i] = static_cast<float>(stddev * rng.normal());
  };
}

/// Moves a table between storages: from `native` (when `small` is empty) or from `small`, to
/// native storage (`native`, exact values of the compact rows) or to compact storage `to`
/// (`small`). The source is released after the copy; the peak is the table in both forms.
inline void convert_table(Table<float>& native, CompactTable& small, TableStorage to, const char* what) {
  const bool from_native = small.empty();
  const Index rows = from_native ? native.rows() : small.rows(), cols = from_native ? native.cols() : small.cols();
  if (from_native && to == TableStorage::native) return;
  if (!from_native && to == small.storage()) return;
  if (to == TableStorage::native) {
    Table<float> t(rows, cols);
    float* out = t.mutable_data();
    for (Index r = 0; r < rows; ++r) small.get_row(r, out + static_cast<std::size_t>(r * cols));
    native = std::move(t);
    small = CompactTable();
    return;
  }
  CompactTable t = make_compact(
      to, rows, cols,
      [&](Index first, Index n, float* buf) {
        if (from_native) std::copy(native.data() + first * cols, native.data() + (first + n) * cols, buf);
        else for (Index r = 0; r < n; ++r) small.get_row(first + r, buf + static_cast<std::size_t>(r * cols));
      },
      what);
  small = std::move(t);
  native = Table<float>();
}

}  // namespace spex
