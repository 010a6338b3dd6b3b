#pragma once
// Saving and loading compact expert tables (core/compact_table.hpp). In a file, a bf16 table
// is a BF16 tensor "<name>" [rows, cols] (the same tensor a float layer saved as BF16 writes,
// and which a float layer loads); an int8 table is an I8 tensor "<name>" [rows, cols] with its
// F32 scales "<name>.scale" [rows] (symmetric per-row absmax: value = scale * q).
//
// Loading into a compact table, per tensor:
//   stored as the table's storage (BF16 for bf16, I8 + scales for int8): read in place from the
//     mapped file with LoadOptions::map (nothing copied, pages from the page cache; the rows then
//     keep the file's layout, one table after the other, not side by side as PEER's tables are
//     in memory: its expert step reads them more slowly, docs/performance.md), else copied;
//   any other floating dtype (F64, F32, F16, BF16) or I8: quantized on load, block by block
//     (the float table never exists in memory). The values are checked finite first, whatever
//     check_finite says: a quantization cannot fail half way.
// Staged like ParameterLoad: the constructor finds every problem and throws one spex::Error;
// apply() writes and cannot fail.
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "../core/compact_table.hpp"
#include "parameter_load.hpp"

namespace spex {

/// The tensors that save compact tables `tables` (names prefixed by `prefix`), stored as they
/// are in memory.
inline std::vector<TensorSource> tensor_sources(const ConstCompactTableList& tables, const std::string& prefix = "") {
  std::vector<TensorSource> out;
  for (const auto& [name, t] : tables) {
    const std::vector<std::int64_t> shape{t->rows(), t->cols()};
    if (t->storage() == TableStorage::bf16) {
      out.push_back(TensorSource{prefix + name, DType::BF16, shape, t->bf16(), DType::BF16, t->ld()});
    } else {
      out.push_back(TensorSource{prefix + name, DType::I8, shape, t->i8(), DType::I8, t->ld()});
      out.push_back(TensorSource{prefix + name + ".scale", DType::F32, {t->rows()}, t->scales(), DType::F32});
    }
  }
  return out;
}

/// A staged load of compact tables from a validated file image (see the top of this file).
/// `keep_alive` and `file_mapping` as for ParameterLoad.
class CompactTableLoad {
 public:
  CompactTableLoad(const SafetensorsView& file, std::shared_ptr<const void> keep_alive, const CompactTableList& tables,
                   const LoadOptions& opt, bool file_mapping = false)
      : file_(file), keep_alive_(std::move(keep_alive)), file_mapping_(file_mapping) {
    std::vector<std::string> problems;
    for (const auto& [name, table] : tables) {
      const TensorInfo* t = file.find(name);
      if (!t) {
        (opt.strict ? missing_ : report_.missing).push_back(name);
        continue;
      }
      Item it{name, table, t, nullptr, Mode::convert};
      if (!check_rows(it, problems)) continue;
      const bool stored_as_is = (table->storage() == TableStorage::bf16 && t->dtype == DType::BF16) ||
                                (table->storage() == TableStorage::int8 && t->dtype == DType::I8);
      if (stored_as_is) {
        const bool aligned = reinterpret_cast<std::uintptr_t>(file.data(*t)) % dtype_size(t->dtype) == 0;
        it.mode = opt.map && keep_alive_ && aligned ? Mode::map : Mode::copy;
      }
      // Scales and values that will be converted are checked here, so that apply() cannot fail;
      // scales always (a few bytes a row), mapped ones too: a huge scale makes infinite weights.
      const bool check = it.mode == Mode::convert || (it.mode == Mode::copy && opt.check_finite);
      if (it.scale && !check_scales(it, problems)) continue;
      if (check && !check_values(it, problems)) continue;
      items_.push_back(it);
    }
    std::ostringstream os;
    if (!missing_.empty()) os << "\n  missing from the file: " << detail::join(missing_);
    for (const auto& p : problems) os << "\n  " << p;
    const std::size_t failed = missing_.size() + problems.size();
    SPEX_CHECK(os.str().empty(), file.source() << ": " << failed << (failed == 1 ? " problem" : " problems") << " loading "
                                               << tables.size() << " compact tables" << os.str());
    // What apply() needs, allocated now: owned rows for copies and conversions (a mapped table
    // is copied once here), the conversion buffer, and the report.
    std::size_t block_values = 0;
    for (auto& it : items_) {
      (it.mode == Mode::map ? report_.mapped : report_.copied).push_back(it.name);
      if (it.mode != Mode::map) it.table->mutable_rows();
      if (it.mode == Mode::convert) block_values = std::max(block_values, static_cast<std::size_t>(rows_per_block(it) * it.table->cols()));
    }
    buf_.resize(block_values);
  }

