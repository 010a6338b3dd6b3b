#pragma once
// The retrieval half of PEER and PKM, shared by both: query network -> query norm -> h heads of
// exact product-key top-k -> score function. Produces, per token, h * k expert ids and gates;
// backward turns gate gradients into gradients for the query network, the norm, the sub-keys
// (only the rows retrieved get non-zero gradient; the tables are small, so they are dense)
// and the input.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../core/check.hpp"
#include "../core/finite.hpp"
#include "../core/parallel.hpp"
#include "../core/parameter.hpp"
#include "../core/sparse_rows.hpp"
#include "../core/types.hpp"
#include "../kernels/activation.hpp"
#include "../kernels/vector.hpp"
#include "../metrics/flops.hpp"
#include "../nn/linear.hpp"
#include "../nn/norm.hpp"
#include "product_keys.hpp"
#include "score_fn.hpp"

namespace spex {

struct KeyRetrievalConfig {
  Index d_in = 0;
  Index n_keys = 0;                     ///< n: rows per sub-key half; N = n^2 experts
  Index heads = 8;                      ///< h
  Index top_k = 16;                     ///< k experts per head
  Index d_key = 128;                    ///< query dimension per head (even)
  ScoreFn score = ScoreFn::softmax;
  NormKind norm = NormKind::batch;
  /// LayerNorm (norm = layer) over each product half of a head's query, d_key / 2 features
  /// (lucidrains' product-key-memory), instead of over the head's d_key. Ignored otherwise.
  bool norm_per_half = false;
  bool shared_keys = true;              ///< one sub-key set for all heads (PEER) or one per head (PKM)
  /// true: the sub-keys are trained (the papers'); false: they keep their seeded random
  /// initialization, are listed without a gradient, and backward skips them. Trained sub-keys
  /// that win retrievals are pulled toward the queries that found them, grow, and win ever more
  /// queries, while the keys that lose get no gradient. Measured in compare_layers --table2
  /// (PEER, shared keys, query BatchNorm, 1000 steps): usage 34% learned vs 87% fixed at
  /// N = 256^2, 15% vs 58% at 512^2, at the same or lower loss (docs/training.md).
  bool learn_keys = false;
  bool query_bias = false;
  double norm_eps = 1e-5, norm_momentum = 0.1;
  /// How sub-key pairs are numbered as expert ids: row_major (i1 * n + i2, the references'),
  /// or shells, which keeps every id when the layer grows (ExpertIds, grow()).
  ExpertIds expert_ids = ExpertIds::row_major;
  /// Frozen (training leaves them bit-identical; Parameter::frozen_rows): the sub-key rows
  /// [0, frozen_key_rows) of every set and half (only matters with learn_keys), and with
  /// frozen_query the query network and the norm, whose BatchNorm then normalizes with its
  /// running statistics in training too and keeps them (an input seen before is mapped to the
  /// same query). Both are listed without a gradient or with those rows frozen.
  Index frozen_key_rows = 0;
  bool frozen_query = false;
};

/// Thread safety: infer() and backward() are const (distinct caches per thread); train-mode
/// forward() updates BatchNorm's running statistics.
template <class T = float, class Arch = default_arch>
class KeyRetrieval {
 public:
  using Config = KeyRetrievalConfig;

  struct Cache {
    RowMat<T> q_raw, q;             // B x h*d_key, before and after the norm
    typename Norm<T>::Cache norm;
    RowMat<T> scores, gates;        // B x h*k
    IndexMat ids;                   // B x h*k, expert id = i1 * n + i2
    ProductKeysWorkspace<T> search;
    RowMat<T> dscores, dq;          // backward scratch
    RowScatterPlan key_plan;        // sub-key gradient rows -> their occurrences
  };

