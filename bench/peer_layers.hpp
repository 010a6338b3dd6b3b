#pragma once
// The PEER layers the PEER benchmarks share: the two reference configurations, each built once
// per table storage, and distinct input batches to cycle through.
#include <memory>

#include "bench_common.hpp"

namespace spex_bench {

// Config 0: d = 256, N = 256^2, batch 512, d_key 128. Config 1: d = 512, N = 1024^2, batch 256,
// d_key 256. Both h = 8, k = 16, softmax scores, GELU experts, no query norm (the PyTorch
// reference the first PEER benchmarks measured).
struct PeerShape {
  spex::Index d, n, batch, d_key;
};
constexpr PeerShape kPeerShapes[] = {{256, 256, 512, 128}, {512, 1024, 256, 256}};

/// The layer of `config` with its expert tables stored as `storage` (same seed: a compact
/// layer's tables are the float layer's, rounded or quantized).
inline spex::Peer<float>& peer_layer(int config, spex::TableStorage storage = spex::TableStorage::native) {
  static std::unique_ptr<spex::Peer<float>> layers[2][3];
  auto& slot = layers[config][int(storage)];
  if (!slot) {
    const PeerShape s = kPeerShapes[config];
    spex::Peer<float>::Config cfg;
    cfg.d_in = s.d;
    cfg.n_keys = s.n;
    cfg.heads = 8;
    cfg.top_k = 16;
    cfg.d_key = s.d_key;
    cfg.norm = spex::NormKind::none;
    cfg.activation = spex::kernels::Activation::gelu_erf;
    cfg.storage = storage;
    slot = std::make_unique<spex::Peer<float>>(cfg, 1);
  }
  return *slot;
}

// Distinct input batches, cycled through: the same batch over and over would find its expert
// rows in the L3 of these VMs instead of memory.
constexpr int kPeerBatches = 8;
inline const spex::RowMat<float>& peer_input(int config, int i) {
  const PeerShape s = kPeerShapes[config];
  return random_matrix(s.batch, s.d, 100 + 10 * config + i);
}

inline void tokens_counter(benchmark::State& state, spex::Index batch) {
  state.counters["tokens/s"] = benchmark::Counter(double(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(label());
}

}  // namespace spex_bench
