#pragma once
// Exhaustive inner-product top-k over N keys: the reference and the baseline product keys are
// measured against. Done the faiss way (exhaustive_inner_product_blas): a GEMM of a block of
// queries against a block of keys into a small score tile that stays in L2, then each query's
// row of the tile streams through that query's top-k heap (kernels/topk.hpp). The B x N score
// matrix is never materialized and nothing is sorted in full.
#include <algorithm>
#include <vector>

#include "../core/check.hpp"
#include "../core/gemm.hpp"
#include "../core/parallel.hpp"
#include "../core/types.hpp"
#include "../kernels/topk.hpp"

namespace spex {

namespace detail {
constexpr Index kExhaustiveQueryBlock = 128;
constexpr Index kExhaustiveKeyBlock = 1024;
}  // namespace detail

/// Exhaustive top-k search. The object holds only scratch (one score tile per thread), which
/// stops allocating once it has seen the largest batch; keys are passed to each call.
/// Thread safety: search() mutates the scratch, so use one object per concurrent caller.
///
/// Usage: examples/snippets/building_blocks.cpp (compiled and run by the test suite).
template <class T = float, class Arch = default_arch>
class ExhaustiveTopK {
 public:
  /// For each query (row of `queries`, B x d), the k keys (rows of `keys`, N x d) with the
  /// largest inner product: scores and ids (B x k each), best first, ties to the smaller key
  /// id. Throws spex::Error on mismatched shapes, k outside [1, N], or a non-finite query.
  /// A key holding NaN yields NaN scores, which are never selected.
  void search(CMatRef<T> keys, CMatRef<T> queries, Index k, MatRef<T> scores, IndexMatRef ids) {
    const Index n_keys = keys.rows(), d = keys.cols(), batch = queries.rows();
    SPEX_CHECK(queries.cols() == d, "queries have " << queries.cols() << " columns, keys have d = " << d);
    SPEX_CHECK(k >= 1 && k <= n_keys, "k = " << k << " must be in [1, N = " << n_keys << "]");
    check_shape(scores, batch, k, "scores");
    check_shape(ids, batch, k, "ids");
    check_finite(queries, "queries");
    if (batch == 0) return;

    const int threads = max_threads();
    // Fixed query blocks, as in ProductKeys::search: results depend on the batch only.
    const Index qb = std::min<Index>(detail::kExhaustiveQueryBlock, batch);
    const Index kb = std::min<Index>(detail::kExhaustiveKeyBlock, n_keys);
    if (static_cast<int>(tiles_.size()) < threads) tiles_.resize(threads);
    for (auto& t : tiles_)
      if (t.rows() < qb || t.cols() < kb) t.resize(std::max<Index>(qb, t.rows()), std::max<Index>(kb, t.cols()));
    if (static_cast<Index>(heap_sizes_.size()) < batch) heap_sizes_.resize(batch);

    const Index n_blocks = (batch + qb - 1) / qb;
    parallel_for(n_blocks, [&](Index blk, int thread) {
      const Index q0 = blk * qb, rows = std::min(qb, batch - q0);
      RowMat<T>& tile = tiles_[thread];
      for (Index q = q0; q < q0 + rows; ++q) heap_sizes_[q] = 0;
      for (Index k0 = 0; k0 < n_keys; k0 += kb) {
        const Index cols = std::min(kb, n_keys - k0);
        gemm(tile.topLeftCorner(rows, cols), queries.middleRows(q0, rows),
             keys.middleRows(k0, cols).transpose(), false);
        for (Index r = 0; r < rows; ++r)
          kernels::topk_push_block<Arch>(&tile(r, 0), static_cast<std::size_t>(cols), k0,
                                         static_cast<std::size_t>(k), &scores(q0 + r, 0), &ids(q0 + r, 0),
                                         heap_sizes_[q0 + r]);
      }
      for (Index r = 0; r < rows; ++r)
        kernels::topk_finish(static_cast<std::size_t>(k), &scores(q0 + r, 0), &ids(q0 + r, 0), heap_sizes_[q0 + r]);
    });
  }

 private:
  std::vector<RowMat<T>> tiles_;
  std::vector<std::size_t> heap_sizes_;
};

}  // namespace spex
