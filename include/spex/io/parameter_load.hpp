#pragma once
// Loading a ParameterList from a safetensors file by name, in two stages: check() finds every
// problem at once (missing and unexpected tensors, shape and dtype mismatches, non-finite
// values) and throws one spex::Error listing them all, before any value is written; apply()
// then writes (it cannot fail). Loading is therefore all-or-nothing.
//
// Shapes: a parameter of rows x cols matches a tensor of shape [rows, cols]; a vector
// (cols == 1 or rows == 1) also matches [n], PyTorch's shape for biases and norm weights; a
// 1 x 1 parameter matches []. Saving writes vectors (cols == 1) as [n], the rest as [rows, cols].
// Dtypes: F64, F32, F16 and BF16 load into float and double parameters (converted exactly or
// rounded to nearest even); any other dtype is an error for a floating parameter.
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

#include "../core/check.hpp"
#include "../core/compact_table.hpp"
#include "../core/memory.hpp"
#include "../core/parameter.hpp"
#include "safetensors.hpp"

namespace spex {

struct LoadOptions {
  bool strict = true;        ///< tensors missing from the file, or in it with no parameter, are errors
  bool map = false;          ///< tables whose dtype, shape and alignment match read the mapped file in place
  bool check_finite = true;  ///< NaN or Inf in a copied tensor is an error (mapped tensors are not read)
  /// load_layer only: the storage of the built layer's expert tables (Peer, Pkm); absent: as
  /// the file records. Compact from a float file quantizes on load (io/compact_tables.hpp).
  std::optional<TableStorage> storage;
};

/// What a load did (names as in the file).
struct LoadReport {
  std::vector<std::string> copied;      ///< written into the layer (converted when the dtype differs)
  std::vector<std::string> mapped;      ///< read in place from the mapped file
  std::vector<std::string> missing;     ///< parameters with no tensor (non-strict loads only)
  std::vector<std::string> unexpected;  ///< tensors in scope with no parameter (non-strict loads only)
};

/// [rows] for a column vector, else [rows, cols].
inline std::vector<std::int64_t> parameter_shape(Index rows, Index cols) {
  if (cols == 1) return {rows};
  return {rows, cols};
}

inline bool shape_matches(const std::vector<std::int64_t>& s, Index rows, Index cols) {
  if (s.size() == 2) return s[0] == rows && s[1] == cols;
  if (s.size() == 1) return (cols == 1 && s[0] == rows) || (rows == 1 && s[0] == cols);
  return s.empty() && rows == 1 && cols == 1;
}

namespace detail {

/// Index of the first value of a floating tensor that is not finite (after conversion to T),
/// or -1.
template <class T>
std::int64_t first_non_finite(const unsigned char* p, DType t, std::uint64_t n) {
  constexpr std::uint64_t kChunk = 4096;
  T buf[kChunk];
  for (std::uint64_t i = 0; i < n; i += kChunk) {
    const std::uint64_t len = std::min(kChunk, n - i);
    convert_from_bytes(p + i * dtype_size(t), t, buf, len);
    for (std::uint64_t j = 0; j < len; ++j)
      if (!std::isfinite(buf[j])) return std::int64_t(i + j);
  }
  return -1;
}

/// Index of the first value of a floating tensor that is finite in the file but not once
/// converted to T (an F64 above FLT_MAX loaded as float), or -1: a conversion must never make
/// an infinity out of a finite value, whatever LoadOptions::check_finite says.
template <class T>
std::int64_t first_conversion_overflow(const unsigned char* p, DType t, std::uint64_t n) {
  if (t != DType::F64 || std::is_same<T, double>::value) return -1;  // every other conversion widens or is exact
  for (std::uint64_t i = 0; i < n; ++i) {
    double v;
    std::memcpy(&v, p + 8 * i, 8);
    if (std::isfinite(v) && std::fabs(v) > double(std::numeric_limits<T>::max())) return std::int64_t(i);
  }
  return -1;
}

/// The largest int8 row scale a file may hold: 127 times it is still a finite float, so every
/// dequantized value (scale * q, |q| <= 127) is finite.
constexpr float kMaxInt8Scale = std::numeric_limits<float>::max() / 127.f;

/// n int8 values `q` of a table with `cols` columns, from its flat index `first` on, times their
/// row's scale (F32 bytes `scales`, one per row: io/compact_tables.hpp), as T.
template <class T>
void dequantize_i8(const unsigned char* q, const unsigned char* scales, std::uint64_t first, std::uint64_t n,
                   std::uint64_t cols, T* out) {
  for (std::uint64_t i = 0; i < n; ++i) {
    float s;
    std::memcpy(&s, scales + sizeof(float) * ((first + i) / cols), sizeof s);
    out[i] = static_cast<T>(s * float(static_cast<std::int8_t>(q[i])));
  }
}

/// The problem with the `rows` F32 int8 scales of tensor `name`, or "" when every scale is in
/// [0, kMaxInt8Scale] (NaN is not): what both loaders of int8 tables report.
inline std::string scale_problem(const std::string& name, const unsigned char* scales, std::int64_t rows) {
  for (std::int64_t r = 0; r < rows; ++r) {
    float s;
    std::memcpy(&s, scales + sizeof(float) * static_cast<std::size_t>(r), sizeof s);
    if (s >= 0 && s <= kMaxInt8Scale) continue;
    std::ostringstream os;
    os << "'" << printable(name) << "' holds the scale " << s << " at row " << r << "; a scale must be in [0, FLT_MAX / 127 = "
       << kMaxInt8Scale << "] (127 times it must be a finite float)";
    return os.str();
  }
  return "";
}

inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + printable(v[i]);
  return s;
}

}  // namespace detail