  /// The tensors this load reads (tables and int8 scales): not unexpected for ParameterLoad.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& it : items_) {
      out.push_back(it.name);
      if (it.scale) out.push_back(it.scale->name);
    }
    return out;
  }

  /// Writes every table (map, copy or quantize): nothing in it can fail, the constructor checked
  /// every value it converts and allocated what it needs. Call once, after every other staged
  /// part.
  void apply() {
    for (auto& it : items_) {
      CompactTable& table = *it.table;
      if (it.mode == Mode::map) {
        const float* scales = it.scale ? reinterpret_cast<const float*>(file_.data(*it.scale)) : nullptr;
        table.adopt_view(file_.data(*it.t), scales, keep_alive_);
      } else if (it.mode == Mode::copy) {
        auto* rows = static_cast<unsigned char*>(table.mutable_rows());
        const std::size_t size = dtype_size(it.t->dtype), row = static_cast<std::size_t>(table.cols()) * size,
                          stride = static_cast<std::size_t>(table.ld()) * size;  // tables side by side: ld() > cols()
        for_each_block(it, [&](Index first, Index n, const unsigned char* src) {
          for (Index r = 0; r < n; ++r)
            std::memcpy(rows + static_cast<std::size_t>(first + r) * stride, src + static_cast<std::size_t>(r) * row, row);
        });
        if (it.scale) std::memcpy(table.mutable_scales(), file_.data(*it.scale), sizeof(float) * static_cast<std::size_t>(table.rows()));
      } else {
        for_each_block(it, [&](Index first, Index n, const unsigned char* src) {
          to_float(it, first, n, src, buf_.data());
          table.set_rows(first, n, buf_.data(), it.name.c_str());
        });
      }
    }
    items_.clear();
  }

  const LoadReport& report() const { return report_; }

 private:
  enum class Mode { map, copy, convert };
  struct Item {
    std::string name;
    CompactTable* table;
    const TensorInfo* t;
    const TensorInfo* scale;  // the I8 tensor's scales
    Mode mode;
  };

  // Dtype, shape and, for I8, the scales tensor.
  bool check_rows(Item& it, std::vector<std::string>& problems) const {
    const TensorInfo& t = *it.t;
    const CompactTable& table = *it.table;
    if (!is_float_dtype(t.dtype) && t.dtype != DType::I8) {
      problems.push_back("'" + it.name + "' is " + to_string(t.dtype) + ", a " + to_string(table.storage()) +
                         " table loads from F64, F32, F16, BF16 or I8 (with scales)");
      return false;
    }
    if (t.shape != std::vector<std::int64_t>{table.rows(), table.cols()}) {
      problems.push_back("'" + it.name + "' has shape " + shape_string(t.shape) + ", the table is " + std::to_string(table.rows()) +
                         " x " + std::to_string(table.cols()));
      return false;
    }
    if (t.dtype != DType::I8) return true;
    it.scale = file_.find(it.name + ".scale");
    if (!it.scale || it.scale->dtype != DType::F32 || it.scale->shape != std::vector<std::int64_t>{table.rows()}) {
      problems.push_back("'" + it.name + "' is I8 and needs its scales '" + it.name + ".scale' as F32 [" +
                         std::to_string(table.rows()) + "]" + (it.scale ? ", the file's is " + std::string(to_string(it.scale->dtype)) + " " + shape_string(it.scale->shape) : std::string(", absent")));
      return false;
    }
    return true;
  }

  // Every scale in [0, FLT_MAX / 127]: then every int8 value times its scale is finite.
  bool check_scales(const Item& it, std::vector<std::string>& problems) const {
    std::string bad = detail::scale_problem(it.scale->name, file_.data(*it.scale), it.table->rows());
    if (bad.empty()) return true;
    problems.push_back(std::move(bad));
    return false;
  }

  // Every value the table will hold is one its storage can hold: for a copy of stored rows,
  // finite; for a conversion, the converted float is finite and, for bf16, so is its rounding.
  bool check_values(const Item& it, std::vector<std::string>& problems) const {
    if (it.mode == Mode::copy && it.scale) return true;  // int8 rows under checked scales
    std::int64_t at = -1;
    std::vector<float> buf;
    const Index cols = it.table->cols();
    for_each_block(it, [&](Index first, Index n, const unsigned char* src) {
      if (at >= 0) return;
      std::int64_t i;
      if (it.mode == Mode::copy) {
        i = detail::first_non_finite<float>(src, it.t->dtype, std::uint64_t(n * cols));
      } else {
        buf.resize(static_cast<std::size_t>(n * cols));
        to_float(it, first, n, src, buf.data());
        i = first_unstorable(it.table->storage(), buf.data(), buf.size());
      }
      if (i >= 0) at = first * cols + i;
    });
    if (at < 0) return true;
    problems.push_back("'" + printable(it.name) + "' holds a value at flat index " + std::to_string(at) + " (row " +
                       std::to_string(at / cols) + ") that " + to_string(it.table->storage()) +
                       " storage cannot hold: not finite, or beyond bfloat16's range once converted");
    return false;
  }

  // Rows [first, first + n) of the tensor as floats into buf (n x cols).
  void to_float(const Item& it, Index first, Index n, const unsigned char* src, float* buf) const {
    const std::size_t c = static_cast<std::size_t>(it.table->cols()), count = static_cast<std::size_t>(n) * c;
    if (it.t->dtype != DType::I8) {
      convert_from_bytes(src, it.t->dtype, buf, count);
      return;
    }
    const std::uint64_t cols = static_cast<std::uint64_t>(c);
    detail::dequantize_i8(src, file_.data(*it.scale), static_cast<std::uint64_t>(first) * cols, count, cols, buf);
  }

  // Rows a block of for_each_block holds: about 16 MiB of the file's tensor.
  static Index rows_per_block(const Item& it) {
    const std::size_t row = static_cast<std::size_t>(it.table->cols()) * dtype_size(it.t->dtype);
    return std::min(it.table->rows(), std::max<Index>(1, Index((std::size_t(16) << 20) / row)));
  }

  // Calls f(first row, rows, bytes) over the tensor in blocks of rows_per_block, unmapping each
  // block of a file mapping once f has read it.
  template <class F>
  void for_each_block(const Item& it, F&& f) const {
    const std::size_t row = static_cast<std::size_t>(it.table->cols()) * dtype_size(it.t->dtype);
    const Index per = rows_per_block(it), rows = it.table->rows();
    for (Index first = 0; first < rows; first += per) {
      const Index n = std::min(per, rows - first);
      const unsigned char* src = file_.data(*it.t) + static_cast<std::size_t>(first) * row;
      f(first, n, src);
      if (file_mapping_) release_file_pages(src, static_cast<std::size_t>(n) * row);
    }
  }

  const SafetensorsView& file_;
  std::shared_ptr<const void> keep_alive_;
  bool file_mapping_ = false;
  std::vector<Item> items_;
  std::vector<float> buf_;  // conversions' blocks, allocated by the constructor
  std::vector<std::string> missing_;
  LoadReport report_;
};

}  // namespace spex
