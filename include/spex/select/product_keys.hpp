#pragma once
// Product keys (Lample et al. 2019; PEER, He 2024): two sub-key tables C1, C2 of n rows of
// d_key/2 stand for N = n^2 virtual keys [C1[i]; C2[j]] with id i * n + j (or numbered by
// shells, ExpertIds below, so that the pool can grow without renumbering). Because
// q . [c; c'] = q1 . c + q2 . c', the exact top-k over all N keys is found from the top-k of
// each half (the k best keys can only use rows among their half's k best) and an exact top-k
// of the k x k candidate sums (kernels/product_topk.hpp). Cost per query: n * d_key MACs of
// GEMM, two top-k over n scores, and ~k ln k candidate sums, instead of N * d_key MACs.
// On CPUs with AMX bf16 tiles or AVX512_BF16 (kernels/bf16_tiles.hpp) large float batches score the sub-keys
// in bf16 first and rescore exactly the few rows that may rank (kernels/refined_topk.hpp):
// the same exact top-k, its scores float dots of the query half and the sub-key.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/check.hpp"
#include "../core/finite.hpp"
#include "../core/gemm.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../kernels/bf16_tiles.hpp"
#include "../kernels/gather.hpp"
#include "../kernels/product_topk.hpp"
#include "../kernels/refined_topk.hpp"
#include "../kernels/topk.hpp"
#include "../kernels/vector.hpp"
#include "bf16_tiles.hpp"
#include "../kernels/transpose.hpp"

namespace spex {

/// The largest n_keys: N = n^2 stays at most 2^40 experts.
constexpr Index kMaxProductKeys = Index(1) << 20;

/// How a pair of sub-key rows (i1, i2) is numbered as an expert id among N = n^2:
/// row_major: i1 * n + i2 (the papers' and PyTorch references'); every id changes with n.
/// shells: by shells of max(i1, i2): shell m holds (m, 0..m) as m^2 .. m^2 + m and (0..m-1, m)
/// as m^2 + m + 1 .. (m + 1)^2 - 1. The ids of pairs below n do not depend on n, so growing n to
/// n' keeps every expert's id and gives the new experts the ids n^2 .. n'^2 - 1.
enum class ExpertIds { row_major, shells };

inline const char* to_string(ExpertIds s) {
  switch (s) {
    case ExpertIds::row_major: return "row_major";
    case ExpertIds::shells: return "shells";
  }
  return "?";
}

/// The id of the pair (i1, i2), 0 <= i1, i2 < n.
inline Index expert_id(ExpertIds s, Index i1, Index i2, Index n) {
  if (s == ExpertIds::row_major) return i1 * n + i2;
  const Index m = std::max(i1, i2);
  return m * m + (i1 == m ? i2 : m + 1 + i1);
}

/// The pair (i1, i2) of expert `id`, 0 <= id < n^2 (the inverse of expert_id).
inline void expert_pair(ExpertIds s, Index id, Index n, Index& i1, Index& i2) {
  if (s == ExpertIds::row_major) {
    i1 = id / n;
    i2 = id % n;
    return;
  }
  Index m = static_cast<Index>(std::sqrt(static_cast<double>(id)));
  while (m * m > id) --m;
  while ((m + 1) * (m + 1) <= id) ++m;
  const Index r = id - m * m;  // 0 .. 2m
  if (r <= m) {
    i1 = m;
    i2 = r;
  } else {
    i1 = r - m - 1;
    i2 = m;
  }
}

/// Scratch for ProductKeys::search: a score block per thread, the halves' top-k lists of the
/// batch, the transposed copies. Reused across calls, it stops allocating once it has seen the
/// largest batch and k. One workspace per concurrent caller.
template <class T>
struct ProductKeysWorkspace {
  struct PerThread {
    RowMat<T> scores;                 // a block of queries' sub-key scores against one half, rows x n
    kernels::ProductTopKScratch<T> scratch;
    std::vector<std::uint16_t> queries_bf16;  // the block's query halves in bf16 (tile path)
    std::vector<float> approx;                // tile scores of 32 of them, 32 x n32
    kernels::RefinedTopKScratch refined;
  };
  std::vector<PerThread> threads;
  RowMat<T> c1t, c2t;                 // the sub-key tables transposed (d_key/2 x n), per call
  std::vector<std::uint16_t> keys_bf16[2];  // each half's sub-keys as a bf16 tile panel, per call
  std::vector<float> key_norm_max;          // per block of sub-keys and half: the largest row norm and rounding
  std::vector<T> list_v;              // each query's top-k of each half: (half, query) x k
  std::vector<std::int64_t> list_i;
};

template <class T = float, class Arch = default_arch>
class ProductKeys {
 public:
  using Workspace = ProductKeysWorkspace<T>;
  /// Queries per block of sub-key scores; search() runs one task per block and half, whose
  /// scores (128 x n) stay in L2 for n <= 4096. An engine that copies (packs) the sub-keys at
  /// every call copies them once per 128 queries (docs/performance.md, "Top-k"); the tasks are
  /// never fewer than 64-query blocks with both halves made.
  static constexpr Index kQueryBlock = 128;
  /// From this many queries on, search() copies the sub-keys transposed for its score GEMMs
  /// (copy_transposed). Measured at n = 1024, d_key = 256 (docs/performance.md, "Top-k"): a
  /// batch of 256 was no faster with the copy, PEER's 2048 head queries faster.
  static constexpr Index kTransposedKeysMinQueries = 1024;
  /// Under Bf16Tiles::automatic, float searches of at least kBf16TilesMinQueries queries over tables of at least
  /// kBf16TilesMinKeys rows of at least kBf16TilesMinHalf values score the sub-keys in bf16 (AMX
  /// tiles, or VDPBF16PS on AMD CPUs where the build targets AVX512_BF16 and not AMX:
  /// kernels::bf16_scores_by_default) and rescore exactly
  /// the rows that may rank (kernels/bf16_tiles.hpp); each call then packs the sub-keys into bf16
  /// tile panels. Measured (docs/performance.md, "Top-k"): with the tiles, on an Intel Xeon,
  /// 1.3-1.4x faster at n = 1024 and 2048 with halves of 128 and 256, slower with fewer rows or
  /// shorter halves, where the exact rescoring of ~2k rows per query half costs more than the
  /// GEMM saves; with VDPBF16PS, on an AMD EPYC (Zen 5), 1.1-1.6x faster at n = 1024 and 2048
  /// with halves of 64 to 256 from 192 queries on, slower at n = 512 or under 128 queries.
  static constexpr bool kBf16Vector = kernels::kBf16Scores == kernels::Bf16Scores::vector_dot;
  static constexpr Index kBf16TilesMinQueries = kBf16Vector ? 192 : 64, kBf16TilesMinKeys = 1024,
                         kBf16TilesMinHalf = kBf16Vector ? 64 : 128;

