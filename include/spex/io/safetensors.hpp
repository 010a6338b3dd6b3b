#pragma once
// The safetensors format (the one PyTorch users already have): an 8-byte little-endian header
// length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// "__metadata__": {string: string}} (padded with spaces), then the data section; offsets are
// relative to its start.
//
// A loader is an attack surface, so a file is validated completely before anything reads a
// tensor: the header length against the file, the JSON (nlohmann/json, with duplicate keys
// rejected at every level), every entry's keys and types, the dtype, the shape (non-negative,
// no overflow), the byte range (dtype size x elements), and the data section's layout, which
// must be tiled exactly as the reference implementation requires: sorted by offset the tensors
// start at 0, each begins where the previous one ends, the last ends at the end of the file (no
// gap, no overlap, no trailing bytes). Every failure is a spex::Error naming the file, the
// tensor and the problem.
//
// SafetensorsFile maps the file read-only and shared: tensors are read in place (no copy), the
// pages come from the page cache on first touch, and several processes mapping the same file
// share them. The file must not change while it is mapped: the data read would change with it
// (and a truncated file raises SIGBUS on access). Writers here never modify a file in place:
// write_safetensors writes a temporary file beside it and renames it over the old one, so a
// process that still maps the old file keeps reading the old, intact contents.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "../core/check.hpp"
#include "dtype.hpp"

namespace spex {

/// One tensor of a file: its dtype, shape and byte range [begin, end) in the data section.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;

  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (auto s : shape) n *= static_cast<std::uint64_t>(s);
    return n;
  }
  std::uint64_t bytes() const { return end - begin; }
};

/// "[2, 3]"
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// `s` (a name or string read from a file) safe to print to a terminal: control characters
/// (C0, DEL, C1), the bidirectional-text controls that reorder what a reader sees, backslashes
/// and bytes that are not UTF-8 are written as escapes (\n, \x1b, \u{202e}, \\); everything
/// else is kept. Every message and listing that shows a name from a file goes through it.
inline std::string printable(const std::string& s) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  auto byte_escape = [&](unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  };
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '\\') {
      out += "\\\\";
      ++i;
    } else if (c == '\n') {
      out += "\\n";
      ++i;
    } else if (c == '\t') {
      out += "\\t";
      ++i;
    } else if (c < 0x20 || c == 0x7f) {
      byte_escape(c);
      ++i;
    } else if (c < 0x80) {
      out += char(c);
      ++i;
    } else {  // a UTF-8 sequence: its length, then its code point (overlong forms and surrogates are not UTF-8)
      const std::size_t len = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? (c <= 0xef ? 3 : 0) : c >= 0xc2 ? 2 : 0;
      std::uint32_t cp = len == 2 ? c & 0x1fu : len == 3 ? c & 0x0fu : c & 0x07u;
      bool ok = len != 0 && i + len <= s.size();
      for (std::size_t k = 1; ok && k < len; ++k) {
        const unsigned char d = static_cast<unsigned char>(s[i + k]);
        ok = (d & 0xc0) == 0x80;
        cp = (cp << 6) | (d & 0x3fu);
      }
      ok = ok && !(len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) && !(len == 4 && (cp < 0x10000 || cp > 0x10ffff));
      if (!ok) {
        byte_escape(c);
        ++i;
        continue;
      }
      const bool hidden = (cp >= 0x80 && cp <= 0x9f) || cp == 0x200e || cp == 0x200f || (cp >= 0x202a && cp <= 0x202e) ||
                          (cp >= 0x2066 && cp <= 0x2069) || cp == 0x061c;
      if (hidden) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "\\u{%x}", unsigned(cp));
        out += buf;
      } else {
        out.append(s, i, len);
      }
      i += len;
    }
  }
  return out;
}

/// Headers larger than this are rejected before parsing (the reference's limit).
constexpr std::uint64_t kMaxSafetensorsHeader = 100u << 20;

