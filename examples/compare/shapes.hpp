#pragma once
// The sizes of compare_layers' model per task, and the product-key block configs it trains:
// shared with the programs that train the same model otherwise (sharded_training).
#include <vector>

#include <spex/spex.hpp>

namespace compare {

using spex::Index;

/// Adam's peak learning rate (compare::learning_rate's schedule) and the examples per step.
constexpr double kPeakLr = 3e-3;
constexpr Index kBatch = 128;

/// One task's model and block sizes. The dense block's hidden size is 4d (a transformer's);
/// MoE experts have the same hidden size; PEER and PKM take `pk_heads` heads of `peer_k` /
/// `pkm_k` picks, and the largest even d_key whose FLOPs at N = budget_n^2 stay within the
/// dense block's.
struct TaskShape {
  int context;
  Index emb;
  Index pk_heads, peer_k, pkm_k;
  Index budget_n;                 // the N = n^2 at which PEER/PKM match the dense FLOPs
  std::vector<Index> peer_n;      // PEER sizes trained (same d_key: fixed active parameters)
  Index pkm_n;
  Index d() const { return Index(context) * emb; }
  Index hidden() const { return 4 * d(); }
};

/// The char-lm task's shape: 8 symbols of context, embeddings of 16, PEER/PKM 8 heads.
inline TaskShape char_lm_shape(Index budget_n, const std::vector<Index>& peer_n) { return {8, 16, 8, 16, 16, budget_n, peer_n, budget_n}; }
/// The recall task's shape: a 4-letter key and ':' as context, embeddings of 16, 4 heads.
inline TaskShape recall_shape(Index budget_n, const std::vector<Index>& peer_n) { return {5, 16, 4, 16, 16, budget_n, peer_n, budget_n}; }

inline double dense_block_flops(const TaskShape& ts) {
  return spex::FfnExperts<float>::flops_per_token(spex::FfnKind::gelu, ts.d(), ts.hidden(), ts.d(), 1).total();
}

/// The largest even d_key (2..512) that keeps a product-key block with `c`'s other sizes within
/// `budget` FLOPs per token at N = budget_n^2 (2 when none does).
template <class Block>
Index d_key_for_budget(spex::ProductKeyLayerConfig c, Index budget_n, double budget) {
  c.n_keys = budget_n;
  Index best = 2;
  for (Index dk = 2; dk <= 512; dk += 2) {
    c.d_key = dk;
    if (Block::flops_per_token(c).total() <= budget) best = dk;
  }
  return best;
}

inline spex::ProductKeyLayerConfig pk_config(const TaskShape& ts, Index n, Index top_k, bool learn_keys) {
  spex::ProductKeyLayerConfig pk;
  pk.d_in = ts.d();
  pk.n_keys = n;
  pk.heads = ts.pk_heads;
  pk.top_k = top_k;
  pk.learn_keys = learn_keys;
  return pk;  // the paper's defaults otherwise: shared sub-keys, query BatchNorm, softmax
}

}  // namespace compare
