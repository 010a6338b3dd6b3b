// dist::ShardedMoE under mpirun with P ranks, against MoE in one process over the same global
// batch (every rank also runs the one-process layer on the whole batch). Each rank takes its
// block of tokens in rank order. Checked, in double, for the ReLU router (each penalty) and
// the TopK router (pre-softmax with its aux and z losses; softmax over k = 2):
//  - the shard's expert weights are the one-process layer's blocks of its experts (bit for bit);
//  - outputs, dx, the router's and every expert's gradients, and the parameters after 3 Adam
//    steps, to a relative 1e-12 (P = 1: bit for bit);
//  - the whole batch's penalty / aux loss and sparsity, on every rank; a LambdaController fed
//    sparsity() on every rank holds the one-process controller's lambda, bit for bit;
//  - the replicated router holds the same bits on every rank;
//  - ReLU routing: with tokens that reach no expert, whose probes (revive_zero_expert_tokens) run
//    on the probed experts' owners.
// And for DeepSeek-V3's routing (sigmoid scores, selection bias, groups, route scale, the
// sequence-wise loss, gated shared experts): the shared experts' gradients and the bias after
// update_expert_bias from the whole batch's expert_load (bit for bit, on every rank).
#include <spex/dist/layers.hpp>
#include <spex/layers/layer_concept.hpp>
#include <spex/layers/moe.hpp>
#include <spex/optim/adam.hpp>

#include "dist_test_util.hpp"

