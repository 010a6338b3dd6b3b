// Growing PEER from 128^2 to 256^2 experts (d = 512): the whole grow() against its two parts
// done alone, copying the old tables into tables of the new size and drawing the new rows, so
// that grow() shows it passes over the old tables once (grow ~ copy + draw).
//   build/bench/bench/bench_grow --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <spex/spex.hpp>

namespace {

constexpr spex::Index kD = 512, kN0 = 128, kN1 = 256;

spex::ProductKeyLayerConfig config() {
  spex::ProductKeyLayerConfig c;
  c.d_in = kD;
  c.n_keys = kN0;
  c.expert_ids = spex::ExpertIds::shells;
  return c;
}

const spex::Peer<float>& small_layer() {
  static const spex::Peer<float> layer(config(), 1);
  return layer;
}

void BM_PeerGrow(benchmark::State& state) {
  for (auto _ : state) {
    state.PauseTiming();
    spex::Peer<float> p = small_layer();
    state.ResumeTiming();
    p.grow(kN1, 2);
    benchmark::DoNotOptimize(p.experts().up().data());
  }
}

// What grow() cannot avoid, in two parts: the old rows copied into new tables of both kinds ...
void BM_PeerGrowPartCopy(benchmark::State& state) {
  const auto& e = small_layer().experts();
  for (auto _ : state) {
    spex::Table<float> down = e.down_table().grown(kN1 * kN1), up = e.up_table().grown(kN1 * kN1);
    benchmark::DoNotOptimize(down.data());
    benchmark::DoNotOptimize(up.data());
  }
  state.SetBytesProcessed(state.iterations() * 2 * kN0 * kN0 * kD * 4);
}

// ... and the new rows of both tables drawn (N(0, 1/d), as at construction) into memory never
// touched before (its first touch, page faults, is part of growing too).
void BM_PeerGrowPartDraw(benchmark::State& state) {
  for (auto _ : state) {
    spex::Table<float> down(kN1 * kN1 - kN0 * kN0, kD), up(kN1 * kN1 - kN0 * kN0, kD);
    spex::Rng rng(3);
    spex::fill_normal(down.mutable_matrix(), 1.0 / std::sqrt(double(kD)), rng);
    spex::fill_normal(up.mutable_matrix(), 1.0 / std::sqrt(double(kD)), rng);
    benchmark::DoNotOptimize(down.data());
    benchmark::DoNotOptimize(up.data());
  }
}

}  // namespace

BENCHMARK(BM_PeerGrow)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerGrowPartCopy)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PeerGrowPartDraw)->Unit(benchmark::kMillisecond)->UseRealTime();
