// Expert-parallel PEER's training step (dist::ShardedPeer) under mpirun, against its model:
//   mpirun -np P build/bench/bench/bench_dist_layers [d] [n] [batch per rank]
// (defaults 512, 256, 512: N = 65536 experts, h = 8, k = 16, d_key = 128, BatchNorm, float).
// Prints, from 7 steps (forward + backward; median time):
//  - the step time of the sharded layer, and of Peer in one process on the same per-rank batch;
//  - bytes each rank sent to the others per token and step (the exchange's counters) against the
//    model: requests h*k (P - 1)/P * (16 + 4 + 4) bytes (two int64 and the gate out, the gate
//    gradient back) and d_in + d_out + d_out + d_in floats (x, partial y, dy, partial dx) per
//    (token, owner) pair off the token's rank, E = (P - 1)(1 - (1 - 1/P)^(h*k)) of them;
//  - the replicated part's bytes per step (gradient sums and BatchNorm statistics, rank-order
//    gather: (P - 1) copies of this rank's part);
//  - the expert table bytes a token reads on its owners in forward, h*k*(d_in + d_out)*4;
//  - the expert tables' memory per rank (1/P of one process's);
//  - from the one-process step time and the bytes model (tokens and, per step, the replicated
//    part): tokens/s per machine for P machines at 25 and 100 Gbit/s, with communication not
//    overlapped (as spex runs it) and the batch per rank above.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <spex/dist/layers.hpp>
#include <spex/layers/peer.hpp>

namespace {

using spex::Index;
using Mat = spex::RowMat<float>;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Off-rank bytes per token and step the model predicts for P ranks.
double model_bytes(double p, double hk, double d_in, double d_out) {
  if (p == 1) return 0;
  const double off_owners = (p - 1) * (1 - std::pow(1 - 1 / p, hk));
  return hk * (p - 1) / p * (16 + 4 + 4) + off_owners * 4 * (2 * d_in + 2 * d_out);
}

/// The times (ms) of `steps` training steps (forward + backward) of `layer` on x, dy; every rank
/// starts each step together.
template <class L>
std::vector<double> step_times(L& layer, typename L::Cache& c, const Mat& x, const Mat& dy, int steps) {
  auto g = layer.make_grads();
  Mat y(x.rows(), layer.d_out()), dx(x.rows(), layer.d_in());
  std::vector<double> ms;
  for (int step = 0; step < steps; ++step) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    g.zero();
    layer.forward(x, y, c);
    layer.backward(dy, dx, c, g);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return ms;
}

/// The replicated part's off-rank bytes per rank and step: the query weight's and the norm's
/// gradients, BatchNorm's sums (2 forward, 2 backward per feature) and token count, each sent
/// to the P - 1 other ranks (rank-order gather).
double replicated_model(double p, double d_in, double hdk) { return (p - 1) * (4 * (d_in * hdk + 2 * hdk + 4 * hdk) + 8); }

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const Index d = argc > 1 ? std::atoll(argv[1]) : 512, n = argc > 2 ? std::atoll(argv[2]) : 256,
              batch = argc > 3 ? std::atoll(argv[3]) : 512;
  spex::ProductKeyLayerConfig cfg;
  cfg.d_in = d;
  cfg.n_keys = n;
  cfg.heads = 8;
  cfg.top_k = 16;
  cfg.d_key = 128;
  spex::dist::ShardedPeer<float> sharded(cfg, 1, MPI_COMM_WORLD);
  spex::Rng rng(10 + std::uint64_t(rank));
  Mat x(batch, d), dy(batch, d);
  spex::fill_normal(x, 1.0, rng);
  spex::fill_normal(dy, 1.0, rng);
  spex::dist::ShardedPeer<float>::Cache c;
  step_times(sharded, c, x, dy, 2);  // warm-up; the counters start after it
  const std::uint64_t bytes0 = c.dispatch.exchange.off_rank_bytes(), rep0 = sharded.dispatch().replicated_bytes();
  const std::vector<double> ms = step_times(sharded, c, x, dy, 7);
  const double steps = double(ms.size());
  double mine[2] = {double(c.dispatch.exchange.off_rank_bytes() - bytes0) / steps / double(batch), double(sharded.dispatch().replicated_bytes() - rep0) / steps};
  double mean[2] = {0, 0};
  MPI_Reduce(mine, mean, 2, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  const double sharded_ms = median(ms);
  const std::size_t table_bytes = sharded.table_bytes();

  // One process: Peer on this rank's batch (every rank, so each has the same load on its core).
  double full_ms = 0, full_tables = 0;
  {
    spex::Peer<float> full(cfg, 1);
    spex::Peer<float>::Cache fc;
    step_times(full, fc, x, dy, 2);
    full_ms = median(step_times(full, fc, x, dy, 7));
    full_tables = double(full.table_bytes());
  }
  if (rank == 0) {
    const double p = ranks, hk = double(cfg.heads * cfg.top_k);
    std::printf("P = %d ranks, d = %lld, N = %lld^2, h*k = %.0f, d_key = %lld, %lld tokens per rank, float, %d threads per rank\n", ranks,
                (long long)d, (long long)n, hk, (long long)cfg.d_key, (long long)batch, spex::max_threads());
    std::printf("step (forward + backward), median of 7: sharded %.2f ms, Peer in one process on the same tokens %.2f ms\n", sharded_ms,
                full_ms);
    std::printf("off-rank bytes per token and step: measured %.0f (mean over the ranks), model %.0f\n", mean[0] / p,
                model_bytes(p, hk, double(d), double(d)));
    const double hdk = double(cfg.heads * cfg.d_key);
    std::printf("replicated part, bytes per rank and step: measured %.0f, model %.0f (%.0f per token)\n", mean[1] / p,
                replicated_model(p, double(d), hdk), mean[1] / p / double(batch));
    std::printf("expert bytes a token reads on its owners in forward: %.0f\n", hk * 2 * double(d) * 4);
    std::printf("expert tables per rank: %.1f MiB (one process: %.1f MiB, ratio %.3f)\n", double(table_bytes) / (1 << 20),
                full_tables / (1 << 20), double(table_bytes) / full_tables);
    std::printf("model, tokens/s per machine (one-process step time of this machine's rank + bytes / bandwidth):\n");
    std::printf("%6s %14s %14s %14s\n", "P", "bytes/token", "25 Gbit/s", "100 Gbit/s");
    const double compute_s = full_ms / 1e3 / double(batch);
    for (int machines : {1, 2, 4, 8, 16, 64}) {
      const double b = model_bytes(machines, hk, double(d), double(d)) + replicated_model(machines, double(d), hdk) / double(batch);
      std::printf("%6d %14.0f %14.0f %14.0f\n", machines, b, 1 / (compute_s + b / (25e9 / 8)), 1 / (compute_s + b / (100e9 / 8)));
    }
  }
  MPI_Finalize();
  return 0;
}
