#pragma once
// Shared types: a batch is a row-major matrix, one token per row, so a token's vector is
// contiguous. Public functions take CMatRef for inputs and MatRef for outputs: callers pass
// their own matrices, blocks or Eigen::Maps over their own buffers, with no copies.
#include <cstdint>

#include "../kernels/detail/intrinsics_warnings_off.hpp"  // spurious GCC 12 AVX-512 warnings
#include <Eigen/Core>
#include "../kernels/detail/intrinsics_warnings_on.hpp"

namespace spex {

/// Signed index for rows, columns and expert ids (N up to 2^31 and beyond must work).
using Index = std::int64_t;

template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only view of a row-major matrix with any row stride (a Map, a block, a whole matrix).
template <class T>
using CMatRef = Eigen::Ref<const RowMat<T>, 0, Eigen::OuterStride<>>;

/// Writable view of a row-major matrix with any row stride.
template <class T>
using MatRef = Eigen::Ref<RowMat<T>, 0, Eigen::OuterStride<>>;

/// Expert ids of a batch: one row per token.
using IndexMat = RowMat<Index>;
/// One flag per token of a batch: true for a real token, false for padding (the layers' masked
/// forward: BatchNorm's statistics over the real tokens only).
using TokenMask = Eigen::Array<bool, Eigen::Dynamic, 1>;
using CTokenMaskRef = Eigen::Ref<const TokenMask>;
using IndexMatRef = MatRef<Index>;
using CIndexMatRef = CMatRef<Index>;

template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

namespace detail {
template <class T>
struct identity {
  using type = T;
};
}  // namespace detail

/// Keeps a parameter out of template argument deduction, so that a RowMat<T> argument can bind
/// to a CMatRef<T> parameter of a function template that deduces T elsewhere.
template <class T>
using no_deduce = typename detail::identity<T>::type;

/// Pointer to row r of a row-major matrix or view (const views have no lvalue operator()).
template <class M>
auto row_ptr(M& m, Index r) -> decltype(m.data()) {
  return m.data() + r * m.outerStride();
}

}  // namespace spex