  struct Grads {
    typename Linear<T>::Grads query;
    typename Norm<T>::Grads norm;
    std::vector<RowMat<T>> keys;    // [set * 2 + half], n x d_key/2 each
    Index frozen_key_rows = 0;      // the frozen set they were made for
    bool frozen_query = false;
    void zero() {
      query.zero();
      norm.zero();
      for (auto& k : keys) k.setZero();
    }
    /// f(data, size) for each array, in a fixed order (sums over ranks).
    template <class F>
    void for_each_array(F&& f) {
      query.for_each_array(f);
      norm.for_each_array(f);
      for (auto& k : keys) f(k.data(), Index(k.size()));
    }
  };

  /// Throws unless `g` was made for this retrieval's shapes (`what` names it).
  void check_grads(const Grads& g, const char* what) const {
    query_.check_grads(g.query, what);
    norm_.check_grads(g.norm, what);
    const Index key_grads = cfg_.learn_keys ? 2 * key_sets() : 0;
    SPEX_CHECK(Index(g.keys.size()) == key_grads,
               what << " holds " << g.keys.size() << " sub-key gradients, the layer has " << key_grads
                    << ": grads were made by another layer");
    for (const auto& k : g.keys)
      SPEX_CHECK(k.rows() == cfg_.n_keys && k.cols() == cfg_.d_key / 2,
                 what << " holds a " << k.rows() << " x " << k.cols() << " sub-key gradient, the layer's sub-keys are "
                      << cfg_.n_keys << " x " << cfg_.d_key / 2 << ": grads were made by another layer");
    SPEX_CHECK(g.frozen_key_rows == cfg_.frozen_key_rows && g.frozen_query == cfg_.frozen_query,
               what << " were made for " << g.frozen_key_rows << " frozen sub-key rows and " << (g.frozen_query ? "a frozen" : "a trainable")
                    << " query network, the layer has " << cfg_.frozen_key_rows << " and "
                    << (cfg_.frozen_query ? "a frozen" : "a trainable") << " one: make_grads() again after freezing");
  }

  KeyRetrieval() = default;
  KeyRetrieval(const Config& cfg, Rng& rng) : cfg_(validate(cfg)) {
    query_ = Linear<T>(cfg.d_in, cfg.heads * cfg.d_key, cfg.query_bias, rng);
    norm_ = Norm<T>(cfg.norm, cfg.heads * cfg.d_key, cfg.norm_per_half ? cfg.d_key / 2 : cfg.d_key, T(cfg.norm_eps),
                    T(cfg.norm_momentum));
    const Index sets = cfg.shared_keys ? 1 : cfg.heads;
    for (Index s = 0; s < sets; ++s) keys_.emplace_back(cfg.n_keys, cfg.d_key, rng.next_u64(), cfg.expert_ids);
  }

  /// Grows every sub-key set to n_new rows per half (N = n_new^2 experts), keeping the existing
  /// rows; the new rows are drawn as at construction from `seed` (set s from a seed split off it).
  /// Needs ExpertIds::shells (every expert keeps its id). Gradients made before must be made
  /// again (make_grads). Not thread-safe.
  void grow(Index n_new, std::uint64_t seed) {
    SPEX_CHECK(cfg_.expert_ids == ExpertIds::shells,
               "grow: experts numbered " << to_string(cfg_.expert_ids) << " would all change id; use ExpertIds::shells");
    SPEX_CHECK(n_new >= cfg_.n_keys && n_new <= kMaxProductKeys,
               "grow: n_new = " << n_new << " must be in [n_keys = " << cfg_.n_keys << ", " << kMaxProductKeys << "]");
    Rng rng(seed);
    for (auto& k : keys_) k.grow(n_new, rng.next_u64());
    cfg_.n_keys = n_new;
  }

  /// Freezes the sub-key rows [0, key_rows) and, with `query`, the query network and norm
  /// (KeyRetrievalConfig::frozen_key_rows, frozen_query); unfreezes what the call leaves out.
  /// Gradients made before must be made again. Not thread-safe.
  void freeze(Index key_rows, bool query) {
    check_frozen_key_rows(key_rows, cfg_.n_keys);
    cfg_.frozen_key_rows = key_rows;
    cfg_.frozen_query = query;
  }