/// A validated safetensors image in memory (not owned). Thread safety: immutable after
/// construction; any number of readers.
class SafetensorsView {
 public:
  /// Parses and validates the whole image; throws spex::Error naming `source` (a path).
  SafetensorsView(const unsigned char* data, std::size_t size, std::string source = "safetensors buffer")
      : source_(std::move(source)) {
    parse(data, size);
  }

  const std::string& source() const { return source_; }
  /// Tensors in the order of their data (by offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The tensor called `name`, or null.
  const TensorInfo* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor called `name`; throws naming the file otherwise.
  const TensorInfo& at(const std::string& name) const {
    const TensorInfo* t = find(name);
    SPEX_CHECK(t, source_ << ": no tensor named '" << printable(name) << "'");
    return *t;
  }
  /// The first byte of a tensor's data (not necessarily aligned to its dtype).
  const unsigned char* data(const TensorInfo& t) const { return data_section_ + t.begin; }
  /// Bytes of the JSON header (without the 8-byte length).
  std::uint64_t header_bytes() const { return header_bytes_; }
  std::uint64_t data_bytes() const { return data_bytes_; }

 private:
  void parse(const unsigned char* data, std::size_t size) {
    SPEX_CHECK(size >= 8, source_ << ": truncated: " << size << " bytes, a safetensors file starts with an 8-byte header length");
    std::uint64_t n = 0;
    std::memcpy(&n, data, 8);
    SPEX_CHECK(n <= size - 8, source_ << ": header length " << n << " runs past the end of the file (" << size << " bytes)");
    SPEX_CHECK(n <= kMaxSafetensorsHeader, source_ << ": header length " << n << " exceeds the limit of " << kMaxSafetensorsHeader);
    SPEX_CHECK(n >= 2 && data[8] == '{', source_ << ": the header is not a JSON object");
    header_bytes_ = n;
    data_section_ = data + 8 + n;
    data_bytes_ = size - 8 - n;
    const nlohmann::json header = parse_json(reinterpret_cast<const char*>(data + 8), n);
    SPEX_CHECK(header.is_object(), source_ << ": the header is not a JSON object");
    for (const auto& item : header.items()) {
      if (item.key() == "__metadata__") {
        read_metadata(item.value());
        continue;
      }
      tensors_.push_back(read_entry(item.key(), item.value()));
    }
    check_layout();
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  // Object nesting is at most 2 deep and arrays hold numbers only; keys are unique per object.
  nlohmann::json parse_json(const char* text, std::uint64_t n) const {
    std::vector<std::unordered_set<std::string>> open_objects;
    int depth = 0;
    const auto cb = [&](int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
      using E = nlohmann::json::parse_event_t;
      if (ev == E::object_start || ev == E::array_start) {
        SPEX_CHECK(++depth <= 3, source_ << ": the header nests deeper than a safetensors header can");
        if (ev == E::object_start) open_objects.emplace_back();
      } else if (ev == E::object_end || ev == E::array_end) {
        --depth;
        if (ev == E::object_end) open_objects.pop_back();
      } else if (ev == E::key) {
        const std::string& key = parsed.get_ref<const std::string&>();
        SPEX_CHECK(open_objects.back().insert(key).second, source_ << ": the header has the key '" << key << "' twice");
      }
      return true;
    };
    try {
      return nlohmann::json::parse(text, text + n, cb);
    } catch (const nlohmann::json::exception& e) {
      SPEX_CHECK(false, source_ << ": the header is not valid JSON (" << e.what() << ")");
    }
    return {};
  }

  void read_metadata(const nlohmann::json& m) {
    SPEX_CHECK(m.is_object(), source_ << ": __metadata__ must be an object of strings");
    for (const auto& kv : m.items()) {
      SPEX_CHECK(kv.value().is_string(), source_ << ": __metadata__ entry '" << printable(kv.key()) << "' is not a string");
      metadata_.emplace(kv.key(), kv.value().get<std::string>());
    }
  }

  static bool is_count(const nlohmann::json& v) { return v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0); }

