#include <algorithm>
#include <numeric>
#include <type_traits>

#include <spex/layers/moe.hpp>

#include "test_util.hpp"

using namespace spex;
using spex_test::randn_mat;

namespace {

MoEConfig small_config(FfnKind ffn, Index granularity = 1) {
  MoEConfig cfg;
  cfg.d_in = 5;
  cfg.n_experts = 4;
  cfg.hidden = 6;
  cfg.experts_per_token = 2;
  cfg.granularity = granularity;
  cfg.ffn = ffn;
  cfg.router_init_std = 0.5;  // spread logits: no router output sits near a kink
  cfg.revive_zero_expert_tokens = false;  // exact gradients (the revival's surrogate: its own test)
  return cfg;
}

double gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
double silu(double x) { return x / (1 + std::exp(-x)); }

// Per-token scalar reference: router, then every routed expert's MLP, gate-weighted.
template <class Layer>
RowMat<double> reference_forward(const Layer& moe, const RowMat<double>& x, RowMat<double>& gates) {
  const auto& cfg = moe.config();
  const auto& ex = moe.experts();
  const Index b = x.rows(), e_n = cfg.total_experts(), h = ex.hidden(), d = cfg.d_in, k = cfg.total_per_token();
  const RowMat<double> w = moe.router().weight().template cast<double>();
  const RowMat<double> w1 = ex.w1().template cast<double>(), w2 = ex.w2().template cast<double>();
  gates = RowMat<double>::Zero(b, e_n);
  RowMat<double> y = RowMat<double>::Zero(b, d);
  for (Index t = 0; t < b; ++t) {
    std::vector<double> l(e_n);
    for (Index e = 0; e < e_n; ++e) l[e] = w.row(e).dot(x.row(t));
    if (Layer::kRelu) {
      for (Index e = 0; e < e_n; ++e) gates(t, e) = std::max(l[e], 0.0);
    } else {
      std::vector<Index> order(e_n);
      std::iota(order.begin(), order.end(), Index(0));
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index c) { return l[a] > l[c]; });
      const double m = l[order[0]];
      double z = 0, zk = 0;
      for (Index e = 0; e < e_n; ++e) z += std::exp(l[e] - m);
      for (Index j = 0; j < k; ++j) zk += std::exp(l[order[j]] - m);
      for (Index j = 0; j < k; ++j)
        gates(t, order[j]) = cfg.pre_softmax ? std::exp(l[order[j]] - m) / (cfg.renormalize ? zk : z)
                                             : std::exp(l[order[j]] - m) / zk;
    }
    for (Index e = 0; e < e_n; ++e) {
      if (gates(t, e) == 0) continue;
      std::vector<double> a(h);
      for (Index i = 0; i < h; ++i) {
        if (cfg.ffn == FfnKind::gelu) {
          a[i] = gelu(w1.row(e * h + i).dot(x.row(t)));
        } else {
          a[i] = silu(w1.row(e * 2 * h + i).dot(x.row(t))) * w1.row(e * 2 * h + h + i).dot(x.row(t));
        }
      }
      for (Index o = 0; o < d; ++o) {
        double s = 0;
        for (Index i = 0; i < h; ++i) s += w2(e * d + o, i) * a[i];
        y(t, o) += gates(t, e) * s;
      }
    }
  }
  return y;
}

template <class LayerRef>
void check_forward(LayerRef&& moe, const RowMat<double>& x) {
  using Layer = std::decay_t<LayerRef>;
  RowMat<double> gates_ref;
  const RowMat<double> y_ref = reference_forward(moe, x, gates_ref);
  typename Layer::Cache cache;
  RowMat<double> y(x.rows(), x.cols());
  moe.forward(x, y, cache);
  CHECK((cache.router.gates - gates_ref).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((y - y_ref).cwiseAbs().maxCoeff() < 1e-10);
}

// Central differences of L = sum(w .* y) + aux_loss for every parameter entry and x.
template <class Layer>
void check_gradients(Layer& moe, const RowMat<double>& x) {
  const Index b = x.rows(), d = x.cols();
  const RowMat<double> w = randn_mat(b, d, 77);
  typename Layer::Cache cache;
  auto grads = moe.make_grads();
  RowMat<double> y(b, d), dx(b, d);
  moe.forward(x, y, cache);
  const RowMat<double> mask = (cache.router.gates.array() > 0).template cast<double>();
  moe.backward(w, dx, cache, grads);
  auto loss = [&](const RowMat<double>& xin) {
    typename Layer::Cache c;
    RowMat<double> yy(b, d);
    moe.forward(xin, yy, c);
    REQUIRE(((c.router.gates.array() > 0).template cast<double>().matrix() - mask).cwiseAbs().maxCoeff() == 0);
    return (yy.array() * w.array()).sum() + moe.aux_loss(c);
  };
  const double eps = 1e-6;
  for (const auto& p : moe.parameters(grads)) {
    if (!p.trainable()) continue;  // buffers: the expert bias
    auto v = p.value_map();
    auto g = p.grad_map();
    for (Index r = 0; r < p.rows; ++r)
      for (Index c = 0; c < p.cols; ++c) {
        const double saved = v(r, c);
        v(r, c) = saved + eps;
        const double lp = loss(x);
        v(r, c) = saved - eps;
        const double lm = loss(x);
        v(r, c) = saved;
        CAPTURE(p.name, r, c);
        CHECK(g(r, c) == Approx((lp - lm) / (2 * eps)).epsilon(1e-5).margin(1e-7));
      }
  }
  for (Index r = 0; r < b; ++r)
    for (Index c = 0; c < d; ++c) {
      RowMat<double> xp = x, xm = x;
      xp(r, c) += eps;
      xm(r, c) -= eps;
      CAPTURE(r, c);
      CHECK(dx(r, c) == Approx((loss(xp) - loss(xm)) / (2 * eps)).epsilon(1e-5).margin(1e-7));
    }
}

using ReMoE = MoE<double, ReluRouter<double>>;
using TopKMoE = MoE<double, TopKRouter<double>>;

}  // namespace

