#pragma once
// The TopK router (docs/topk_moe.md): logits = x W^T, exactly k experts per token.
// Scores: softmax over all E (Switch, Mixtral) or an independent sigmoid per expert
// (DeepSeek-V3). Selection: the top k of the selection keys (the scores, or with a softmax
// over the k the logits; plus the expert bias when enabled), optionally limited to the
// token's best group_topk of n_groups expert groups (a group scores the sum of its best
// group_score_experts keys). Gates: the selected scores (softmax: P; sigmoid: s), optionally
// renormalized to sum 1 over the k (sigmoid: s / (sum + 1e-20)), or softmax over the k
// selected logits; then times route_scale.
// Balancing losses on P (softmax probabilities, or the sigmoid scores normalized over E):
// Switch aux = coeff * E / (k T^2) * sum_e (sum_t P_te) c_e, with c_e the selection counts
// (held constant); the sequence-wise aux, the same per sequence of seq_len consecutive tokens
// and averaged over the sequences; z-loss z_coeff * mean_t logsumexp(logits_t)^2.
// Capacity: at most ceil(cf * k * T / E) tokens per expert, kept in token order, the rest
// dropped (gate 0; counted in Cache::dropped).
// The expert bias changes which experts are selected, never a gate value or a gradient; it is
// a buffer moved by update_expert_bias (auxiliary-loss-free balancing), not by an optimizer.
#include <cmath>
#include <limits>
#include <vector>

#include "../core/batch_reduction.hpp"
#include "../core/check.hpp"
#include "../core/finite.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../kernels/activation.hpp"
#include "../kernels/topk.hpp"
#include "../nn/linear.hpp"
#include "router_config.hpp"

namespace spex {

/// Thread safety: const methods; one cache per concurrent caller. update_expert_bias and
/// the non-const accessors need exclusive access.
template <class T = float, class Arch = default_arch>
class TopKRouter {
 public:
  static constexpr bool kRelu = false;
  static constexpr const char* kName = "topk";
  /// The renormalization of sigmoid gates and the normalization of sigmoid scores for the
  /// balancing losses divide by (sum + kSumEpsilon), as Megatron-Core and DeepSeek-V3 do.
  static constexpr double kSumEpsilon = 1e-20;
  struct Cache {
    RowMat<T> logits, probs, gates;  // B x E; probs: the balancing losses' P; gates zero off the selection
    RowMat<T> scores;                // B x E: sigmoid scores (sigmoid only)
    Vec<T> prob_norm;                // sigmoid: sum_e s_te + kSumEpsilon per token
    RowMat<T> keys;                  // B x E: selection keys, when the bias or groups change them
    RowMat<T> group_scores;          // B x n_groups
    IndexMat selected_groups;        // B x group_topk
    RowMat<T> selected_group_scores;
    RowMat<T> group_best;            // B x group_score_experts (scratch)
    IndexMat group_best_ids;
    IndexMat selected;               // B x k expert ids (before capacity)
    RowMat<T> selected_keys;         // B x k: their keys
    RowMat<T> selected_gates;        // B x k: the gates before route_scale and capacity drops
    RowMat<unsigned char> kept;      // B x k: 0 where capacity dropped the pair
    Vec<double> counts;              // c_e of the selection
    Vec<double> p_sum;               // sum over the tokens of P, per expert
    RowMat<double> seq_counts, seq_p;  // per sequence (seq_aux_coeff > 0): c_e and sum of P
    double seq_sum = 0;              // sum over the sequences of their unscaled balancing loss
    Index sequences = 0;
    double lse_sq = 0;               // sum over the tokens of logsumexp^2
    Index batch_tokens = 0;          // T of the losses: the batch's, or the whole batch's (use_whole_batch)
    Vec<T> lse;                      // logsumexp per token (z-loss)
    Index dropped = 0;               // (token, expert) pairs dropped by capacity
    double aux = 0, seq_aux = 0, z = 0;  // loss values (scaled by their coefficients)
    RowMat<T> dlogits, dprobs;       // backward scratch
  };
  using Grads = typename Linear<T>::Grads;