  /// n rows per half (N = n^2 keys) of d_key / 2 each (d_key even), initialized
  /// U(-1/sqrt(d_key/2), 1/sqrt(d_key/2)) as the PKM reference does, from `seed`; ids as `ids`.
  ProductKeys(Index n, Index d_key, std::uint64_t seed = 0, ExpertIds ids = ExpertIds::row_major) : ids_(checked(ids)) {
    SPEX_CHECK(n >= 1, "n = " << n << " must be >= 1");
    SPEX_CHECK(d_key >= 2 && d_key % 2 == 0, "d_key = " << d_key << " must be even and >= 2");
    c1_.resize(0, d_key / 2);
    c2_.resize(0, d_key / 2);
    append_rows(n, seed);
  }

  /// From given sub-key tables (n x d_key/2 each).
  ProductKeys(RowMat<T> c1, RowMat<T> c2, ExpertIds ids = ExpertIds::row_major) : ids_(checked(ids)), c1_(std::move(c1)), c2_(std::move(c2)) {
    SPEX_CHECK(c1_.rows() >= 1 && c1_.cols() >= 1, "sub-key table c1 is empty");
    check_shape(c2_, c1_.rows(), c1_.cols(), "sub-key table c2");
    check_finite(c1_, "sub-key table c1");
    check_finite(c2_, "sub-key table c2");
  }

  Index n() const { return c1_.rows(); }
  /// When searches score the sub-keys with bf16 tiles first (kernels/bf16_tiles.hpp; only
  /// where bf16_tiles_ready(), for float): `automatic` (the default) on the shapes measured
  /// faster (kBf16TilesMin*), `always` on any batch and table, `never`. Without the tiles every
  /// search runs the float GEMM path: the same top-k, its scores the GEMM's rather than float dots
  /// (the last bits). Not thread-safe against concurrent searches.
  void set_bf16_tiles(Bf16Tiles use) { bf16_tiles_ = spex::checked(use, "ProductKeys::set_bf16_tiles"); }
  Bf16Tiles bf16_tiles() const { return bf16_tiles_; }
  /// How pairs of sub-key rows are numbered (ExpertIds).
  ExpertIds ids() const { return ids_; }

