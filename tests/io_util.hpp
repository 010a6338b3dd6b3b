#pragma once
// Helpers for the io tests: a temporary directory removed afterwards, and safetensors images
// built byte by byte.
#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <spex/layers/moe.hpp>
#include <spex/layers/peer.hpp>

namespace spex_test {

/// A parameter's values row after row, as V (its rows may lie ld apart in memory: expert
/// tables side by side).
template <class V, class P>
std::vector<V> row_major_values(const P& p) {
  std::vector<V> out;
  out.reserve(static_cast<std::size_t>(p.size()));
  for (spex::Index r = 0; r < p.rows; ++r) out.insert(out.end(), p.row(r), p.row(r) + p.cols);
  return out;
}

/// Small layer configs the io tests save, load and train.
inline spex::ProductKeyLayerConfig io_pk_config() {
  spex::ProductKeyLayerConfig cfg;
  cfg.d_in = 8;
  cfg.n_keys = 6;
  cfg.heads = 2;
  cfg.top_k = 3;
  cfg.d_key = 4;
  cfg.learn_keys = true;  // checkpoints must carry trained sub-keys too
  return cfg;
}

/// The rows of compact table `t` (row r at r * ld(): tables side by side) as contiguous bytes,
/// followed by the int8 scales: what a file holds for it.
inline std::vector<unsigned char> compact_bytes(const spex::CompactTable& t) {
  const bool bf16 = t.storage() == spex::TableStorage::bf16;
  const std::size_t size = bf16 ? 2 : 1, row = size * std::size_t(t.cols()), stride = size * std::size_t(t.ld());
  const auto* rows = static_cast<const unsigned char*>(bf16 ? static_cast<const void*>(t.bf16()) : static_cast<const void*>(t.i8()));
  std::vector<unsigned char> out;
  for (spex::Index r = 0; r < t.rows(); ++r) out.insert(out.end(), rows + std::size_t(r) * stride, rows + std::size_t(r) * stride + row);
  if (!bf16) {
    const auto* s = reinterpret_cast<const unsigned char*>(t.scales());
    out.insert(out.end(), s, s + 4 * std::size_t(t.rows()));
  }
  return out;
}

inline spex::MoEConfig io_moe_config() {
  spex::MoEConfig cfg;
  cfg.d_in = 8;
  cfg.n_experts = 4;
  cfg.hidden = 12;
  cfg.experts_per_token = 2;
  cfg.router_init_std = 0.5;
  return cfg;
}

/// A fresh directory under $TMPDIR (or /tmp), removed with its files when destroyed.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string t = std::string(base && *base ? base : "/tmp") + "/spex-test-XXXXXX";
    if (!::mkdtemp(&t[0])) throw std::runtime_error("mkdtemp failed");
    dir_ = t;
  }
  ~TempDir() {
    for (const auto& f : files()) ::unlink(path(f).c_str());
    ::rmdir(dir_.c_str());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(dir_.c_str())) {
      while (dirent* e = ::readdir(d))
        if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) out.push_back(e->d_name);
      ::closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  std::string dir_;
};

/// A safetensors image: 8-byte little-endian length of `header`, the header, the data.
inline std::string image(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(&out[0], &n, 8);
  return out + header + data;
}

}  // namespace spex_test
