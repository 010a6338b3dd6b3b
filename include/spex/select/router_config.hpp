#pragma once
// What a router needs of its layer's configuration (MoE builds it from MoEConfig:
// layers/moe_config.hpp), its validation, and the check of router logits both routers run.
#include "../core/check.hpp"
#include "../core/types.hpp"

namespace spex {

/// A router over n_experts experts (after granularity) for d_in-wide tokens.
struct RouterConfig {
  Index d_in = 0;
  Index n_experts = 0;            ///< E (after granularity)
  Index experts_per_token = 1;    ///< k: exactly (TopK), on average (ReLU)
  double init_std = 0.01;         ///< weights ~ N(0, std^2)
  // TopK router
  bool pre_softmax = true;
  bool renormalize = false;
  double aux_coeff = 0.01;
  double z_coeff = 0.0;
  double capacity_factor = 0.0;
};

/// Throws spex::Error naming the first field of `c` that is out of range.
inline const RouterConfig& validate(const RouterConfig& c) {
  SPEX_CHECK(c.d_in >= 1, "router d_in = " << c.d_in << " must be >= 1");
  SPEX_CHECK(c.n_experts >= 1, "router n_experts = " << c.n_experts << " must be >= 1");
  SPEX_CHECK(c.experts_per_token >= 1 && c.experts_per_token <= c.n_experts,
             "router experts_per_token = " << c.experts_per_token << " must be in [1, n_experts = " << c.n_experts << "]");
  checked_mul(c.n_experts, c.d_in, "the router weight size");
  check_positive(c.init_std, "router_init_std");
  check_at_least(c.aux_coeff, 0, "aux_coeff");
  check_at_least(c.z_coeff, 0, "z_coeff");
  check_at_least(c.capacity_factor, 0, "capacity_factor");
  return c;
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
