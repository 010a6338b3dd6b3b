#pragma once
// The plain read of the rows PEER's expert step reads: the retrievals of the reference
// configurations' batches, the expert tables' raw bytes whatever their storage, and
// BM_PeerRowRead<S>, which reads the step's rows in its order and computes nothing (the step's
// ceiling with this access pattern on this machine). bench_peer reads the float tables beside
// the forward (scripts/bench.sh's roofline with the rows at this rate), bench_peer_infer every
// storage.
#include <cstdint>
#include <cstring>
#include <vector>

#include "peer_layers.hpp"

namespace spex_bench {

/// Retrievals of the config's input batches (the same for every storage), made once.
inline const std::vector<spex::Peer<float>::Cache>& peer_retrievals(int config) {
  static std::vector<spex::Peer<float>::Cache> caches[2];
  auto& c = caches[config];
  if (c.empty()) {
    c.resize(kPeerBatches);
    const auto s = kPeerShapes[config];
    spex::RowMat<float> y(s.batch, s.d);
    for (int i = 0; i < kPeerBatches; ++i) peer_layer(config).infer(peer_input(config, i), y, c[i]);
  }
  return c;
}

/// The expert tables' bytes, row length and distance between rows in bytes, whatever their
/// storage (the tables lie side by side: the stride is both rows').
struct RawTables {
  const char* down;
  const char* up;
  std::size_t row_bytes, stride;
};
inline RawTables raw_tables(const spex::Peer<float>& peer, spex::TableStorage storage, spex::Index d) {
  const auto& e = peer.experts();
  switch (storage) {
    case spex::TableStorage::bf16:
      return {reinterpret_cast<const char*>(e.compact_down().bf16()), reinterpret_cast<const char*>(e.compact_up().bf16()),
              std::size_t(d) * 2, std::size_t(e.compact_down().ld()) * 2};
    case spex::TableStorage::int8:
      return {reinterpret_cast<const char*>(e.compact_down().i8()), reinterpret_cast<const char*>(e.compact_up().i8()),
              std::size_t(d), std::size_t(e.compact_down().ld())};
    default:
      return {reinterpret_cast<const char*>(e.down().data()), reinterpret_cast<const char*>(e.up().data()), std::size_t(d) * 4,
              std::size_t(e.down_table().ld()) * 4};
  }
}

/// Loads one 8-byte word of every 64-byte line of the rows ids[0, m) (4 rows per pass, the first
/// line of each row prefetched 8 rows ahead: the fastest plain read of random rows measured
/// here) and returns their sum, so that nothing is optimized away.
inline std::uint64_t read_rows(const char* table, std::size_t row_bytes, std::size_t stride, const spex::Index* ids, std::size_t m) {
  std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::size_t r = 0;
  for (; r + 4 <= m; r += 4) {
    for (std::size_t q = 0; q < 4 && r + 8 + q < m; ++q) spex::kernels::prefetch_lines(table + std::size_t(ids[r + 8 + q]) * stride, 1);
    const char* a = table + std::size_t(ids[r]) * stride;
    const char* b = table + std::size_t(ids[r + 1]) * stride;
    const char* c = table + std::size_t(ids[r + 2]) * stride;
    const char* e = table + std::size_t(ids[r + 3]) * stride;
    for (std::size_t i = 0; i < row_bytes; i += 64) {
      std::uint64_t w[4];
      std::memcpy(&w[0], a + i, 8);
      std::memcpy(&w[1], b + i, 8);
      std::memcpy(&w[2], c + i, 8);
      std::memcpy(&w[3], e + i, 8);
      s0 += w[0];
      s1 += w[1];
      s2 += w[2];
      s3 += w[3];
    }
  }
  for (; r < m; ++r)
    for (std::size_t i = 0; i < row_bytes; i += 64) {
      std::uint64_t w;
      std::memcpy(&w, table + std::size_t(ids[r]) * stride + i, 8);
      s0 += w;
    }
  return s0 + s1 + s2 + s3;
}

/// Reads both tables' rows of every token's picks (u rows, then v rows), token by token over the
/// threads. Counter bytes/s: the rows' bytes (int8 scales not counted).
template <spex::TableStorage S>
void BM_PeerRowRead(benchmark::State& state) {
  const int config = int(state.range(0));
  const auto s = kPeerShapes[config];
  const RawTables t = raw_tables(peer_layer(config, S), S, s.d);
  const auto& caches = peer_retrievals(config);
  std::vector<std::uint64_t> sums(std::size_t(s.batch));
  int i = 0;
  for (auto _ : state) {
    const auto& ids = caches[i++ % kPeerBatches].retrieval.ids;
    const std::size_t m = std::size_t(ids.cols());
    spex::parallel_for(s.batch, [&](spex::Index tok, int) {
      const spex::Index* row = &ids(tok, 0);
      sums[std::size_t(tok)] = read_rows(t.down, t.row_bytes, t.stride, row, m) + read_rows(t.up, t.row_bytes, t.stride, row, m);
    });
    benchmark::DoNotOptimize(sums.data());
  }
  state.counters["bytes/s"] = benchmark::Counter(double(s.batch) * 2.0 * 8 * 16 * double(t.row_bytes),
                                                 benchmark::Counter::kIsIterationInvariantRate);
  tokens_counter(state, s.batch);
}

}  // namespace spex_bench