  /// Throws spex::Error naming the first field that is out of range.
  static const Config& validate(const Config& cfg) {
    SPEX_CHECK(cfg.d_in >= 1, "d_in = " << cfg.d_in << " must be >= 1");
    SPEX_CHECK(cfg.n_keys >= 1, "n_keys = " << cfg.n_keys << " must be >= 1");
    SPEX_CHECK(cfg.n_keys <= kMaxProductKeys, "n_keys = " << cfg.n_keys << " exceeds " << kMaxProductKeys << " (N = n^2 up to 2^40 experts)");
    SPEX_CHECK(cfg.heads >= 1, "heads = " << cfg.heads << " must be >= 1");
    SPEX_CHECK(cfg.d_key >= 2 && cfg.d_key % 2 == 0, "d_key = " << cfg.d_key << " must be even and >= 2");
    SPEX_CHECK(cfg.top_k >= 1 && cfg.top_k <= cfg.n_keys,
               "top_k = " << cfg.top_k << " must be in [1, n_keys = " << cfg.n_keys << "]");
    checked_mul(cfg.heads, cfg.top_k, "heads * top_k");
    checked_mul(cfg.d_in, checked_mul(cfg.heads, cfg.d_key, "heads * d_key"), "the query weight's size d_in * heads * d_key");
    SPEX_CHECK(cfg.score == ScoreFn::softmax || cfg.score == ScoreFn::sigmoid || cfg.score == ScoreFn::relu,
               "score = " << int(cfg.score) << " is not a ScoreFn");
    SPEX_CHECK(cfg.norm == NormKind::none || cfg.norm == NormKind::batch || cfg.norm == NormKind::layer,
               "norm = " << int(cfg.norm) << " is not a NormKind");
    SPEX_CHECK(cfg.expert_ids == ExpertIds::row_major || cfg.expert_ids == ExpertIds::shells,
               "expert_ids = " << int(cfg.expert_ids) << " is not an ExpertIds");
    check_positive(cfg.norm_eps, "norm_eps");
    check_range(cfg.norm_momentum, 0.0, 1.0, "norm_momentum");
    check_frozen_key_rows(cfg.frozen_key_rows, cfg.n_keys);
    return cfg;
  }

  const Config& config() const { return cfg_; }
  Index n_experts() const { return cfg_.n_keys * cfg_.n_keys; }
  /// Experts a token retrieves: h * k.
  Index per_token() const { return cfg_.heads * cfg_.top_k; }
  /// Forward FLOPs per token of the retrieval (metrics/flops.hpp): query network and norm,
  /// sub-key scores, candidate sums and score function.
  FlopCount flops_per_token() const { return flops_per_token(cfg_); }
  static FlopCount flops_per_token(const Config& c) {
    FlopCount f;
    f.query = flops::product_key_query(c.d_in, c.heads, c.d_key, c.query_bias, c.norm != NormKind::none);
    f.keys = flops::product_key_scores(c.heads, c.n_keys, c.d_key);
    f.select = flops::product_key_select(c.heads, c.top_k);
    return f;
  }
  Linear<T>& query() { return query_; }
  const Linear<T>& query() const { return query_; }
  Norm<T>& norm() { return norm_; }
  const Norm<T>& norm() const { return norm_; }
  /// Sub-key set of a head (all heads share set 0 when shared_keys).
  ProductKeys<T, Arch>& keys(Index head) { return keys_[key_set(head)]; }
  const ProductKeys<T, Arch>& keys(Index head) const { return keys_[key_set(head)]; }
  Index key_sets() const { return static_cast<Index>(keys_.size()); }

  Grads make_grads() const {
    Grads g{query_.make_grads(), norm_.make_grads(), {}, cfg_.frozen_key_rows, cfg_.frozen_query};
    if (cfg_.learn_keys)
      for (const auto& k : keys_) {
        g.keys.push_back(RowMat<T>::Zero(k.n(), k.d_key() / 2));
        g.keys.push_back(RowMat<T>::Zero(k.n(), k.d_key() / 2));
      }
    return g;
  }