  TopKRouter() = default;
  TopKRouter(const RouterConfig& cfg, Rng& rng) : linear_(validate(cfg).d_in, cfg.n_experts, false, rng), cfg_(cfg) {
    Rng r = rng.split(32);
    fill_normal(linear_.weight(), cfg.init_std, r);
    if (cfg.expert_bias) bias_ = Vec<T>::Zero(cfg.n_experts);
  }

  Index n_experts() const { return linear_.out_features(); }
  Index k() const { return cfg_.experts_per_token; }
  const RouterConfig& config() const { return cfg_; }
  RowMat<T>& weight() { return linear_.weight(); }
  const RowMat<T>& weight() const { return linear_.weight(); }
  /// The selection bias (E entries; empty unless config().expert_bias).
  Vec<T>& expert_bias() { return bias_; }
  const Vec<T>& expert_bias() const { return bias_; }
  Grads make_grads() const { return linear_.make_grads(); }
  void check_grads(const Grads& g, const char* what) const { linear_.check_grads(g, what); }

  /// Auxiliary-loss-free balancing (DeepSeek-V3; Megatron-Core's expert bias update): each
  /// expert's bias moves by `rate` toward balance, b_e += rate * sign(mean(load) - load_e),
  /// from `load`, the tokens routed to each expert over a training step (Cache::counts, summed
  /// over the step's micro-batches). Throws, changing nothing, unless the bias is enabled, load
  /// has E finite entries >= 0 and rate is finite and >= 0.
  void update_expert_bias(const Vec<double>& load, double rate) {
    SPEX_CHECK(cfg_.expert_bias, "update_expert_bias: the router has no expert bias (config expert_bias = false)");
    SPEX_CHECK(load.size() == n_experts(), "update_expert_bias: load has " << load.size() << " entries, expected E = " << n_experts());
    SPEX_CHECK(std::isfinite(rate) && rate >= 0, "update_expert_bias: rate = " << rate << " must be finite and >= 0");
    for (Index e = 0; e < load.size(); ++e)
      SPEX_CHECK(std::isfinite(load(e)) && load(e) >= 0, "update_expert_bias: load of expert " << e << " = " << load(e) << " must be finite and >= 0");
    Vec<T> next = bias_;
    const double mean = load.mean();
    for (Index e = 0; e < load.size(); ++e) next(e) += T(rate * double((mean > load(e)) - (mean < load(e))));
    const auto bad = find_non_finite(next);
    SPEX_CHECK(bad.first < 0, "update_expert_bias: the bias of expert " << bad.first << " would be " << next(bad.first));
    bias_ = next;  // in place: parameter lists point at the bias
  }