  TensorInfo read_entry(const std::string& name, const nlohmann::json& e) const {
    const std::string at = source_ + ": tensor '" + printable(name) + "'";
    SPEX_CHECK(e.is_object(), at << ": its entry is not an object");
    for (const auto& kv : e.items())
      SPEX_CHECK(kv.key() == "dtype" || kv.key() == "shape" || kv.key() == "data_offsets",
                 at << ": unknown key '" << printable(kv.key()) << "' (expected dtype, shape, data_offsets)");
    SPEX_CHECK(e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
               at << ": needs dtype, shape and data_offsets");
    TensorInfo t;
    t.name = name;
    SPEX_CHECK(e["dtype"].is_string() && parse_dtype(e["dtype"].get<std::string>(), t.dtype),
               at << ": unknown dtype " << printable(e["dtype"].dump()));
    const auto& shape = e["shape"];
    SPEX_CHECK(shape.is_array(), at << ": shape is not an array");
    std::uint64_t elements = 1;
    bool overflow = false;
    for (const auto& s : shape) {
      SPEX_CHECK(is_count(s) && s.get<std::uint64_t>() <= std::uint64_t(INT64_MAX),
                 at << ": shape " << printable(shape.dump()) << " holds something other than a non-negative integer");
      const std::uint64_t d = s.get<std::uint64_t>();
      t.shape.push_back(static_cast<std::int64_t>(d));
      if (d != 0 && elements > UINT64_MAX / d) overflow = true;
      elements *= d;
    }
    const auto& off = e["data_offsets"];
    SPEX_CHECK(off.is_array() && off.size() == 2 && is_count(off[0]) && is_count(off[1]),
               at << ": data_offsets must be two non-negative integers, got " << printable(off.dump()));
    t.begin = off[0].get<std::uint64_t>();
    t.end = off[1].get<std::uint64_t>();
    SPEX_CHECK(t.begin <= t.end, at << ": data_offsets [" << t.begin << ", " << t.end << "] are out of order");
    const std::uint64_t size = dtype_size(t.dtype);
    SPEX_CHECK(!overflow && !(elements != 0 && elements > UINT64_MAX / size),
               at << ": shape " << shape_string(t.shape) << " overflows a 64-bit byte count");
    SPEX_CHECK(t.end - t.begin == elements * size, at << ": data_offsets [" << t.begin << ", " << t.end << "] hold "
                                                      << t.end - t.begin << " bytes, " << to_string(t.dtype) << " "
                                                      << shape_string(t.shape) << " needs " << elements * size);
    SPEX_CHECK(t.end <= data_bytes_, at << ": data_offsets [" << t.begin << ", " << t.end << "] lie outside the data section of "
                                        << data_bytes_ << " bytes");
    return t;
  }

  void check_layout() {
    std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t pos = 0;
    for (const auto& t : tensors_) {
      SPEX_CHECK(t.begin >= pos, source_ << ": tensor '" << printable(t.name) << "' at [" << t.begin << ", " << t.end
                                         << ") overlaps the tensor before it, which ends at " << pos);
      SPEX_CHECK(t.begin == pos, source_ << ": a gap of " << t.begin - pos << " bytes before tensor '" << printable(t.name) << "' at " << t.begin);
      pos = t.end;
    }
    SPEX_CHECK(pos == data_bytes_, source_ << ": " << data_bytes_ - pos << " trailing bytes after the last tensor");
  }

  std::string source_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
  const unsigned char* data_section_ = nullptr;
  std::uint64_t header_bytes_ = 0, data_bytes_ = 0;
};