  /// Training forward: batch statistics in the norm. The running statistics are not touched:
  /// call commit_running_stats(c) once the whole pass has succeeded (all-or-nothing).
  void forward(CMatRef<T> x, Cache& c) const {
    project(x, c);
    forward_projected(c);
  }
  /// The halves of forward(), for a caller that acts between them (dist/: the ranks agree that
  /// every one's projection succeeded before the norm sums over their batches): the query
  /// projection of x into c.q_raw (throws on a non-finite projection), then the norm and the
  /// retrieval.
  void project(CMatRef<T> x, Cache& c) const {
    SPEX_CHECK(x.cols() == cfg_.d_in, "x has " << x.cols() << " columns, expected d_in = " << cfg_.d_in);
    c.q_raw.resize(x.rows(), cfg_.heads * cfg_.d_key);
    c.q.resize(x.rows(), cfg_.heads * cfg_.d_key);
    query_.forward(x, c.q_raw);
    check_rows_finite(c.q_raw, "the query projection of token ",
                      " is not finite: x or query.weight holds NaN/Inf, or their product overflows");
  }
  /// `training` false: the norm in eval mode, as infer().
  void forward_projected(Cache& c, bool training = true) const {
    if (!training || cfg_.frozen_query)  // a frozen BatchNorm normalizes as at inference and keeps its statistics
      norm_.forward_eval(c.q_raw, c.q, c.norm);
    else
      norm_.forward_batch_stats(c.q_raw, c.q, c.norm);
    retrieve(c);
  }

  /// Folds the batch statistics of the training forward held in `c` into BatchNorm's running
  /// ones (throws, changing nothing, if they would not be finite).
  void commit_running_stats(const Cache& c) { norm_.commit_running_stats(c.norm); }

  /// Eval forward: running statistics, nothing in the layer changes.
  void infer(CMatRef<T> x, Cache& c) const {
    project(x, c);
    forward_projected(c, false);
  }

  /// From dgates (B x h*k): grads accumulate; *dx += the input gradient when dx is given
  /// (a component: the layer assigns its dx, then each path adds its share).
  void backward(CMatRef<T> x, CMatRef<T> dgates, Cache& c, Grads& g, MatRef<T>* dx) const {
    const Index b = x.rows(), hk = per_token(), k = cfg_.top_k;
    check_shape(dgates, b, hk, "dgates");
    check_grads(g, "grads");
    c.dscores.resize(b, hk);
    parallel_for(b, [&](Index t, int) {
      for (Index h = 0; h < cfg_.heads; ++h) {
        const T* gt = &c.gates(t, h * k);
        const T* dg = row_ptr(dgates, t) + h * k;
        T* ds = &c.dscores(t, h * k);
        switch (cfg_.score) {
          case ScoreFn::softmax: kernels::softmax_backward<Arch>(gt, dg, ds, static_cast<std::size_t>(k)); break;
          case ScoreFn::sigmoid:
            for (Index j = 0; j < k; ++j) ds[j] = dg[j] * gt[j] * (T(1) - gt[j]);
            break;
          case ScoreFn::relu:
            for (Index j = 0; j < k; ++j) ds[j] = c.scores(t, h * k + j) > T(0) ? dg[j] : T(0);
            break;
        }
      }
    });
    sub_key_backward(c, g);
    if (cfg_.frozen_query) {  // dx only: no gradient for the query network and norm
      if (!dx) return;
      norm_.backward_input(c.dq, c.dq, c.norm);
      query_.backward_input_accumulate(c.dq, *dx);
      return;
    }
    norm_.backward(c.dq, c.dq, c.norm, g.norm);
    query_.backward_accumulate(x, c.dq, dx, g.query);
  }