TEST_CASE("MoE forward equals a per-token reference for both routers and both expert kinds", "[remoe]") {
  for (FfnKind ffn : {FfnKind::gelu, FfnKind::swiglu})
    for (Index g : {1, 2}) {
      CAPTURE(to_string(ffn), g);
      const RowMat<double> x = randn_mat(11, 5, 3);
      check_forward(ReMoE(small_config(ffn, g), 1), x);
      check_forward(TopKMoE(small_config(ffn, g), 1), x);
      MoEConfig post = small_config(ffn, g);
      post.pre_softmax = false;
      check_forward(TopKMoE(post, 2), x);
      MoEConfig renorm = small_config(ffn, g);
      renorm.renormalize = true;
      check_forward(TopKMoE(renorm, 3), x);
    }
}

TEST_CASE("MoE inference runs experts with many tokens feature-major: the reference's y, whatever the threads", "[remoe]") {
  // 70 tokens over 4 experts: groups of kFeatureMajorTokens or more run feature-major (all
  // below a GEMM tile), the others token-major; the shared expert (all 70 tokens) feature-major.
  using Ffn = FfnExperts<double>;
  for (FfnKind ffn : {FfnKind::gelu, FfnKind::swiglu}) {
    CAPTURE(to_string(ffn));
    MoEConfig cfg = small_config(ffn);
    cfg.d_in = 9;
    cfg.hidden = 20;
    cfg.experts_per_token = 1;
    const RowMat<double> x = randn_mat(70, cfg.d_in, 8);
    auto check = [&](const auto& moe) {
      RowMat<double> gates_ref;
      const RowMat<double> y_ref = reference_forward(moe, x, gates_ref);
      typename std::decay_t<decltype(moe)>::Cache cache;
      RowMat<double> y(x.rows(), x.cols());
      moe.infer(x, y, cache);
      Index feature_major = 0, token_major = 0;
      for (Index e = 0; e < moe.n_experts(); ++e)
        (Ffn::runs_feature_major(cache.groups.count(e)) ? feature_major : token_major) += cache.groups.count(e) > 0;
      CHECK(feature_major > 0);
      CHECK((y - y_ref).cwiseAbs().maxCoeff() < 1e-10);
      return std::make_pair(y, token_major);
    };
    Index token_major = 0;
    token_major += check(ReMoE(cfg, 1)).second;
    token_major += check(TopKMoE(cfg, 1)).second;
    cfg.experts_per_token = 2;
    token_major += check(TopKMoE(cfg, 4)).second;
    CHECK(token_major > 0);  // both paths ran, side by side in one batch

    // A shared expert (every token): infer equals forward, and neither depends on the threads.
    cfg.shared_experts = 1;
    TopKMoE shared(cfg, 5);
    const int threads_before = max_threads();
    RowMat<double> y_infer[2], y_train(x.rows(), x.cols());
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      TopKMoE::Cache c;
      y_infer[threads - 1].resize(x.rows(), x.cols());
      shared.infer(x, y_infer[threads - 1], c);
    }
    set_num_threads(threads_before);
    TopKMoE::Cache c;
    shared.forward(x, y_train, c);
    CHECK(y_infer[0] == y_infer[1]);
    CHECK((y_infer[0] - y_train).cwiseAbs().maxCoeff() < 1e-12);
  }
}

namespace {
// Inference of `moe` over the batches in turn with one cache, on 1, 2 and 3 threads: each batch's
// y equals the reference's, every expert runs feature-major (or token-major: !feature_major), the
// biggest expert of each batch in at least `min_blocks` feature-major blocks, and the last
// batch's y has the same bits on every thread count, whether its blocks were added to y in expert
// order or combined after (adds_in_expert_order); returns on how many of the three the last
// batch's were added in expert order. The cache serves a bigger batch first, so the smaller
// one's blocks sit in scratch that earlier experts wrote.
int check_infer_side_by_side(const TopKMoE& moe, std::initializer_list<Index> batches, bool feature_major,
                             Index min_blocks = 1) {
  using Ffn = FfnExperts<double>;
  const int threads_before = max_threads();
  RowMat<double> y_last[3];
  int in_expert_order = 0;
  for (int threads : {1, 2, 3}) {
    CAPTURE(threads);
    set_num_threads(threads);
    TopKMoE::Cache cache;
    for (Index batch : batches) {
      const RowMat<double> x = randn_mat(batch, moe.config().d_in, 9 + batch);
      RowMat<double> gates_ref, y(batch, moe.config().d_in);
      const RowMat<double> y_ref = reference_forward(moe, x, gates_ref);
      moe.infer(x, y, cache);
      Index experts = 0, most = 0;
      for (Index e = 0; e < moe.n_experts(); ++e) {
        if (cache.groups.count(e) > 0) CHECK(Ffn::runs_feature_major(cache.groups.count(e)) == feature_major);
        experts += cache.groups.count(e) > 0;
        most = std::max(most, cache.groups.count(e));
      }
      CHECK(experts >= 4);  // enough to run over the threads
      CHECK(Ffn::feature_major_blocks(most) >= min_blocks);
      CHECK((y - y_ref).cwiseAbs().maxCoeff() < 1e-10);
      y_last[threads - 1] = y;
    }
    in_expert_order += Ffn::adds_in_expert_order(cache.groups, threads);
  }
  set_num_threads(threads_before);
  CHECK(y_last[0] == y_last[1]);
  CHECK(y_last[0] == y_last[2]);
  return in_expert_order;
}
}  // namespace

