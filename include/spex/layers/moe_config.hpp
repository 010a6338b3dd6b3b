#pragma once
// The configuration of a mixture-of-experts layer (layers/moe.hpp) and its validation (every
// field, overflow-safe sizes). The math of the fields: docs/remoe.md, docs/topk_moe.md.
#include <cmath>

#include "../core/check.hpp"
#include "../core/types.hpp"
#include "../experts/ffn.hpp"
#include "../select/router_config.hpp"
#include "../select/sparsity.hpp"

namespace spex {

struct MoEConfig {
  Index d_in = 0;                 ///< input width
  Index d_out = 0;                ///< output width (0: same as d_in)
  Index n_experts = 8;            ///< E before granularity
  Index hidden = 0;               ///< per-expert hidden size before granularity (0: 4 d_in)
  Index experts_per_token = 1;    ///< k: TopK routes exactly k per token; ReLU routes k on average
                                  ///< (its sparsity target is 1 - k/E)
  Index granularity = 1;          ///< G: E*G experts, k*G per token, hidden/G each
  FfnKind ffn = FfnKind::swiglu;
  double router_init_std = 0.01;  ///< router weights ~ N(0, std^2), as the reference
  bool check_finite = true;       ///< throw on NaN/Inf in x and dy

  // ReLU router (ReMoE)
  Penalty penalty = Penalty::l1_lb_spare_top;  ///< l1_lb is the paper's; sparing each token's top gate
                                               ///< trained better at every batch measured (sparsity.hpp)
  bool revive_zero_expert_tokens = true;  ///< training: a token with no active expert probes its
                                          ///< largest logit's expert, whose router logit then learns
                                          ///< whether switching it on helps (docs/remoe.md, "Dead routers")

  // TopK router (classic MoE)
  bool pre_softmax = true;        ///< softmax over all E, then top-k (not renormalized); else softmax over the k
  bool renormalize = false;       ///< with pre_softmax: divide the k probabilities by their sum
  double aux_coeff = 0.01;        ///< Switch load-balancing loss coefficient (0: off)
  double z_coeff = 0.0;           ///< router z-loss coefficient (0: off)
  double capacity_factor = 0.0;   ///< > 0: at most ceil(cf * k * T / E) tokens per expert, the rest dropped
  // TopK router, the routing of DeepSeek-V3 and Megatron-Core (docs/topk_moe.md)
  ScoreFn score = ScoreFn::softmax;  ///< softmax over the E logits, or sigmoid per expert
  double route_scale = 1.0;       ///< the gates' factor (DeepSeek's routed_scaling_factor)
  bool expert_bias = false;       ///< a selection-only bias per expert, moved by MoE::update_expert_bias
  Index n_groups = 1;             ///< group-limited routing: experts (E * G) in n_groups groups (1: off)
  Index group_topk = 0;           ///< groups a token may use (0: all)
  Index group_score_experts = 0;  ///< a group's score sums its best this many keys (0: k / group_topk)
  double seq_aux_coeff = 0.0;     ///< sequence-wise balancing loss coefficient (0: off)
  Index seq_len = 0;              ///< tokens per sequence: the batch is sequences of consecutive rows

  // Shared experts (either router): always-on FFNs added to every token's output
  Index shared_experts = 0;       ///< how many (0: none); they form one FFN of shared_experts * shared_hidden
  Index shared_hidden = 0;        ///< each one's hidden size (0: a routed expert's, hidden / G)
  bool shared_gate = false;       ///< gate their output by sigmoid(x . w_g) per token (Qwen2-MoE)

