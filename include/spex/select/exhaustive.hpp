#pragma once
// Exhaustive inner-product top-k over N keys: the reference and the baseline product keys are
// measured against. Done the faiss way (exhaustive_inner_product_blas): a GEMM of a block of
// queries against a block of keys into a small score tile that stays in L2, then each query's
// row of the tile streams through that query's top-k heap (kernels/topk.hpp). The B x N score
// matrix is never materialized and nothing is sorted in full. Few blocks of queries (a batch of
// up to 256 is one) split the keys over the threads and merge their top-k lists.
#include <algorithm>
#include <vector>

#include "../core/check.hpp"
#include "../core/gemm.hpp"
#include "../core/parallel.hpp"
#include "../core/types.hpp"
#include "../kernels/topk.hpp"

namespace spex {

namespace detail {
constexpr Index kExhaustiveQueryBlock = kGemmTileRows;
constexpr Index kExhaustiveKeyBlock = kGemmTileCols;
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
    // Fixed query and key blocks (one GEMM tile each), as in ProductKeys::search: every score's
    // last bits depend on the batch only.
    const Index qb = std::min<Index>(detail::kExhaustiveQueryBlock, batch);
    const Index kb = std::min<Index>(detail::kExhaustiveKeyBlock, n_keys);
    const Index q_blocks = (batch + qb - 1) / qb, k_blocks = (n_keys + kb - 1) / kb;
    // Each block of queries reads the keys in `ranges` contiguous runs of key blocks, one task
    // each, so that the threads share the keys (read and packed by the GEMM once per block of
    // queries) instead of each reading all of them. The split is free to follow the thread
    // count: every run keeps the exact top-k of its keys, and merging them keeps the exact
    // top-k of their union in the total order "larger score, then smaller id", the same
    // entries for any split.
    const Index ranges = std::clamp<Index>(threads / q_blocks, 1, k_blocks);
    if (static_cast<int>(tiles_.size()) < threads) tiles_.resize(threads);
    for (auto& t : tiles_)
      if (t.rows() < qb || t.cols() < kb) t.resize(std::max<Index>(qb, t.rows()), std::max<Index>(kb, t.cols()));
    const std::size_t ks = static_cast<std::size_t>(k);
    const std::size_t parts = ranges > 1 ? static_cast<std::size_t>(ranges * batch) : 0;  // (range, query) heaps
    if (part_vals_.size() < parts * ks) {
      part_vals_.resize(parts * ks);
      part_ids_.resize(parts * ks);
    }
    const std::size_t heaps = std::max(parts, static_cast<std::size_t>(batch));
    if (heap_sizes_.size() < heaps) heap_sizes_.resize(heaps);
    // Query q's top-k heap in run `range`: its result row when one run covers the keys, else
    // the run's own.
    struct Heap {
      T* v;
      std::int64_t* id;
      std::size_t& size;
    };
    auto heap = [&](Index range, Index q) -> Heap {
      if (ranges == 1) return {&scores(q, 0), &ids(q, 0), heap_sizes_[static_cast<std::size_t>(q)]};
      const std::size_t p = static_cast<std::size_t>(range * batch + q);
      return {&part_vals_[p * ks], &part_ids_[p * ks], heap_sizes_[p]};
    };
    parallel_for(q_blocks * ranges, [&](Index task, int thread) {
      const Index blk = task / ranges, range = task % ranges;
      const Index q0 = blk * qb, rows = std::min(qb, batch - q0);
      for (Index q = q0; q < q0 + rows; ++q) heap(range, q).size = 0;
      RowMat<T>& tile = tiles_[thread];
      for (Index kblk = range * k_blocks / ranges; kblk < (range + 1) * k_blocks / ranges; ++kblk) {
        const Index k0 = kblk * kb, cols = std::min(kb, n_keys - k0);
        gemm(tile.topLeftCorner(rows, cols), queries.middleRows(q0, rows), keys.middleRows(k0, cols).transpose(), false);
        for (Index r = 0; r < rows; ++r) {
          const Heap h = heap(range, q0 + r);
          kernels::topk_push_block<Arch>(&tile(r, 0), static_cast<std::size_t>(cols), k0, ks, h.v, h.id, h.size);
        }
      }
      if (ranges == 1)
        for (Index q = q0; q < q0 + rows; ++q) {
          const Heap h = heap(0, q);
          kernels::topk_finish(ks, h.v, h.id, h.size);
        }
    });
    if (ranges == 1) return;
    parallel_for(batch, [&](Index q, int) {
      std::size_t size = 0;
      for (Index range = 0; range < ranges; ++range) {
        const Heap h = heap(range, q);
        for (std::size_t j = 0; j < h.size; ++j) kernels::heap::offer(&scores(q, 0), &ids(q, 0), size, ks, h.v[j], h.id[j]);
      }
      kernels::topk_finish(ks, &scores(q, 0), &ids(q, 0), size);
    });
  }

 private:
  std::vector<RowMat<T>> tiles_;
  std::vector<std::size_t> heap_sizes_;   // per query, or per (run of key blocks, query)
  std::vector<T> part_vals_;              // the runs' heaps, k entries per (run, query)
  std::vector<std::int64_t> part_ids_;
};

}  // namespace spex
