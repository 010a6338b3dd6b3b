// The memory layers of today in spex: Memory+'s gated output and a value pool shared by two
// layers, PEER-pytorch's input RMSNorm and per-head tables with GLU experts, a padded batch
// with a token mask, and sparse memory finetuning (only the experts TF-IDF picks train).
#include <cstdio>
#include <memory>

#include <spex/spex.hpp>

int main() {
  // Memory+: two memory layers, each its own query network, keys and SiLU-gated output, one
  // value table (d_value 48) between them.
  spex::ProductKeyLayerConfig mem;
  mem.d_in = 32;
  mem.n_keys = 16;  // 256 slots
  mem.heads = 2;
  mem.top_k = 8;
  mem.d_key = 16;
  mem.norm = spex::NormKind::layer;  // per token: no statistics across a causal batch
  mem.shared_keys = false;
  mem.query_bias = true;
  mem.silu_output = true;            // y = W_o (m * silu(W_g x + b_g)) + b_o
  mem.d_value = 48;
  auto pool = std::make_shared<spex::ValuePool<float>>(256, 48, /*seed=*/9);
  spex::Pkm<float> first(mem, pool, /*seed=*/1), second(mem, pool, /*seed=*/2);

  auto g1 = first.make_grads();
  auto g2 = second.make_grads();
  spex::ParameterList<float> params = first.parameters(g1, "layers.0.");
  spex::append_parameters(params, second.parameters(g2, "layers.3."));
  spex::append_parameters(params, pool->parameters("pool."));  // the table once: one Adam state
  spex::Adam<float> adam(params, spex::AdamConfig{1e-3});

  spex::RowMat<float> x = spex::RowMat<float>::Random(64, 32), h(64, 32), y(64, 32);
  spex::Pkm<float>::Cache c1, c2;
  spex::zero_grads(params);
  first.forward(x, h, c1);
  second.forward(h, y, c2);
  second.backward(y, h, c2, g2);  // the loss 0.5 |y|^2
  first.backward(h, c1, g1);
  adam.step();
  std::printf("value pool: %lld rows with a gradient from both layers\n", (long long)pool->grad().nnz_rows());

  // PEER-pytorch's options: input RMSNorm, one table per head; GLU experts act(u.x)(w.x)v.
  spex::ProductKeyLayerConfig peer_cfg;
  peer_cfg.d_in = 32;
  peer_cfg.n_keys = 16;
  peer_cfg.heads = 4;
  peer_cfg.top_k = 4;
  peer_cfg.d_key = 16;
  peer_cfg.input_rmsnorm = true;
  peer_cfg.per_head_tables = true;
  peer_cfg.glu = true;
  spex::Peer<float> peer(peer_cfg, /*seed=*/3);
  std::printf("PEER: %lld experts in %lld table rows (per head), GLU\n", (long long)peer.n_experts(), (long long)peer.table_rows());

  // A padded batch: the BatchNorm of the default query norm sees the real tokens only.
  spex::ProductKeyLayerConfig bn = peer_cfg;
  bn.norm = spex::NormKind::batch;
  spex::Peer<float> padded(bn, 4);
  spex::TokenMask real(64);
  for (int t = 0; t < 64; ++t) real(t) = t < 48;  // the last 16 rows are padding
  spex::Peer<float>::Cache pc;
  auto pg = padded.make_grads();
  padded.forward(x, y, pc, real);
  padded.backward(y, pc, pg);  // padded rows' dy counts as zero

  // Sparse memory finetuning: background batches, then per step the new batch's top 32 slots.
  padded.freeze(spex::FrozenSet{0, true, true});  // the retrieval frozen
  auto fg = padded.make_grads();
  spex::TfIdfSlotRanking ranking(padded.n_experts());
  for (int b = 0; b < 4; ++b) {
    spex::RowMat<float> old = spex::RowMat<float>::Random(64, 32);
    padded.infer(old, y, pc);
    ranking.add_background(pc.retrieval.ids);
  }
  spex::RowMat<float> fresh = spex::RowMat<float>::Random(64, 32).array() + 1.0f;
  padded.forward(fresh, y, pc);
  padded.set_trainable_experts(fg, ranking.top(pc.retrieval.ids, 32));
  padded.backward(y, pc, fg);
  std::printf("sparse finetuning: %lld expert rows get a gradient\n", (long long)fg.experts.up.nnz_rows());
  return fg.experts.up.nnz_rows() > 0 && fg.experts.up.nnz_rows() <= 32 * 4 ? 0 : 1;
}