TEST_CASE("MoE inference over experts run side by side reuses one cache: the reference's y, the same bits on 1 and 2 threads",
          "[remoe]") {
  MoEConfig cfg = small_config(FfnKind::gelu);
  cfg.d_in = 12;
  cfg.hidden = 20;
  cfg.n_experts = 8;
  SECTION("feature-major: 2 experts per token, tens of tokens each, each expert in its thread's slot of transposed blocks") {
    cfg.experts_per_token = 2;
    // Experts under 128 tokens: added in expert order on one thread only, so both ways ran.
    CHECK(check_infer_side_by_side(TopKMoE(cfg, 6), {400, 230}, true) == 1);
  }
  SECTION("feature-major in blocks: 1 expert per token, hundreds of tokens each, run 128 to 255 tokens at a time") {
    // Blocks of uneven sizes (an expert's n is rarely a multiple of its block count), the
    // smaller batch's in scratch the bigger one's wrote. Where the build runs experts of 256
    // tokens token-major (a CBLAS with AVX-512 kernels, no libxsmm), they are checked as such.
    cfg.experts_per_token = 1;
    using Ffn = FfnExperts<double>;
    const bool blocks = Ffn::runs_feature_major(2 * Ffn::kFeatureMajorBlockTokens);
    const int in_expert_order = check_infer_side_by_side(TopKMoE(cfg, 8), {3000, 2200}, blocks, blocks ? 2 : 1);
    if (blocks) CHECK(in_expert_order == 3);
  }
  SECTION("y in x's memory: the outputs combined after the experts ran, the bits of y in a matrix of its own") {
    // On one thread y in its own matrix takes each block's outputs in expert order; in x it
    // cannot (x is read until the last expert ran).
    cfg.experts_per_token = 2;
    const TopKMoE moe(cfg, 9);
    const RowMat<double> x = randn_mat(300, cfg.d_in, 10);
    const int threads_before = max_threads();
    set_num_threads(1);
    TopKMoE::Cache cache;
    RowMat<double> y(x.rows(), x.cols()), in_place = x;
    moe.infer(x, y, cache);
    CHECK(FfnExperts<double>::adds_in_expert_order(cache.groups, 1));
    moe.infer(in_place, in_place, cache);
    set_num_threads(threads_before);
    CHECK(in_place == y);
  }
  SECTION("token-major: 1 expert per token, a few tokens each, its gathered rows, pre-activations and activations in its thread's slot") {
    cfg.ffn = FfnKind::swiglu;
    cfg.experts_per_token = 1;
    check_infer_side_by_side(TopKMoE(cfg, 7), {50, 31}, false);
  }
}

TEST_CASE("MoE training runs experts with many tokens feature-major: y and every gradient those of token-major sub-batches",
          "[remoe]") {
  // The whole batch gives experts kFeatureMajorTokens or more tokens (at 90 tokens some, the
  // others run token-major beside them; at 1100 all, the biggest in two blocks or more where the
  // build runs such experts feature-major), sub-batches of 8 tokens fewer: forward then runs
  // them token-major. Backward accumulates, so the sub-batches' gradients
  // add up to the batch's (no batch-level loss term: lambda 0, no aux loss).
  using Ffn = FfnExperts<double>;
  for (FfnKind ffn : {FfnKind::gelu, FfnKind::swiglu})
    for (Index batch : {Index(90), Index(1100)}) {
      CAPTURE(to_string(ffn), batch);
      MoEConfig cfg = small_config(ffn);
      cfg.d_in = 9;
      cfg.hidden = 20;
      cfg.experts_per_token = 1;
      cfg.aux_coeff = 0;
      const RowMat<double> x = randn_mat(batch, cfg.d_in, 11), dy = randn_mat(batch, cfg.d_in, 12);
      auto check = [&](auto&& moe) {
        using Layer = std::decay_t<decltype(moe)>;
        const int threads_before = max_threads();
        RowMat<double> y[2], dx[2];
        std::vector<typename Layer::Grads> grads;
        for (int threads : {1, 2}) {
          set_num_threads(threads);
          typename Layer::Cache cache;
          grads.push_back(moe.make_grads());
          y[threads - 1].resize(batch, cfg.d_in);
          dx[threads - 1].resize(batch, cfg.d_in);
          moe.forward(x, y[threads - 1], cache);
          moe.backward(dy, dx[threads - 1], cache, grads.back());
          Index most = 0, feature_major = 0;
          for (Index e = 0; e < moe.n_experts(); ++e) {
            feature_major += Ffn::runs_feature_major(cache.groups.count(e));
            most = std::max(most, cache.groups.count(e));
          }
          CHECK(feature_major >= (batch > 1000 ? moe.n_experts() : 1));
          if (Ffn::runs_feature_major(2 * Ffn::kFeatureMajorBlockTokens) && batch > 1000) CHECK(Ffn::feature_major_blocks(most) >= 2);
        }
        set_num_threads(threads_before);
        CHECK(y[0] == y[1]);  // the same bits on any number of threads
        CHECK(dx[0] == dx[1]);
        CHECK(grads[0].experts.w1 == grads[1].experts.w1);
        CHECK(grads[0].experts.w2 == grads[1].experts.w2);

        auto sub = moe.make_grads();
        typename Layer::Cache cache;
        for (Index t0 = 0; t0 < batch; t0 += 8) {
          const Index n = std::min<Index>(8, batch - t0);
          RowMat<double> ys(n, cfg.d_in), dxs(n, cfg.d_in);
          moe.forward(x.middleRows(t0, n), ys, cache);
          for (Index e = 0; e < moe.n_experts(); ++e) REQUIRE(!Ffn::runs_feature_major(cache.groups.count(e)));
          moe.backward(dy.middleRows(t0, n), dxs, cache, sub);
          CHECK((ys - y[0].middleRows(t0, n)).cwiseAbs().maxCoeff() < 1e-12);
          CHECK((dxs - dx[0].middleRows(t0, n)).cwiseAbs().maxCoeff() < 1e-12);
        }
        const auto whole = moe.parameters(grads[0]), parts = moe.parameters(sub);
        REQUIRE(whole.size() == parts.size());
        for (std::size_t i = 0; i < whole.size(); ++i) {
          CAPTURE(whole[i].name);
          const double scale = std::max(1.0, whole[i].grad_map().cwiseAbs().maxCoeff());
          CHECK((whole[i].grad_map() - parts[i].grad_map()).cwiseAbs().maxCoeff() < 1e-12 * scale);
          CHECK(whole[i].grad_map().cwiseAbs().maxCoeff() > 0);
        }
      };
      ReMoE relu(cfg, 21);
      relu.set_lambda(0);
      check(relu);
      check(TopKMoE(cfg, 22));
    }
}

TEST_CASE("MoE gradients match finite differences: ReLU router with every penalty", "[remoe][gradcheck]") {
  for (FfnKind ffn : {FfnKind::gelu, FfnKind::swiglu})
    for (Penalty p : {Penalty::none, Penalty::l1, Penalty::l1_lb, Penalty::l1_lb_spare_top}) {
      CAPTURE(to_string(ffn), to_string(p));
      MoEConfig cfg = small_config(ffn);
      cfg.penalty = p;
      ReMoE moe(cfg, 5);
      moe.set_lambda(0.37);
      check_gradients(moe, randn_mat(7, 5, 9));
    }
}