/// A staged load of `params` from a validated file image. Tensors count as unexpected only
/// when their name starts with `scope` (several layers or an optimizer may share a file).
/// `keep_alive` owns the image's memory (SafetensorsFile::keep_alive()); without it nothing is
/// mapped in place. When the image is a shared file mapping (`file_mapping`), the pages a
/// check or a copy has read are unmapped again, chunk by chunk (the page cache keeps them): a
/// copying load then peaks at the size of the copy, not of the copy plus the file. Tensors
/// named in `read_elsewhere` (compact tables) are neither loaded nor unexpected.
template <class T>
class ParameterLoad {
 public:
  ParameterLoad(const SafetensorsView& file, std::shared_ptr<const void> keep_alive, const ParameterList<T>& params,
                const std::string& scope, const LoadOptions& opt, bool file_mapping = false,
                const std::vector<std::string>& read_elsewhere = {})
      : file_(file), keep_alive_(std::move(keep_alive)), file_mapping_(file_mapping) {
    spex::check_current(params, "loading parameters");
    std::vector<std::string> problems;
    std::unordered_set<std::string> wanted(read_elsewhere.begin(), read_elsewhere.end());
    for (const auto& p : params) {
      if (!wanted.insert(p.name).second) {
        problems.push_back("parameter '" + p.name + "' appears twice in the list");
        continue;
      }
      const TensorInfo* t = file.find(p.name);
      if (!t) {
        (opt.strict ? missing_ : report_.missing).push_back(p.name);
        continue;
      }
      const TensorInfo* scale = nullptr;
      if (t->dtype == DType::I8 && p.table) {  // an int8 table with a scale per row (io/compact_tables.hpp)
        scale = file.find(p.name + ".scale");
        if (!scale || scale->dtype != DType::F32 || scale->shape != std::vector<std::int64_t>{p.rows}) {
          problems.push_back("'" + p.name + "' is I8 and needs its scales '" + p.name + ".scale' as F32 [" + std::to_string(p.rows) + "]");
          continue;
        }
        wanted.insert(scale->name);
      } else if (!is_float_dtype(t->dtype)) {
        problems.push_back("'" + p.name + "' is " + to_string(t->dtype) + ", a floating parameter needs F64, F32, F16 or BF16" +
                           (t->dtype == DType::I8 ? " (I8 with scales: expert tables only)" : ""));
        continue;
      }
      if (!shape_matches(t->shape, p.rows, p.cols)) {
        problems.push_back("'" + p.name + "' has shape " + shape_string(t->shape) + ", the parameter is " +
                           std::to_string(p.rows) + " x " + std::to_string(p.cols));
        continue;
      }
      const bool map = opt.map && p.table && keep_alive_ && t->dtype == dtype_of<T>() && t->shape.size() == 2 &&
                       reinterpret_cast<std::uintptr_t>(file.data(*t)) % alignof(T) == 0;
      if (scale) {
        std::string bad = detail::scale_problem(scale->name, file.data(*scale), p.rows);
        if (!bad.empty()) problems.push_back(std::move(bad));
      } else if (!map) {
        std::int64_t at = -1, overflow = -1;
        for_each_chunk(*t, [&](std::uint64_t first, std::uint64_t n, const unsigned char* src) {
          const std::int64_t i = at < 0 && opt.check_finite ? detail::first_non_finite<T>(src, t->dtype, n) : -1;
          if (i >= 0) at = std::int64_t(first) + i;
          // With check_finite the scan above already sees an overflow as a non-finite converted value.
          const std::int64_t o = overflow < 0 && !opt.check_finite ? detail::first_conversion_overflow<T>(src, t->dtype, n) : -1;
          if (o >= 0) overflow = std::int64_t(first) + o;
        });
        if (at >= 0)
          problems.push_back("'" + printable(p.name) + "' holds a non-finite value at flat index " + std::to_string(at) +
                             (t->dtype == dtype_of<T>() ? std::string() : " (after conversion from " + std::string(to_string(t->dtype)) + ")"));
        else if (overflow >= 0)
          problems.push_back("'" + printable(p.name) + "' holds a finite " + to_string(t->dtype) + " value at flat index " +
                             std::to_string(overflow) + " beyond the range of the parameter's type");
      }
      items_.push_back(Item{p, t, map, scale});
      (map ? report_.mapped : report_.copied).push_back(p.name);
    }
    std::vector<std::string> unexpected;
    for (const auto& t : file.tensors())
      if (t.name.compare(0, scope.size(), scope) == 0 && !wanted.count(t.name))
        (opt.strict ? unexpected : report_.unexpected).push_back(t.name);
    std::ostringstream os;
    if (!missing_.empty()) os << "\n  missing from the file: " << detail::join(missing_);
    if (!unexpected.empty()) os << "\n  in the file but not in the layer: " << detail::join(unexpected);
    for (const auto& p : problems) os << "\n  " << p;
    const std::size_t failed = missing_.size() + unexpected.size() + problems.size();
    SPEX_CHECK(os.str().empty(), file.source() << ": " << failed << (failed == 1 ? " problem" : " problems") << " loading "
                                               << params.size() << " parameters (" << missing_.size() << " missing, "
                                               << unexpected.size() << " unexpected, " << problems.size() << " unreadable)" << os.str()
                                               << (opt.strict && missing_.empty() && !unexpected.empty() && problems.empty()
                                                       ? "\n  (LoadOptions::strict = false skips the tensors the parameters do not have)"
                                                       : ""));
  }