  /// Grows to n_new rows per half (N = n_new^2): the existing rows stay as they are, the new
  /// ones are drawn as at construction from `seed`. Only with ExpertIds::shells, under which
  /// every existing key keeps its id and the new keys take the ids n^2 .. n_new^2 - 1.
  void grow(Index n_new, std::uint64_t seed) {
    SPEX_CHECK(ids_ == ExpertIds::shells, "grow: keys numbered " << to_string(ids_)
                                                                 << " would all change id; construct with ExpertIds::shells");
    SPEX_CHECK(n_new >= n() && n_new <= kMaxProductKeys, "grow: n_new = " << n_new << " must be in [n = " << n() << ", " << kMaxProductKeys << "]");
    append_rows(n_new - n(), seed);
  }
  /// Number of virtual keys N = n^2.
  Index size() const { return n() * n(); }
  Index d_key() const { return 2 * c1_.cols(); }
  /// Sub-key table of half 0 (C1, first d_key/2 query coordinates) or 1 (C2).
  const RowMat<T>& sub_keys(int half) const { return half == 0 ? c1_ : c2_; }
  RowMat<T>& sub_keys(int half) { return half == 0 ? c1_ : c2_; }

  /// The N x d_key explicit keys [C1[i]; C2[j]] in id order (tests and baselines only: this
  /// is the memory product keys avoid).
  RowMat<T> full_keys() const {
    const Index h = c1_.cols();
    RowMat<T> keys(size(), d_key());
    for (Index i = 0; i < n(); ++i)
      for (Index j = 0; j < n(); ++j) {
        const Index id = expert_id(ids_, i, j, n());
        keys.row(id).head(h) = c1_.row(i);
        keys.row(id).tail(h) = c2_.row(j);
      }
    return keys;
  }

  /// The k-product step measured fastest for this k: the heap walk, at every k from 8 to 64
  /// (BM_ProductStep_* in bench/bench_retrieval.cpp; docs/product_keys.md, "Choosing among the exact methods").
  static kernels::ProductTopK default_method(Index k) {
    (void)k;
    return kernels::ProductTopK::heap;
  }

  /// out (d_key/2 x n) = sub_keys(half) transposed, the copy search() makes for large batches:
  /// 16 x 16 tiles in registers (kernels::transpose_rows), blocks of rows over the threads.
  /// Only copies (the same bits as any transpose); out is resized when its shape differs.
  void copy_transposed(int half, RowMat<T>& out) const {
    const RowMat<T>& src = sub_keys(half);
    out.resize(src.cols(), src.rows());
    constexpr Index kRowsPerTask = 256;
    const auto u = [](Index i) { return static_cast<std::size_t>(i); };
    parallel_for((src.rows() + kRowsPerTask - 1) / kRowsPerTask, [&](Index task, int) {
      const Index j0 = task * kRowsPerTask, rows = std::min(kRowsPerTask, src.rows() - j0);
      kernels::transpose_rows<Arch>([&](std::size_t j) { return src.row(j0 + Index(j)).data(); }, u(rows), u(src.cols()),
                                    out.data() + j0, u(out.cols()));
    });
  }

