#pragma once
// What every spex benchmark shares: the label (ISA and threads) and cached random data.
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include <benchmark/benchmark.h>
#include <spex/spex.hpp>

namespace spex_bench {

/// "avx512bw, 2 threads": runs are only comparable with the same ISA and thread count.
inline std::string label() {
  return std::string(spex::default_arch::name()) + ", " + std::to_string(spex::max_threads()) + " threads";
}

/// Random N(0, 1) matrix, made once per (rows, cols, seed) for the whole run.
inline const spex::RowMat<float>& random_matrix(spex::Index rows, spex::Index cols, std::uint64_t seed) {
  static std::map<std::tuple<spex::Index, spex::Index, std::uint64_t>, std::unique_ptr<spex::RowMat<float>>> cache;
  auto& slot = cache[{rows, cols, seed}];
  if (!slot) {
    slot = std::make_unique<spex::RowMat<float>>(rows, cols);
    spex::Rng rng(seed);
    spex::fill_normal(*slot, 1.0, rng);
  }
  return *slot;
}

}  // namespace spex_bench
