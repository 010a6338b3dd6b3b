#pragma once
// A big row-major table stored compact, for inference: bfloat16 rows (half the bytes of float)
// or int8 rows with one float scale per row (a quarter, plus 4 bytes per row; symmetric
// per-row absmax, kernels/scalar/compact.hpp). Like Table, either owned or a read-only view
// of memory someone else keeps alive (a safetensors file mapped from disk). Rows are read by
// the compact gathers (kernels/compact.hpp), which widen them to float in registers.
//
// Training never sees these: it keeps float master tables (Table<T>). A layer stores its
// expert tables one way or the other (TableStorage), and converts between them on request.
// Tables read together may share one allocation, their rows side by side (side_by_side): row r
// of a table is then ld() values after row r - 1, not cols().
//
// Thread safety: const methods are safe to call concurrently; set_rows(), the mutable
// accessors and adopt_view() are not.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <memory>
#include <new>
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
  CompactTable(TableStorage s, Index rows, Index cols) : CompactTable(s, rows, cols, allocate(s, rows, cols), 0, cols) {}

  /// Owned tables of `rows` rows each, `cols[i]` columns for table i, whose rows lie side by
  /// side in one allocation: row r of every table, then row r + 1 of every table (ld() is the
  /// sum of `cols`). Tables read together row by row (PEER's u_i, then v_i, of each pick) then
  /// read one run of bytes per row index instead of one per table: a random row costs more than
  /// its bytes, and PEER's compact expert step ran 1.16-1.34x as fast this way on an AMD EPYC
  /// (docs/performance.md, "Gather kernels"). Each table is an ordinary CompactTable; a copy of
  /// one is a table of its own (rows contiguous).
  static std::vector<CompactTable> side_by_side(TableStorage s, Index rows, const std::vector<Index>& cols) {
    SPEX_CHECK(!cols.empty(), "CompactTable::side_by_side needs at least one table");
    Index ld = 0;
    for (Index c : cols) {
      SPEX_CHECK(c >= 1, "CompactTable::side_by_side: columns " << c << " (every table needs at least 1)");
      ld += c;
    }
    const std::shared_ptr<unsigned char> block = allocate(s, rows, ld);
    std::vector<CompactTable> out;
    Index offset = 0;
    for (Index c : cols) {
      out.push_back(CompactTable(s, rows, c, block, offset, ld));
      offset += c;
    }
    return out;
  }

  /// A copy of `other`'s rows and scales in a table of its own (rows contiguous); a view stays
  /// a view of the same memory.
  CompactTable(const CompactTable& other)
      : storage_(other.storage_), rows_(other.rows_), cols_(other.cols_), ld_(other.ld_), view_rows_(other.view_rows_),
        view_scale_(other.view_scale_), keep_alive_(other.keep_alive_) {
    if (other.view_rows_ || other.rows_ == 0) return;
    *this = CompactTable(storage_, rows_, cols_);
    copy_rows_from(other);
  }
  CompactTable& operator=(const CompactTable& other) {
    if (this != &other) *this = CompactTable(other);
    return *this;
  }
  CompactTable(CompactTable&&) noexcept = default;
  CompactTable& operator=(CompactTable&&) noexcept = default;

  TableStorage storage() const { return storage_; }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  /// Values from the start of one row to the next: cols() for a table alone or a view, the sum
  /// of the tables' columns for tables side by side (side_by_side). Row r of bf16() or i8()
  /// starts at r * ld().
  Index ld() const { return ld_; }
  bool empty() const { return rows_ == 0; }
  /// Bytes held: the rows and, for int8, the scales.
  std::size_t bytes() const { return static_cast<std::size_t>(rows_) * row_bytes(storage_, cols_, 0); }
  /// True while the table reads someone else's memory (see adopt_view).
  bool is_view() const { return view_rows_ != nullptr; }

  /// The bfloat16 rows (row-major, row r at r * ld()); bf16 storage only.
  const std::uint16_t* bf16() const {
    SPEX_CHECK(storage_ == TableStorage::bf16, "the table is stored as " << to_string(storage_) << ", not bf16");
    return static_cast<const std::uint16_t*>(raw_rows());
  }
  /// The int8 rows (row r at r * ld()) and their scales (one per row); int8 storage only.
  const std::int8_t* i8() const {
    SPEX_CHECK(storage_ == TableStorage::int8, "the table is stored as " << to_string(storage_) << ", not int8");
    return static_cast<const std::int8_t*>(raw_rows());
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
      void* row = rows_at_ + static_cast<std::size_t>(first + r) * row_stride();
      if (storage_ == TableStorage::bf16) {
        std::uint16_t* q = static_cast<std::uint16_t*>(row);
        for (std::size_t i = 0; i < c; ++i) q[i] = kernels::scalar::float_to_bf16(x[i]);
      } else {
        scale_[first + r] = kernels::scalar::quantize_row_i8(x, c, static_cast<std::int8_t*>(row));
      }
    }
  }

  /// Row r as floats (the values the gathers compute with) into out (cols values).
  void get_row(Index r, float* out) const {
    SPEX_CHECK(r >= 0 && r < rows_, "get_row(" << r << ") on " << rows_ << " rows");
    const std::size_t c = static_cast<std::size_t>(cols_), o = static_cast<std::size_t>(r) * static_cast<std::size_t>(ld_);
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
  /// first): the bf16 or int8 rows (row r at r * ld() values), and the int8 scales.
  void* mutable_rows() {
    own();
    return rows_at_;
  }
  float* mutable_scales() {
    SPEX_CHECK(storage_ == TableStorage::int8, "the table is stored as " << to_string(storage_) << ", it has no scales");
    own();
    return scale_.data();
  }

  /// Reads `rows` (and, for int8, `scales`) in place from now on, in this table's storage and
  /// shape, rows contiguous (ld() becomes cols()); `keep_alive` owns that memory. The owned
  /// storage is released (for tables side by side, this table's share of it).
  void adopt_view(const void* rows, const float* scales, std::shared_ptr<const void> keep_alive) {
    SPEX_CHECK(rows != nullptr && keep_alive != nullptr, "adopt_view needs data and the owner that keeps it alive");
    SPEX_CHECK((storage_ == TableStorage::int8) == (scales != nullptr), "adopt_view: int8 rows need their scales, bf16 rows have none");
    block_.reset();
    rows_at_ = nullptr;
    Vec<float>().swap(scale_);
    ld_ = cols_;
    view_rows_ = rows;
    view_scale_ = scales;
    keep_alive_ = std::move(keep_alive);
  }

 private:
  CompactTable(TableStorage s, Index rows, Index cols, std::shared_ptr<unsigned char> block, Index offset, Index ld)
      : storage_(s), rows_(rows), cols_(cols), ld_(ld), block_(std::move(block)) {
    rows_at_ = block_.get() + element_size() * static_cast<std::size_t>(offset);
    if (s == TableStorage::int8) scale_.resize(rows);
  }

  /// Rows x ld values of storage `s`, 64-byte aligned, huge pages advised before the first touch.
  static std::shared_ptr<unsigned char> allocate(TableStorage s, Index rows, Index ld) {
    SPEX_CHECK(s != TableStorage::native, "CompactTable holds bf16 or int8 rows, not native ones");
    SPEX_CHECK(rows >= 1 && ld >= 1, "CompactTable(" << rows << ", " << ld << ") needs positive sizes");
    const std::size_t values = static_cast<std::size_t>(checked_mul(rows, ld, "a compact table's size"));
    const std::size_t bytes = ((values * (s == TableStorage::bf16 ? 2 : 1) + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    advise_huge_pages(p, bytes);
    return std::shared_ptr<unsigned char>(static_cast<unsigned char*>(p), [](unsigned char* q) { std::free(q); });
  }

  std::size_t element_size() const { return storage_ == TableStorage::bf16 ? 2 : 1; }
  std::size_t row_stride() const { return element_size() * static_cast<std::size_t>(ld_); }
  const void* raw_rows() const { return view_rows_ ? view_rows_ : static_cast<const void*>(rows_at_); }

  /// The rows and scales of `src` (owned or a view; this table's storage and shape) into this
  /// owned table, bit for bit, each row at its table's ld().
  void copy_rows_from(const CompactTable& src) {
    const std::size_t row = element_size() * static_cast<std::size_t>(cols_);
    const auto* from = static_cast<const unsigned char*>(src.raw_rows());
    for (Index r = 0; r < rows_; ++r)
      std::memcpy(rows_at_ + static_cast<std::size_t>(r) * row_stride(), from + static_cast<std::size_t>(r) * src.row_stride(), row);
    if (storage_ == TableStorage::int8) std::copy(src.scales(), src.scales() + rows_, scale_.data());
  }
  friend std::vector<CompactTable> copy_side_by_side(const std::vector<const CompactTable*>& tables);

  // A view becomes an owned copy (rows contiguous) before anything writes.
  void own() {
    if (!view_rows_) return;
    CompactTable copy(storage_, rows_, cols_);
    copy.copy_rows_from(*this);
    *this = std::move(copy);
  }

  TableStorage storage_ = TableStorage::native;
  Index rows_ = 0, cols_ = 0, ld_ = 0;
  std::shared_ptr<unsigned char> block_;  // owned rows: this table's alone, or shared with the tables beside it
  unsigned char* rows_at_ = nullptr;       // this table's row 0 in block_
  Vec<float> scale_;
  const void* view_rows_ = nullptr;
  const float* view_scale_ = nullptr;
  std::shared_ptr<const void> keep_alive_;
};

/// out[r] = table[ids[r]] . x for r < m (x: cols floats): the compact gather-dot for the
/// table's storage.
template <class Arch = default_arch>
void gather_dot(const CompactTable& t, const Index* ids, std::size_t m, const float* x, float* out) {
  const std::size_t c = static_cast<std::size_t>(t.cols()), ld = static_cast<std::size_t>(t.ld());
  if (t.storage() == TableStorage::bf16) kernels::gather_dot_bf16<Arch>(t.bf16(), ld, ids, m, x, c, out);
  else kernels::gather_dot_i8<Arch>(t.i8(), ld, t.scales(), ids, m, x, c, out);
}

/// y += sum_r alpha[r] table[ids[r]] for r < m (y: cols floats).
template <class Arch = default_arch>
void gather_axpy(const CompactTable& t, const Index* ids, const float* alpha, std::size_t m, float* y) {
  const std::size_t c = static_cast<std::size_t>(t.cols()), ld = static_cast<std::size_t>(t.ld());
  if (t.storage() == TableStorage::bf16) kernels::gather_axpy_bf16<Arch>(t.bf16(), ld, ids, alpha, m, y, c);
  else kernels::gather_axpy_i8<Arch>(t.i8(), ld, t.scales(), ids, alpha, m, y, c);
}

/// Fills `t` block by block: fill(first, n, buf) writes rows [first, first + n) into buf
/// (n x cols floats), which set_rows rounds or quantizes (`what` names the table in its errors).
/// The full float table never exists at once.
template <class Fill>
void fill_compact(CompactTable& t, Fill&& fill, const char* what) {
  constexpr Index kBlock = 256;
  const Index rows = t.rows(), cols = t.cols();
  std::vector<float> buf(static_cast<std::size_t>(std::min(rows, kBlock) * cols));
  for (Index first = 0; first < rows; first += kBlock) {
    const Index n = std::min(kBlock, rows - first);
    fill(first, n, buf.data());
    t.set_rows(first, n, buf.data(), what);
  }
}

/// A compact copy of `rows` x `cols` floats produced block by block (see fill_compact).
template <class Fill>
CompactTable make_compact(TableStorage s, Index rows, Index cols, Fill&& fill, const char* what) {
  CompactTable t(s, rows, cols);
  fill_compact(t, std::forward<Fill>(fill), what);
  return t;
}

/// Copies of `tables` (owned or views; one storage and one number of rows) with their rows side
/// by side (CompactTable::side_by_side): the same rows and scales, bit for bit.
inline std::vector<CompactTable> copy_side_by_side(const std::vector<const CompactTable*>& tables) {
  SPEX_CHECK(!tables.empty(), "copy_side_by_side needs at least one table");
  const TableStorage s = tables[0]->storage();
  const Index rows = tables[0]->rows();
  std::vector<Index> cols;
  for (const CompactTable* t : tables) {
    SPEX_CHECK(t->storage() == s && t->rows() == rows, "copy_side_by_side: tables of one storage and one number of rows");
    cols.push_back(t->cols());
  }
  std::vector<CompactTable> out = CompactTable::side_by_side(s, rows, cols);
  for (std::size_t i = 0; i < tables.size(); ++i) out[i].copy_rows_from(*tables[i]);
  return out;
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

/// A fill for fill_compact: the rows of `native`, or, when `small` is not empty, the values
/// `small` computes with.
inline auto rows_of(const Table<float>& native, const CompactTable& small) {
  return [&native, &small](Index first, Index n, float* buf) {
    const Index cols = small.empty() ? native.cols() : small.cols();
    for (Index r = 0; r < n; ++r) {
      float* to = buf + static_cast<std::size_t>(r * cols);
      if (small.empty()) std::copy(native.data() + (first + r) * native.ld(), native.data() + (first + r) * native.ld() + cols, to);
      else small.get_row(first + r, to);
    }
  };
}

/// The values compact table `from` computes with into the owned native table `to` of its shape
/// (exact), each row at to.ld().
inline void copy_native(const CompactTable& from, Table<float>& to) {
  SPEX_CHECK(to.rows() == from.rows() && to.cols() == from.cols(), "copy_native: a " << from.rows() << " x " << from.cols()
                                                                                    << " table into " << to.rows() << " x " << to.cols());
  float* rows = to.mutable_data();
  for (Index r = 0; r < from.rows(); ++r) from.get_row(r, rows + static_cast<std::size_t>(r * to.ld()));
}

/// The values compact table `t` computes with, as a native table (exact).
inline Table<float> native_copy(const CompactTable& t) {
  Table<float> out(t.rows(), t.cols());
  copy_native(t, out);
  return out;
}

/// Moves a table between storages: from `native` (when `small` is empty) or from `small`, to
/// native storage (`native`, exact values of the compact rows) or to compact storage `to`
/// (`small`). The source is released after the copy; the peak is the table in both forms.
inline void convert_table(Table<float>& native, CompactTable& small, TableStorage to, const char* what) {
  const bool from_native = small.empty();
  if (from_native && to == TableStorage::native) return;
  if (!from_native && to == small.storage()) return;
  if (to == TableStorage::native) {
    native = native_copy(small);
    small = CompactTable();
    return;
  }
  const Index rows = from_native ? native.rows() : small.rows(), cols = from_native ? native.cols() : small.cols();
  CompactTable t = make_compact(to, rows, cols, rows_of(native, small), what);
  small = std::move(t);
  native = Table<float>();
}

}  // namespace spex