  /// Named parameters ("query.weight", "norm.weight", "keys.c1" or "keys.h3.c1", ...) with
  /// their gradients in `g` (or none when g is null). Frozen ones: the query network and norm
  /// without a gradient, the sub-keys with their frozen rows (Parameter::frozen_rows).
  ParameterList<T> parameters(Grads* g) {
    if (g) check_grads(*g, "grads");
    ParameterList<T> list;
    Grads* gq = cfg_.frozen_query ? nullptr : g;
    append_parameters(list, gq ? query_.parameters(gq->query, "query.") : query_.parameters("query."));
    append_parameters(list, gq ? norm_.parameters(gq->norm, "norm.") : norm_.parameters("norm."));
    for (Index s = 0; s < key_sets(); ++s) {
      const std::string base = cfg_.shared_keys ? "keys." : "keys.h" + std::to_string(s) + ".";
      for (int half = 0; half < 2; ++half)
        list.push_back(dense_parameter<T>(base + (half == 0 ? "c1" : "c2"), keys_[s].sub_keys(half),
                                          g && cfg_.learn_keys ? &g->keys[2 * s + half] : nullptr,
                                          g && cfg_.learn_keys ? cfg_.frozen_key_rows : 0));
    }
    return list;
  }
  /// Read-only views of the same parameters.
  ParameterList<const T> parameters() const { return read_only(const_cast<KeyRetrieval*>(this)->parameters(nullptr)); }

 private:
  Index key_set(Index head) const { return cfg_.shared_keys ? 0 : head; }

  static void check_frozen_key_rows(Index rows, Index n_keys) {
    SPEX_CHECK(rows >= 0 && rows <= n_keys, "frozen sub-key rows = " << rows << " must be in [0, n_keys = " << n_keys << "]");
  }

  /// Names the token (row) of the first non-finite value; one cheap pass when all is finite.
  static void check_rows_finite(const RowMat<T>& m, const char* before, const char* after) {
    const Index row = find_non_finite(m).first;
    SPEX_CHECK(row < 0, before << row << after);
  }

  void retrieve(Cache& c) const {
    const Index b = c.q.rows(), k = cfg_.top_k, dk = cfg_.d_key;
    check_rows_finite(c.q, "the normalized query of token ",
                      " is not finite: the norm's weight, bias or running statistics hold NaN/Inf");
    c.scores.resize(b, per_token());
    c.gates.resize(b, per_token());
    c.ids.resize(b, per_token());
    if (cfg_.shared_keys) {
      // One search over all B * h head queries: row t of the B x h*d_key queries is h rows of
      // d_key back to back, and likewise for the B x h*k results, so plain Maps reshape them.
      const Index rows = b * cfg_.heads;
      Eigen::Map<const RowMat<T>> q(c.q.data(), rows, dk);
      Eigen::Map<RowMat<T>> s(c.scores.data(), rows, k);
      Eigen::Map<IndexMat> ids(c.ids.data(), rows, k);
      keys_[0].search(q, k, s, ids, c.search);
    } else {
      for (Index h = 0; h < cfg_.heads; ++h) {
        MatRef<T> s = c.scores.middleCols(h * k, k);
        IndexMatRef ids = c.ids.middleCols(h * k, k);
        keys(h).search(c.q.middleCols(h * dk, dk), k, s, ids, c.search);
      }
    }
    // A sub-key row holding NaN/Inf scores NaN and is never selected; a head that finds fewer
    // than k finite scores pads with id -1, which no expert table may be indexed with.
    for (Index t = 0; t < b; ++t)
      for (Index j = 0; j < per_token(); ++j)
        SPEX_CHECK(c.ids(t, j) >= 0, "token " << t << ", head " << j / k << ": fewer than top_k = " << k
                                              << " finite retrieval scores (the sub-keys hold NaN/Inf)");
    parallel_for(b, [&](Index t, int) {
      const T* s = &c.scores(t, 0);
      T* g = &c.gates(t, 0);
      switch (cfg_.score) {
        case ScoreFn::softmax:
          for (Index h = 0; h < cfg_.heads; ++h) kernels::softmax<Arch>(s + h * k, g + h * k, static_cast<std::size_t>(k));
          break;
        case ScoreFn::sigmoid:
          kernels::activate<Arch>(kernels::Activation::sigmoid, s, g, static_cast<std::size_t>(per_token()));
          break;
        case ScoreFn::relu:
          kernels::activate<Arch>(kernels::Activation::relu, s, g, static_cast<std::size_t>(per_token()));
          break;
      }
    });
  }