  /// Experts after granularity: E * G.
  Index total_experts() const { return checked_mul(n_experts, granularity, "n_experts * granularity"); }
  /// Experts per token after granularity: k * G.
  Index total_per_token() const { return checked_mul(experts_per_token, granularity, "experts_per_token * granularity"); }
  /// Each expert's hidden size: hidden / G.
  Index expert_hidden() const { return (hidden > 0 ? hidden : 4 * d_in) / granularity; }
  Index output_width() const { return d_out > 0 ? d_out : d_in; }
  /// Each shared expert's hidden size: shared_hidden, or a routed expert's.
  Index shared_expert_hidden() const { return shared_hidden > 0 ? shared_hidden : expert_hidden(); }
  /// What the router takes of it.
  RouterConfig router() const {
    RouterConfig r;
    r.d_in = d_in;
    r.n_experts = total_experts();
    r.experts_per_token = total_per_token();
    r.init_std = router_init_std;
    r.pre_softmax = pre_softmax;
    r.renormalize = renormalize;
    r.aux_coeff = aux_coeff;
    r.z_coeff = z_coeff;
    r.capacity_factor = capacity_factor;
    r.score = score;
    r.route_scale = route_scale;
    r.expert_bias = expert_bias;
    r.n_groups = n_groups;
    r.group_topk = group_topk;
    r.group_score_experts = group_score_experts;
    r.seq_aux_coeff = seq_aux_coeff;
    r.seq_len = seq_len;
    return r;
  }
};

/// Throws spex::Error naming the first field of `c` that is out of range.
inline const MoEConfig& validate(const MoEConfig& c) {
  SPEX_CHECK(c.d_in >= 1, "d_in = " << c.d_in << " must be >= 1");
  SPEX_CHECK(c.d_out >= 0, "d_out = " << c.d_out << " must be >= 0 (0: same as d_in)");
  SPEX_CHECK(c.n_experts >= 1, "n_experts = " << c.n_experts << " must be >= 1");
  SPEX_CHECK(c.granularity >= 1, "granularity = " << c.granularity << " must be >= 1");
  SPEX_CHECK(c.hidden >= 0, "hidden = " << c.hidden << " must be >= 0 (0: 4 d_in)");
  SPEX_CHECK(c.experts_per_token >= 1 && c.experts_per_token <= c.n_experts,
             "experts_per_token = " << c.experts_per_token << " must be in [1, n_experts = " << c.n_experts << "]");
  const Index e = c.total_experts();
  c.total_per_token();
  const Index hidden = c.hidden > 0 ? c.hidden : checked_mul(4, c.d_in, "4 * d_in (the default hidden)");
  SPEX_CHECK(hidden % c.granularity == 0, "hidden = " << hidden << " must divide by granularity = " << c.granularity);
  SPEX_CHECK(c.ffn == FfnKind::gelu || c.ffn == FfnKind::swiglu, "ffn = " << int(c.ffn) << " is not an FfnKind");
  // W1 holds E * h1 rows of d_in (h1 = 2 hidden/G for SwiGLU), W2 E * d_out rows of hidden/G.
  const Index h1 = checked_mul(c.ffn == FfnKind::swiglu ? 2 : 1, hidden / c.granularity, "the expert hidden size");
  checked_mul(checked_mul(e, h1, "the expert weight rows"), c.d_in, "the expert weight size");
  checked_mul(checked_mul(e, c.output_width(), "the expert output rows"), hidden / c.granularity, "the expert output weight size");
  checked_mul(e, c.d_in, "the router weight size");
  check_positive(c.router_init_std, "router_init_std");
  SPEX_CHECK(c.penalty == Penalty::none || c.penalty == Penalty::l1 || c.penalty == Penalty::l1_lb ||
                 c.penalty == Penalty::l1_lb_spare_top,
             "penalty = " << int(c.penalty) << " is not a Penalty");
  check_at_least(c.aux_coeff, 0, "aux_coeff");
  check_at_least(c.z_coeff, 0, "z_coeff");
  check_at_least(c.capacity_factor, 0, "capacity_factor");
  validate(c.router());  // the router's options (score, groups, seq_aux_coeff, ...)
  SPEX_CHECK(c.shared_experts >= 0, "shared_experts = " << c.shared_experts << " must be >= 0");
  SPEX_CHECK(c.shared_hidden >= 0, "shared_hidden = " << c.shared_hidden << " must be >= 0 (0: a routed expert's hidden)");
  SPEX_CHECK(!c.shared_gate || c.shared_experts > 0, "shared_gate = true needs shared_experts >= 1");
  if (c.shared_experts > 0) {
    const Index sh = checked_mul(c.shared_experts, c.shared_expert_hidden(), "shared_experts * shared_hidden");
    checked_mul(checked_mul(c.ffn == FfnKind::swiglu ? 2 : 1, sh, "the shared hidden size"), c.d_in, "the shared expert weight size");
    checked_mul(sh, c.output_width(), "the shared expert output weight size");
  }
  return c;
}

}  // namespace spex