  /// Writes every matched tensor (copy or map): nothing in it can fail, every check and every
  /// allocation happened in the constructor. Call once, after every other staged part of a load
  /// has been checked.
  void apply() {
    for (auto& it : items_) {
      const TensorInfo& t = *it.t;
      if (it.map) {
        it.p.table->adopt_view(reinterpret_cast<const T*>(file_.data(t)), it.p.rows, it.p.cols, keep_alive_);
        continue;
      }
      const std::size_t size = dtype_size(t.dtype);
      for_each_chunk(t, [&](std::uint64_t first, std::uint64_t n, const unsigned char* src) {
        // The file's flat run [first, first + n) in pieces within one row each (rows ld apart).
        for_each_row_piece(it.p, first, n, [&](std::uint64_t at, std::uint64_t len, T* dst) {
          const unsigned char* from = src + (at - first) * size;
          if (it.scale) detail::dequantize_i8(from, file_.data(*it.scale), at, len, static_cast<std::uint64_t>(it.p.cols), dst);
          else if (t.dtype == dtype_of<T>()) std::memcpy(dst, from, len * sizeof(T));
          else convert_from_bytes(from, t.dtype, dst, len);
        });
      });
    }
    items_.clear();
  }

  /// What apply() will do (known once the constructor has checked everything).
  const LoadReport& report() const { return report_; }
  /// The stamps of the parameters staged: apply() must not run once one is stale.
  void check_current(const char* user) const {
    for (const auto& it : items_) spex::check_current(it.p.name, it.p.stamps, user);
  }

 private:
  // Calls f(first element, element count, bytes) over the tensor in 64 MiB pieces, unmapping
  // each piece of a file mapping once f has read it.
  template <class F>
  void for_each_chunk(const TensorInfo& t, F&& f) const {
    const std::uint64_t size = dtype_size(t.dtype), per = (std::uint64_t(64) << 20) / size, n = t.elements();
    for (std::uint64_t first = 0; first < n; first += per) {
      const std::uint64_t len = std::min(per, n - first);
      const unsigned char* src = file_.data(t) + first * size;
      f(first, len, src);
      if (file_mapping_) release_file_pages(src, len * size);
    }
  }

  // Calls f(flat index, count, destination) over the flat run [first, first + n) of p's values:
  // one call when p's rows are contiguous, else one per row the run touches.
  template <class F>
  static void for_each_row_piece(const Parameter<T>& p, std::uint64_t first, std::uint64_t n, F&& f) {
    if (p.contiguous()) {
      f(first, n, p.value + first);
      return;
    }
    const std::uint64_t cols = static_cast<std::uint64_t>(p.cols);
    for (std::uint64_t at = first, end = first + n; at < end;) {
      const std::uint64_t r = at / cols, c = at % cols, len = std::min(cols - c, end - at);
      f(at, len, p.row(Index(r)) + c);
      at += len;
    }
  }

  struct Item {
    Parameter<T> p;
    const TensorInfo* t;
    bool map;
    const TensorInfo* scale;  // an I8 table's scales
  };
  const SafetensorsView& file_;
  std::shared_ptr<const void> keep_alive_;
  bool file_mapping_ = false;
  std::vector<Item> items_;
  std::vector<std::string> missing_;
  LoadReport report_;
};

/// The tensors that save `params` (const or not) as `dtype` (default: as stored in memory).
template <class P>
std::vector<TensorSource> tensor_sources(const ParameterList<P>& params, const std::string& prefix = "",
                                         DType dtype = dtype_of<std::remove_const_t<P>>()) {
  check_unique_names(params);
  std::vector<TensorSource> out;
  for (const auto& p : params)
    out.push_back(TensorSource{prefix + p.name, dtype, parameter_shape(p.rows, p.cols), p.value, dtype_of<std::remove_const_t<P>>(),
                               p.contiguous() ? 0 : std::int64_t(p.row_stride())});
  return out;
}

}  // namespace spex