  /// Exact top-k over the N keys for each query (row of `queries`, B x d_key): scores and ids
  /// (B x k), best first, ties to the smaller id; identical to ExhaustiveTopK over
  /// full_keys() up to the rounding of q1.c + q2.c' versus one d_key-long dot.
  /// Throws spex::Error on shapes, k outside [1, n] (the top-k of a half needs k rows), or a
  /// non-finite query. Thread safety: const; concurrent calls need distinct workspaces.
  void search(CMatRef<T> queries, Index k, MatRef<T> scores, IndexMatRef ids, Workspace& ws,
              kernels::ProductTopK method) const {
    const Index batch = queries.rows(), h = c1_.cols();
    SPEX_CHECK(queries.cols() == d_key(), "queries have " << queries.cols() << " columns, expected d_key = " << d_key());
    SPEX_CHECK(k >= 1 && k <= n(), "k = " << k << " must be in [1, n = " << n() << "] (n rows per sub-key half)");
    check_shape(scores, batch, k, "scores");
    check_shape(ids, batch, k, "ids");
    check_finite(queries, "queries");
    if (batch == 0) return;

    const Index qb = std::min<Index>(kQueryBlock, batch);
    const bool tiles = bf16_tiles_for(batch);
    reserve(ws, batch, qb, k, tiles);
    const std::size_t ks = static_cast<std::size_t>(k), ns = static_cast<std::size_t>(n());
    auto list = [&](int half, Index r) { return list_offset(half, r, batch, ks); };
    if (!tiles || !halves_topk_bf16(queries, k, ws)) {
      // Large batches read the sub-keys transposed (copied once per call, 2 n d_key/2 values):
      // Q C1ᵀ becomes a product with an untransposed operand, which libxsmm's kernels run ~1.25x
      // faster than any engine runs the transposed one (docs/api.md, "GEMM engines"). Smaller
      // batches keep the copy-free product.
      const bool transposed_copy = batch >= kTransposedKeysMinQueries;
      if (transposed_copy) {
        copy_transposed(0, ws.c1t);
        copy_transposed(1, ws.c2t);
      }
      // One task per (block of queries, half): the block's scores against that half's sub-keys
      // and each row's top-k of them, in the thread's cache. Fixed blocks (never sized by the
      // thread count): the engine and shape of each sub-key GEMM, hence every score's last bits,
      // depend on the batch only.
      parallel_for(2 * ((batch + qb - 1) / qb), [&](Index task, int thread) {
        const int half = static_cast<int>(task % 2);
        const Index q0 = (task / 2) * qb, rows = std::min(qb, batch - q0);
        auto s = ws.threads[static_cast<std::size_t>(thread)].scores.topRows(rows);
        const auto q = queries.block(q0, half * h, rows, h);
        if (transposed_copy)
          gemm(s, q, half == 0 ? ws.c1t : ws.c2t, false);
        else
          gemm(s, q, sub_keys(half).transpose(), false);
        for (Index r = 0; r < rows; ++r) {
          const std::size_t l = list(half, q0 + r);
          kernels::topk<Arch>(&s(r, 0), ns, ks, &ws.list_v[l], &ws.list_i[l]);
        }
      });
    }
    // Each row's k best of the k x k sums of its halves' lists.
    parallel_for(batch, [&](Index r, int thread) {
      const std::size_t l1 = list(0, r), l2 = list(1, r);
      kernels::product_topk(method, &ws.list_v[l1], &ws.list_i[l1], ks, &ws.list_v[l2], &ws.list_i[l2], ks, n(), ks,
                            &scores(r, 0), &ids(r, 0), ws.threads[static_cast<std::size_t>(thread)].scratch);
      if (ids_ == ExpertIds::shells)  // ids -1 (fewer finite scores than k) stay -1
        for (Index j = 0; j < k; ++j)
          if (const Index id = ids(r, j); id >= 0) ids(r, j) = expert_id(ids_, id / n(), id % n(), n());
    });
  }

  void search(CMatRef<T> queries, Index k, MatRef<T> scores, IndexMatRef ids, Workspace& ws) const {
    search(queries, k, scores, ids, ws, default_method(k));
  }

 private:
  static std::size_t round_up32(Index x) { return (static_cast<std::size_t>(x) + 31) / 32 * 32; }
  static constexpr Index kKeysPerPackTask = 256;
  // The largest sub-key half whose exact rescoring reads it without prefetches
  // (kernels::gather_dot_cached): such a half stays in the L2 of CPUs with AMX (2 MiB). AMD's
  // Zen 4 and 5 have 1 MiB of L2; the rule was not measured apart there.
  static constexpr std::size_t kCachedSubKeyBytes = std::size_t(1) << 20;
  Index key_blocks() const { return (n() + kKeysPerPackTask - 1) / kKeysPerPackTask; }

  /// Whether a search of `batch` queries scores its sub-keys with bf16 tiles.
  bool bf16_tiles_for(Index batch) const {
    return scores_in_bf16<T>(bf16_tiles_,
                             batch >= kBf16TilesMinQueries && n() >= kBf16TilesMinKeys && c1_.cols() >= kBf16TilesMinHalf);
  }