namespace detail {

/// A file mapped read-only and shared; unmapped when the last owner lets go.
class FileMapping {
 public:
  explicit FileMapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    SPEX_CHECK(fd >= 0, path << ": cannot open (" << std::strerror(errno) << ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      SPEX_CHECK(false, path << ": not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
      const int err = errno;
      ::close(fd);
      SPEX_CHECK(p != MAP_FAILED, path << ": cannot map " << size_ << " bytes (" << std::strerror(err) << ")");
      data_ = static_cast<const unsigned char*>(p);
    } else {
      ::close(fd);
    }
  }
  ~FileMapping() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
  }
  FileMapping(const FileMapping&) = delete;
  FileMapping& operator=(const FileMapping&) = delete;

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

/// A safetensors file, mapped and validated on construction (or a validated image in memory,
/// from_memory). Copies share the mapping; the mapping lives while a copy or a table reading it
/// in place (keep_alive()) does. Thread safety: immutable; any number of readers.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path) {
    auto mapping = std::make_shared<detail::FileMapping>(path);
    init(path, mapping->data(), mapping->size(), mapping);
    mapped_ = true;
  }
  /// A file image held in memory (`bytes` is shared, never copied); `name` stands for the path
  /// in messages.
  static SafetensorsFile from_memory(std::shared_ptr<const std::vector<unsigned char>> bytes, const std::string& name) {
    SPEX_CHECK(bytes != nullptr, name << ": no bytes");
    SafetensorsFile f;
    f.init(name, bytes->data(), bytes->size(), bytes);
    return f;
  }

  const std::string& path() const { return path_; }
  std::uint64_t file_bytes() const { return size_; }
  const SafetensorsView& view() const { return *view_; }
  const std::vector<TensorInfo>& tensors() const { return view_->tensors(); }
  const std::map<std::string, std::string>& metadata() const { return view_->metadata(); }
  const TensorInfo* find(const std::string& name) const { return view_->find(name); }
  const TensorInfo& at(const std::string& name) const { return view_->at(name); }
  const unsigned char* data(const TensorInfo& t) const { return view_->data(t); }
  /// True for a file mapped from disk (shared with the page cache), false for from_memory.
  bool is_mapped_file() const { return mapped_; }
  /// Owns the file's memory: hold it as long as you read tensor data in place.
  std::shared_ptr<const void> keep_alive() const { return owner_; }

 private:
  SafetensorsFile() = default;
  void init(const std::string& path, const unsigned char* data, std::size_t size, std::shared_ptr<const void> owner) {
    path_ = path;
    size_ = size;
    owner_ = std::move(owner);
    view_ = std::make_shared<SafetensorsView>(data, size, path);
  }

  std::string path_;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::shared_ptr<const void> owner_;
  std::shared_ptr<SafetensorsView> view_;
};

/// One tensor to write: `count` values at `data` of type `data_type`, stored as `dtype` (the
/// same, or both floating: converted with round-to-nearest-even) with `shape`. `row_stride`
/// (values, 0: the rows are contiguous) is the distance between the starts of the rows of
/// `data`, a row being everything after the first dimension: rows of a table that lies side by
/// side with others in memory (Table::ld(), CompactTable::ld()); written contiguous.
struct TensorSource {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
  DType data_type = DType::F32;
  std::int64_t row_stride = 0;
};

struct WriteOptions {
  bool sync = true;  ///< fsync the file before the rename and its directory after (a checkpoint survives a crash)
};