namespace {

using namespace dist_test;

/// The one-process layer's blocks of `block` rows of the shard's experts, in the shard's order.
template <class Sharded>
Mat shard_blocks(const Sharded& s, const Mat& full, Index block) {
  const Index mine = s.dispatch().partition().local_rows(rank);
  Mat out(mine * block, full.cols());
  for (Index i = 0; i < mine; ++i) out.middleRows(i * block, block) = full.middleRows(s.dispatch().partition().global_id(rank, i) * block, block);
  return out;
}

template <class Router>
void check(const std::string& name, spex::MoEConfig cfg, bool first_empty = false) {
  const Index seq = cfg.seq_aux_coeff > 0 ? cfg.seq_len : 1;  // each rank holds whole sequences
  using Full = spex::MoE<double, Router>;
  using Sharded = spex::dist::ShardedMoE<double, Router>;
  const Index total = 14, seed = 3;
  const std::string tag = name + ": ";
  Full full(cfg, seed);
  Sharded sharded(cfg, seed, MPI_COMM_WORLD);
  const Index h1 = full.experts().h1(), d_out = full.d_out();
  auto expect_weights = [&](const std::string& when, bool exact) {
    auto fp = full.parameters(), sp = sharded.parameters();
    expect(fp.size() == sp.size(), tag + "the same parameter list");
    for (std::size_t i = 0; i < std::min(fp.size(), sp.size()); ++i) {
      expect(fp[i].name == sp[i].name, tag + "parameter names " + fp[i].name + " / " + sp[i].name);
      const Mat f = fp[i].value_map(), s = sp[i].value_map();
      const Mat want = fp[i].name == "experts.w1" ? shard_blocks(sharded, f, h1)
                       : fp[i].name == "experts.w2" ? shard_blocks(sharded, f, d_out)
                                                   : f;
      if (exact) expect(s == want, tag + sp[i].name + " " + when);
      else expect_close(rel_diff(s, want), tag + sp[i].name + " " + when);
    }
  };
  expect_weights("as the one-process layer's", true);

  full.set_lambda(0.05);
  sharded.set_lambda(0.05);
  auto controller = spex::LambdaController::for_small_batches(0.5), full_controller = controller;
  spex::Rng rng(23);
  Mat x(total, cfg.d_in), dy(total, d_out);
  const auto [first_seq, seqs] = my_tokens(total / seq, first_empty);
  const Index first = first_seq * seq, b = seqs * seq;
  auto fg = full.make_grads();
  auto sg = sharded.make_grads();
  spex::AdamConfig ac;
  ac.lr = 1e-2;
  spex::Adam<double> full_adam(full.parameters(fg), ac), shard_adam(sharded.parameters(sg), ac);
  typename Full::Cache fc;
  typename Sharded::Cache sc;
  double zero_expert_tokens = 0;
  for (int step = 0; step < 3; ++step) {
    const std::string at = tag + "step " + std::to_string(step) + ": ";
    spex::fill_normal(x, 1.0, rng);
    spex::fill_normal(dy, 1.0, rng);
    Mat y_full(total, d_out), dx_full(total, cfg.d_in), y(b, d_out), dx(b, cfg.d_in);
    fg.zero();
    sg.zero();
    full.forward(x, y_full, fc);
    full.backward(dy, dx_full, fc, fg);
    sharded.forward(x.middleRows(first, b), y, sc);
    sharded.backward(dy.middleRows(first, b), dx, sc, sg);
    expect_close(rel_diff(y, y_full.middleRows(first, b)), at + "y");
    expect_close(rel_diff(dx, dx_full.middleRows(first, b)), at + "dx");
    expect_close(rel_diff(sg.router.weight, fg.router.weight), at + "router.weight gradient");
    expect_close(rel_diff(sg.experts.w1, shard_blocks(sharded, fg.experts.w1, h1)), at + "experts.w1 gradient");
    expect_close(rel_diff(sg.experts.w2, shard_blocks(sharded, fg.experts.w2, d_out)), at + "experts.w2 gradient");
    {  // the other replicated gradients (shared experts)
      auto fp = full.parameters(fg), sp = sharded.parameters(sg);
      for (std::size_t i = 0; i < fp.size() && i < sp.size(); ++i)
        if (fp[i].name.rfind("shared.", 0) == 0) expect_close(rel_diff(Mat(sp[i].grad_map()), Mat(fp[i].grad_map())), at + fp[i].name + " gradient");
    }
    if constexpr (!Router::kRelu) {
      if (cfg.expert_bias) {
        expect(sharded.expert_load(sc) == full.expert_load(fc), at + "the whole batch's expert load");
        full.update_expert_bias(full.expert_load(fc), 0.01);
        sharded.update_expert_bias(sharded.expert_load(sc), 0.01);
        expect(sharded.router().expert_bias() == full.router().expert_bias(), at + "the expert bias after its update");
      }
    }
    const double loss = full.aux_loss(fc), shard_loss = sharded.aux_loss(sc);
    expect(std::abs(shard_loss - loss) <= tolerance() * std::max(1.0, std::abs(loss)),
           at + "aux loss " + std::to_string(shard_loss) + " vs " + std::to_string(loss));
    zero_expert_tokens += full.stats(fc).zero_expert_fraction;
    const double s_full = spex::sparsity(fc.router.gates);
    expect(sharded.sparsity(sc) == s_full, at + "sparsity of the whole batch");
    expect(full.sparsity(fc) == s_full, at + "the one-process layer's sparsity");
    controller.update(sharded.sparsity(sc));
    full_controller.update(s_full);
    expect(controller.lambda() == full_controller.lambda(), at + "lambda");
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
  expect_weights("after 3 Adam steps", ranks == 1);
  // ReLU routing: tokens without an expert probe one (revive_zero_expert_tokens), also when sharded.
  if (Router::kRelu && cfg.revive_zero_expert_tokens) expect(zero_expert_tokens > 0, tag + "some tokens reach no expert");
  expect_replicas_identical(sharded.parameters(), "experts.");
}

static_assert(spex::is_layer_v<spex::dist::ShardedMoE<double>> && spex::is_layer_v<spex::dist::ShardedMoE<float, spex::TopKRouter<float>>>,
              "a sharded MoE is a layer");

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  try {
    spex::MoEConfig cfg;
    cfg.d_in = 10;
    cfg.d_out = 7;
    cfg.n_experts = 5;
    cfg.hidden = 8;
    cfg.experts_per_token = 2;
    cfg.router_init_std = 0.5;  // gates of every size, some tokens on many experts, some on none
    for (auto p : {spex::Penalty::l1_lb_spare_top, spex::Penalty::l1_lb, spex::Penalty::l1}) {
      cfg.penalty = p;
      check<spex::ReluRouter<double>>(std::string("ReMoE, ") + spex::to_string(p), cfg);
    }
    check<spex::ReluRouter<double>>("ReMoE, rank 0 without tokens", cfg, true);
    cfg.ffn = spex::FfnKind::gelu;
    cfg.granularity = 2;  // 10 experts of hidden 4, k = 4
    cfg.z_coeff = 1e-3;
    check<spex::TopKRouter<double>>("TopK, pre-softmax, aux and z losses, granularity 2", cfg);
    check<spex::TopKRouter<double>>("TopK, rank 0 without tokens", cfg, true);
    cfg.granularity = 1;
    cfg.pre_softmax = false;
    check<spex::TopKRouter<double>>("TopK, softmax over the k", cfg);
    {
      spex::MoEConfig ds = cfg;
      ds.n_experts = 6;
      ds.pre_softmax = true;
      ds.score = spex::ScoreFn::sigmoid;
      ds.renormalize = true;
      ds.route_scale = 2.0;
      ds.expert_bias = true;
      ds.n_groups = 3;
      ds.group_topk = 2;
      ds.seq_aux_coeff = 0.1;
      ds.seq_len = 2;
      ds.shared_experts = 2;
      ds.shared_hidden = 3;
      ds.shared_gate = true;
      check<spex::TopKRouter<double>>("TopK, DeepSeek-V3 routing with gated shared experts", ds);
      check<spex::TopKRouter<double>>("TopK, DeepSeek-V3 routing, rank 0 without tokens", ds, true);
    }
    bool refused = false;
    try {
      cfg.capacity_factor = 1.25;
      spex::dist::ShardedMoE<double, spex::TopKRouter<double>> dropping(cfg, 1, MPI_COMM_WORLD);
    } catch (const spex::Error&) {
      refused = true;
    }
    expect(refused, "a capacity factor is refused (the sharded layer is dropless)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, e.what());
    failures++;
  }
  return finish("sharded MoE equals one process");
}