  // Each query half's top-k into ws.list_v / list_i as the GEMM path makes them, from bf16
  // tile scores rescored exactly (float dots). False, with nothing written, when a sub-key is
  // not finite or its norm exceeds kBf16MaxNorm (the caller then runs the GEMM path).
  bool halves_topk_bf16(CMatRef<T> queries, Index k, Workspace& ws) const {
    if constexpr (!std::is_same<T, float>::value) {
      (void)queries, (void)k, (void)ws;
      return false;
    } else {
      const Index batch = queries.rows(), h = c1_.cols(), n = this->n(), blocks = key_blocks();
      const std::size_t hs = static_cast<std::size_t>(h), n32 = round_up32(n), ks = static_cast<std::size_t>(k),
                        ns = static_cast<std::size_t>(n);
      // The panels of both halves, blocks of 256 sub-keys over the threads, and each block's
      // largest norm. Half-major tasks, as the scoring's below: under the static partition the
      // thread that scores a half has packed most of its panel and read its sub-keys (with 2
      // threads, all of it), instead of a panel written by one core and read by another
      // (docs/performance.md, "Top-k").
      parallel_for(2 * blocks, [&](Index task, int) {
        const int half = static_cast<int>(task / blocks);
        const Index j0 = (task % blocks) * kKeysPerPackTask, rows = std::min(kKeysPerPackTask, n - j0);
        const RowMat<T>& c = sub_keys(half);
        const auto bound = kernels::bf16_rows_bound<Arch>(c.row(j0).data(), hs, static_cast<std::size_t>(rows), hs);
        ws.key_norm_max[static_cast<std::size_t>(2 * task)] = bound.norm;
        ws.key_norm_max[static_cast<std::size_t>(2 * task + 1)] = bound.rounding;
        std::uint16_t* panel = ws.keys_bf16[half].data();
        kernels::pack_keys_bf16(c.data(), hs, static_cast<std::size_t>(j0), static_cast<std::size_t>(rows), hs, panel);
        if (j0 + rows == n) kernels::zero_key_panel_tail(panel, ns, hs);
      });
      float key_norm[2] = {0, 0}, key_rounding[2] = {0, 0};
      for (Index b = 0; b < 2 * blocks; ++b) {
        const Index half = b / blocks;
        key_norm[half] = std::max(key_norm[half], ws.key_norm_max[static_cast<std::size_t>(2 * b)]);
        key_rounding[half] = std::max(key_rounding[half], ws.key_norm_max[static_cast<std::size_t>(2 * b + 1)]);
      }
      if (!(key_norm[0] <= kernels::kBf16MaxNorm) || !(key_norm[1] <= kernels::kBf16MaxNorm)) return false;  // NaN too

      const Index qb = std::min<Index>(kQueryBlock, batch);
      // A half's sub-keys stay in L2 while its tasks rescore rows (512 KiB at n = 1024,
      // d_key = 256), where the gather's prefetches cost more than they save.
      const bool keys_cached = ns * hs * sizeof(float) <= kCachedSubKeyBytes;
      const std::size_t hp = kernels::bf16_row_length(hs), stride = static_cast<std::size_t>(queries.outerStride());
      // Half-major tasks: a thread's consecutive tasks (static partition) score one half, whose
      // sub-keys (512 KiB at n = 1024, d_key = 256) and panel then stay in its L2.
      const Index blocks_q = (batch + qb - 1) / qb;
      parallel_for(2 * blocks_q, [&](Index task, int thread) {
        const int half = static_cast<int>(task / blocks_q);
        const Index q0 = (task % blocks_q) * qb, rows = std::min(qb, batch - q0);
        auto& w = ws.threads[static_cast<std::size_t>(thread)];
        const std::size_t rows32 = round_up32(rows);
        const T* q = queries.data() + static_cast<std::size_t>(q0) * stride + static_cast<std::size_t>(half * h);
        kernels::pack_rows_bf16(q, stride, static_cast<std::size_t>(rows), hs, w.queries_bf16.data());
        std::fill(w.queries_bf16.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(rows) * hp),
                  w.queries_bf16.begin() + static_cast<std::ptrdiff_t>(rows32 * hp), std::uint16_t(0));
        const RowMat<T>& c = sub_keys(half);
        for (Index r = 0; r < rows; ++r) {
          // Tile scores 32 rows at a time: their 128 KiB (n = 1024) stay in L2 beside the half's
          // sub-keys, which the exact scores read.
          if (r % 32 == 0)
            kernels::scores_bf16_tiles(w.queries_bf16.data() + static_cast<std::size_t>(r) * hp, 32, ws.keys_bf16[half].data(),
                                       n32, hs, w.approx.data(), n32);
          const T* qr = q + static_cast<std::size_t>(r) * stride;
          // Exact scores: float dots as kernels::gather_dot sums each row.
          const auto exact = [&](const std::int64_t* rows_j, std::size_t m, float* out) {
            if (keys_cached)
              kernels::gather_dot_cached<Arch>(c.data(), hs, rows_j, m, qr, hs, out);
            else
              kernels::gather_dot<Arch>(c.data(), hs, rows_j, m, qr, hs, out);
          };
          float* approx = &w.approx[static_cast<std::size_t>(r % 32) * n32];
          const auto query = kernels::bf16_rows_bound<Arch>(qr, hs, 1, hs);
          float slack = 0;
          if (query.norm <= kernels::kBf16MaxNorm) {
            slack = kernels::bf16_score_error(hs, query.norm, key_norm[half], query.rounding, key_rounding[half]);
          } else {  // a huge query: its bf16 scores may overflow, so this row is scored exactly
            for (std::size_t j = 0; j < ns; ++j) w.refined.ids[j] = static_cast<std::int64_t>(j);
            exact(w.refined.ids.data(), ns, approx);
          }
          const std::size_t l = list_offset(half, q0 + r, batch, ks);
          kernels::topk_refined<Arch>(approx, ns, ks, slack, exact, &ws.list_v[l], &ws.list_i[l], w.refined);
        }
      });
      return true;
    }
  }