  void forward(CMatRef<T> x, Cache& c) const {
    const Index b = x.rows(), e = n_experts(), k = cfg_.experts_per_token;
    const bool sigmoid = cfg_.score == ScoreFn::sigmoid, grouped = cfg_.n_groups > 1;
    const bool own_keys = grouped || bias_.size() > 0;
    const Index per_group = e / cfg_.n_groups, group_k = cfg_.groups_per_token(), group_m = cfg_.group_scoring();
    if (cfg_.seq_aux_coeff > 0)
      SPEX_CHECK(b % cfg_.seq_len == 0, "the batch's " << b << " tokens are not whole sequences of seq_len = " << cfg_.seq_len
                                                         << " (seq_aux_coeff > 0 needs them)");
    c.logits.resize(b, e);
    linear_.forward(x, c.logits);
    check_router_logits(c.logits);
    c.probs.resize(b, e);
    c.lse.resize(b);
    c.gates.setZero(b, e);
    if (sigmoid) {
      c.scores.resize(b, e);
      c.prob_norm.resize(b);
    }
    if (own_keys) c.keys.resize(b, e);
    if (grouped) {
      c.group_scores.resize(b, cfg_.n_groups);
      c.selected_groups.resize(b, group_k);
      c.selected_group_scores.resize(b, group_k);
      c.group_best.resize(b, group_m);
      c.group_best_ids.resize(b, group_m);
    }
    c.selected.resize(b, k);
    c.selected_keys.resize(b, k);
    c.selected_gates.resize(b, k);
    c.kept.setOnes(b, k);
    const std::size_t es = static_cast<std::size_t>(e), ks = static_cast<std::size_t>(k);
    const T scale = T(cfg_.route_scale);
    parallel_for(b, [&](Index t, int) {
      const T* l = &c.logits(t, 0);
      T* p = &c.probs(t, 0);
      const T* key = nullptr;
      if (sigmoid) {
        T* s = &c.scores(t, 0);
        kernels::activate<Arch>(kernels::Activation::sigmoid, l, s, es);
        T z = 0;
        for (Index j = 0; j < e; ++j) z += s[j];
        z += T(kSumEpsilon);
        c.prob_norm(t) = z;
        for (Index j = 0; j < e; ++j) p[j] = s[j] / z;
        c.lse(t) = cfg_.z_coeff > 0 ? logsumexp(l, e) : T(0);
        key = s;
      } else {
        kernels::softmax<Arch>(l, p, es);
        Index top = 0;
        for (Index j = 1; j < e; ++j)
          if (l[j] > l[top]) top = j;
        c.lse(t) = l[top] - std::log(p[top]);  // P_top = exp(l_top - lse) >= 1/E
        key = cfg_.pre_softmax ? p : l;
      }
      if (own_keys) {
        T* kt = &c.keys(t, 0);
        for (Index j = 0; j < e; ++j) kt[j] = key[j] + (bias_.size() > 0 ? bias_(j) : T(0));
        if (grouped) mask_groups(kt, t, per_group, group_k, group_m, c);
        key = kt;
      }
      kernels::topk<Arch>(key, es, ks, &c.selected_keys(t, 0), &c.selected(t, 0));
      T* u = &c.selected_gates(t, 0);
      if (!sigmoid && !cfg_.pre_softmax) {  // softmax over the k selected logits
        T mx = l[c.selected(t, 0)];
        for (Index j = 1; j < k; ++j) mx = std::max(mx, l[c.selected(t, j)]);
        T norm = 0;
        for (Index j = 0; j < k; ++j) norm += (u[j] = std::exp(l[c.selected(t, j)] - mx));
        for (Index j = 0; j < k; ++j) u[j] /= norm;
      } else {
        const T* score = sigmoid ? &c.scores(t, 0) : p;
        T norm = 0;
        for (Index j = 0; j < k; ++j) norm += (u[j] = score[c.selected(t, j)]);
        if (cfg_.renormalize) {
          if (sigmoid) norm += T(kSumEpsilon);
          for (Index j = 0; j < k; ++j) u[j] /= norm;
        }
      }
      for (Index j = 0; j < k; ++j) c.gates(t, c.selected(t, j)) = scale * u[j];
    });
    c.counts.setZero(e);
    for (Index t = 0; t < b; ++t)
      for (Index j = 0; j < k; ++j) c.counts(c.selected(t, j)) += 1.0;
    c.dropped = 0;
    if (cfg_.capacity_factor > 0) {
      const double cap = std::ceil(cfg_.capacity_factor * double(k) * double(b) / double(e));
      std::vector<double> used(static_cast<std::size_t>(e), 0.0);
      for (Index t = 0; t < b; ++t)
        for (Index j = 0; j < k; ++j) {
          const Index ex = c.selected(t, j);
          if (used[ex] < cap)
            used[ex] += 1;
          else {
            c.gates(t, ex) = T(0);
            c.kept(t, j) = 0;
            ++c.dropped;
          }
        }
    }
    c.p_sum = c.probs.colwise().sum().transpose().template cast<double>();
    c.lse_sq = c.lse.template cast<double>().squaredNorm();
    c.batch_tokens = b;
    sequence_statistics(c);
    losses(c);
  }

  /// Makes a forward's batch statistics those of the whole batch when this batch is one part of
  /// it (data parallelism, dist/): the selection counts, probability sums, sequence losses,
  /// z-loss sum and token count are summed over the parts by `r`, the losses recomputed from
  /// them, and backward uses them. Every part calls it after its forward (it is collective).
  /// Capacity needs the whole batch's token order and is refused.
  void use_whole_batch(Cache& c, const BatchReduction& r) const {
    SPEX_CHECK(cfg_.capacity_factor == 0, "capacity_factor = " << cfg_.capacity_factor
                                                              << ": capacity drops by the whole batch's token order; a batch in parts is dropless");
    r.sum(c.counts.data(), c.counts.size());
    r.sum(c.p_sum.data(), c.p_sum.size());
    double sums[2] = {c.lse_sq, c.seq_sum};
    r.sum(sums, 2);
    c.lse_sq = sums[0];
    c.seq_sum = sums[1];
    c.sequences = r.sum(c.sequences);
    c.batch_tokens = r.sum(c.batch_tokens);
    losses(c);
  }