TEST_CASE("MoE gradients match finite differences: TopK router, aux and z losses", "[remoe][gradcheck]") {
  for (FfnKind ffn : {FfnKind::gelu, FfnKind::swiglu})
    for (int mode = 0; mode < 3; ++mode) {
      CAPTURE(to_string(ffn), mode);
      MoEConfig cfg = small_config(ffn);
      cfg.pre_softmax = mode != 1;
      cfg.renormalize = mode == 2;
      cfg.aux_coeff = 0.3;
      cfg.z_coeff = 0.1;
      TopKMoE moe(cfg, 6);
      check_gradients(moe, randn_mat(7, 5, 10));
    }
}

TEST_CASE("TopK gradients match finite differences with DeepSeek-V3's and Megatron-Core's routing options", "[remoe][gradcheck]") {
  // sigmoid scores (renormalized or not), a selection bias, groups, route scale, the
  // sequence-wise loss, shared experts with and without their gate, and capacity drops.
  for (int mode = 0; mode < 6; ++mode) {
    CAPTURE(mode);
    MoEConfig cfg = small_config(mode % 2 ? FfnKind::swiglu : FfnKind::gelu);
    cfg.n_experts = 6;
    cfg.score = mode == 4 ? ScoreFn::softmax : ScoreFn::sigmoid;
    cfg.renormalize = mode != 1;
    cfg.route_scale = 2.5;
    cfg.expert_bias = true;
    cfg.n_groups = mode < 3 ? 3 : 1;
    cfg.group_topk = mode < 3 ? 2 : 0;
    cfg.aux_coeff = 0.2;
    cfg.seq_aux_coeff = 0.3;
    cfg.seq_len = 4;
    cfg.z_coeff = mode == 2 ? 0.1 : 0.0;
    cfg.shared_experts = mode == 5 ? 0 : 1 + mode % 2;
    cfg.shared_hidden = 3;
    cfg.shared_gate = mode % 3 == 0 && cfg.shared_experts > 0;
    cfg.capacity_factor = mode == 3 ? 0.5 : 0.0;
    TopKMoE moe(cfg, 20 + mode);
    moe.router().expert_bias() = randn_mat(6, 1, 40 + mode) * 0.3;  // changes the selection
    check_gradients(moe, randn_mat(8, 5, 13));
  }
}

TEST_CASE("TopK gradients with capacity drops match finite differences in every mode", "[remoe][gradcheck]") {
  // A dropped pair has gate 0, but with a normalizer over the k (renormalize, or softmax over
  // the k) its logit still shapes the kept gates.
  for (int mode = 0; mode < 3; ++mode) {
    CAPTURE(mode);
    MoEConfig cfg = small_config(FfnKind::gelu);
    cfg.pre_softmax = mode != 1;
    cfg.renormalize = mode == 2;
    cfg.capacity_factor = 0.5;  // 9 tokens x 2 picks over 4 experts: at most 3 per expert
    cfg.aux_coeff = 0.2;
    TopKMoE moe(cfg, 8);
    const RowMat<double> x = randn_mat(9, 5, 12);
    TopKMoE::Cache c;
    RowMat<double> y(9, 5);
    moe.forward(x, y, c);
    REQUIRE(c.router.dropped > 0);
    check_gradients(moe, x);
  }
}