  /// score = q1 . C1[i1] + q2 . C2[i2]: dq gets ds * C rows (per token, parallel); the sub-key
  /// gradients get ds * q halves (frozen rows none). Rows collide across tokens, so the
  /// occurrences are grouped by sub-key row (a counting sort) and each row is summed by one
  /// thread in token order: the result does not depend on the number of threads.
  void sub_key_backward(Cache& c, Grads& g) const {
    const Index b = c.q.rows(), k = cfg_.top_k, dk = cfg_.d_key, half = dk / 2, n = cfg_.n_keys, heads = cfg_.heads;
    const std::size_t hs = static_cast<std::size_t>(half);
    c.dq.setZero(b, heads * dk);
    parallel_for(b, [&](Index t, int) {
      for (Index h = 0; h < heads; ++h) {
        const Index set = key_set(h);
        T* dq1 = &c.dq(t, h * dk);
        for (Index j = 0; j < k; ++j) {
          const T ds = c.dscores(t, h * k + j);
          if (ds == T(0)) continue;
          Index i1, i2;
          expert_pair(cfg_.expert_ids, c.ids(t, h * k + j), n, i1, i2);
          kernels::axpy<Arch>(ds, keys_[set].sub_keys(0).row(i1).data(), dq1, hs);
          kernels::axpy<Arch>(ds, keys_[set].sub_keys(1).row(i2).data(), dq1 + half, hs);
        }
      }
    });
    if (!cfg_.learn_keys) return;
    // Gradient rows r = (set * 2 + half) * n + i; occurrence 2 * o + half for each score
    // o = (t * heads + h) * k + j with a non-zero gradient.
    const Index n_rows = 2 * key_sets() * n, occ = b * heads * k;
    auto& plan = c.key_plan;
    plan.slot.resize(static_cast<std::size_t>(2 * occ));
    for (Index o = 0; o < occ; ++o) {
      const Index h = (o / k) % heads;
      const bool used = c.dscores.data()[o] != T(0);
      Index i1 = 0, i2 = 0;
      if (used) expert_pair(cfg_.expert_ids, c.ids.data()[o], n, i1, i2);
      const Index frozen = cfg_.frozen_key_rows;
      plan.slot[2 * o] = used && i1 >= frozen ? (key_set(h) * 2) * n + i1 : -1;
      plan.slot[2 * o + 1] = used && i2 >= frozen ? (key_set(h) * 2 + 1) * n + i2 : -1;
    }
    plan.group(n_rows);
    constexpr Index kRowsPerTask = 64;
    parallel_for((n_rows + kRowsPerTask - 1) / kRowsPerTask, [&](Index task, int) {
      for (Index r = task * kRowsPerTask; r < std::min(n_rows, (task + 1) * kRowsPerTask); ++r) {
        if (plan.offsets[r] == plan.offsets[r + 1]) continue;
        T* dst = g.keys[r / n].row(r % n).data();
        for (Index p = plan.offsets[r]; p < plan.offsets[r + 1]; ++p) {
          const Index o = plan.order[p] / 2, hf = plan.order[p] % 2, t = o / (heads * k), h = (o / k) % heads;
          kernels::axpy<Arch>(c.dscores.data()[o], &c.q(t, h * dk + hf * half), dst, hs);
        }
      }
    });
  }

  Config cfg_;
  Linear<T> query_;
  Norm<T> norm_;
  std::vector<ProductKeys<T, Arch>> keys_;
};

}  // namespace spex
