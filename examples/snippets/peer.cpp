// PEER and PKM: a training step and inference (docs/quick_start.md).
#include <cstdio>

#include <spex/spex.hpp>

int main() {
  spex::Peer<float>::Config cfg;
  cfg.d_in = 64;             // d_out defaults to d_in
  cfg.n_experts = 64 * 64;   // N = n^2 single-neuron experts
  cfg.heads = 4;
  cfg.top_k = 8;             // experts per head
  cfg.d_key = 32;
  // Defaults: sub-keys shared by the heads, query BatchNorm, softmax scores, and sub-keys fixed
  // at their seeded initialization (cfg.learn_keys = true trains them, as the papers do;
  // docs/training.md says why the default is not to).
  spex::Peer<float> peer(cfg, /*seed=*/1);

  spex::RowMat<float> x = spex::RowMat<float>::Random(16, 64), y(16, 64), dy(16, 64), dx(16, 64);
  spex::Peer<float>::Cache cache;  // reuse it: no allocation once it has seen the largest batch
  auto grads = peer.make_grads();
  peer.forward(x, y, cache);            // training forward
  dy = y;                               // dL/dy of L = |y|^2 / 2
  peer.backward(dy, dx, cache, grads);  // grads accumulate; dx is assigned (dx may be dy itself)
  std::printf("rows of experts.up with a gradient: %lld of %lld\n", (long long)grads.experts.up.nnz_rows(),
              (long long)peer.n_experts());

  peer.infer(x, y);  // inference: const, thread-safe with one cache per thread

  spex::Pkm<float>::Config pkm_cfg = cfg;  // PKM: the same retrieval, value experts
  pkm_cfg.shared_keys = false;
  spex::Pkm<float> pkm(pkm_cfg, /*seed=*/2);
  pkm.infer(x, y);
  return y.allFinite() ? 0 : 1;
}
