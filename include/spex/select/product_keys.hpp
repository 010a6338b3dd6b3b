#pragma once
// Product keys (Lample et al. 2019; PEER, He 2024): two sub-key tables C1, C2 of n rows of
// d_key/2 stand for N = n^2 virtual keys [C1[i]; C2[j]] with id i * n + j. Because
// q . [c; c'] = q1 . c + q2 . c', the exact top-k over all N keys is found from the top-k of
// each half (the k best keys can only use rows among their half's k best) and an exact top-k
// of the k x k candidate sums (kernels/product_topk.hpp). Cost per query: n * d_key MACs of
// GEMM, two top-k over n scores, and ~k ln k candidate sums, instead of N * d_key MACs.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/check.hpp"
#include "../core/gemm.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../kernels/product_topk.hpp"
#include "../kernels/topk.hpp"

namespace spex {

/// Scratch for ProductKeys::search, one set per thread. Reused across calls, it stops
/// allocating once it has seen the largest batch and k. One workspace per concurrent caller.
template <class T>
struct ProductKeysWorkspace {
  struct PerThread {
    RowMat<T> s1, s2;                 // sub-key scores of a block of queries, rows x n
    std::vector<T> a, b;              // top-k of each half
    std::vector<std::int64_t> ia, ib;
    kernels::ProductTopKScratch<T> scratch;
  };
  std::vector<PerThread> threads;
  RowMat<T> c1t, c2t;                 // the sub-key tables transposed (d_key/2 x n), per call
};

template <class T = float, class Arch = default_arch>
class ProductKeys {
 public:
  using Workspace = ProductKeysWorkspace<T>;
  /// Queries per GEMM block: the two score tiles (2 x 64 x n) stay in L2 for n <= 4096.
  static constexpr Index kQueryBlock = 64;
  /// From this many queries on, search() copies the sub-keys transposed for its score GEMMs.
  /// The copy costs about as much as 1000 queries save (measured at n = 1024, d_key = 256: a
  /// batch of 256 was 16% slower with it, PEER's 2048 head queries 7% faster).
  static constexpr Index kTransposedKeysMinQueries = 1024;

  /// n rows per half (N = n^2 keys) of d_key / 2 each (d_key even), initialized
  /// U(-1/sqrt(d_key/2), 1/sqrt(d_key/2)) as the PKM reference does, from `seed`.
  ProductKeys(Index n, Index d_key, std::uint64_t seed = 0) {
    SPEX_CHECK(n >= 1, "n = " << n << " must be >= 1");
    SPEX_CHECK(d_key >= 2 && d_key % 2 == 0, "d_key = " << d_key << " must be even and >= 2");
    const double bound = 1.0 / std::sqrt(static_cast<double>(d_key / 2));
    Rng rng(seed);
    c1_.resize(n, d_key / 2);
    c2_.resize(n, d_key / 2);
    Rng r1 = rng.split(1), r2 = rng.split(2);
    fill_uniform(c1_, -bound, bound, r1);
    fill_uniform(c2_, -bound, bound, r2);
  }

  /// From given sub-key tables (n x d_key/2 each).
  ProductKeys(RowMat<T> c1, RowMat<T> c2) : c1_(std::move(c1)), c2_(std::move(c2)) {
    SPEX_CHECK(c1_.rows() >= 1 && c1_.cols() >= 1, "sub-key table c1 is empty");
    check_shape(c2_, c1_.rows(), c1_.cols(), "sub-key table c2");
    check_finite(c1_, "sub-key table c1");
    check_finite(c2_, "sub-key table c2");
  }

  Index n() const { return c1_.rows(); }
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
        keys.row(i * n() + j).head(h) = c1_.row(i);
        keys.row(i * n() + j).tail(h) = c2_.row(j);
      }
    return keys;
  }

  /// The k-product step measured fastest for this k: the heap walk, at every k from 8 to 64
  /// (BM_ProductStep_* in bench/bench_retrieval.cpp; README, "Retrieval benchmark").
  static kernels::ProductTopK default_method(Index k) {
    (void)k;
    return kernels::ProductTopK::heap;
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

    const int threads = max_threads();
    // Fixed query blocks (never sized by the thread count): the engine and shape of each
    // sub-key GEMM, hence every score's last bits, depend on the batch only.
    const Index qb = std::min<Index>(kQueryBlock, batch);
    reserve(ws, threads, qb, k);
    const Index n_blocks = (batch + qb - 1) / qb;
    const std::size_t ks = static_cast<std::size_t>(k), ns = static_cast<std::size_t>(n());
    // Large batches read the sub-keys transposed (copied once per call, 2 n d_key/2 values):
    // Q C1ᵀ becomes a product with an untransposed operand, which libxsmm's kernels run ~1.25x
    // faster than any engine runs the transposed one (README, "GEMM engines"). Smaller batches
    // keep the copy-free product.
    const bool transposed_copy = batch >= kTransposedKeysMinQueries;
    if (transposed_copy) {
      ws.c1t = c1_.transpose();
      ws.c2t = c2_.transpose();
    }
    parallel_for(n_blocks, [&](Index blk, int thread) {
      auto& w = ws.threads[thread];
      const Index q0 = blk * qb, rows = std::min(qb, batch - q0);
      if (transposed_copy) {
        gemm(w.s1.topRows(rows), queries.block(q0, 0, rows, h), ws.c1t, false);
        gemm(w.s2.topRows(rows), queries.block(q0, h, rows, h), ws.c2t, false);
      } else {
        gemm(w.s1.topRows(rows), queries.block(q0, 0, rows, h), c1_.transpose(), false);
        gemm(w.s2.topRows(rows), queries.block(q0, h, rows, h), c2_.transpose(), false);
      }
      for (Index r = 0; r < rows; ++r) {
        kernels::topk<Arch>(&w.s1(r, 0), ns, ks, w.a.data(), w.ia.data());
        kernels::topk<Arch>(&w.s2(r, 0), ns, ks, w.b.data(), w.ib.data());
        kernels::product_topk(method, w.a.data(), w.ia.data(), ks, w.b.data(), w.ib.data(), ks, n(), ks,
                              &scores(q0 + r, 0), &ids(q0 + r, 0), w.scratch);
      }
    });
  }

  void search(CMatRef<T> queries, Index k, MatRef<T> scores, IndexMatRef ids, Workspace& ws) const {
    search(queries, k, scores, ids, ws, default_method(k));
  }

 private:
  void reserve(Workspace& ws, int threads, Index qb, Index k) const {
    if (static_cast<int>(ws.threads.size()) < threads) ws.threads.resize(threads);
    for (auto& w : ws.threads) {
      if (w.s1.rows() < qb || w.s1.cols() != n()) {
        w.s1.resize(qb, n());
        w.s2.resize(qb, n());
      }
      if (static_cast<Index>(w.a.size()) < k) {
        w.a.resize(k);
        w.b.resize(k);
        w.ia.resize(k);
        w.ib.resize(k);
      }
      w.scratch.reserve(static_cast<std::size_t>(k));
    }
  }

  RowMat<T> c1_, c2_;
};

}  // namespace spex
