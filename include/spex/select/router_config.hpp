#pragma once
// What a router needs of its layer's configuration (MoE builds it from MoEConfig:
// layers/moe_config.hpp), its validation, and the check of router logits both routers run.
// The math of the TopK router's options: docs/topk_moe.md.
#include <cmath>

#include "../core/check.hpp"
#include "../core/finite.hpp"
#include "../core/types.hpp"
#include "score_fn.hpp"

namespace spex {

/// A router over n_experts experts (after granularity) for d_in-wide tokens.
struct RouterConfig {
  Index d_in = 0;
  Index n_experts = 0;            ///< E (after granularity)
  Index experts_per_token = 1;    ///< k: exactly (TopK), on average (ReLU)
  double init_std = 0.01;         ///< weights ~ N(0, std^2)
  // TopK router
  ScoreFn score = ScoreFn::softmax;  ///< softmax over the E logits, or sigmoid per expert
  bool pre_softmax = true;
  bool renormalize = false;
  double route_scale = 1.0;       ///< the gates' factor after renormalization
  bool expert_bias = false;       ///< a per-expert bias added to the scores for selection only
  Index n_groups = 1;             ///< experts in n_groups equal groups (1: no group limit)
  Index group_topk = 0;           ///< groups a token may use (0: all)
  Index group_score_experts = 0;  ///< a group's score: the sum of its best this many (0: k / group_topk)
  double aux_coeff = 0.01;
  double seq_aux_coeff = 0.0;     ///< the sequence-wise balancing loss (0: off)
  Index seq_len = 0;              ///< tokens per sequence for seq_aux_coeff: consecutive rows
  double z_coeff = 0.0;
  double capacity_factor = 0.0;

  /// Groups a token may use: group_topk, or all of them.
  Index groups_per_token() const { return group_topk > 0 ? group_topk : n_groups; }
  /// The experts whose best scores make a group's score.
  Index group_scoring() const { return group_score_experts > 0 ? group_score_experts : std::max<Index>(1, experts_per_token / groups_per_token()); }
};

/// Throws spex::Error naming the first field of `c` that is out of range.
inline const RouterConfig& validate(const RouterConfig& c) {
  SPEX_CHECK(c.d_in >= 1, "router d_in = " << c.d_in << " must be >= 1");
  SPEX_CHECK(c.n_experts >= 1, "router n_experts = " << c.n_experts << " must be >= 1");
  SPEX_CHECK(c.experts_per_token >= 1 && c.experts_per_token <= c.n_experts,
             "router experts_per_token = " << c.experts_per_token << " must be in [1, n_experts = " << c.n_experts << "]");
  checked_mul(c.n_experts, c.d_in, "the router weight size");
  check_positive(c.init_std, "router_init_std");
  SPEX_CHECK(c.score == ScoreFn::softmax || c.score == ScoreFn::sigmoid,
             "score = " << int(c.score) << " must be softmax or sigmoid (ReLU routing is ReluRouter's)");
  SPEX_CHECK(c.pre_softmax || c.score == ScoreFn::softmax,
             "pre_softmax = false (softmax over the k selected logits) needs score = softmax, not " << to_string(c.score));
  SPEX_CHECK(std::isfinite(c.route_scale) && c.route_scale > 0, "route_scale = " << c.route_scale << " must be finite and > 0");
  SPEX_CHECK(c.n_groups >= 1 && c.n_experts % c.n_groups == 0,
             "n_groups = " << c.n_groups << " must be >= 1 and divide the experts (" << c.n_experts << ")");
  SPEX_CHECK(c.group_topk >= 0 && c.group_topk <= c.n_groups,
             "group_topk = " << c.group_topk << " must be in [0, n_groups = " << c.n_groups << "] (0: all groups)");
  const Index per_group = c.n_experts / c.n_groups;
  SPEX_CHECK(c.groups_per_token() * per_group >= c.experts_per_token,
             "group_topk = " << c.groups_per_token() << " groups of " << per_group << " experts hold fewer than experts_per_token = "
                             << c.experts_per_token);
  SPEX_CHECK(c.group_score_experts >= 0 && c.group_score_experts <= per_group,
             "group_score_experts = " << c.group_score_experts << " must be in [0, " << per_group
                                      << "] (the experts per group; 0: experts_per_token / group_topk)");
  check_at_least(c.aux_coeff, 0, "aux_coeff");
  check_at_least(c.seq_aux_coeff, 0, "seq_aux_coeff");
  SPEX_CHECK(c.seq_len >= 0, "seq_len = " << c.seq_len << " must be >= 0");
  SPEX_CHECK(c.seq_aux_coeff == 0 || c.seq_len >= 1,
             "seq_aux_coeff = " << c.seq_aux_coeff << " needs seq_len >= 1 (the tokens of one sequence), got " << c.seq_len);
  check_at_least(c.z_coeff, 0, "z_coeff");
  check_at_least(c.capacity_factor, 0, "capacity_factor");
  return c;
}

/// Throws spex::Error naming the first TopK-only option of `c` that is set: ReLU routing has
/// no scores, selection, groups or balancing loss of its own.
inline void check_relu_router_options(const RouterConfig& c) {
  SPEX_CHECK(c.score == ScoreFn::softmax, "score = " << to_string(c.score) << " applies to the TopK router only (ReLU routing: softmax, the default)");
  SPEX_CHECK(!c.expert_bias, "expert_bias = true applies to the TopK router only");
  SPEX_CHECK(c.n_groups == 1, "n_groups = " << c.n_groups << " applies to the TopK router only (ReLU routing: 1)");
  SPEX_CHECK(c.route_scale == 1.0, "route_scale = " << c.route_scale << " applies to the TopK router only (ReLU routing: 1)");
  SPEX_CHECK(c.seq_aux_coeff == 0, "seq_aux_coeff = " << c.seq_aux_coeff << " applies to the TopK router only (ReLU routing: 0)");
}

/// Throws, naming the token and expert, unless every router logit is finite. Both routers
/// call it: a NaN logit makes ReLU gates and softmax probabilities NaN, and TopK's top-k pads
/// with id -1 when fewer than k logits are not NaN, which no expert may be indexed with.
template <class T>
void check_router_logits(const RowMat<T>& logits) {
  const auto at = find_non_finite(logits);
  SPEX_CHECK(at.first < 0, "the router logit of token " << at.first << " for expert " << at.second << " is "
                                                        << logits(at.first, at.second)
                                                        << ": x or router.weight holds NaN/Inf, or their product overflows");
}

}  // namespace spex