namespace detail {

/// The file a write to `path` replaces: `path` itself, or the file a symbolic link at `path`
/// points to (followed link by link, so the link stays a link). Throws spex::Error for an empty
/// path, a directory, or anything but a regular file or nothing at the end.
inline std::string write_destination(const std::string& path) {
  SPEX_CHECK(!path.empty(), "cannot write a safetensors file to an empty path");
  std::string at = path;
  for (int links = 0;; ++links) {
    struct stat st;
    if (::lstat(at.c_str(), &st) != 0) {
      SPEX_CHECK(errno == ENOENT, path << ": cannot inspect '" << at << "' (" << std::strerror(errno) << ")");
      return at;  // a new file
    }
    if (S_ISREG(st.st_mode)) return at;
    SPEX_CHECK(!S_ISDIR(st.st_mode), path << ": '" << at << "' is a directory; give the path of a file to write");
    SPEX_CHECK(S_ISLNK(st.st_mode), path << ": '" << at << "' is not a regular file; give the path of a file to write");
    SPEX_CHECK(links < 40, path << ": too many levels of symbolic links");
    std::string target(std::size_t(st.st_size > 0 ? st.st_size : 255) + 1, '\0');
    const ssize_t n = ::readlink(at.c_str(), &target[0], target.size());
    SPEX_CHECK(n > 0 && std::size_t(n) < target.size(), path << ": cannot read the symbolic link '" << at << "'");
    target.resize(std::size_t(n));
    const std::size_t slash = at.rfind('/');
    at = target[0] == '/' || slash == std::string::npos ? target : at.substr(0, slash + 1) + target;
  }
}

/// The directory that holds `file` ("." for a bare name).
inline std::string parent_directory(const std::string& file) {
  const std::size_t slash = file.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : file.substr(0, slash);
}

/// The process's file mode creation mask, read without changing it (Linux's /proc), or by
/// setting and restoring it where /proc is not there.
inline mode_t current_umask() {
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    unsigned mask = 0;
    bool found = false;
    while (!found && std::fgets(line, sizeof line, f)) found = std::sscanf(line, "Umask: %o", &mask) == 1;
    std::fclose(f);
    if (found) return mode_t(mask);
  }
  const mode_t m = ::umask(022);
  ::umask(m);
  return m;
}

/// An open file beside `dest` with a name no other file has, readable by its owner only until
/// the write is complete; its name in `tmp`.
inline int create_beside(const std::string& dest, std::string& tmp) {
  static const char* digits = "0123456789abcdefghijklmnopqrstuvwxyz";
  std::uint64_t seed = std::uint64_t(::getpid()) * 0x9E3779B97F4A7C15ull ^ std::uint64_t(reinterpret_cast<std::uintptr_t>(&tmp));
  for (int attempt = 0; attempt < 100; ++attempt) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull + std::uint64_t(::time(nullptr));
    tmp = dest + ".tmp-";
    for (int i = 0; i < 8; ++i) tmp += digits[(seed >> (6 * i)) % 36];
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd >= 0 || errno != EEXIST) return fd;
  }
  errno = EEXIST;
  return -1;
}


inline void write_all(int fd, const void* p, std::size_t n, const std::string& path) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, std::min<std::size_t>(n, std::size_t(1) << 30));
    if (w < 0 && errno == EINTR) continue;
    SPEX_CHECK(w > 0, path << ": write failed (" << std::strerror(errno) << ")");
    c += w;
    n -= static_cast<std::size_t>(w);
  }
}

/// Writes `rows` rows of `row` values of `size` bytes each, `stride` values apart at `data`,
/// as contiguous rows (gathered into a buffer of about 1 MiB between writes).
inline void write_rows(int fd, const void* data, std::size_t rows, std::size_t row, std::size_t stride, std::size_t size,
                       const std::string& path) {
  const std::size_t row_bytes = row * size, per_write = std::max<std::size_t>(1, (std::size_t(1) << 20) / std::max<std::size_t>(row_bytes, 1));
  std::vector<unsigned char> buf(std::min(rows, per_write) * row_bytes);
  const auto* src = static_cast<const unsigned char*>(data);
  for (std::size_t r0 = 0; r0 < rows; r0 += per_write) {
    const std::size_t n = std::min(per_write, rows - r0);
    for (std::size_t r = 0; r < n; ++r) std::memcpy(buf.data() + r * row_bytes, src + (r0 + r) * stride * size, row_bytes);
    write_all(fd, buf.data(), n * row_bytes, path);
  }
}