  void backward(CMatRef<T> x, CMatRef<T> dgates, Cache& c, Grads& g, MatRef<T>* dx) const {
    const Index b = x.rows(), e = n_experts(), k = cfg_.experts_per_token;
    check_shape(dgates, b, e, "dgates");
    const bool sigmoid = cfg_.score == ScoreFn::sigmoid;
    c.dlogits.setZero(b, e);
    c.dprobs.resize(b, e);
    const double bt = double(c.batch_tokens);
    const T aux_scale = bt > 0 ? T(cfg_.aux_coeff * double(e) / (double(k) * bt * bt)) : T(0);
    const double len = double(cfg_.seq_len);
    const T seq_scale = c.sequences > 0 ? T(cfg_.seq_aux_coeff * double(e) / (double(k) * len * len * double(c.sequences))) : T(0);
    const T scale = T(cfg_.route_scale);
    parallel_for(b, [&](Index t, int) {
      T* dp = &c.dprobs(t, 0);  // dL/dP
      T* dl = &c.dlogits(t, 0);  // dL/dlogits (sigmoid: dL/ds until the end)
      for (Index j = 0; j < e; ++j) dp[j] = aux_scale * T(c.counts(j));
      if (seq_scale != T(0))
        for (Index j = 0; j < e; ++j) dp[j] += seq_scale * T(c.seq_counts(t / cfg_.seq_len, j));
      // The gates: u_j (selected_gates) times route_scale, the dropped zeroed. A dropped entry
      // has no gradient of its own, but with a normalizer over the k it still shapes the kept
      // gates: its path through the sum stays.
      const T* u = &c.selected_gates(t, 0);
      T udg = 0, sum = 0;
      for (Index j = 0; j < k; ++j) {
        const Index ex = c.selected(t, j);
        udg += u[j] * du(c, dgates, t, j, scale);
        sum += sigmoid ? c.scores(t, ex) : c.probs(t, ex);
      }
      for (Index j = 0; j < k; ++j) {
        const Index ex = c.selected(t, j);
        const T d = du(c, dgates, t, j, scale);
        if (!sigmoid && !cfg_.pre_softmax)  // u = softmax over the k logits: dl_j = u_j (d_j - sum u d)
          dl[ex] += u[j] * (d - udg);
        else {
          // u_j = score_j, or score_j / S (sigmoid: S + eps): dscore_j = (d_j - sum u d) / S.
          T& target = sigmoid ? dl[ex] : dp[ex];
          target += cfg_.renormalize ? (d - udg) / (sigmoid ? sum + T(kSumEpsilon) : sum) : d;
        }
      }
      const T* p = &c.probs(t, 0);
      T pdp = 0;
      for (Index j = 0; j < e; ++j) pdp += p[j] * dp[j];
      if (sigmoid) {
        // P = s / Z: ds_j += (dp_j - <P, dp>) / Z; then through s = sigmoid(l).
        const T z = c.prob_norm(t);
        const T* s = &c.scores(t, 0);
        for (Index j = 0; j < e; ++j) dl[j] = (dl[j] + (dp[j] - pdp) / z) * s[j] * (T(1) - s[j]);
      } else {
        for (Index j = 0; j < e; ++j) dl[j] += p[j] * (dp[j] - pdp);  // through P = softmax(logits)
      }
      if (cfg_.z_coeff > 0) {
        const T zs = T(2 * cfg_.z_coeff) * c.lse(t) / T(c.batch_tokens);
        const T* l = &c.logits(t, 0);
        for (Index j = 0; j < e; ++j) dl[j] += zs * (sigmoid ? std::exp(l[j] - c.lse(t)) : p[j]);
      }
    });
    linear_.backward_accumulate(x, c.dlogits, dx, g);
  }

