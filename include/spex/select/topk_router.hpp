#pragma once
// The classic MoE router that ReMoE replaces (docs/topk_moe.md): logits = x W^T,
// P = softmax over all E, exactly k experts per token.
//  - pre_softmax (the reference's mode for k = 1): gates are the top-k entries of P, not
//    renormalized (or renormalized to sum 1 with `renormalize`);
//  - otherwise: softmax over the k selected logits.
// Switch load-balancing loss aux = coeff * E / (k T^2) * sum_e (sum_t P_te) c_e, with c_e the
// top-k selection counts (held constant); optional z-loss z_coeff * mean_t logsumexp(logits_t)^2;
// optional capacity: at most ceil(cf * k * T / E) tokens per expert, kept in token order, the
// rest dropped (gate 0; counted in Cache::dropped).
#include <cmath>
#include <vector>

#include "../core/batch_reduction.hpp"
#include "../core/check.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../kernels/activation.hpp"
#include "../kernels/topk.hpp"
#include "../nn/linear.hpp"
#include "router_config.hpp"

namespace spex {

/// Thread safety: const methods; one cache per concurrent caller.
template <class T = float, class Arch = default_arch>
class TopKRouter {
 public:
  static constexpr bool kRelu = false;
  static constexpr const char* kName = "topk";
  struct Cache {
    RowMat<T> logits, probs, gates;  // B x E; gates zero off the selection
    IndexMat selected;               // B x k expert ids (before capacity)
    RowMat<T> selected_gates;        // B x k: the gates before capacity drops
    RowMat<unsigned char> kept;      // B x k: 0 where capacity dropped the pair
    RowMat<T> selected_logits;       // B x k
    Vec<double> counts;              // c_e of the selection
    Vec<double> p_sum;               // sum over the tokens of P, per expert
    double lse_sq = 0;               // sum over the tokens of logsumexp^2
    Index batch_tokens = 0;          // T of the losses: the batch's, or the whole batch's (use_whole_batch)
    Vec<T> lse;                      // logsumexp per token
    Index dropped = 0;               // (token, expert) pairs dropped by capacity
    double aux = 0, z = 0;           // loss values (scaled by their coefficients)
    RowMat<T> dlogits, dprobs;       // backward scratch
  };
  using Grads = typename Linear<T>::Grads;

  TopKRouter() = default;
  TopKRouter(const RouterConfig& cfg, Rng& rng)
      : linear_(validate(cfg).d_in, cfg.n_experts, false, rng), k_(cfg.experts_per_token),
        pre_softmax_(cfg.pre_softmax), renormalize_(cfg.renormalize), aux_coeff_(cfg.aux_coeff), z_coeff_(cfg.z_coeff),
        capacity_factor_(cfg.capacity_factor) {
    Rng r = rng.split(32);
    fill_normal(linear_.weight(), cfg.init_std, r);
  }

  Index n_experts() const { return linear_.out_features(); }
  Index k() const { return k_; }
  RowMat<T>& weight() { return linear_.weight(); }
  const RowMat<T>& weight() const { return linear_.weight(); }
  Grads make_grads() const { return linear_.make_grads(); }
  void check_grads(const Grads& g, const char* what) const { linear_.check_grads(g, what); }

