#pragma once
// When the searches (ProductKeys, ExhaustiveTopK) score in bf16 tiles first: the choice a user
// makes per search object (kernels/bf16_tiles.hpp has the kernels and the error bound).
#include "../core/check.hpp"

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

}  // namespace spex