/// Writes n values of T converted to `dtype`. A finite value the conversion would make an
/// infinity (beyond F16's 65504 or BF16's 3.39e38) is an error naming the tensor and the index.
/// `base`: the flat index of src[0] in its tensor (for the message).
template <class T>
void write_converted(int fd, const T* src, std::size_t n, DType dtype, const std::string& path, const std::string& name,
                     std::size_t base = 0) {
  constexpr std::size_t kChunk = std::size_t(1) << 20;
  std::vector<unsigned char> buf(std::min(n, kChunk) * dtype_size(dtype));
  std::vector<double> back(std::min(n, kChunk));
  for (std::size_t i = 0; i < n; i += kChunk) {
    const std::size_t len = std::min(kChunk, n - i);
    convert_to_bytes(src + i, len, dtype, buf.data());
    convert_from_bytes(buf.data(), dtype, back.data(), len);
    for (std::size_t j = 0; j < len; ++j)
      SPEX_CHECK(std::isfinite(back[j]) || !std::isfinite(src[i + j]),
                 path << ": tensor '" << printable(name) << "' holds " << src[i + j] << " at flat index " << base + i + j
                      << ", beyond the range of " << to_string(dtype) << "; store it as F32 or F64");
    write_all(fd, buf.data(), len * dtype_size(dtype), path);
  }
}

/// Writes `rows` rows of `row` values of T, `stride` values apart at `data`, converted to
/// `dtype` as contiguous rows (gathered into a buffer of about 1 MiB values between writes).
template <class T>
void write_rows_converted(int fd, const T* data, std::size_t rows, std::size_t row, std::size_t stride, DType dtype,
                          const std::string& path, const std::string& name) {
  const std::size_t per_write = std::max<std::size_t>(1, (std::size_t(1) << 20) / std::max<std::size_t>(row, 1));
  std::vector<T> buf(std::min(rows, per_write) * row);
  for (std::size_t r0 = 0; r0 < rows; r0 += per_write) {
    const std::size_t n = std::min(per_write, rows - r0);
    for (std::size_t r = 0; r < n; ++r) std::copy(data + (r0 + r) * stride, data + (r0 + r) * stride + row, buf.data() + r * row);
    write_converted(fd, buf.data(), n * row, dtype, path, name, r0 * row);
  }
}

}  // namespace detail

