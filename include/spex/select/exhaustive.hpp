#pragma once
// Exhaustive inner-product top-k over N keys: the reference and the baseline product keys are
// measured against. Done the faiss way (exhaustive_inner_product_blas): a GEMM of a block of
// queries against a block of keys into a small score tile that stays in L2, then each query's
// row of the tile streams through that query's top-k heap (kernels/topk.hpp). The B x N score
// matrix is never materialized and nothing is sorted in full. Few blocks of queries (a batch of
// up to 256 is one) split the keys over the threads and merge their top-k lists.
// On CPUs with AMX bf16 tiles or AVX512_BF16, large float searches score in bf16 first and rescore exactly the
// keys that may rank (as ProductKeys does; docs/product_keys.md): the same exact top-k.
#include <algorithm>
#include <vector>

#include "../core/check.hpp"
#include "../core/finite.hpp"
#include "../core/gemm.hpp"
#include "../core/parallel.hpp"
#include "../core/types.hpp"
#include "../kernels/bf16_tiles.hpp"
#include "../kernels/gather.hpp"
#include "../kernels/topk.hpp"
#include "bf16_tiles.hpp"

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
    const bool tiles = bf16_tiles_for(batch, n_keys, d);
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
    if (tiles) reserve_tiles(threads, qb, kb, d, k, ranges * batch);
    parallel_for(q_blocks * ranges, [&](Index task, int thread) {
      const Index blk = task / ranges, range = task % ranges;
      const Index q0 = blk * qb, rows = std::min(qb, batch - q0);
      if constexpr (std::is_same<T, float>::value)
        if (tiles) {
          search_run_bf16(keys, queries, k, q0, rows, range * k_blocks / ranges, (range + 1) * k_blocks / ranges, kb,
                          static_cast<std::size_t>(range * batch), thread, [&](Index q) { return heap(range, q); });
          return;
        }
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

  /// When searches score in bf16 tiles first and rescore exactly the keys that may rank
  /// (kernels/bf16_tiles.hpp; float only, where bf16_tiles_ready()): `automatic` (the default)
  /// for batches of kBf16TilesMinQueries queries and more over kBf16TilesMinKeys keys of
  /// kBf16TilesMinDim values and more, `always`, `never`. The ids are the same either way; the
  /// scores are then float dots (kernels::gather_dot's), not the GEMM's (the last bits).
  /// Measured, 2 threads (docs/performance.md, "Top-k"): with AMX tiles on an Intel Xeon,
  /// 1.2-2.2x faster from 16 queries and 16384 keys of 32 values on, slower for batches of 4 or 1
  /// and small tables; with VDPBF16PS (AVX512_BF16 without AMX; `automatic` takes it on AMD
  /// CPUs only: kernels::bf16_scores_by_default) on an AMD EPYC (Zen 5), 1.1-1.6x
  /// faster from 64 queries and 16384 keys of 128 values on, slower with shorter keys.
  void set_bf16_tiles(Bf16Tiles use) { bf16_tiles_ = checked(use, "ExhaustiveTopK::set_bf16_tiles"); }
  Bf16Tiles bf16_tiles() const { return bf16_tiles_; }
  static constexpr bool kBf16Vector = kernels::kBf16Scores == kernels::Bf16Scores::vector_dot;
  static constexpr Index kBf16TilesMinQueries = kBf16Vector ? 64 : 16, kBf16TilesMinKeys = Index(1) << 14,
                         kBf16TilesMinDim = kBf16Vector ? 128 : 32;

 private:
  bool bf16_tiles_for(Index batch, Index n_keys, Index d) const {
    return scores_in_bf16<T>(bf16_tiles_,
                             batch >= kBf16TilesMinQueries && n_keys >= kBf16TilesMinKeys && d >= kBf16TilesMinDim);
  }

  // Per thread: a block of queries and a block of keys in bf16, the tile scores, a row's bounds.
  struct TileScratch {
    std::vector<std::uint16_t> queries, keys;
    std::vector<float> approx, lower, query_norm, query_rounding;
    std::vector<float> cand_v;
    std::vector<std::int32_t> cand_i;
    std::vector<std::int64_t> rows;
    std::vector<float> exact;
    std::vector<std::int64_t> picks, block_ids;
    std::vector<float> heap_v;             // per query of the block: its heap of lower bounds
    std::vector<std::int64_t> heap_i;
    std::vector<std::size_t> heap_size;
  };
  // Per (run of key blocks, query): the heap of the k largest lower bounds (tile score minus
  // slack) seen so far, and the keys whose upper bound reached the heap's root when seen.
  struct Candidates {
    std::vector<float> upper;
    std::vector<std::int64_t> ids;
  };

  void reserve_tiles(int threads, Index qb, Index kb, Index d, Index k, Index runs) {
    const std::size_t hp = kernels::bf16_row_length(static_cast<std::size_t>(d));
    const std::size_t q32 = static_cast<std::size_t>((qb + 31) / 32 * 32), k32 = static_cast<std::size_t>((kb + 31) / 32 * 32);
    if (static_cast<int>(tile_scratch_.size()) < threads) tile_scratch_.resize(static_cast<std::size_t>(threads));
    for (auto& w : tile_scratch_) {
      if (w.queries.size() < q32 * hp) w.queries.resize(q32 * hp);
      if (w.keys.size() < k32 * hp) w.keys.resize(k32 * hp);
      if (w.approx.size() < q32 * k32) w.approx.resize(q32 * k32);
      if (w.lower.size() < k32) w.lower.resize(k32);
      if (w.query_norm.size() < q32) {
        w.query_norm.resize(q32);
        w.query_rounding.resize(q32);
      }
      if (w.cand_v.size() < k32 + 64) {
        w.cand_v.resize(k32 + 64);
        w.cand_i.resize(k32 + 64);
        w.block_ids.resize(k32);
      }
      const std::size_t ks = static_cast<std::size_t>(k);
      if (w.heap_v.size() < q32 * ks) {
        w.heap_v.resize(q32 * ks);
        w.heap_i.resize(q32 * ks);
      }
      if (w.heap_size.size() < q32) w.heap_size.resize(q32);
      if (w.picks.size() < ks) w.picks.resize(ks);
    }
    if (candidates_.size() < static_cast<std::size_t>(runs)) candidates_.resize(static_cast<std::size_t>(runs));
  }

  // One run of key blocks [kb0, kb1) for queries q0 .. q0 + rows: tile scores per block, each
  // query's heap of lower bounds and its candidates, then the candidates rescored exactly into
  // the run's heap `heap_of(q)` (its k best, sorted, size set).
  template <class HeapOf>
  void search_run_bf16(CMatRef<T> keys, CMatRef<T> queries, Index k, Index q0, Index rows, Index kb0, Index kb1, Index kb,
                       std::size_t run0, int thread, HeapOf&& heap_of) {
    const Index n_keys = keys.rows(), d = keys.cols();
    const std::size_t ds = static_cast<std::size_t>(d), hp = kernels::bf16_row_length(ds), ks = static_cast<std::size_t>(k);
    const std::size_t rows32 = static_cast<std::size_t>((rows + 31) / 32 * 32);
    const std::size_t q_stride = static_cast<std::size_t>(queries.outerStride()), k_stride = static_cast<std::size_t>(keys.outerStride());
    TileScratch& w = tile_scratch_[static_cast<std::size_t>(thread)];
    const T* q_data = queries.data() + static_cast<std::size_t>(q0) * q_stride;
    kernels::pack_rows_bf16(q_data, q_stride, static_cast<std::size_t>(rows), ds, w.queries.data());
    std::fill(w.queries.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(rows) * hp),
              w.queries.begin() + static_cast<std::ptrdiff_t>(rows32 * hp), std::uint16_t(0));
    std::size_t* lower_size = w.heap_size.data();
    for (Index r = 0; r < rows; ++r) {
      lower_size[r] = 0;
      const T* qr = q_data + static_cast<std::size_t>(r) * q_stride;
      const auto query = kernels::bf16_rows_bound<Arch>(qr, ds, 1, ds);
      w.query_norm[static_cast<std::size_t>(r)] = query.norm;
      w.query_rounding[static_cast<std::size_t>(r)] = query.rounding;
      Candidates& c = candidates_[run0 + static_cast<std::size_t>(q0 + r)];
      c.upper.clear();
      c.ids.clear();
    }
    for (Index kblk = kb0; kblk < kb1; ++kblk) {
      const Index k0 = kblk * kb, cols = std::min(kb, n_keys - k0);
      const std::size_t cs = static_cast<std::size_t>(cols), c32 = (cs + 31) / 32 * 32;
      const T* k_data = keys.data() + static_cast<std::size_t>(k0) * k_stride;
      const auto key_bound = kernels::bf16_rows_bound<Arch>(k_data, k_stride, cs, ds);
      const float key_norm = key_bound.norm, key_rounding = key_bound.rounding;
      const bool block_exact = !(key_norm <= kernels::kBf16MaxNorm);  // a key not finite or too large
      if (!block_exact) {
        kernels::pack_keys_bf16(k_data, k_stride, 0, cs, ds, w.keys.data());
        kernels::zero_key_panel_tail(w.keys.data(), cs, ds);
        kernels::scores_bf16_tiles(w.queries.data(), rows32, w.keys.data(), c32, ds, w.approx.data(), c32);
      }
      for (Index r = 0; r < rows; ++r) {
        const std::size_t rs = static_cast<std::size_t>(r);
        const T* qr = q_data + rs * q_stride;
        float* approx = &w.approx[rs * c32];
        float slack = 0;
        if (block_exact || !(w.query_norm[rs] <= kernels::kBf16MaxNorm)) {  // scored exactly, as the rescoring does
          for (std::size_t j = 0; j < cs; ++j) w.block_ids[j] = k0 + static_cast<std::int64_t>(j);
          kernels::gather_dot<Arch>(keys.data(), k_stride, w.block_ids.data(), cs, qr, ds, approx);
        } else {
          slack = kernels::bf16_score_error(ds, w.query_norm[rs], key_norm, w.query_rounding[rs], key_rounding);
        }
        // The row's lower bounds into the query's heap, then the keys whose upper bound reaches
        // its root (every key while it holds fewer than k).
        for (std::size_t j = 0; j < cs; ++j) w.lower[j] = approx[j] - slack;
        float* hv = &w.heap_v[rs * ks];
        std::int64_t* hi = &w.heap_i[rs * ks];
        kernels::topk_push_block<Arch>(w.lower.data(), cs, k0, ks, hv, hi, lower_size[rs]);
        const float root = lower_size[rs] < ks ? -std::numeric_limits<float>::infinity() : hv[0];
        const float floor = root - slack;
        Candidates& c = candidates_[run0 + static_cast<std::size_t>(q0 + r)];
        std::size_t m = 0, i = 0;
#if SPEX_SIMD
        i = kernels::detail::collect_vectors<Arch, float, std::size_t(-1) / 2>(approx, cs, floor, w.cand_v.data(), w.cand_i.data(), m);
#endif
        for (; i < cs; ++i)
          if (approx[i] >= floor) {
            w.cand_v[m] = approx[i];
            w.cand_i[m++] = static_cast<std::int32_t>(i);
          }
        // Candidates kept earlier whose upper bound the root has passed can no longer rank.
        if (c.ids.size() > 4 * ks + kPruneSlack) prune(c, root);
        for (std::size_t p = 0; p < m; ++p) {
          c.upper.push_back(w.cand_v[p] + slack);
          c.ids.push_back(k0 + w.cand_i[p]);
        }
      }
    }
    // Each query's candidates that may rank (upper bound >= the k-th lower bound), scored
    // exactly, and their top-k (ties to the smaller id: the candidates are in id order).
    for (Index r = 0; r < rows; ++r) {
      const std::size_t rs = static_cast<std::size_t>(r);
      const float root = lower_size[rs] < ks ? -std::numeric_limits<float>::infinity() : w.heap_v[rs * ks];
      Candidates& c = candidates_[run0 + static_cast<std::size_t>(q0 + r)];
      prune(c, root);
      const std::size_t m = c.ids.size();
      if (w.exact.size() < m) w.exact.resize(m);  // grows to the largest candidate list, then stays
      kernels::gather_dot<Arch>(keys.data(), k_stride, c.ids.data(), m, q_data + rs * q_stride, ds, w.exact.data());
      const auto h = heap_of(q0 + r);
      kernels::topk<Arch>(w.exact.data(), m, ks, h.v, w.picks.data());
      std::size_t found = 0;
      for (std::size_t j = 0; j < ks; ++j) {
        const std::int64_t p = w.picks[j];
        h.id[j] = p >= 0 ? c.ids[static_cast<std::size_t>(p)] : -1;
        found += p >= 0;
      }
      h.size = found;
    }
  }

  // A query's candidate list is pruned once it holds more than 4k plus this many entries (a
  // pass over it then drops a good share of them).
  static constexpr std::size_t kPruneSlack = 256;

  static void prune(Candidates& c, float root) {
    std::size_t kept = 0;
    for (std::size_t p = 0; p < c.ids.size(); ++p)
      if (c.upper[p] >= root) {
        c.upper[kept] = c.upper[p];
        c.ids[kept++] = c.ids[p];
      }
    c.upper.resize(kept);
    c.ids.resize(kept);
  }

  Bf16Tiles bf16_tiles_ = Bf16Tiles::automatic;
  std::vector<TileScratch> tile_scratch_;
  std::vector<Candidates> candidates_;  // per (run of key blocks, query)
  std::vector<RowMat<T>> tiles_;
  std::vector<std::size_t> heap_sizes_;   // per query, or per (run of key blocks, query)
  std::vector<T> part_vals_;              // the runs' heaps, k entries per (run, query)
  std::vector<std::int64_t> part_ids_;
};

}  // namespace spex
