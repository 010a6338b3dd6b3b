#pragma once
// Floating-point operations per token of a forward pass, by part, so that layers can be
// compared at equal compute (the PEER paper compares at equal FLOPs; its query networks and
// sub-key scores count, not only the experts). A multiply-add counts 2. The layers report
// their own counts (MoE::flops_per_token, Peer::flops_per_token, Pkm::flops_per_token,
// FfnExperts::flops_per_token); the parts here are the formulas they share.
//
// Not counted: comparisons (the top-k over each half's n scores, ~2n per head, and over the
// candidate sums), index arithmetic and memory traffic. A backward pass costs about twice the
// forward for every part with weights.
#include "../core/types.hpp"

namespace spex {

struct FlopCount {
  double query = 0;    ///< product keys: query network and its norm
  double keys = 0;     ///< product keys: sub-key scores of both halves, every head
  double select = 0;   ///< product keys: candidate sums and the score function
  double router = 0;   ///< MoE: router logits (and the softmax of TopK)
  double experts = 0;  ///< the experts and the gated sum of their outputs
  double total() const { return query + keys + select + router + experts; }
};

namespace flops {

/// y = x W^T for one token: d_in x d_out multiply-adds.
inline double linear(Index d_in, Index d_out) { return 2.0 * double(d_in) * double(d_out); }

/// Query network (d_in -> h * d_key, bias optional) and an affine norm over its output.
inline double product_key_query(Index d_in, Index heads, Index d_key, bool bias, bool norm) {
  const double q = double(heads) * double(d_key);
  return linear(d_in, heads * d_key) + (bias ? q : 0.0) + (norm ? 2.0 * q : 0.0);
}

/// Each head scores its query halves against both sub-key tables: 2 x n x d_key/2 multiply-adds.
inline double product_key_scores(Index heads, Index n_keys, Index d_key) {
  return 2.0 * double(heads) * double(n_keys) * double(d_key);
}

/// Up to k x k candidate sums per head, then the score function on the k picks.
inline double product_key_select(Index heads, Index top_k) {
  return double(heads) * (double(top_k) * double(top_k) + double(top_k));
}

}  // namespace flops
}  // namespace spex