/// Writes a safetensors file: tensors ordered by element size (8-byte types first) so that,
/// with the data section starting on a 64-byte boundary, every tensor is aligned to its
/// element size and can be read in place. All-or-nothing: the file is written beside `path`
/// and renamed over it only when complete (fsync'd first, and its directory after, with
/// WriteOptions::sync). File mode rule: a file that exists keeps its mode (and its owner and
/// group where the process may set them); a new file gets 0666 minus the umask, as any file the
/// process creates; until the rename the data is readable by the owner only. A symbolic link
/// at `path` stays a link: the file it points to is replaced. `path` must not be empty or a
/// directory (checked before anything is written).
inline void write_safetensors(const std::string& path, std::vector<TensorSource> tensors,
                              const std::map<std::string, std::string>& metadata = {}, const WriteOptions& opt = {}) {
  const std::string dest = detail::write_destination(path);
  std::unordered_set<std::string> names;
  for (const auto& t : tensors) {
    SPEX_CHECK(t.name != "__metadata__", path << ": '__metadata__' cannot name a tensor");
    SPEX_CHECK(names.insert(t.name).second, path << ": tensor '" << printable(t.name) << "' given twice");
    SPEX_CHECK(t.dtype == t.data_type || (is_float_dtype(t.dtype) && (t.data_type == DType::F32 || t.data_type == DType::F64)),
               path << ": tensor '" << printable(t.name) << "': cannot store " << to_string(t.data_type) << " data as " << to_string(t.dtype));
    for (auto s : t.shape) SPEX_CHECK(s >= 0, path << ": tensor '" << printable(t.name) << "' has a negative dimension");
    if (t.row_stride != 0) {
      std::int64_t row = 1;
      for (std::size_t i = 1; i < t.shape.size(); ++i) row *= t.shape[i];
      SPEX_CHECK(!t.shape.empty() && t.row_stride >= row,
                 path << ": tensor '" << printable(t.name) << "': row_stride " << t.row_stride << " needs at least the row's "
                      << row << " values");
    }
  }
  std::stable_sort(tensors.begin(), tensors.end(),
                   [](const TensorSource& a, const TensorSource& b) { return dtype_size(a.dtype) > dtype_size(b.dtype); });
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  std::vector<std::uint64_t> counts;
  for (const auto& t : tensors) {
    std::uint64_t n = 1;
    for (auto s : t.shape) n = static_cast<std::uint64_t>(checked_mul(Index(n), Index(s), "a tensor's element count"));
    SPEX_CHECK(n == 0 || t.data, path << ": tensor '" << printable(t.name) << "' has no data");
    counts.push_back(n);
    const std::uint64_t bytes = n * dtype_size(t.dtype);
    header[t.name] = {{"dtype", to_string(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string json = header.dump();
  json.append((64 - (8 + json.size()) % 64) % 64, ' ');  // the data section starts 64-byte aligned
  const std::uint64_t n = json.size();

  struct stat existing;
  const bool exists = ::stat(dest.c_str(), &existing) == 0;
  std::string tmp;
  int fd = detail::create_beside(dest, tmp);
  SPEX_CHECK(fd >= 0, path << ": cannot create a file beside '" << dest << "' (" << std::strerror(errno) << ")");
  try {
    detail::write_all(fd, &n, 8, path);
    detail::write_all(fd, json.data(), json.size(), path);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const std::size_t rows = t.shape.empty() ? 0 : std::size_t(t.shape[0]), row = rows ? counts[i] / rows : 0;
      if (t.row_stride != 0 && counts[i] > 0 && t.dtype == t.data_type) {
        detail::write_rows(fd, t.data, rows, row, std::size_t(t.row_stride), dtype_size(t.dtype), path);
      } else if (t.row_stride != 0 && counts[i] > 0 && t.data_type == DType::F32) {
        detail::write_rows_converted(fd, static_cast<const float*>(t.data), rows, row, std::size_t(t.row_stride), t.dtype, path, t.name);
      } else if (t.row_stride != 0 && counts[i] > 0) {
        detail::write_rows_converted(fd, static_cast<const double*>(t.data), rows, row, std::size_t(t.row_stride), t.dtype, path, t.name);
      } else if (t.dtype == t.data_type) {
        detail::write_all(fd, t.data, counts[i] * dtype_size(t.dtype), path);
      } else if (t.data_type == DType::F32) {
        detail::write_converted(fd, static_cast<const float*>(t.data), counts[i], t.dtype, path, t.name);
      } else {
        detail::write_converted(fd, static_cast<const double*>(t.data), counts[i], t.dtype, path, t.name);
      }
    }
    if (exists) {
      (void)!::fchown(fd, existing.st_uid, existing.st_gid);  // where permitted; the mode below is the old file's either way
      SPEX_CHECK(::fchmod(fd, existing.st_mode & 07777) == 0, path << ": cannot set the file mode (" << std::strerror(errno) << ")");
    } else {
      SPEX_CHECK(::fchmod(fd, 0666 & ~detail::current_umask()) == 0, path << ": cannot set the file mode (" << std::strerror(errno) << ")");
    }
    SPEX_CHECK(!opt.sync || ::fsync(fd) == 0, path << ": fsync failed (" << std::strerror(errno) << ")");
    const int closing = fd;
    fd = -1;  // closed once, whatever close() returns
    SPEX_CHECK(::close(closing) == 0, path << ": close failed (" << std::strerror(errno) << ")");
    SPEX_CHECK(::rename(tmp.c_str(), dest.c_str()) == 0,
               path << ": cannot rename the finished file to '" << dest << "' (" << std::strerror(errno) << ")");
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (opt.sync) {  // the rename itself survives a crash once the directory is on disk
    const std::string dir = detail::parent_directory(dest);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    SPEX_CHECK(dfd >= 0, path << ": the file is in place, but its directory '" << dir << "' cannot be opened to sync it ("
                              << std::strerror(errno) << ")");
    const bool synced = ::fsync(dfd) == 0;
    const int err = errno;
    ::close(dfd);
    SPEX_CHECK(synced, path << ": the file is in place, but syncing its directory failed (" << std::strerror(err) << ")");
  }
}

}  // namespace spex
