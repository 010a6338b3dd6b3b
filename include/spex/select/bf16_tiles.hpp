#pragma once
// When the searches (ProductKeys, ExhaustiveTopK) score in bf16 tiles first: the choice a user
// makes per search object (kernels/bf16_tiles.hpp has the kernels and the error bound).
#include <type_traits>

#include "../core/check.hpp"
#include "../kernels/bf16_tiles.hpp"

namespace spex {

/// `automatic`: on the shapes measured faster (each search names them); `always`: on any shape
/// (where the build and CPU have AMX tiles or AVX512_BF16); `never`: the float GEMM path only.
enum class Bf16Tiles { automatic, always, never };

/// `use` if it is a Bf16Tiles, else spex::Error naming `where`.
inline Bf16Tiles checked(Bf16Tiles use, const char* where) {
  SPEX_CHECK(use == Bf16Tiles::automatic || use == Bf16Tiles::always || use == Bf16Tiles::never,
             where << ": " << int(use) << " is not a Bf16Tiles (automatic, always, never)");
  return use;
}

/// Whether a search of T values set to `use` scores in bf16: only float searches where the
/// kernels may run (kernels::bf16_tiles_ready); `always` then, `automatic` where this CPU takes
/// them by default (kernels::bf16_scores_by_default) and the search's shape is one measured
/// faster (`shape_measured_faster`, each search's own thresholds).
template <class T>
bool scores_in_bf16(Bf16Tiles use, bool shape_measured_faster) {
  if (!std::is_same<T, float>::value || use == Bf16Tiles::never || !kernels::bf16_tiles_ready()) return false;
  return use == Bf16Tiles::always || (kernels::bf16_scores_by_default() && shape_measured_faster);
}

}  // namespace spex
