// sharded_training: compare_layers' model with its PEER block (the recall task's shape and
// sizes) trained with the PEER layer expert-parallel over MPI ranks (dist::ShardedPeer): every
// rank holds 1/P of the expert tables and takes its part of every batch of 128; the rest of
// the model (embeddings, norm, output layer) is replicated, its gradients summed over the
// ranks in rank order. The same seed gives the same model on any number of ranks, so the
// losses printed with 1, 2, ... ranks agree to float rounding (the sums' order differs).
//
//   mpirun -np P sharded_training [--steps N] [--facts N] [--n N] [--seed S]
//
// Prints the whole batch's loss every 10 steps, the final loss over every fact, and per rank
// the bytes of its expert tables.
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <spex/dist/layers.hpp>

#include "compare/data.hpp"
#include "compare/model.hpp"
#include "compare/options.hpp"
#include "compare/shapes.hpp"
#include "example_setup.hpp"

namespace {

using compare::Index;
using Block = spex::dist::ShardedPeer<float>;

struct Options {
  int steps = 300;
  int facts = 8192;
  Index n = 128;
  std::uint64_t seed = 7;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto count = [&]() {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return compare::parse_count(a, argv[++i]);
    };
    if (a == "--steps") o.steps = count();
    else if (a == "--facts") o.facts = count();
    else if (a == "--n") o.n = count();
    else if (a == "--seed") o.seed = std::uint64_t(count());
    else throw std::invalid_argument("unknown option " + a + "\nusage: mpirun -np P sharded_training [--steps N] [--facts N] [--n N] [--seed S]");
  }
  return o;
}

/// Rows [n r / P, n (r + 1) / P) of `rows`: this rank's part of a batch.
std::vector<std::size_t> my_part(const std::vector<std::size_t>& rows, int rank, int ranks) {
  const std::size_t n = rows.size(), first = n * std::size_t(rank) / std::size_t(ranks), last = n * std::size_t(rank + 1) / std::size_t(ranks);
  return std::vector<std::size_t>(rows.begin() + std::ptrdiff_t(first), rows.begin() + std::ptrdiff_t(last));
}

int run(const Options& o, int rank, int ranks) {
  const compare::Dataset data = compare::recall(o.facts, compare::recall_shape(o.n, {o.n}).context - 1, 5);
  const compare::TaskShape ts = compare::recall_shape(o.n, {o.n});
  spex::ProductKeyLayerConfig peer = compare::pk_config(ts, o.n, ts.peer_k, false);
  peer.d_key = compare::d_key_for_budget<spex::Peer<float>>(peer, o.n, compare::dense_block_flops(ts));
  compare::Model<Block> model(data.vocab, data.context, ts.emb, std::make_unique<Block>(peer, o.seed + 7, MPI_COMM_WORLD),
                              compare::kPeakLr, o.seed);
  const spex::dist::RankOrderSum sum(MPI_COMM_WORLD);
  std::vector<std::int64_t> row_buffer;
  std::vector<float> value_buffer;
  model.set_gradient_sum([&](spex::ParameterList<float>& own) {
    for (auto& p : own) {
      if (p.sparse_grad) spex::dist::sum_rows_over_ranks(*p.sparse_grad, MPI_COMM_WORLD, row_buffer, value_buffer);
      else if (p.grad) sum.sum(p.grad, p.size());
    }
  });
  if (rank == 0)
    std::printf("sharded_training: recall, %d facts, PEER N = %lld^2 (h %lld, k %lld, d_key %lld) over %d rank(s), batch %lld, %d steps\n",
                o.facts, (long long)o.n, (long long)peer.heads, (long long)peer.top_k, (long long)peer.d_key, ranks,
                (long long)compare::kBatch, o.steps);
  spex::Rng rng(o.seed + 1);
  std::vector<std::size_t> rows(compare::kBatch);
  for (int step = 1; step <= o.steps; ++step) {
    for (auto& r : rows) r = rng.below(data.n_train());  // the same batch on every rank
    const std::vector<std::size_t> mine = my_part(rows, rank, ranks);
    model.optimizer().set_lr(compare::learning_rate(step, o.steps, compare::kPeakLr));
    double loss = model.train_step(data.train_x, data.train_y, mine, compare::kBatch).loss * double(mine.size());
    sum.sum(&loss, 1);
    if (rank == 0 && (step % 10 == 0 || step == o.steps)) std::printf("step %5d  loss %.6f\n", step, loss / double(compare::kBatch));
  }
  // Every fact, 512 at a time, each batch split over the ranks (every rank evaluates every batch).
  double total = 0;
  for (std::size_t first = 0; first < data.n_val(); first += 512) {
    const std::size_t n = std::min<std::size_t>(512, data.n_val() - first);
    SPEX_CHECK(n >= std::size_t(ranks), "an evaluation batch of " << n << " facts cannot be split over " << ranks << " ranks");
    const std::size_t a = first + n * std::size_t(rank) / std::size_t(ranks), b = first + n * std::size_t(rank + 1) / std::size_t(ranks);
    total += model.evaluate(data.val_x, data.val_y, a, b - a) * double(b - a);
  }
  sum.sum(&total, 1);
  if (rank == 0) std::printf("final loss over all facts %.6f\n", total / double(data.n_val()));
  for (int r = 0; r < ranks; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    if (r == rank)
      std::printf("rank %d: expert tables %.2f MiB (%lld of %lld experts)\n", rank, double(model.block().table_bytes()) / (1 << 20),
                  (long long)model.block().dispatch().partition().local_rows(rank), (long long)model.block().n_experts());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1, rc = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  if (rank == 0) example_setup();
  else std::setvbuf(stdout, nullptr, _IOLBF, 0);
  try {
    rc = run(parse(argc, argv), rank, ranks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sharded_training (rank %d): %s\n", rank, e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