TEST_CASE("a token with no active expert probes its largest logit: y unchanged, the router learns min(dL/dR, 0) there", "[remoe]") {
  MoEConfig cfg = small_config(FfnKind::swiglu);
  cfg.revive_zero_expert_tokens = true;
  ReMoE on(cfg, 4);
  cfg.revive_zero_expert_tokens = false;
  ReMoE off(cfg, 4);
  on.router().weight().row(1) *= -1;  // some tokens with every logit <= 0
  off.router().weight() = on.router().weight();
  RowMat<double> x = randn_mat(12, 5, 21);
  x.row(3) = -x.row(3);
  on.set_lambda(0.2);
  off.set_lambda(0.2);
  const RowMat<double> dy = randn_mat(12, 5, 22);
  ReMoE::Cache con, coff;
  auto gon = on.make_grads(), goff = off.make_grads();
  RowMat<double> yon(12, 5), yoff(12, 5), dxon(12, 5), dxoff(12, 5);
  on.forward(x, yon, con);
  off.forward(x, yoff, coff);
  CHECK(yon == yoff);
  on.backward(dy, dxon, con, gon);
  off.backward(dy, dxoff, coff, goff);
  // A probe's gate is 0: no expert gradient; backward skips its rows, so the products see the
  // same rows as without probes.
  CHECK(gon.experts.w1 == goff.experts.w1);
  CHECK(gon.experts.w2 == goff.experts.w2);
  // The probes' terms: dlogit(t, top) = min(dy_t . FFN_top(x_t), 0), into W_r and dx.
  RowMat<double> want_w = goff.router.weight, want_dx = dxoff;
  const RowMat<double>& logits = con.router.logits;
  int probes = 0, pulled = 0;
  for (Index t = 0; t < 12; ++t) {
    if ((con.router.gates.row(t).array() > 0).any()) continue;
    Index top = 0;
    for (Index e = 1; e < 4; ++e)
      if (logits(t, e) > logits(t, top)) top = e;
    RowMat<double> one = RowMat<double>::Zero(1, 4), ffn(1, 5);
    one(0, top) = 1;
    ExpertGroups groups;
    groups.build(one);
    FfnExperts<double>::Cache fc;
    on.experts().forward(x.row(t), one, groups, ffn, fc);
    const double dl = std::min(dy.row(t).dot(ffn.row(0)), 0.0);
    want_w.row(top) += dl * x.row(t);
    want_dx.row(t) += dl * on.router().weight().row(top);
    ++probes;
    pulled += dl < 0;
  }
  REQUIRE(probes >= 2);
  REQUIRE(pulled >= 1);
  CHECK((gon.router.weight - want_w).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((dxon - want_dx).cwiseAbs().maxCoeff() < 1e-12);
  // Inference probes nothing.
  ReMoE::Cache ci;
  on.infer(x, yon, ci);
  CHECK(ci.probe.empty());
}

TEST_CASE("ExpertGroups: per expert its gated pairs in token order, then its pairs of gate 0, row_of and token agreeing",
          "[remoe]") {
  // Expert counts below one SIMD vector, of whole vectors, of one 64-bit mask word and of several
  // (build reads each token's row into masks of 64 experts).
  for (Index e_n : {6, 16, 64, 70, 131}) {
    CAPTURE(e_n);
    const Index b = 40;
    RowMat<double> gates = randn_mat(b, e_n, 31).cwiseMax(0.0);  // about half the pairs active
    std::vector<Index> probes(static_cast<std::size_t>(b), -1);
    for (Index t = 0; t < b; t += 3) {
      gates.row(t).setZero();  // a token with no active expert probes one
      probes[static_cast<std::size_t>(t)] = (t * 5 + t / 3 * 61) % e_n;
    }
    // An expert-parallel owner's form: the pairs apart from their gates (probes: a pair of gate 0).
    RowMat<unsigned char> pairs(b, e_n);
    for (Index t = 0; t < b; ++t)
      for (Index e = 0; e < e_n; ++e) pairs(t, e) = gates(t, e) != 0 || probes[static_cast<std::size_t>(t)] == e;
    ExpertGroups from_gates, from_pairs, from_float, from_col_major;
    from_gates.build(gates, probes);
    from_pairs.build(pairs, gates);
    from_float.build(RowMat<float>(gates.cast<float>()), probes);                    // float rows: the SIMD masks
    from_col_major.build(Eigen::MatrixXd(gates), probes);                            // no contiguous rows: entry by entry
    for (const ExpertGroups* g : {&from_gates, &from_pairs}) {
      Index rows = 0;
      for (Index e = 0; e < e_n; ++e) {
        CAPTURE(e);
        std::vector<Index> want_gated, want_zero;
        for (Index t = 0; t < b; ++t) {
          if (gates(t, e) != 0) want_gated.push_back(t);
          else if (probes[static_cast<std::size_t>(t)] == e) want_zero.push_back(t);
        }
        REQUIRE(g->count(e) == Index(want_gated.size() + want_zero.size()));
        REQUIRE(g->gated(e) == Index(want_gated.size()));
        std::vector<Index> want = want_gated;
        want.insert(want.end(), want_zero.begin(), want_zero.end());
        for (Index i = 0; i < g->count(e); ++i) {
          const Index r = g->offsets[static_cast<std::size_t>(e)] + i, t = want[static_cast<std::size_t>(i)];
          CHECK(g->token[static_cast<std::size_t>(r)] == t);
          CHECK(g->row_of(t, e) == r);
        }
        rows += g->count(e);
      }
      CHECK(g->rows() == rows);
      CHECK((g->row_of.array() >= 0).count() == rows);  // every other entry is -1
      CHECK(g->row_of.minCoeff() >= -1);
    }
    for (const ExpertGroups* g : {&from_pairs, &from_float, &from_col_major}) {
      CHECK(g->row_of == from_gates.row_of);
      CHECK(g->token == from_gates.token);
      CHECK(g->offsets == from_gates.offsets);
      CHECK(g->by_size == from_gates.by_size);
      for (Index e = 0; e < e_n; ++e) CHECK(g->gated(e) == from_gates.gated(e));
    }
  }
}

TEST_CASE("the load-balanced penalty is the Switch formula with P := R, and f = 1 when balanced", "[remoe]") {
  const Index t_n = 12, e_n = 4;
  const double k = 2;
  RowMat<double> r = randn_mat(t_n, e_n, 4).cwiseMax(0.0);
  double switch_form = 0;
  for (Index e = 0; e < e_n; ++e) {
    double col = 0, c = 0;
    for (Index t = 0; t < t_n; ++t) {
      col += r(t, e);
      c += r(t, e) > 0;
    }
    switch_form += col * c;
  }
  switch_form *= double(e_n) / (k * t_n * t_n);
  CHECK(penalty_value(Penalty::l1_lb, r, k) == Approx(switch_form).epsilon(1e-12));
  CHECK(penalty_value(Penalty::l1, r, k) == Approx(r.sum() / t_n).epsilon(1e-12));
  // Balanced: every expert gets exactly k/E of the tokens (token t uses experts t%4, (t+1)%4).
  RowMat<double> bal = RowMat<double>::Zero(t_n, e_n);
  for (Index t = 0; t < t_n; ++t) {
    bal(t, t % e_n) = 0.5 + 0.1 * t;
    bal(t, (t + 1) % e_n) = 1.0 + 0.05 * t;
  }
  const Vec<double> f = penalty_weights(Penalty::l1_lb, bal, k);
  for (Index e = 0; e < e_n; ++e) CHECK(f(e) == Approx(1.0));
  CHECK(penalty_value(Penalty::l1_lb, bal, k) == Approx(bal.rowwise().sum().mean()));
  CHECK(sparsity(bal) == Approx(0.5));
}

TEST_CASE("the spare-top penalty is l1_lb without each token's largest gate", "[remoe]") {
  const Index t_n = 9, e_n = 5;
  const double k = 2;
  RowMat<double> r = randn_mat(t_n, e_n, 21).cwiseMax(0.0);
  r.row(3).setZero();                       // a token with no active expert: nothing spared
  r.row(4) << 0.0, 0.7, 0.7, 0.0, 0.2;      // a tie: the first largest is spared
  const Vec<double> f = penalty_weights(Penalty::l1_lb, r, k);
  CHECK(penalty_weights(Penalty::l1_lb_spare_top, r, k) == f);
  double expect = 0;
  for (Index t = 0; t < t_n; ++t) {
    Index top = -1;
    for (Index e = 0; e < e_n; ++e)
      if (r(t, e) > 0 && (top < 0 || r(t, e) > r(t, top))) top = e;
    CHECK(spared_expert(Penalty::l1_lb_spare_top, r, t) == top);
    CHECK(spared_expert(Penalty::l1_lb, r, t) == -1);
    for (Index e = 0; e < e_n; ++e)
      if (e != top) expect += f(e) * r(t, e);
  }
  CHECK(spared_expert(Penalty::l1_lb_spare_top, r, 4) == 1);
  CHECK(penalty_value(Penalty::l1_lb_spare_top, r, k) == Approx(expect / t_n).epsilon(1e-12));
  // The gradient it adds is lambda * dL_reg/dR (f held constant), zero on the spared entries.
  RowMat<double> g = RowMat<double>::Zero(t_n, e_n);
  add_penalty_gradient(Penalty::l1_lb_spare_top, r, f, 0.5, g);
  for (Index t = 0; t < t_n; ++t)
    for (Index e = 0; e < e_n; ++e) {
      const bool penalized = r(t, e) > 0 && e != spared_expert(Penalty::l1_lb_spare_top, r, t);
      CHECK(g(t, e) == (penalized ? Approx(0.5 * f(e) / t_n).epsilon(1e-15) : Approx(0.0)));
    }
}

TEST_CASE("lambda controller, smoothed rule: moving average and steps proportional within the band", "[remoe]") {
  LambdaController ctl = LambdaController::for_small_batches(0.875, 0.5, 0.05, 1e-3, 1.1);
  CHECK(ctl.rule() == LambdaRule::smoothed);
  double lambda = 1e-3, avg = -1;
  for (double s : {0.2, 0.86, 0.9, 0.88, 0.95, 0.875, 0.874}) {
    avg = avg < 0 ? s : 0.5 * avg + 0.5 * s;
    const double e = std::min(1.0, std::max(-1.0, (0.875 - avg) / 0.05));
    lambda *= std::pow(1.1, e);
    ctl.update(s);
    CAPTURE(s, avg, e);
    CHECK(ctl.state().average == Approx(avg).epsilon(1e-15));
    CHECK(ctl.lambda() == Approx(lambda).epsilon(1e-13));
  }
  // Far below the target it moves as fast as the sign rule; at the target it stands still.
  LambdaController fast = LambdaController::for_small_batches(0.875, 0.0, 0.05, 1e-3, 1.2);
  fast.update(0.0);
  CHECK(fast.lambda() == Approx(1.2e-3).epsilon(1e-14));
  fast.update(0.875);
  CHECK(fast.lambda() == Approx(1.2e-3).epsilon(1e-14));
  // Bounds hold as for the sign rule; state round-trips; bad fields are named.
  fast.set_clamp(1e-12, 1.3e-3);
  for (int i = 0; i < 5; ++i) fast.update(0.0);
  CHECK(fast.lambda() == 1.3e-3);
  CHECK(fast.consecutive_steps_at_bound() == 5);
  LambdaController copy;
  copy.set_state(fast.state());
  CHECK(copy.rule() == LambdaRule::smoothed);
  copy.update(0.5);
  fast.update(0.5);
  CHECK(copy.lambda() == fast.lambda());
  auto bad = fast.state();
  bad.smoothing = 1.0;
  CHECK_THROWS_WITH(copy.set_state(bad), Catch::Contains("smoothing = 1"));
  bad = fast.state();
  bad.band = 0;
  CHECK_THROWS_WITH(copy.set_state(bad), Catch::Contains("band = 0"));
  bad = fast.state();
  bad.average = 1.5;
  CHECK_THROWS_WITH(copy.set_state(bad), Catch::Contains("average sparsity 1.5"));
  bad = fast.state();
  bad.rule = LambdaRule(7);
  CHECK_THROWS_WITH(copy.set_state(bad), Catch::Contains("not a LambdaRule"));
  CHECK(copy.lambda() == fast.lambda());  // a rejected state changes nothing
}

TEST_CASE("lambda controller: grows by alpha below target, shrinks at or above it", "[remoe]") {
  LambdaController ctl(LambdaController::target_for(1, 8));
  CHECK(ctl.target() == 0.875);
  CHECK(ctl.lambda() == 1e-8);
  double expect = 1e-8;
  for (int i = 0; i < 5; ++i) {
    ctl.update(0.5);
    expect *= 1.2;
    CHECK(ctl.lambda() == Approx(expect).epsilon(1e-12));
  }
  ctl.update(0.875);  // equality decreases, as the reference
  CHECK(ctl.lambda() == Approx(expect / 1.2).epsilon(1e-12));
  ctl.update(0.95);
  CHECK(ctl.lambda() == Approx(expect / 1.44).epsilon(1e-12));
  CHECK(ctl.steps() == 7);
  // Granularity multiplies E and k alike: the target stays 1 - k/E.
  MoEConfig cfg;
  cfg.n_experts = 8;
  cfg.experts_per_token = 1;
  cfg.granularity = 4;
  CHECK(LambdaController::target_for(double(cfg.total_per_token()), double(cfg.total_experts())) == 0.875);
  // Clamp, save and restore.
  ctl.set_clamp(1e-12, 2e-8);
  for (int i = 0; i < 20; ++i) ctl.update(0.0);
  CHECK(ctl.lambda() == 2e-8);
  LambdaController copy;
  copy.set_state(ctl.state());
  CHECK(copy.lambda() == ctl.lambda());
  CHECK(copy.steps() == ctl.steps());
  CHECK_THROWS_WITH(LambdaController(0.5, 1e-8, 1.0), Catch::Contains("alpha"));
}

TEST_CASE("MoE handles tokens, experts and batches with no expert, and all-active batches", "[remoe]") {
  MoEConfig cfg = small_config(FfnKind::swiglu);
  ReMoE moe(cfg, 2);
  // All-zero batch: every logit is 0, so nothing routes (z = 0 is inactive).
  RowMat<double> zero = RowMat<double>::Zero(6, 5), y(6, 5), dx(6, 5);
  ReMoE::Cache cache;
  auto g = moe.make_grads();
  moe.set_lambda(1.0);
  moe.forward(zero, y, cache);
  CHECK(y.cwiseAbs().maxCoeff() == 0);
  CHECK(moe.stats(cache).sparsity == 1.0);
  CHECK(moe.stats(cache).zero_expert_fraction == 1.0);
  moe.backward(randn_mat(6, 5, 1), dx, cache, g);
  CHECK(dx.allFinite());
  CHECK(g.experts.w1.cwiseAbs().maxCoeff() == 0);
  // One all-zero token in a normal batch gets exactly zero output.
  RowMat<double> x = randn_mat(6, 5, 3);
  x.row(2).setZero();
  moe.forward(x, y, cache);
  CHECK(y.row(2).cwiseAbs().maxCoeff() == 0);
  // All active: router weights and inputs positive.
  moe.router().weight().setConstant(0.3);
  RowMat<double> pos = randn_mat(6, 5, 4).cwiseAbs();
  moe.forward(pos, y, cache);
  CHECK(moe.stats(cache).sparsity == 0.0);
  CHECK(moe.stats(cache).active_histogram[4] == 6);
  CHECK(y.allFinite());
  check_forward(moe, pos);
  moe.backward(randn_mat(6, 5, 5), dx, cache, g);
  CHECK(dx.allFinite());
}

TEST_CASE("TopK capacity drops tokens past ceil(cf k T / E) per expert, in token order", "[remoe]") {
  MoEConfig cfg = small_config(FfnKind::gelu);
  cfg.experts_per_token = 1;
  cfg.capacity_factor = 1.0;  // 8 tokens, 4 experts: at most 2 per expert
  TopKMoE moe(cfg, 3);
  moe.router().weight().setZero();
  moe.router().weight()(1, 0) = 1.0;  // expert 1 wins for every token with x0 > 0
  RowMat<double> x = RowMat<double>::Zero(8, 5);
  x.col(0).setConstant(1.0);
  RowMat<double> y(8, 5);
  TopKMoE::Cache cache;
  moe.forward(x, y, cache);
  CHECK(cache.router.dropped == 6);
  CHECK(cache.router.gates(0, 1) > 0);
  CHECK(cache.router.gates(1, 1) > 0);
  CHECK(cache.router.gates(2, 1) == 0);
  CHECK(y.row(7).cwiseAbs().maxCoeff() == 0);
}

TEST_CASE("routing metrics and flip rate", "[remoe]") {
  RowMat<double> g(4, 3);
  g << 1, 0, 0,   //
      0.5, 0.2, 0,  //
      0, 0, 0,      //
      0.1, 0, 0;
  const RoutingStats s = routing_stats(g, 1.0);
  CHECK(s.sparsity == Approx(1.0 - 4.0 / 12));
  CHECK(s.mean_active == Approx(1.0));
  CHECK(s.active_histogram == std::vector<Index>{1, 2, 1, 0});
  CHECK(s.load(0) == Approx(0.75));
  CHECK(s.f(0) == Approx(3 * 0.75));
  CHECK(s.dead == 1);
  CHECK(s.zero_expert_fraction == Approx(0.25));
  CHECK(s.max_over_mean_load == Approx(0.75 / (1.0 / 3)));  // loads 0.75, 0.25, 0
  CHECK_THAT(describe(s), Catch::Contains("sparsity 0.6667") && Catch::Contains("25.0% tokens with none") &&
                              Catch::Contains("max/mean load 2.25") && Catch::Contains("load 0.750 0.250 0.000"));
  RowMat<double> h = g;
  h(2, 2) = 1;
  h(0, 0) = 0;
  CHECK(flip_rate(g, h) == Approx(2.0 / 12));
}

TEST_CASE("RoutingMonitor finds a layer that routes nothing for a window, under each policy", "[remoe]") {
  RoutingStats routing, none;
  routing.sparsity = 0.875;
  none.sparsity = 1.0;
  RoutingMonitor report(3, 0.0, DeadRoutingPolicy::report);
  for (int i = 0; i < 2; ++i) report.update(none);
  report.update(routing);  // the run restarts
  for (int i = 0; i < 2; ++i) report.update(none);
  CHECK_FALSE(report.dead());
  report.update(none);
  CHECK(report.dead());
  CHECK(report.deaths() == 1);
  CHECK(report.longest_run() == 3);
  report.update(routing);
  CHECK_FALSE(report.dead());  // it came back
  RoutingMonitor strict(2, 0.01, DeadRoutingPolicy::error, "block 3 MoE");
  RoutingStats almost = none;
  almost.sparsity = 0.995;  // 0.5% routed: at most the floor
  strict.update(almost);
  CHECK_THROWS_WITH(strict.update(almost), Catch::Contains("block 3 MoE") && Catch::Contains("2 consecutive batches"));
  CHECK_THROWS_WITH(RoutingMonitor(0), Catch::Contains("window = 0"));
  CHECK_THROWS_WITH(RoutingMonitor(5, 1.0), Catch::Contains("floor = 1"));
  CHECK_THROWS_WITH(RoutingMonitor(5, 0.0, DeadRoutingPolicy(7)), Catch::Contains("report, warn, error"));
}

TEST_CASE("the expert bias moves by the rate toward balance, only selects, and is refused where it does not exist", "[remoe]") {
  MoEConfig cfg = small_config(FfnKind::gelu);
  cfg.score = ScoreFn::sigmoid;
  cfg.expert_bias = true;
  TopKMoE moe(cfg, 3);
  Vec<double> load(4);
  load << 5, 1, 3, 3;  // mean 3
  moe.update_expert_bias(load, 0.25);
  CHECK(moe.router().expert_bias() == (Vec<double>(4) << -0.25, 0.25, 0, 0).finished());
  // A large bias on one expert selects it for every token, with its unbiased gate.
  moe.router().expert_bias() << 0, 0, 100, 0;
  const RowMat<double> x = randn_mat(9, 5, 4);
  TopKMoE::Cache c;
  RowMat<double> y(9, 5);
  moe.forward(x, y, c);
  for (Index t = 0; t < 9; ++t) {
    CHECK(c.router.gates(t, 2) > 0);
    CHECK(c.router.gates(t, 2) == Approx(1 / (1 + std::exp(-c.router.logits(t, 2)))));
  }
  CHECK(moe.expert_load(c)(2) == 9);
  CHECK(moe.stats(c).bias_max == 100);
  const Vec<double> before = moe.router().expert_bias();
  CHECK_THROWS_WITH(moe.update_expert_bias(Vec<double>::Ones(3), 0.1), Catch::Contains("expected E = 4"));
  CHECK_THROWS_WITH(moe.update_expert_bias(-load, 0.1), Catch::Contains("load of expert 0"));
  CHECK_THROWS_WITH(moe.update_expert_bias(load, -1), Catch::Contains("rate = -1"));
  CHECK(moe.router().expert_bias() == before);  // nothing changed
  ReMoE relu(small_config(FfnKind::gelu), 1);
  CHECK_THROWS_WITH(relu.update_expert_bias(load), Catch::Contains("ReLU routing has no expert bias"));
  cfg.expert_bias = false;
  TopKMoE plain(cfg, 3);
  CHECK_THROWS_WITH(plain.update_expert_bias(load), Catch::Contains("expert_bias = false"));
}

TEST_CASE("MoE refuses router options that do not fit, naming the field and its valid values", "[remoe]") {
  auto refused = [](MoEConfig c, const char* what) {
    CAPTURE(what);
    CHECK_THROWS_WITH(TopKMoE(c), Catch::Contains(what));
  };
  MoEConfig c = small_config(FfnKind::gelu);  // E 4, k 2
  c.n_groups = 3;
  refused(c, "n_groups = 3 must be >= 1 and divide the experts (4)");
  c.n_groups = 2;
  c.group_topk = 3;
  refused(c, "group_topk = 3 must be in [0, n_groups = 2]");
  c.group_topk = 1;
  c.experts_per_token = 3;
  refused(c, "group_topk = 1 groups of 2 experts hold fewer than experts_per_token = 3");
  c = small_config(FfnKind::gelu);
  c.score = ScoreFn::relu;
  refused(c, "must be softmax or sigmoid");
  c.score = ScoreFn::sigmoid;
  c.pre_softmax = false;
  refused(c, "pre_softmax = false");
  c = small_config(FfnKind::gelu);
  c.seq_aux_coeff = 0.1;
  refused(c, "needs seq_len >= 1");
  c.route_scale = 0;
  c.seq_aux_coeff = 0;
  refused(c, "route_scale = 0");
  c = small_config(FfnKind::gelu);
  c.shared_gate = true;
  refused(c, "shared_gate = true needs shared_experts >= 1");
  c = small_config(FfnKind::gelu);
  c.score = ScoreFn::sigmoid;
  CHECK_THROWS_WITH(ReMoE(c), Catch::Contains("applies to the TopK router only"));
  c = small_config(FfnKind::gelu);
  c.seq_aux_coeff = 0.1;
  c.seq_len = 4;
  TopKMoE seq(c, 1);
  RowMat<double> y(6, 5);
  TopKMoE::Cache cache;
  CHECK_THROWS_WITH(seq.forward(randn_mat(6, 5, 1), y, cache), Catch::Contains("not whole sequences of seq_len = 4"));
}

TEST_CASE("MoE rejects bad configurations and inputs", "[remoe]") {
  MoEConfig cfg = small_config(FfnKind::gelu);
  cfg.hidden = 7;
  cfg.granularity = 2;
  CHECK_THROWS_WITH(ReMoE(cfg), Catch::Contains("granularity"));
  cfg = small_config(FfnKind::gelu);
  cfg.experts_per_token = 5;
  CHECK_THROWS_WITH(TopKMoE(cfg), Catch::Contains("experts_per_token = 5"));
  ReMoE moe(small_config(FfnKind::gelu), 1);
  RowMat<double> y(3, 5);
  CHECK_THROWS_WITH(moe.infer(RowMat<double>::Ones(3, 4), y), Catch::Contains("x has 4 columns"));
  RowMat<double> bad = RowMat<double>::Ones(3, 5);
  bad(1, 1) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(moe.infer(bad, y), Catch::Contains("non-finite"));
  CHECK_THROWS_WITH(moe.set_lambda(-1), Catch::Contains("lambda"));
}

TEST_CASE("MoE backward accumulates until zeroed", "[remoe]") {
  ReMoE moe(small_config(FfnKind::gelu), 4);
  const RowMat<double> x = randn_mat(6, 5, 1), dy = randn_mat(6, 5, 2);
  RowMat<double> y(6, 5);
  ReMoE::Cache cache;
  auto fresh = moe.make_grads(), reused = moe.make_grads();
  moe.forward(x, y, cache);
  moe.backward(dy, cache, fresh);
  moe.backward(dy, cache, reused);
  moe.backward(dy, cache, reused);  // reused holds twice the gradient now
  CHECK((reused.experts.w1 - 2 * fresh.experts.w1).cwiseAbs().maxCoeff() < 1e-14);
  const auto params = moe.parameters(reused);
  zero_grads(params);  // the same as reused.zero()
  CHECK(reused.experts.w1.cwiseAbs().maxCoeff() == 0);
  CHECK(reused.router.weight.cwiseAbs().maxCoeff() == 0);
  moe.backward(dy, cache, reused);
  CHECK((reused.experts.w1 - fresh.experts.w1).cwiseAbs().maxCoeff() < 1e-14);
  CHECK((reused.experts.w2 - fresh.experts.w2).cwiseAbs().maxCoeff() < 1e-14);
  CHECK((reused.router.weight - fresh.router.weight).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("MoE FLOPs per token: router over all experts, the budget's experts, or a measured average", "[remoe]") {
  MoEConfig cfg;
  cfg.d_in = 5;
  cfg.n_experts = 4;
  cfg.hidden = 6;
  cfg.experts_per_token = 1;
  cfg.ffn = FfnKind::gelu;
  const ReMoE relu(cfg, 1);
  const TopKMoE topk(cfg, 1);
  const double expert = 2 * 5 * 6 + 6 + 2 * 6 * 5 + 2 * 5;  // W1, GELU, W2, gate and sum
  CHECK(relu.flops_per_token().router == 2 * 5 * 4 + 4);    // logits and ReLU
  CHECK(topk.flops_per_token().router == 2 * 5 * 4 + 3 * 4);  // logits and softmax
  CHECK(relu.flops_per_token().experts == expert);
  CHECK(relu.flops_per_token(2.5).experts == 2.5 * expert);
  cfg.ffn = FfnKind::swiglu;
  cfg.granularity = 2;  // 8 experts of hidden 3, 2 per token
  const ReMoE fine(cfg, 1);
  CHECK(fine.flops_per_token().experts == 2 * (2 * 5 * 6 + 2 * 3 + 2 * 3 * 5 + 2 * 5));
  CHECK(fine.flops_per_token().router == 2 * 5 * 8 + 8);
}
