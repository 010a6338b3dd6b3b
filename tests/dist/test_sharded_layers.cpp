// dist::ShardedPeer and dist::ShardedPkm under mpirun with P ranks, against Peer and Pkm in one
// process over the same global batch (every rank also runs the one-process layer, on the whole
// batch: the reference). Each rank takes its block of tokens in rank order. Checked, in double:
//  - the shard's table rows are the one-process layer's rows of its experts (bit for bit);
//  - forward outputs, dx, the retrieval's gradients, every expert row's gradient (the same rows
//    non-zero), and the parameters and BatchNorm statistics after 3 Adam steps, to a relative
//    1e-12 (P = 1: bit for bit; P > 1 sums partial sums in another order, see the header);
//  - the replicated parameters are the same bits on every rank after the steps;
//  - two layers reading one sharded value pool: as two layers reading one pool in one process;
//  - bad input on one rank throws on every rank (none hangs).
// Exit code 0 on every rank = pass.
#include <spex/dist/layers.hpp>
#include <spex/layers/layer_concept.hpp>
#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>
#include <spex/optim/adam.hpp>

#include <memory>
#include <set>

#include "dist_test_util.hpp"

namespace {

using namespace dist_test;

/// The one-process layer's table rows of the shard's experts, in the shard's order.
template <class Sharded>
Mat shard_rows(const Sharded& s, const Mat& full) {
  Mat out(s.dispatch().partition().local_rows(rank), full.cols());
  for (Index i = 0; i < out.rows(); ++i) out.row(i) = full.row(s.dispatch().partition().global_id(rank, i));
  return out;
}

/// The expert gradient of the shard against the one-process layer's rows of its experts.
template <class Sharded>
void compare_sparse(const Sharded& s, const spex::SparseRowGrad<double>& shard, const spex::SparseRowGrad<double>& full,
                    const std::string& what) {
  Index owned = 0;
  for (Index row : full.rows()) owned += s.dispatch().partition().owner(row) == rank;
  expect(shard.nnz_rows() == owned, what + ": the shard's gradient rows are the full gradient's rows of its experts");
  double worst = 0;
  for (Index i = 0; i < shard.nnz_rows(); ++i) {
    const Index id = s.dispatch().partition().global_id(rank, shard.rows()[i]), f = full.find(id);
    if (f < 0) {
      expect(false, what + ": a row the one-process gradient does not have");
      continue;
    }
    worst = std::max(worst, rel_diff(shard.values().row(i), full.values().row(f)));
  }
  expect_close(worst, what);
}

struct Unchanged {
  template <class L>
  void operator()(L&) const {}
};

/// `prepare` runs on both layers after construction (growing, freezing).
template <class Full, class Sharded, class Prepare = Unchanged>
void check(const char* name, spex::ProductKeyLayerConfig cfg, bool first_empty = false, Prepare prepare = {}) {
  const Index total = 13, seed = 5;
  const std::string tag = std::string(name) + ": ";
  Full full(cfg, seed);
  Sharded sharded(cfg, seed, MPI_COMM_WORLD);
  prepare(full);
  prepare(sharded);
  cfg = full.config();
  // Initial weights: the retrieval is the one-process layer's, the shard holds its experts' rows.
  {
    auto fp = full.parameters(), sp = sharded.parameters();
    expect(fp.size() == sp.size(), tag + "the same parameter list");
    for (std::size_t i = 0; i < std::min(fp.size(), sp.size()); ++i) {
      expect(fp[i].name == sp[i].name, tag + "parameter names " + fp[i].name + " / " + sp[i].name);
      const Mat f = fp[i].value_map(), s = sp[i].value_map();
      const bool table = fp[i].name.rfind("experts.", 0) == 0;
      expect((table ? shard_rows(sharded, f) : f) == s, tag + sp[i].name + " as the one-process layer's");
    }
  }
  spex::Rng rng(17);
  Mat x(total, cfg.d_in), dy(total, full.d_out());
  const auto [first, b] = my_tokens(total, first_empty);

  auto fg = full.make_grads();
  auto sg = sharded.make_grads();
  spex::AdamConfig ac;
  ac.lr = 1e-2;
  spex::Adam<double> full_adam(full.parameters(fg), ac), shard_adam(sharded.parameters(sg), ac);
  typename Full::Cache fc;
  typename Sharded::Cache sc;
  for (int step = 0; step < 3; ++step) {
    const std::string at = tag + "step " + std::to_string(step) + ": ";
    spex::fill_normal(x, 1.0, rng);
    spex::fill_normal(dy, 1.0, rng);
    Mat y_full(total, full.d_out()), dx_full(total, cfg.d_in), y(b, full.d_out()), dx(b, cfg.d_in);
    fg.zero();
    sg.zero();
    full.forward(x, y_full, fc);
    full.backward(dy, dx_full, fc, fg);
    sharded.forward(x.middleRows(first, b), y, sc);
    sharded.backward(dy.middleRows(first, b), dx, sc, sg);
    expect_close(rel_diff(y, y_full.middleRows(first, b)), at + "y");
    expect_close(rel_diff(dx, dx_full.middleRows(first, b)), at + "dx");
    expect_close(rel_diff(sg.retrieval.query.weight, fg.retrieval.query.weight), at + "query.weight gradient");
    expect_close(rel_diff(sg.retrieval.norm.weight, fg.retrieval.norm.weight), at + "norm.weight gradient");
    expect_close(rel_diff(sg.retrieval.norm.bias, fg.retrieval.norm.bias), at + "norm.bias gradient");
    for (std::size_t i = 0; i < fg.retrieval.keys.size(); ++i)
      expect_close(rel_diff(sg.retrieval.keys[i], fg.retrieval.keys[i]), at + "sub-key gradient");
    if (cfg.input_rmsnorm) expect_close(rel_diff(sg.input_norm.gamma, fg.input_norm.gamma), at + "input_norm.gamma gradient");
    if (cfg.silu_output) expect_close(rel_diff(sg.head.proj.weight, fg.head.proj.weight), at + "output.proj.weight gradient");
    if constexpr (std::is_same<Full, spex::Peer<double>>::value) {
      compare_sparse(sharded, sg.experts.down, fg.experts.down, at + "experts.down gradient");
      compare_sparse(sharded, sg.experts.up, fg.experts.up, at + "experts.up gradient");
      if (cfg.glu) compare_sparse(sharded, sg.experts.down_linear, fg.experts.down_linear, at + "experts.down_linear gradient");
    } else {
      compare_sparse(sharded, sg.experts.values, fg.experts.values, at + "experts.values gradient");
    }
    if (step == 1) {  // the whole model's gradient norm, and clipping to half of it on every rank
      const spex::dist::RankOrderSum sum(MPI_COMM_WORLD);
      const double norm = spex::grad_norm(full.parameters(fg)), shard_norm = spex::dist::grad_norm(sharded.parameters(sg), sum);
      expect(std::abs(shard_norm - norm) <= tolerance() * norm, at + "gradient norm " + std::to_string(shard_norm) + " vs " + std::to_string(norm));
      spex::clip_grad_norm(full.parameters(fg), norm / 2);
      spex::dist::clip_grad_norm(sharded.parameters(sg), norm / 2, sum);
    }
    full_adam.step();
    shard_adam.step();
  }
  auto fp = full.parameters(), sp = sharded.parameters();
  for (std::size_t i = 0; i < std::min(fp.size(), sp.size()); ++i) {
    const Mat f = fp[i].value_map(), s = sp[i].value_map();
    const bool table = fp[i].name.rfind("experts.", 0) == 0;
    expect_close(rel_diff(s, table ? shard_rows(sharded, f) : f), tag + sp[i].name + " after 3 Adam steps");
  }
  expect_replicas_identical(sharded.parameters(), "experts.");
  // Inference after training: running statistics, the same exchange.
  Mat y_full(total, full.d_out()), y(b, full.d_out());
  full.infer(x, y_full);
  sharded.infer(x.middleRows(first, b), y, sc);
  expect_close(rel_diff(y, y_full.middleRows(first, b)), tag + "infer");
  // The one-process layer's cache-less infer, which a sharded layer has by construction.
  Mat y_own(b, full.d_out());
  sharded.infer(x.middleRows(first, b), y_own);
  expect(y_own == y, tag + "infer without a cache equals infer with one");
}

// The sharded layers are the one-process classes with another dispatch: the layer vocabulary.
static_assert(spex::is_layer_v<spex::dist::ShardedPeer<double>> && spex::is_layer_v<spex::dist::ShardedPkm<float>>,
              "a sharded product-key layer is a layer");

/// A padded batch (every third token padding) with a token mask, and sparse memory finetuning
/// (only some experts trainable): the shards' training step equals one process's on the whole
/// batch (the masked BatchNorm counts the real tokens of every rank).
template <class Full, class Sharded>
void check_masked_sparse(const char* name, const spex::ProductKeyLayerConfig& cfg) {
  const Index total = 14, seed = 9;
  const std::string tag = std::string(name) + ", masked batch, trainable experts: ";
  Full full(cfg, seed);
  Sharded sharded(cfg, seed, MPI_COMM_WORLD);
  spex::Rng rng(23);
  Mat x(total, cfg.d_in), dy(total, full.d_out());
  spex::fill_normal(x, 1.0, rng);
  spex::fill_normal(dy, 1.0, rng);
  spex::TokenMask mask(total);
  for (Index t = 0; t < total; ++t) mask(t) = t % 3 != 2;
  const auto [first, b] = my_tokens(total, false);
  auto fg = full.make_grads();
  auto sg = sharded.make_grads();
  std::vector<Index> trainable;
  for (Index e = 0; e < full.n_experts(); e += 3) trainable.push_back(e);
  full.set_trainable_experts(fg, trainable);
  sharded.set_trainable_experts(sg, trainable);
  typename Full::Cache fc;
  typename Sharded::Cache sc;
  Mat y_full(total, full.d_out()), dx_full(total, cfg.d_in), y(b, full.d_out()), dx(b, cfg.d_in);
  full.forward(x, y_full, fc, mask);
  full.backward(dy, dx_full, fc, fg);
  sharded.forward(x.middleRows(first, b), y, sc, mask.segment(first, b));
  sharded.backward(dy.middleRows(first, b), dx, sc, sg);
  expect_close(rel_diff(y, y_full.middleRows(first, b)), tag + "y");
  expect_close(rel_diff(dx, dx_full.middleRows(first, b)), tag + "dx");
  expect_close(rel_diff(sg.retrieval.query.weight, fg.retrieval.query.weight), tag + "query.weight gradient");
  const auto fp = full.parameters(), sp = sharded.parameters();
  for (std::size_t i = 0; i < fp.size(); ++i)
    if (fp[i].name.find("running_") != std::string::npos)
      expect_close(rel_diff(Mat(sp[i].value_map()), Mat(fp[i].value_map())), tag + sp[i].name + " (the real tokens' statistics)");
  if constexpr (std::is_same<Full, spex::Peer<double>>::value) {
    compare_sparse(sharded, sg.experts.up, fg.experts.up, tag + "experts.up gradient");
    for (Index r : fg.experts.up.rows()) expect(r % 3 == 0, tag + "only trainable experts hold gradient rows");
  } else {
    compare_sparse(sharded, sg.experts.values, fg.experts.values, tag + "experts.values gradient");
    for (Index r : fg.experts.values.rows()) expect(r % 3 == 0, tag + "only trainable experts hold gradient rows");
  }
}

/// Memory+'s value pool under expert parallelism: two ShardedPkm layers reading one sharded pool
/// (dist::sharded_value_pool) against two Pkm layers reading one pool in one process, both layers
/// on the same tokens: outputs, dx, the pool's one gradient (both layers' rows), the gradient
/// norm, and the pool and layers after 3 Adam steps over one list with the pool listed once.
void check_value_pool(spex::ProductKeyLayerConfig cfg) {
  const Index total = 11;
  const std::string tag = "two Pkm layers sharing a value pool: ";
  const Index slots = spex::detail::table_rows(spex::detail::resolve(cfg)), d_value = cfg.d_value;
  auto full_pool = std::make_shared<spex::ValuePool<double>>(slots, d_value, 31);
  auto shard_pool = spex::dist::sharded_value_pool<double>(slots, d_value, 31, MPI_COMM_WORLD);
  spex::Pkm<double> fa(cfg, full_pool, 1), fb(cfg, full_pool, 2);
  spex::dist::ShardedPkm<double> sa(cfg, shard_pool, 1, MPI_COMM_WORLD), sb(cfg, shard_pool, 2, MPI_COMM_WORLD);
  expect(shard_rows(sa, full_pool->values()) == shard_pool->values(), tag + "the shard holds the one-process pool's rows");
  auto fga = fa.make_grads(), fgb = fb.make_grads();
  auto sga = sa.make_grads(), sgb = sb.make_grads();
  auto model = [](auto& a, auto& ga, auto& b, auto& gb, auto& pool) {
    auto params = a.parameters(ga, "a.");
    spex::append_parameters(params, b.parameters(gb, "b."));
    spex::append_parameters(params, pool->parameters("pool."));
    return params;
  };
  const auto full_params = model(fa, fga, fb, fgb, full_pool), shard_params = model(sa, sga, sb, sgb, shard_pool);
  spex::AdamConfig ac;
  ac.lr = 1e-2;
  spex::Adam<double> full_adam(full_params, ac), shard_adam(shard_params, ac);
  spex::Rng rng(41);
  const auto [first, b] = my_tokens(total, false);
  Mat x(total, cfg.d_in), dya(total, fa.d_out()), dyb(total, fa.d_out());
  spex::Pkm<double>::Cache fca, fcb;
  spex::dist::ShardedPkm<double>::Cache sca, scb;
  const spex::dist::RankOrderSum sum(MPI_COMM_WORLD);
  for (int step = 0; step < 3; ++step) {
    const std::string at = tag + "step " + std::to_string(step) + ": ";
    spex::fill_normal(x, 1.0, rng);
    spex::fill_normal(dya, 1.0, rng);
    spex::fill_normal(dyb, 1.0, rng);
    Mat ya(total, fa.d_out()), yb(total, fa.d_out()), dx(total, cfg.d_in), dxb(total, cfg.d_in);
    Mat sya(b, fa.d_out()), syb(b, fa.d_out()), sdx(b, cfg.d_in), sdxb(b, cfg.d_in);
    spex::zero_grads(full_params);
    spex::zero_grads(shard_params);
    fa.forward(x, ya, fca);
    fb.forward(x, yb, fcb);
    fa.backward(dya, dx, fca, fga);
    fb.backward(dyb, dxb, fcb, fgb);
    sa.forward(x.middleRows(first, b), sya, sca);
    sb.forward(x.middleRows(first, b), syb, scb);
    sa.backward(dya.middleRows(first, b), sdx, sca, sga);
    sb.backward(dyb.middleRows(first, b), sdxb, scb, sgb);
    dx += dxb;
    sdx += sdxb;
    expect_close(rel_diff(sya, ya.middleRows(first, b)), at + "y of the first layer");
    expect_close(rel_diff(syb, yb.middleRows(first, b)), at + "y of the second layer");
    expect_close(rel_diff(sdx, dx.middleRows(first, b)), at + "dx");
    std::set<Index> used;  // the slots either layer read: the rows of the pool's one gradient
    for (const auto* c : {&fca, &fcb})
      for (Index t = 0; t < c->retrieval.ids.rows(); ++t)
        for (Index j = 0; j < c->retrieval.ids.cols(); ++j) used.insert(c->retrieval.ids(t, j));
    expect(std::set<Index>(full_pool->grad().rows().begin(), full_pool->grad().rows().end()) == used,
           at + "the pool's gradient holds the rows both layers read");
    compare_sparse(sa, shard_pool->grad(), full_pool->grad(), at + "the pool's gradient");
    expect_close(rel_diff(sga.head.proj.weight, fga.head.proj.weight), at + "output.proj.weight gradient of the first layer");
    const double norm = spex::grad_norm(full_params), shard_norm = spex::dist::grad_norm(shard_params, sum);
    expect(std::abs(shard_norm - norm) <= tolerance() * norm, at + "gradient norm " + std::to_string(shard_norm) + " vs " + std::to_string(norm));
    full_adam.step();
    shard_adam.step();
  }
  for (std::size_t i = 0; i < full_params.size(); ++i) {
    const Mat f = full_params[i].value_map(), s = shard_params[i].value_map();
    const bool table = spex::dist::is_sharded_name(full_params[i].name);
    expect_close(rel_diff(s, table ? shard_rows(sa, f) : f), tag + shard_params[i].name + " after 3 Adam steps");
  }
  // A pool of another sharding is refused by name, on every rank.
  bool threw = false;
  try {
    spex::dist::ShardedPkm<double> wrong(cfg, full_pool, 3, MPI_COMM_WORLD);
  } catch (const spex::Error& e) {
    threw = ranks == 1 || std::string(e.what()).find("dist::sharded_value_pool") != std::string::npos;
  }
  expect(threw || ranks == 1, tag + "a whole pool under a sharded layer is refused");
}

void check_refusals() {
  spex::ProductKeyLayerConfig cfg;
  cfg.d_in = 8;
  cfg.n_keys = 6;
  cfg.heads = 2;
  cfg.top_k = 3;
  cfg.d_key = 4;
  spex::dist::ShardedPeer<double> layer(cfg, 1, MPI_COMM_WORLD);
  spex::dist::ShardedPeer<double>::Cache c;
  Mat x = Mat::Ones(4, 8), y(4, 8);
  if (rank == ranks - 1) x(2, 3) = NAN;  // one rank's bad input
  bool threw = false;
  std::string msg;
  try {
    layer.forward(x, y, c);
  } catch (const spex::Error& e) {
    threw = true;
    msg = e.what();
    expect(msg.find("on rank " + std::to_string(ranks - 1) + ": ") != std::string::npos && msg.find("non-finite") != std::string::npos,
           "the refusal names the rank and says why: " + msg);
  }
  expect(threw, "a NaN on one rank throws on every rank");
  expect_same_on_all_ranks(msg, "a NaN on one rank");
  // Backward without a forward: refused on every rank, and the layer still works afterwards.
  auto g = layer.make_grads();
  threw = false;
  try {
    layer.backward(y, c, g);
  } catch (const spex::Error&) {
    threw = true;
  }
  expect(threw, "backward without a forward pass throws");
  x.setOnes();
  layer.forward(x, y, c);
  layer.backward(y, c, g);
  // Ranks given different configs (or seeds) would build different layers: refused on all.
  if (ranks > 1) {
    threw = false;
    try {
      spex::ProductKeyLayerConfig other = cfg;
      if (rank == ranks - 1) other.top_k = 2;
      spex::dist::ShardedPeer<double> mixed(other, 1, MPI_COMM_WORLD);
    } catch (const spex::Error& e) {
      threw = std::string(e.what()).find("different configs") != std::string::npos;
    }
    expect(threw, "different configs on the ranks are refused on every rank");
  }
}

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  try {
    spex::ProductKeyLayerConfig cfg;
    cfg.d_in = 12;
    cfg.d_out = 10;
    cfg.n_keys = 9;
    cfg.heads = 3;
    cfg.top_k = 4;
    cfg.d_key = 6;
    // PEER's defaults: BatchNorm over the whole batch, softmax.
    check<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, BatchNorm, softmax", cfg);
    check<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, BatchNorm, softmax, rank 0 without tokens", cfg, true);
    cfg.norm = spex::NormKind::layer;
    cfg.score = spex::ScoreFn::sigmoid;
    cfg.learn_keys = true;
    cfg.shared_keys = false;
    cfg.query_bias = true;
    check<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, LayerNorm, sigmoid, learned per-head keys", cfg);
    check_masked_sparse<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, BatchNorm", [&] {
      spex::ProductKeyLayerConfig c = cfg;
      c.norm = spex::NormKind::batch;
      return c;
    }());
    cfg.input_rmsnorm = cfg.per_head_tables = cfg.glu = true;
    check<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, input RMSNorm, per-head GLU tables", cfg);
    cfg.glu = false;
    cfg.silu_output = cfg.sigmoid_gate = true;
    cfg.d_value = 7;
    check<spex::Pkm<double>, spex::dist::ShardedPkm<double>>("Pkm, input RMSNorm, per-head tables, Memory+'s output head", cfg);
    cfg.silu_output = cfg.sigmoid_gate = false;
    cfg.d_value = 0;
    cfg.input_rmsnorm = cfg.per_head_tables = false;
    cfg = spex::ProductKeyLayerConfig{};
    cfg.d_in = 12;
    cfg.n_keys = 8;
    cfg.heads = 2;
    cfg.top_k = 5;
    cfg.d_key = 8;
    cfg.learn_keys = true;
    check<spex::Pkm<double>, spex::dist::ShardedPkm<double>>("Pkm, BatchNorm, learned keys", cfg);
    {
      spex::ProductKeyLayerConfig mem = cfg;  // Memory+: per-token norm, SiLU-gated head, one pool
      mem.norm = spex::NormKind::layer;
      mem.shared_keys = false;
      mem.silu_output = true;
      mem.d_value = 9;
      check_value_pool(mem);
      mem.norm = spex::NormKind::batch;  // BatchNorm's statistics over every rank's tokens
      check_value_pool(mem);
    }
    // A frozen set (a grown layer's old experts, sub-key rows and query network): the shards'
    // first rows are frozen, as the one-process layer's first experts.
    cfg.n_keys = 7;
    cfg.expert_ids = spex::ExpertIds::shells;
    cfg.frozen = spex::FrozenSet{4, true, true};
    check<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, frozen experts, sub-keys and query", cfg);
    // Frozen, then grown from 7^2 to 9^2 experts (the lifelong recipe): the shards' new rows are
    // the one-process layer's new experts', the old ones stay.
    cfg.frozen = spex::FrozenSet{};
    auto freeze_and_grow = [](auto& layer) {
      layer.freeze(spex::FrozenSet{7, true, true});
      layer.grow(9, 21);
    };
    check<spex::Peer<double>, spex::dist::ShardedPeer<double>>("Peer, frozen and grown", cfg, false, freeze_and_grow);
    check<spex::Pkm<double>, spex::dist::ShardedPkm<double>>("Pkm, frozen and grown, learned keys", cfg, false, freeze_and_grow);
    check_refusals();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, e.what());
    failures++;
  }
  return finish("sharded Peer and Pkm equal one process");
}