  /// aux + sequence aux + z (already scaled by their coefficients).
  double aux_loss(const Cache& c) const { return c.aux + c.seq_aux + c.z; }

 private:
  /// dL/du_j of token t's j-th selection: route_scale * dgates, 0 where capacity dropped it.
  static T du(const Cache& c, CMatRef<T> dgates, Index t, Index j, T scale) {
    return c.kept(t, j) != 0 ? scale * dgates(t, c.selected(t, j)) : T(0);
  }

  static T logsumexp(const T* l, Index n) {
    T mx = l[0];
    for (Index j = 1; j < n; ++j) mx = std::max(mx, l[j]);
    T s = 0;
    for (Index j = 0; j < n; ++j) s += std::exp(l[j] - mx);
    return mx + std::log(s);
  }

  /// Group-limited selection: the token's best group_k groups by the sum of each group's best
  /// group_m keys; the keys of every other group become -inf (never selected: validation keeps
  /// k <= group_k * per_group).
  void mask_groups(T* key, Index t, Index per_group, Index group_k, Index group_m, Cache& c) const {
    const std::size_t pg = static_cast<std::size_t>(per_group), m = static_cast<std::size_t>(group_m);
    for (Index g = 0; g < cfg_.n_groups; ++g) {
      kernels::topk<Arch>(key + g * per_group, pg, m, &c.group_best(t, 0), &c.group_best_ids(t, 0));
      T s = 0;
      for (Index j = 0; j < group_m; ++j) s += c.group_best(t, j);
      c.group_scores(t, g) = s;
    }
    kernels::topk<Arch>(&c.group_scores(t, 0), static_cast<std::size_t>(cfg_.n_groups), static_cast<std::size_t>(group_k),
                        &c.selected_group_scores(t, 0), &c.selected_groups(t, 0));
    for (Index g = 0; g < cfg_.n_groups; ++g) {
      bool chosen = false;
      for (Index j = 0; j < group_k; ++j) chosen |= c.selected_groups(t, j) == g;
      if (!chosen)
        for (Index j = 0; j < per_group; ++j) key[g * per_group + j] = -std::numeric_limits<T>::infinity();
    }
  }

  /// Per sequence of seq_len consecutive tokens: selection counts, P sums and the unscaled
  /// loss E / (k L^2) sum_e (sum_t P_te) c_e, summed over the sequences.
  void sequence_statistics(Cache& c) const {
    c.seq_sum = 0;
    c.sequences = 0;
    if (cfg_.seq_aux_coeff == 0) return;
    const Index b = c.logits.rows(), e = n_experts(), len = cfg_.seq_len, n = b / len;
    c.sequences = n;
    c.seq_counts.setZero(n, e);
    c.seq_p.setZero(n, e);
    for (Index t = 0; t < b; ++t) {
      for (Index j = 0; j < cfg_.experts_per_token; ++j) c.seq_counts(t / len, c.selected(t, j)) += 1.0;
      for (Index j = 0; j < e; ++j) c.seq_p(t / len, j) += double(c.probs(t, j));
    }
    const double f = double(e) / (double(cfg_.experts_per_token) * double(len) * double(len));
    c.seq_sum = f * c.seq_counts.cwiseProduct(c.seq_p).sum();
  }

  /// aux, seq_aux and z from the batch statistics in `c`.
  void losses(Cache& c) const {
    const double bt = double(c.batch_tokens), e = double(n_experts()), k = double(cfg_.experts_per_token);
    c.aux = (cfg_.aux_coeff > 0 && bt > 0) ? cfg_.aux_coeff * e / (k * bt * bt) * c.p_sum.dot(c.counts) : 0.0;
    c.seq_aux = (cfg_.seq_aux_coeff > 0 && c.sequences > 0) ? cfg_.seq_aux_coeff * c.seq_sum / double(c.sequences) : 0.0;
    c.z = (cfg_.z_coeff > 0 && bt > 0) ? cfg_.z_coeff * c.lse_sq / bt : 0.0;
  }

  Linear<T> linear_;
  RouterConfig cfg_;
  Vec<T> bias_;  // the selection bias (expert_bias), else empty
};

}  // namespace spex