  // Where query r's top-k list of `half` starts in ws.list_v / list_i.
  static std::size_t list_offset(int half, Index r, Index batch, std::size_t k) {
    return static_cast<std::size_t>(half * batch + r) * k;
  }

  static ExpertIds checked(ExpertIds s) {
    SPEX_CHECK(s == ExpertIds::row_major || s == ExpertIds::shells, "expert ids = " << int(s) << " is not an ExpertIds");
    return s;
  }

  // Appends `rows` rows to each half, U(-1/sqrt(d_key/2), 1/sqrt(d_key/2)) from `seed`: the
  // tables once copied (conservativeResize), the old rows unchanged.
  void append_rows(Index rows, std::uint64_t seed) {
    const Index n0 = c1_.rows(), h = c1_.cols();
    const double bound = 1.0 / std::sqrt(static_cast<double>(h));
    Rng rng(seed);
    Rng r1 = rng.split(1), r2 = rng.split(2);
    c1_.conservativeResize(n0 + rows, h);
    c2_.conservativeResize(n0 + rows, h);
    auto new1 = c1_.bottomRows(rows);
    auto new2 = c2_.bottomRows(rows);
    fill_uniform(new1, -bound, bound, r1);
    fill_uniform(new2, -bound, bound, r2);
  }

  void reserve(Workspace& ws, Index batch, Index qb, Index k, bool tiles) const {
    const std::size_t threads = static_cast<std::size_t>(max_threads());
    if (ws.threads.size() < threads) ws.threads.resize(threads);
    for (auto& w : ws.threads) {
      if (w.scores.rows() < qb || w.scores.cols() != n()) w.scores.resize(qb, n());
      w.scratch.reserve(static_cast<std::size_t>(k));
      if (tiles) {
        const std::size_t rows32 = round_up32(qb), n32 = round_up32(n()), h = static_cast<std::size_t>(c1_.cols());
        if (w.queries_bf16.size() < rows32 * kernels::bf16_row_length(h)) w.queries_bf16.resize(rows32 * kernels::bf16_row_length(h));
        if (w.approx.size() < 32 * n32) w.approx.resize(32 * n32);
        w.refined.reserve(static_cast<std::size_t>(n()), static_cast<std::size_t>(k));
      }
    }
    if (tiles) {
      const std::size_t panel = kernels::bf16_key_panel_size(static_cast<std::size_t>(n()), static_cast<std::size_t>(c1_.cols()));
      for (auto& p : ws.keys_bf16)
        if (p.size() != panel) p.resize(panel);
      ws.key_norm_max.resize(static_cast<std::size_t>(4 * key_blocks()));
    }
    const std::size_t lists = static_cast<std::size_t>(2 * batch * k);
    if (ws.list_v.size() < lists) {
      ws.list_v.resize(lists);
      ws.list_i.resize(lists);
    }
  }

  ExpertIds ids_ = ExpertIds::row_major;
  Bf16Tiles bf16_tiles_ = Bf16Tiles::automatic;
  RowMat<T> c1_, c2_;
};

}  // namespace spex
