#pragma once
// The configuration of the product-key layers (Peer, Pkm): ProductKeyLayerConfig, the FrozenSet
// it holds, and their validation. The math of the fields: docs/product_keys.md, docs/peer.md.
#include <algorithm>
#include <cmath>

#include "../core/check.hpp"
#include "../core/compact_table.hpp"
#include "../core/types.hpp"
#include "../kernels/activation.hpp"
#include "../select/key_retrieval.hpp"

namespace spex {

/// The activation of PEER's experts (and of FFN experts): identity, relu, gelu_tanh, gelu_erf,
/// silu, sigmoid.
using Activation = kernels::Activation;

/// What training leaves bit-identical in a product-key layer: after a growth, the experts it
/// had, and the retrieval parts that decide which of them an input finds. Frozen parameters get
/// no gradient (a row-sparse gradient never holds their rows, a dense one keeps them zero) and
/// optimizers step neither them nor their state (Parameter::frozen_rows).
///
/// Shared parts: an old sub-key row i < keys also serves the new experts (i, j) with j >= keys,
/// and the query network serves every expert. The choices:
///  - sub_keys (with learn_keys): frozen, the old experts' keys stay as they were, and the new
///    experts learn through their new rows only; trainable, training on new data moves the old
///    experts' keys too, so old inputs may retrieve other experts than before.
///  - query: frozen (with the norm: BatchNorm then normalizes with its running statistics in
///    training too, and keeps them), an input seen before gets the same query and the same
///    scores for the old experts; trainable, the layer can learn to send new inputs to new
///    experts, at the price of moving old inputs' queries.
/// In either case new experts can outscore old ones for an old input and join its top-k: the
/// pool is shared, not partitioned (docs/growth_and_freezing.md, "Lifelong learning", measures what that costs).
struct FrozenSet {
  /// The experts of sub-key pairs (i1, i2) with both below `keys` are frozen: with
  /// ExpertIds::shells the ids [0, keys^2), all the experts a layer of n_keys = keys had.
  /// 0 < keys < n_keys needs shells ids (under row_major they are not a range of ids).
  Index keys = 0;
  bool sub_keys = true;  ///< also the sub-key rows [0, keys) (see above; only with learn_keys)
  bool query = false;    ///< also the query network, its norm, the input RMSNorm and the output head (see above)
};

/// Configuration of a product-key layer (PEER, PKM). Give n_keys (n, N = n^2) or n_experts
/// (N, a perfect square). Defaults are the PEER paper's: h = 8, k = 16, query BatchNorm,
/// softmax over each head's k scores, sub-keys shared by all heads.
/// Retrieval (infer) is exact up to N = 2^40; training keeps a row lookup table of 4 bytes per
/// expert for the row-sparse gradients and is limited to N <= 2^31 - 1 (n <= 46340).
struct ProductKeyLayerConfig {
  Index d_in = 0;
  Index d_out = 0;                   ///< 0: same as d_in
  Index n_keys = 0;                  ///< n; or
  Index n_experts = 0;               ///< N = n^2
  Index heads = 8;
  Index top_k = 16;                  ///< experts per head
  Index d_key = 128;                 ///< query dimension per head (even)
  Activation activation = Activation::gelu_erf;  ///< PEER only
  ScoreFn score = ScoreFn::softmax;
  NormKind norm = NormKind::batch;
  /// With norm = layer: LayerNorm over each product half of a head's query (d_key / 2 features,
  /// lucidrains' product-key-memory) instead of over the head's d_key.
  bool norm_per_half = false;
  bool shared_keys = true;
  bool learn_keys = false;           ///< true: train the sub-keys (KeyRetrievalConfig::learn_keys)
  bool query_bias = false;
  /// RMSNorm of the layer input with a learned gain, x / ||x|| * sqrt(d_in) * (1 + gamma)
  /// (parameter "input_norm.gamma", zero-initialized: PEER-pytorch's `pre_rmsnorm`): the query
  /// network and the experts (u . x) both read the normalized input. docs/peer.md, "Input RMSNorm".
  bool input_rmsnorm = false;
  /// One expert table per head (PEER-pytorch's `separate_embed_per_head`): the tables hold
  /// heads * N rows, and head h's pick of expert i reads row i * heads + h (expert-major, so that
  /// growth appends rows and a frozen set of experts is a prefix of rows). false: the heads share
  /// one pool of N experts (the PEER paper's).
  bool per_head_tables = false;
  /// Peer only: GLU experts act(u . x) (w . x) v (UltraMemV2's PEER-style values; table
  /// "experts.down_linear" holds w). false: act(u . x) v.
  bool glu = false;
  /// Memory+'s output ("Memory Layers at Scale"): y = W_o (m ⊙ silu(W_g x + b_g)) + b_o, where m
  /// (B x d_value) is what the experts return; parameters "output.silu.*" [d_value, d_in] and
  /// "output.proj.*" [d_out, d_value] (nn/gated_output.hpp). false: y = m.
  bool silu_output = false;
  /// y <- sigmoid(w . x + b) y per token (Memory+'s `mem_gated`; "output.gate.*" [1, d_in]).
  bool sigmoid_gate = false;
  /// Width of the experts' output m (PEER's v rows, PKM's values); 0: d_out. Another width
  /// needs silu_output, whose projection maps it to d_out.
  Index d_value = 0;
  /// Pkm only: the values are a ValuePool shared with other layers (experts/values.hpp), set by
  /// the constructor Pkm(cfg, pool, seed); the layer's files then hold no value table (the pool
  /// is saved once, on its own: docs/pkm.md, "A value pool shared by layers").
  bool shared_values = false;
  bool check_finite = true;          ///< throw on NaN/Inf in x and dy (one pass over each)
  double norm_eps = 1e-5, norm_momentum = 0.1;
  /// How the expert tables are stored: native (T; trainable) or, for inference only with
  /// T = float, bf16 or int8 (core/compact_table.hpp). Retrieval always stays in T.
  TableStorage storage = TableStorage::native;
  /// Expert numbering (ExpertIds): row_major (the references'), or shells, which grow() needs.
  ExpertIds expert_ids = ExpertIds::row_major;
  /// What training leaves unchanged (FrozenSet; Peer/Pkm::freeze). Default: nothing.
  FrozenSet frozen;
};

namespace detail {

inline Index resolve_n_keys(const ProductKeyLayerConfig& c) {
  if (c.n_keys != 0) {
    SPEX_CHECK(c.n_keys >= 1 && c.n_keys <= kMaxProductKeys,
               "n_keys = " << c.n_keys << " must be in [1, " << kMaxProductKeys << "]");
    SPEX_CHECK(c.n_experts == 0 || c.n_experts == c.n_keys * c.n_keys,
               "n_experts = " << c.n_experts << " does not match n_keys = " << c.n_keys << " (N = n^2)");
    return c.n_keys;
  }
  SPEX_CHECK(c.n_experts >= 1, "give n_keys (n) or n_experts (N = n^2); got n_keys = " << c.n_keys
                                                                                       << ", n_experts = " << c.n_experts);
  const Index max_n = kMaxProductKeys;
  SPEX_CHECK(c.n_experts <= max_n * max_n, "n_experts = " << c.n_experts << " exceeds 2^40");
  Index n = static_cast<Index>(std::llround(std::sqrt(static_cast<double>(c.n_experts))));
  while (n * n > c.n_experts) --n;
  while ((n + 1) * (n + 1) <= c.n_experts) ++n;
  SPEX_CHECK(n * n == c.n_experts, "n_experts = " << c.n_experts << " is not a perfect square (N = n^2 for product keys)");
  return n;
}

/// Rows of each expert table: N, or heads * N with per-head tables.
inline Index table_rows(const ProductKeyLayerConfig& c) { return c.per_head_tables ? c.heads * c.n_experts : c.n_experts; }

inline ProductKeyLayerConfig resolve(ProductKeyLayerConfig c) {
  SPEX_CHECK(c.d_in >= 1, "d_in = " << c.d_in << " must be >= 1");
  SPEX_CHECK(c.d_out >= 0, "d_out = " << c.d_out << " must be >= 0 (0: same as d_in)");
  SPEX_CHECK(c.activation == kernels::Activation::identity || c.activation == kernels::Activation::relu ||
                 c.activation == kernels::Activation::gelu_tanh || c.activation == kernels::Activation::gelu_erf ||
                 c.activation == kernels::Activation::silu || c.activation == kernels::Activation::sigmoid,
             "activation = " << int(c.activation) << " is not a kernels::Activation");
  SPEX_CHECK(c.storage == TableStorage::native || c.storage == TableStorage::bf16 || c.storage == TableStorage::int8,
             "storage = " << int(c.storage) << " is not a TableStorage");
  c.n_keys = resolve_n_keys(c);
  c.n_experts = c.n_keys * c.n_keys;
  SPEX_CHECK(c.frozen.keys >= 0 && c.frozen.keys <= c.n_keys,
             "frozen.keys = " << c.frozen.keys << " must be in [0, n_keys = " << c.n_keys << "]");
  SPEX_CHECK(c.frozen.keys == 0 || c.frozen.keys == c.n_keys || c.expert_ids == ExpertIds::shells,
             "frozen.keys = " << c.frozen.keys << " of n_keys = " << c.n_keys
                              << " needs expert_ids = shells (under row_major the frozen experts are not a range of ids)");
  if (c.d_out == 0) c.d_out = c.d_in;
  SPEX_CHECK(c.d_value >= 0, "d_value = " << c.d_value << " must be >= 0 (0: same as d_out)");
  if (c.d_value == 0) c.d_value = c.d_out;
  SPEX_CHECK(c.silu_output || c.d_value == c.d_out, "d_value = " << c.d_value << " differs from d_out = " << c.d_out
                                                                 << ": only silu_output = true projects the experts' output to d_out");
  SPEX_CHECK(c.heads >= 1, "heads = " << c.heads << " must be >= 1");
  SPEX_CHECK(!c.shared_values || c.frozen.keys == 0, "frozen.keys = " << c.frozen.keys
                                                                     << " with shared_values: the experts' rows are the pool's, shared with other layers; "
                                                                        "freeze pool rows through the pool's gradient (ValuePool::grad())");
  checked_mul(checked_mul(c.n_experts, c.per_head_tables ? c.heads : 1, "the expert table rows n_experts * heads"),
              std::max(c.d_in, c.d_value), "the expert table size rows * d");
  return c;
}

inline KeyRetrievalConfig retrieval_config(const ProductKeyLayerConfig& c) {
  KeyRetrievalConfig r;
  r.d_in = c.d_in;
  r.n_keys = c.n_keys;
  r.heads = c.heads;
  r.top_k = c.top_k;
  r.d_key = c.d_key;
  r.score = c.score;
  r.norm = c.norm;
  r.norm_per_half = c.norm_per_half;
  r.shared_keys = c.shared_keys;
  r.learn_keys = c.learn_keys;
  r.query_bias = c.query_bias;
  r.norm_eps = c.norm_eps;
  r.norm_momentum = c.norm_momentum;
  r.expert_ids = c.expert_ids;
  r.frozen_key_rows = c.frozen.sub_keys ? c.frozen.keys : 0;
  r.frozen_query = c.frozen.query;
  return r;
}

/// `c` grown to n_new sub-key rows per half (ProductKeyLayer::grow, and the sharded layers'):
/// validated, `layer` naming the caller in errors.
inline ProductKeyLayerConfig grown_config(const ProductKeyLayerConfig& c, Index n_new, const char* layer) {
  SPEX_CHECK(c.expert_ids == ExpertIds::shells, layer << "::grow: experts numbered " << to_string(c.expert_ids)
                                                      << " would all change id; construct with expert_ids = ExpertIds::shells");
  SPEX_CHECK(n_new >= c.n_keys && n_new <= kMaxProductKeys,
             layer << "::grow: n_new = " << n_new << " must be in [n_keys = " << c.n_keys << ", " << kMaxProductKeys << "]");
  ProductKeyLayerConfig grown = c;
  grown.n_keys = n_new;
  grown.n_experts = n_new * n_new;
  checked_mul(checked_mul(grown.n_experts, grown.per_head_tables ? grown.heads : 1, "the expert table rows n_experts * heads"),
              std::max(grown.d_in, grown.d_out), "the expert table size rows * d");
  return grown;
}

}  // namespace detail
}  // namespace spex