  void forward(CMatRef<T> x, Cache& c) const {
    const Index b = x.rows(), e = n_experts();
    c.logits.resize(b, e);
    linear_.forward(x, c.logits);
    check_router_logits(c.logits);
    c.probs.resize(b, e);
    c.lse.resize(b);
    c.gates.setZero(b, e);
    c.selected.resize(b, k_);
    c.selected_gates.resize(b, k_);
    c.kept.setOnes(b, k_);
    c.selected_logits.resize(b, k_);
    const std::size_t es = static_cast<std::size_t>(e), ks = static_cast<std::size_t>(k_);
    parallel_for(b, [&](Index t, int) {
      const T* l = &c.logits(t, 0);
      kernels::softmax<Arch>(l, &c.probs(t, 0), es);
      kernels::topk<Arch>(l, es, ks, &c.selected_logits(t, 0), &c.selected(t, 0));  // P has the same order
      const Index top = c.selected(t, 0);
      c.lse(t) = l[top] - std::log(c.probs(t, top));  // P_top = exp(l_top - lse), P_top >= 1/E
      T norm = 0;
      for (Index j = 0; j < k_; ++j) {
        const Index ex = c.selected(t, j);
        c.gates(t, ex) = pre_softmax_ ? c.probs(t, ex) : std::exp(l[ex] - l[c.selected(t, 0)]);
        norm += c.gates(t, ex);
      }
      if (!pre_softmax_ || renormalize_)
        for (Index j = 0; j < k_; ++j) c.gates(t, c.selected(t, j)) /= norm;
      for (Index j = 0; j < k_; ++j) c.selected_gates(t, j) = c.gates(t, c.selected(t, j));
    });
    c.counts.setZero(e);
    for (Index t = 0; t < b; ++t)
      for (Index j = 0; j < k_; ++j) c.counts(c.selected(t, j)) += 1.0;
    c.dropped = 0;
    if (capacity_factor_ > 0) {
      const double cap = std::ceil(capacity_factor_ * double(k_) * double(b) / double(e));
      std::vector<double> used(static_cast<std::size_t>(e), 0.0);
      for (Index t = 0; t < b; ++t)
        for (Index j = 0; j < k_; ++j) {
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
    losses(c);
  }

  /// Makes a forward's batch statistics those of the whole batch when this batch is one part of
  /// it (data parallelism, dist/): the selection counts, probability sums, z-loss sum and token
  /// count are summed over the parts by `r`, the aux and z losses recomputed from them, and
  /// backward uses them. Every part calls it after its forward (it is collective). Capacity
  /// needs the whole batch's token order and is refused.
  void use_whole_batch(Cache& c, const BatchReduction& r) const {
    SPEX_CHECK(capacity_factor_ == 0, "capacity_factor = " << capacity_factor_
                                                            << ": capacity drops by the whole batch's token order; a batch in parts is dropless");
    r.sum(c.counts.data(), c.counts.size());
    r.sum(c.p_sum.data(), c.p_sum.size());
    r.sum(&c.lse_sq, 1);
    c.batch_tokens = r.sum(c.batch_tokens);
    losses(c);
  }

  void backward(CMatRef<T> x, CMatRef<T> dgates, Cache& c, Grads& g, MatRef<T>* dx) const {
    const Index b = x.rows(), e = n_experts();
    check_shape(dgates, b, e, "dgates");
    c.dlogits.setZero(b, e);
    c.dprobs.resize(b, e);
    const double bt = double(c.batch_tokens);
    const T aux_scale = bt > 0 ? T(aux_coeff_ * double(e) / (double(k_) * bt * bt)) : T(0);
    parallel_for(b, [&](Index t, int) {
      T* dp = &c.dprobs(t, 0);
      T* dl = &c.dlogits(t, 0);
      for (Index j = 0; j < e; ++j) dp[j] = aux_scale * T(c.counts(j));  // the aux loss, through P
      // An entry dropped by capacity has gate 0 and no gradient of its own, but with a
      // normalizer over the k it still shapes the kept gates: its path through S stays.
      if (pre_softmax_) {
        // gate_j = P_j, or P_j / S with S = sum of the k selected P (dropped ones included).
        T s = 0, gdg = 0;
        for (Index j = 0; j < k_; ++j) {
          const Index ex = c.selected(t, j);
          s += c.probs(t, ex);
          gdg += c.gates(t, ex) * dgates(t, ex);  // dropped: gate 0
        }
        for (Index j = 0; j < k_; ++j) {
          const Index ex = c.selected(t, j);
          const bool kept = c.kept(t, j) != 0;
          if (renormalize_)
            dp[ex] += ((kept ? dgates(t, ex) : T(0)) - gdg) / s;
          else if (kept)
            dp[ex] += dgates(t, ex);
        }
      } else {
        // gates = softmax over the k selected logits (q_j, dropped ones included), then the
        // dropped zeroed: dl_j = q_j ((kept_j ? dg_j : 0) - sum_kept q_i dg_i).
        T gdg = 0;
        for (Index j = 0; j < k_; ++j) {
          const Index ex = c.selected(t, j);
          gdg += c.gates(t, ex) * dgates(t, ex);
        }
        for (Index j = 0; j < k_; ++j) {
          const Index ex = c.selected(t, j);
          dl[ex] += c.selected_gates(t, j) * ((c.kept(t, j) != 0 ? dgates(t, ex) : T(0)) - gdg);
        }
      }
      // Through P = softmax(logits): dl += P (dp - <P, dp>); then the z-loss.
      const T* p = &c.probs(t, 0);
      T pdp = 0;
      for (Index j = 0; j < e; ++j) pdp += p[j] * dp[j];
      const T zs = T(2 * z_coeff_) * c.lse(t) / T(c.batch_tokens);
      for (Index j = 0; j < e; ++j) dl[j] += p[j] * (dp[j] - pdp) + zs * p[j];
    });
    linear_.backward_accumulate(x, c.dlogits, dx, g);
  }

  /// aux + z (already scaled by their coefficients).
  double aux_loss(const Cache& c) const { return c.aux + c.z; }

 private:
  /// aux and z from the batch statistics in `c`.
  void losses(Cache& c) const {
    const double bt = double(c.batch_tokens), e = double(n_experts());
    c.aux = (aux_coeff_ > 0 && bt > 0) ? aux_coeff_ * e / (double(k_) * bt * bt) * c.p_sum.dot(c.counts) : 0.0;
    c.z = (z_coeff_ > 0 && bt > 0) ? z_coeff_ * c.lse_sq / bt : 0.0;
  }

  Linear<T> linear_;
  Index k_ = 1;
  bool pre_softmax_ = true, renormalize_ = false;
  double aux_coeff_ = 0.01, z_coeff_ = 0.0, capacity_factor_ = 0.0;
};

}  // namespace spex
