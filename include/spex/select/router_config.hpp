#pragma once
// Configuration of a mixture-of-experts layer and its router (layers/moe.hpp).
#include "../core/types.hpp"
#include "../experts/ffn.hpp"
#include "sparsity.hpp"

namespace spex {

struct MoEConfig {
  Index d = 0;                    ///< model width (input and output)
  Index n_experts = 8;            ///< E before granularity
  Index hidden = 0;               ///< per-expert hidden size before granularity (0: 4 d)
  Index top_k = 1;                ///< k: TopK's experts per token; ReLU's budget (target 1 - k/E)
  Index granularity = 1;          ///< G: E*G experts, k*G budget, hidden/G each
  FfnKind ffn = FfnKind::swiglu;
  double router_init_std = 0.01;  ///< router weights ~ N(0, std^2), as the reference
  bool check_finite = true;       ///< throw on NaN/Inf in x and dy

  // ReLU router (ReMoE)
  Penalty penalty = Penalty::l1_lb;

  // TopK router (classic MoE)
  bool pre_softmax = true;        ///< softmax over all E, then top-k (not renormalized); else softmax over the k
  bool renormalize = false;       ///< with pre_softmax: divide the k probabilities by their sum
  double aux_coeff = 0.01;        ///< Switch load-balancing loss coefficient (0: off)
  double z_coeff = 0.0;           ///< router z-loss coefficient (0: off)
  double capacity_factor = 0.0;   ///< > 0: at most ceil(cf * k * T / E) tokens per expert, the rest dropped

  /// E, k and hidden after granularity.
  Index experts() const { return n_experts * granularity; }
  Index budget() const { return top_k * granularity; }
  Index expert_hidden() const { return (hidden > 0 ? hidden : 4 * d) / granularity; }
};

}  // namespace spex
