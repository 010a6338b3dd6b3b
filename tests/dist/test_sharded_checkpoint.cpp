// Sharded checkpoints (dist/checkpoint.hpp) under mpirun with P ranks: a ShardedPeer and a
// ShardedMoE (ReLU router) trained 2 Adam steps, saved with the optimizer, the lambda and a
// LambdaController, loaded into layers built from another seed with a fresh optimizer, and both
// trained 2 more steps: every parameter and optimizer state equal bit for bit. Resharding (P - 1
// ranks to P and back) against the one-process layer. Refused on every rank: another config, a
// directory mixing two writes, a missing shard. A value pool shared by two ShardedPkm layers: resumed
// bit for bit, and resharded.
#include <spex/dist/checkpoint.hpp>
#include <spex/layers/moe.hpp>
#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>
#include <spex/optim/adam.hpp>

#include <filesystem>
#include <memory>
#include <utility>
#include <unistd.h>

#include "dist_test_util.hpp"

namespace {

using namespace dist_test;

/// A directory every rank knows (rank 0 makes it).
std::string shared_temp_dir() {
  char path[256] = "/tmp/spex_dist_ckpt_XXXXXX";
  if (rank == 0 && !mkdtemp(path)) path[0] = 0;
  MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

template <class L>
void train(L& layer, spex::Adam<double>& adam, typename L::Grads& g, spex::Rng& rng, int steps) {
  typename L::Cache c;
  Mat x(5, layer.d_in()), y(5, layer.d_out()), dy(5, layer.d_out());
  for (int s = 0; s < steps; ++s) {
    spex::fill_normal(x, 1.0, rng);
    spex::fill_normal(dy, 1.0, rng);
    g.zero();
    layer.forward(x, y, c);
    layer.backward(dy, c, g);
    adam.step();
  }
}

void expect_same(const spex::ParameterList<const double>& a, const spex::ParameterList<const double>& b, const std::string& what) {
  expect(a.size() == b.size(), what + ": the same lists");
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    expect(a[i].name == b[i].name && Mat(a[i].value_map()) == Mat(b[i].value_map()), what + ": " + a[i].name + " bit for bit");
}

template <class L>
void check(const std::string& name, const typename L::Config& cfg, const std::string& dir) {
  const std::string tag = name + ": ";
  L a(cfg, 1, MPI_COMM_WORLD), b(cfg, 2, MPI_COMM_WORLD);
  auto ga = a.make_grads();
  auto gb = b.make_grads();
  spex::AdamConfig ac;
  ac.lr = 1e-2;
  spex::Adam<double> adam_a(a.parameters(ga), ac), adam_b(b.parameters(gb), ac);
  auto controller = spex::LambdaController::for_small_batches(0.5), other = spex::LambdaController(0.25);
  if constexpr (L::kName == std::string_view("ShardedMoE")) a.set_lambda(0.125);
  spex::Rng rng(100 + rank), rng_b = rng;
  train(a, adam_a, ga, rng, 2);
  controller.update(0.3);
  spex::dist::ShardedCheckpointWriter w(MPI_COMM_WORLD);
  w.add_layer("layer.", a).add_optimizer("adam.", adam_a);
  w.replicated().add_state("controller", controller);
  w.write(dir);

  spex::dist::ShardedCheckpointLoader ld(dir, MPI_COMM_WORLD);
  ld.layer(b, "layer.").optimizer(adam_b, "adam.");
  ld.replicated().state(other, "controller");
  ld.commit();
  expect(other.state().lambda == controller.state().lambda && other.rule() == controller.rule(), tag + "the controller");
  if constexpr (L::kName == std::string_view("ShardedMoE")) expect(b.lambda() == 0.125, tag + "lambda");
  expect(adam_b.steps() == adam_a.steps(), tag + "Adam's steps");
  rng_b = rng;
  train(a, adam_a, ga, rng, 2);
  train(b, adam_b, gb, rng_b, 2);
  expect_same(std::as_const(a).parameters(), std::as_const(b).parameters(), tag + "parameters after resuming");
  expect_same(std::as_const(adam_a).state(), std::as_const(adam_b).state(), tag + "Adam's state after resuming");

  // Another config: refused on every rank, nothing loaded.
  typename L::Config other_cfg = cfg;
  other_cfg.d_out = cfg.d_in + 1;
  L c(other_cfg, 3, MPI_COMM_WORLD);
  bool refused = false;
  try {
    spex::dist::ShardedCheckpointLoader(dir, MPI_COMM_WORLD).layer(c, "layer.");
  } catch (const spex::Error& e) {
    refused = std::string(e.what()).find("config") != std::string::npos || std::string(e.what()).find("refused") != std::string::npos;
  }
  expect(refused, tag + "another config is refused");
}

/// The one-process values of the experts comm rank `r` of `p` holds: expert e = i p + r is
/// block i of the shard (an expert is full.rows() / n rows).
Mat shard_of(const Mat& full, Index n, int r, int p) {
  const Index block = full.rows() / n, mine = spex::RowStride{r, p}.rows_of(n);
  Mat out(mine * block, full.cols());
  for (Index i = 0; i < mine; ++i) out.middleRows(i * block, block) = full.middleRows((i * p + r) * block, block);
  return out;
}

/// Every value of `sharded` (a layer's or an optimizer's list on rank r of p) against the
/// one-process `full` list: the shards' rows against their experts' rows.
void expect_as_full(const spex::ParameterList<const double>& sharded, const spex::ParameterList<const double>& full, Index n, int r,
                    int p, const std::string& what) {
  expect(sharded.size() == full.size(), what + ": the same lists");
  for (std::size_t i = 0; i < std::min(sharded.size(), full.size()); ++i) {
    const Mat f = full[i].value_map(), s = sharded[i].value_map();
    const Mat want = spex::dist::is_sharded_name(full[i].name) ? shard_of(f, n, r, p) : f;
    expect(sharded[i].name == full[i].name && rel_diff(s, want) <= 1e-12, what + ": " + sharded[i].name);
  }
}

/// Resharding: layer L trained 2 Adam steps on the first P - 1 ranks (sub-communicator), saved,
/// loaded on all P ranks, trained 1 step, saved, loaded on P - 1 ranks again: every time each
/// rank's values and Adam state equal those of the one-process layer `Full` trained alongside on
/// the same batches (1e-12; the sharded layers' own tolerance), experts' rows at their new place.
template <class L, class Full>
void check_reshard(const std::string& name, const typename L::Config& cfg, const std::string& dir) {
  if (ranks < 2) return;
  const std::string tag = name + ", resharding: ";
  MPI_Comm small;
  MPI_Comm_split(MPI_COMM_WORLD, rank < ranks - 1 ? 0 : MPI_UNDEFINED, rank, &small);
  const std::string from_small = dir + "/small", from_all = dir + "/all";
  if (rank == 0) {
    std::filesystem::create_directory(from_small);
    std::filesystem::create_directory(from_all);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  spex::AdamConfig ac;
  ac.lr = 1e-2;
  Full full(cfg, 4);
  auto fg = full.make_grads();
  spex::Adam<double> full_adam(full.parameters(fg), ac);
  typename Full::Cache fc;
  spex::Rng rng(77);
  const Index total = 12;
  Mat x(total, full.d_in()), dy(total, full.d_out());
  // One step of the one-process layer and of `layer` (its comm's part of the same batch).
  auto step = [&](L* layer, typename L::Grads* g, spex::Adam<double>* adam, MPI_Comm comm) {
    spex::fill_normal(x, 1.0, rng);
    spex::fill_normal(dy, 1.0, rng);
    Mat y(total, full.d_out());
    fg.zero();
    full.forward(x, y, fc);
    full.backward(dy, fc, fg);
    full_adam.step();
    if (!layer) return;
    int r = 0, p = 1;
    MPI_Comm_rank(comm, &r);
    MPI_Comm_size(comm, &p);
    const Index first = total * r / p, b = total * (r + 1) / p - first;
    typename L::Cache c;
    Mat ys(b, full.d_out());
    g->zero();
    layer->forward(x.middleRows(first, b), ys, c);
    layer->backward(dy.middleRows(first, b), c, *g);
    adam->step();
  };
  const Index n = full.n_experts();
  {
    std::unique_ptr<L> a;
    std::unique_ptr<typename L::Grads> ga;
    std::unique_ptr<spex::Adam<double>> adam_a;
    if (small != MPI_COMM_NULL) {
      a = std::make_unique<L>(cfg, 4, small);
      ga = std::make_unique<typename L::Grads>(a->make_grads());
      adam_a = std::make_unique<spex::Adam<double>>(a->parameters(*ga), ac);
    }
    for (int s = 0; s < 2; ++s) step(a.get(), ga.get(), adam_a.get(), small);
    if (small != MPI_COMM_NULL) spex::dist::ShardedCheckpointWriter(small).add_layer("l.", *a).add_optimizer("adam.", *adam_a).write(from_small);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  L b(cfg, 5, MPI_COMM_WORLD);
  auto gb = b.make_grads();
  spex::Adam<double> adam_b(b.parameters(gb), ac);
  spex::dist::ShardedCheckpointLoader ld(from_small, MPI_COMM_WORLD);
  expect(ld.resharding(), tag + "a checkpoint of P - 1 ranks loads on P");
  ld.layer(b, "l.").optimizer(adam_b, "adam.").commit();
  expect_as_full(std::as_const(b).parameters(), std::as_const(full).parameters(), n, rank, ranks, tag + "P - 1 to P");
  expect_as_full(std::as_const(adam_b).state(), std::as_const(full_adam).state(), n, rank, ranks, tag + "P - 1 to P, Adam");
  expect(adam_b.steps() == 2, tag + "Adam's steps");
  step(&b, &gb, &adam_b, MPI_COMM_WORLD);
  expect_as_full(std::as_const(b).parameters(), std::as_const(full).parameters(), n, rank, ranks, tag + "a step on P");
  spex::dist::ShardedCheckpointWriter(MPI_COMM_WORLD).add_layer("l.", b).add_optimizer("adam.", adam_b).write(from_all);
  if (small != MPI_COMM_NULL) {
    int r = 0;
    MPI_Comm_rank(small, &r);
    L c(cfg, 6, small);
    auto gc = c.make_grads();
    spex::Adam<double> adam_c(c.parameters(gc), ac);
    spex::dist::ShardedCheckpointLoader(from_all, small).layer(c, "l.").optimizer(adam_c, "adam.").commit();
    expect_as_full(std::as_const(c).parameters(), std::as_const(full).parameters(), n, r, ranks - 1, tag + "P to P - 1");
    expect_as_full(std::as_const(adam_c).state(), std::as_const(full_adam).state(), n, r, ranks - 1, tag + "P to P - 1, Adam");
    MPI_Comm_free(&small);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

/// Memory+ under expert parallelism: two Pkm layers reading one value pool, one Adam over the
/// layers and the pool (listed once). L is spex::Pkm (one process, a whole pool) or
/// dist::ShardedPkm (a pool sharded over comm).
template <class L>
struct PooledMemory {
  std::shared_ptr<spex::ValuePool<double>> pool;
  std::unique_ptr<L> a, b;
  std::unique_ptr<typename L::Grads> ga, gb;  // pinned: the parameter list points into them
  spex::ParameterList<double> params;
  std::unique_ptr<spex::Adam<double>> adam;
  MPI_Comm comm;

  PooledMemory(const spex::ProductKeyLayerConfig& cfg, std::uint64_t seed, MPI_Comm c) : comm(c) {
    const Index slots = spex::detail::table_rows(spex::detail::resolve(cfg));
    if constexpr (L::kName == std::string_view("ShardedPkm")) {
      pool = spex::dist::sharded_value_pool<double>(slots, cfg.d_value, seed, comm);
      a = std::make_unique<L>(cfg, pool, seed + 1, comm);
      b = std::make_unique<L>(cfg, pool, seed + 2, comm);
    } else {
      pool = std::make_shared<spex::ValuePool<double>>(slots, cfg.d_value, seed);
      a = std::make_unique<L>(cfg, pool, seed + 1);
      b = std::make_unique<L>(cfg, pool, seed + 2);
    }
    ga = std::make_unique<typename L::Grads>(a->make_grads());
    gb = std::make_unique<typename L::Grads>(b->make_grads());
    params = a->parameters(*ga, "a.");
    spex::append_parameters(params, b->parameters(*gb, "b."));
    spex::append_parameters(params, pool->parameters("pool."));
    spex::AdamConfig ac;
    ac.lr = 1e-2;
    adam = std::make_unique<spex::Adam<double>>(params, ac);
  }
  /// One step on this process's part (comm's rank order) of the batch x, dy_a, dy_b.
  void step(const Mat& x, const Mat& dya, const Mat& dyb, bool whole_batch) {
    int r = 0, p = 1;
    if (!whole_batch) {
      MPI_Comm_rank(comm, &r);
      MPI_Comm_size(comm, &p);
    }
    const Index total = x.rows(), first = total * r / p, n = total * (r + 1) / p - first;
    typename L::Cache ca, cb;
    Mat ya(n, a->d_out()), yb(n, b->d_out());
    spex::zero_grads(params);
    a->forward(x.middleRows(first, n), ya, ca);
    b->forward(x.middleRows(first, n), yb, cb);
    a->backward(dya.middleRows(first, n), ca, *ga);
    b->backward(dyb.middleRows(first, n), cb, *gb);
    adam->step();
  }
  spex::ParameterList<const double> values() const {
    auto v = std::as_const(*a).parameters("a.");
    spex::append_parameters(v, std::as_const(*b).parameters("b."));
    spex::append_parameters(v, std::as_const(*pool).parameters("pool."));
    return v;
  }
  void save(const std::string& dir) const {
    spex::dist::ShardedCheckpointWriter(comm).add_layer("a.", *a).add_layer("b.", *b).add_pool("pool.", *pool).add_optimizer("adam.", *adam).write(dir);
  }
  void load(const std::string& dir) {
    spex::dist::ShardedCheckpointLoader(dir, comm).layer(*a, "a.").layer(*b, "b.").pool(*pool, "pool.").optimizer(*adam, "adam.").commit();
  }
};

/// A shared value pool in a sharded checkpoint: saved and loaded with its two layers and the
/// optimizer, training resumes bit for bit; resharded from P - 1 ranks to P, every rank's pool
/// rows and their Adam state are the one-process pool's (1e-12).
void check_value_pool(const std::string& dir) {
  spex::ProductKeyLayerConfig cfg;
  cfg.d_in = 8;
  cfg.n_keys = 5;  // 25 slots: unequal shards
  cfg.heads = 2;
  cfg.top_k = 3;
  cfg.d_key = 4;
  cfg.norm = spex::NormKind::layer;
  cfg.shared_keys = false;
  cfg.silu_output = true;
  cfg.d_value = 6;
  const std::string tag = "two ShardedPkm layers sharing a value pool: ";
  spex::Rng rng(300);
  Mat x(9, cfg.d_in), dya(9, cfg.d_in), dyb(9, cfg.d_in);
  auto batch = [&] {
    spex::fill_normal(x, 1.0, rng);
    spex::fill_normal(dya, 1.0, rng);
    spex::fill_normal(dyb, 1.0, rng);
  };
  using Sharded = PooledMemory<spex::dist::ShardedPkm<double>>;
  Sharded first(cfg, 10, MPI_COMM_WORLD), second(cfg, 20, MPI_COMM_WORLD);
  PooledMemory<spex::Pkm<double>> full(cfg, 10, MPI_COMM_WORLD);
  for (int s = 0; s < 2; ++s) {
    batch();
    first.step(x, dya, dyb, false);
    full.step(x, dya, dyb, true);
  }
  const std::string same = dir + "/pool_same";
  if (rank == 0) std::filesystem::create_directory(same);
  MPI_Barrier(MPI_COMM_WORLD);
  first.save(same);
  second.load(same);
  for (int s = 0; s < 2; ++s) {
    batch();
    first.step(x, dya, dyb, false);
    second.step(x, dya, dyb, false);
    full.step(x, dya, dyb, true);
  }
  expect_same(first.values(), second.values(), tag + "parameters after resuming");
  expect_same(std::as_const(*first.adam).state(), std::as_const(*second.adam).state(), tag + "Adam's state after resuming");
  const Index slots = full.pool->n_slots();
  expect_as_full(first.values(), full.values(), slots, rank, ranks, tag + "as one process");
  if (ranks < 2) return;
  // Resharding: P - 1 ranks train and save, P ranks load.
  MPI_Comm small;
  MPI_Comm_split(MPI_COMM_WORLD, rank < ranks - 1 ? 0 : MPI_UNDEFINED, rank, &small);
  const std::string from_small = dir + "/pool_small";
  if (rank == 0) std::filesystem::create_directory(from_small);
  MPI_Barrier(MPI_COMM_WORLD);
  PooledMemory<spex::Pkm<double>> reference(cfg, 40, MPI_COMM_WORLD);
  {
    std::unique_ptr<Sharded> on_small;
    if (small != MPI_COMM_NULL) on_small = std::make_unique<Sharded>(cfg, 40, small);
    for (int s = 0; s < 2; ++s) {
      batch();
      if (on_small) on_small->step(x, dya, dyb, false);
      reference.step(x, dya, dyb, true);
    }
    if (on_small) on_small->save(from_small);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  Sharded all(cfg, 50, MPI_COMM_WORLD);
  all.load(from_small);
  expect_as_full(all.values(), reference.values(), slots, rank, ranks, tag + "P - 1 to P");
  expect_as_full(std::as_const(*all.adam).state(), std::as_const(*reference.adam).state(), slots, rank, ranks, tag + "P - 1 to P, Adam");
  if (small != MPI_COMM_NULL) MPI_Comm_free(&small);
  MPI_Barrier(MPI_COMM_WORLD);
}

void check_mixed_directory(const spex::ProductKeyLayerConfig& cfg, const std::string& dir) {
  spex::dist::ShardedPeer<double> a(cfg, 1, MPI_COMM_WORLD);
  const std::string other = dir + "/other";
  if (rank == 0) std::filesystem::create_directory(other);
  MPI_Barrier(MPI_COMM_WORLD);
  spex::dist::ShardedCheckpointWriter(MPI_COMM_WORLD).add_layer("layer.", a).write(dir);
  spex::dist::ShardedCheckpointWriter(MPI_COMM_WORLD).add_layer("layer.", a).write(other);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == ranks - 1) {  // the last rank's shard from the other write
    const std::string f = "/shard-" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ".safetensors";
    std::filesystem::copy_file(other + f, dir + f, std::filesystem::copy_options::overwrite_existing);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  bool refused = false;
  try {
    spex::dist::ShardedCheckpointLoader ld(dir, MPI_COMM_WORLD);
  } catch (const spex::Error&) {
    refused = true;
  }
  expect(refused, "a shard of another write is refused on every rank");
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) std::filesystem::remove(dir + "/shard-0-of-" + std::to_string(ranks) + ".safetensors");
  MPI_Barrier(MPI_COMM_WORLD);
  refused = false;
  try {
    spex::dist::ShardedCheckpointLoader ld(dir, MPI_COMM_WORLD);
  } catch (const spex::Error&) {
    refused = true;
  }
  expect(refused, "a missing shard is refused on every rank");
}

// A checkpoint of P - 1 ranks loaded on P (resharding maps every old shard) with one old shard
// missing, and a layer of another config: every
// rank gets the same error, none waits for ever.
void check_reshard_failures(const spex::ProductKeyLayerConfig& cfg, const std::string& dir) {
  if (ranks < 2) return;
  const int r = rank < ranks - 1 ? rank : MPI_UNDEFINED;
  MPI_Comm small;
  MPI_Comm_split(MPI_COMM_WORLD, r == MPI_UNDEFINED ? MPI_UNDEFINED : 0, rank, &small);
  const std::string from_small = dir + "/from_small";
  if (rank == 0) std::filesystem::create_directory(from_small);
  MPI_Barrier(MPI_COMM_WORLD);
  if (small != MPI_COMM_NULL) {
    spex::dist::ShardedPeer<double> a(cfg, 1, small);
    spex::dist::ShardedCheckpointWriter(small).add_layer("l.", a).write(from_small);
    MPI_Comm_free(&small);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  auto message_of_load = [&](const spex::ProductKeyLayerConfig& mine) {
    std::string msg;
    try {
      spex::dist::ShardedPeer<double> b(mine, 2, MPI_COMM_WORLD);
      spex::dist::ShardedCheckpointLoader(from_small, MPI_COMM_WORLD).layer(b, "l.").commit();
    } catch (const spex::Error& e) {
      msg = e.what();
    }
    return msg;
  };
  // A config the file does not hold: refused (the same message on every rank).
  spex::ProductKeyLayerConfig other = cfg;
  other.top_k = cfg.top_k + 1;
  std::string msg = message_of_load(other);
  expect(!msg.empty(), "another config is refused on every rank when resharding");
  expect_same_on_all_ranks(msg, "another config when resharding");
  // One old shard missing.
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) std::filesystem::remove(from_small + "/shard-" + std::to_string(ranks - 2) + "-of-" + std::to_string(ranks - 1) + ".safetensors");
  MPI_Barrier(MPI_COMM_WORLD);
  msg = message_of_load(cfg);
  expect(!msg.empty(), "a missing old shard is refused on every rank when resharding");
  expect(msg.find("shard-" + std::to_string(ranks - 2)) != std::string::npos, "the refusal names the missing shard: " + msg);
  expect_same_on_all_ranks(msg, "a missing old shard");
}

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  const std::string dir = shared_temp_dir();
  try {
    expect(!dir.empty(), "a temporary directory");
    spex::ProductKeyLayerConfig pk;
    pk.d_in = 8;
    pk.n_keys = 6;
    pk.heads = 2;
    pk.top_k = 3;
    pk.d_key = 4;
    pk.learn_keys = true;
    check<spex::dist::ShardedPeer<double>>("ShardedPeer", pk, dir);
    spex::MoEConfig moe;
    moe.d_in = 8;
    moe.n_experts = 4;
    moe.hidden = 8;
    moe.router_init_std = 0.5;
    check<spex::dist::ShardedMoE<double>>("ShardedMoE", moe, dir);
    check_reshard<spex::dist::ShardedPeer<double>, spex::Peer<double>>("ShardedPeer", pk, dir);
    pk.n_keys = 7;  // 49 experts: shards of unequal sizes
    check_reshard<spex::dist::ShardedPkm<double>, spex::Pkm<double>>("ShardedPkm", pk, dir);
    check_reshard<spex::dist::ShardedMoE<double>, spex::MoE<double>>("ShardedMoE", moe, dir);
    check_value_pool(dir);
    check_mixed_directory(pk, dir);
    check_reshard_failures(pk, dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, e.what());
    failures++;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0 && !dir.empty()) std::filesystem::remove_all(dir);
  return finish("sharded checkpoints resume bit for bit");
}
