// Expert parallelism's traffic (dist/exchange.hpp) against its model, under mpirun:
//   mpirun -np P build/bench/bench/bench_dist_exchange
// Each rank retrieves h*k experts per token uniformly from N (what BatchNorm'd retrieval
// approaches), experts round robin over P ranks. Model, per token and direction: requests
// h*k * (16 + 4) bytes (two int64 and a float gate; on the way back a float per request in
// backward only), and one row of d floats per (token, owner) pair off the token's rank:
// E[owners] = P * (1 - (1 - 1/P)^(h*k)), of which (P - 1)/P of them elsewhere on average.
// Prints the measured counts (all ranks summed), the model, and the time of plan + to_owners +
// to_sources on this machine's transport (loopback here: a shared-memory copy, not a network).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include <spex/core/random.hpp>
#include <spex/dist/exchange.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const spex::Index n_experts = spex::Index(1) << 20, batch = 1024, d = 512;
  spex::dist::ExpertExchange<float> ex(MPI_COMM_WORLD);
  const spex::dist::ExpertPartition part(n_experts, ranks);
  if (rank == 0)
    std::printf("ranks %d, N = 2^20, batch %lld per rank, d = %lld, float\n%6s %12s %12s %14s %14s %12s\n", ranks,
                (long long)batch, (long long)d, "h*k", "owners/tok", "model", "off-rank B/tok", "model B/tok", "ms/batch");
  for (spex::Index m : {8, 32, 128}) {
    spex::Rng rng(1000 + std::uint64_t(rank));
    spex::IndexMat ids(batch, m);
    spex::RowMat<float> gates = spex::RowMat<float>::Constant(batch, m, 1.f / float(m)), x(batch, d), y(batch, d), xr;
    for (spex::Index t = 0; t < batch; ++t)
      for (spex::Index j = 0; j < m; ++j) ids(t, j) = spex::Index(rng.below(std::uint64_t(n_experts)));
    spex::fill_normal(x, 1.0, rng);
    std::vector<double> ms;
    for (int rep = 0; rep < 7; ++rep) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = std::chrono::steady_clock::now();
      ex.plan(ids, gates, part);
      ex.to_owners(x, xr);
      ex.to_sources(xr, y);  // the owners' rows straight back: the traffic of a forward
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    // Off-rank bytes per token, one direction: the requests and the token rows to other ranks.
    long long counts[3] = {(long long)ex.sent_token_rows(), (long long)ex.own_token_rows(), (long long)ex.sent_requests()};
    long long own_requests = 0;
    for (spex::Index t = 0; t < batch; ++t)
      for (spex::Index j = 0; j < m; ++j) own_requests += part.owner(ids(t, j)) == rank;
    long long all[3] = {0, 0, 0}, all_own_req = 0;
    MPI_Reduce(counts, all, 3, MPI_LONG_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    MPI_Reduce(&own_requests, &all_own_req, 1, MPI_LONG_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      const double tokens = double(batch) * ranks, p = ranks;
      const double owners = double(all[0]) / tokens;
      const double model_owners = p * (1 - std::pow(1 - 1 / p, double(m)));
      const double bytes = (double(all[0] - all[1]) * double(d) * 4 + double(all[2] - all_own_req) * 20) / tokens;
      const double model_bytes = model_owners * (p - 1) / p * double(d) * 4 + double(m) * (p - 1) / p * 20;
      std::printf("%6lld %12.3f %12.3f %14.0f %14.0f %12.3f\n", (long long)m, owners, model_owners, bytes, model_bytes,
                  ms[ms.size() / 2]);
    }
  }
  MPI_Finalize();
  return 0;
}
