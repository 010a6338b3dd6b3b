// remoe_stability: does ReLU routing stay alive in a deeper model? A character model of two
// residual blocks (LayerNorm -> PEER, LayerNorm -> ReMoE with MoEConfig's defaults, E 8, k 1)
// trained with Adam at a constant learning rate, for several rates and seeds. Per run it
// reports the ReMoE layer's sparsity after the warm-up, the share of steps on which no token
// reached any expert, the experts alive at the end and the validation loss; a run "dies" when
// the layer routes no token for `--dead-window` consecutive steps (RoutingMonitor).
//
//   remoe_stability [--steps N] [--lrs 3e-3,1e-2] [--seeds 1,2,3] [--remedy default|none] [--text FILE ...]
//
// Exit status 0 when every run kept its layer alive and its sparsity within 0.05 of the target
// over the last quarter of the steps.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include <spex/spex.hpp>

#include "compare/data.hpp"
#include "example_setup.hpp"

namespace {

using spex::Index;
using Mat = spex::RowMat<float>;

struct Options {
  int steps = 600;
  std::vector<double> lrs = {3e-3, 1e-2};
  std::vector<int> seeds = {1, 2, 3};
  bool remedy = true;
  bool sign_rule = false;
  int trace = 0;
  int dead_window = 20;
  std::vector<std::string> text;
};

template <class T>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(T(std::stod(item)));
  return out;
}

/// embeddings of 8 characters (d = 128) -> x + PEER(LN(x)) -> h + ReMoE(LN(h)) -> logits.
class TwoBlockModel {
 public:
  static constexpr int kContext = 8;
  static constexpr Index kEmb = 16, kD = kContext * kEmb;

  TwoBlockModel(int vocab, double lr, bool remedy, std::uint64_t seed)
      : vocab_(vocab), peer_(peer_config(), seed), moe_(moe_config(remedy), seed + 1) {
    spex::Rng rng(seed + 2);
    embed_.resize(vocab, kEmb);
    spex::fill_normal(embed_, 1.0, rng);
    g_embed_.reset(vocab, kEmb);
    ln1_ = spex::Norm<float>(spex::NormKind::layer, kD);
    ln2_ = spex::Norm<float>(spex::NormKind::layer, kD);
    out_ = spex::Linear<float>(kD, vocab, true, rng);
    g_ln1_ = ln1_.make_grads();
    g_ln2_ = ln2_.make_grads();
    g_out_ = out_.make_grads();
    params_.push_back(spex::sparse_parameter<float>("embed", embed_, &g_embed_));
    spex::append_parameters(params_, ln1_.parameters(g_ln1_, "ln1."));
    spex::append_parameters(params_, peer_.parameters(g_peer_, "peer."));
    spex::append_parameters(params_, ln2_.parameters(g_ln2_, "ln2."));
    spex::append_parameters(params_, moe_.parameters(g_moe_, "moe."));
    spex::append_parameters(params_, out_.parameters(g_out_, "out."));
    spex::AdamConfig ac;
    ac.lr = lr;
    opt_ = std::make_unique<spex::Adam<float>>(params_, ac);
  }

  spex::MoE<float>& moe() { return moe_; }
  const spex::MoE<float>::Cache& moe_cache() const { return c_moe_; }

  /// Mean cross-entropy of examples `rows`; with `train`, one Adam step on it.
  double step(const compare::Dataset& data, const std::vector<int>& xs, const std::vector<int>& ys,
              const std::vector<std::size_t>& rows, bool train) {
    const Index b = Index(rows.size());
    x_.resize(b, kD);
    for (Index i = 0; i < b; ++i)
      for (int j = 0; j < kContext; ++j) x_.row(i).segment(j * kEmb, kEmb) = embed_.row(xs[rows[i] * kContext + j]);
    a_.resize(b, kD);
    p_.resize(b, kD);
    ln1_.forward(x_, a_, c_ln1_, train);
    if (train) peer_.forward(a_, p_, c_peer_);
    else peer_.infer(a_, p_, c_peer_);
    h_ = x_ + p_;
    n_.resize(b, kD);
    m_.resize(b, kD);
    ln2_.forward(h_, n_, c_ln2_, train);
    if (train) moe_.forward(n_, m_, c_moe_);
    else moe_.infer(n_, m_, c_moe_);
    h2_ = h_ + m_;
    logits_.resize(b, vocab_);
    out_.forward(h2_, logits_);
    probs_.resize(b, vocab_);
    double loss = 0;
    for (Index i = 0; i < b; ++i) {
      spex::kernels::softmax(&logits_(i, 0), &probs_(i, 0), std::size_t(vocab_));
      loss -= std::log(std::max(double(probs_(i, ys[rows[i]])), 1e-30));
    }
    loss /= double(b);
    if (!train) return loss;
    (void)data;
    dlogits_ = probs_ / float(b);
    for (Index i = 0; i < b; ++i) dlogits_(i, ys[rows[i]]) -= 1.0f / float(b);
    spex::zero_grads(params_);
    dh2_.resize(b, kD);
    out_.backward(h2_, dlogits_, dh2_, g_out_);
    dn_.resize(b, kD);
    moe_.backward(dh2_, dn_, c_moe_, g_moe_);
    ln2_.backward(dn_, dn_, c_ln2_, g_ln2_);
    dh_ = dh2_ + dn_;
    da_.resize(b, kD);
    peer_.backward(dh_, da_, c_peer_, g_peer_);
    ln1_.backward(da_, da_, c_ln1_, g_ln1_);
    dh_ += da_;
    for (Index i = 0; i < b; ++i)
      for (int j = 0; j < kContext; ++j) g_embed_.add_row(xs[rows[i] * kContext + j], &dh_(i, j * kEmb));
    opt_->step();
    return loss;
  }

 private:
  static spex::ProductKeyLayerConfig peer_config() {
    spex::ProductKeyLayerConfig c;
    c.d_in = kD;
    c.n_keys = 32;
    c.heads = 4;
    c.top_k = 8;
    c.d_key = 32;
    return c;
  }
  static spex::MoEConfig moe_config(bool remedy) {
    spex::MoEConfig c;  // MoEConfig's defaults: E 8, k 1, SwiGLU of hidden 4 d, ...
    c.d_in = kD;
    c.revive_zero_expert_tokens = remedy;
    return c;
  }

  int vocab_;
  Mat embed_;
  spex::SparseRowGrad<float> g_embed_;
  spex::Norm<float> ln1_, ln2_;
  spex::Peer<float> peer_;
  spex::MoE<float> moe_;
  spex::Linear<float> out_;
  spex::Norm<float>::Grads g_ln1_, g_ln2_;
  spex::Peer<float>::Grads g_peer_ = peer_.make_grads();
  spex::MoE<float>::Grads g_moe_ = moe_.make_grads();
  spex::Linear<float>::Grads g_out_;
  spex::ParameterList<float> params_;
  std::unique_ptr<spex::Adam<float>> opt_;
  spex::Norm<float>::Cache c_ln1_, c_ln2_;
  spex::Peer<float>::Cache c_peer_;
  spex::MoE<float>::Cache c_moe_;
  Mat x_, a_, p_, h_, n_, m_, h2_, logits_, probs_, dlogits_, dh2_, dn_, dh_, da_;
};

struct RunResult {
  double sparsity = 0, worst = 0, val_loss = 0, zero_token_share = 0;
  int no_token_steps = 0, alive = 0;
  bool died = false;
};

RunResult train(const compare::Dataset& data, double lr, int seed, const Options& opt) {
  TwoBlockModel model(data.vocab, lr, opt.remedy, std::uint64_t(seed));
  const double target = spex::LambdaController::target_for(1, 8);
  auto ctl = opt.sign_rule ? spex::LambdaController(target) : spex::LambdaController::for_small_batches(target, 0.9, 0.05, 1e-8, 1.2);
  spex::RoutingMonitor monitor(opt.dead_window, 0.0, spex::DeadRoutingPolicy::report);
  spex::Rng rng(std::uint64_t(seed) + 100);
  const Index batch = 128;
  std::vector<std::size_t> rows(batch);
  RunResult r;
  const int tail = opt.steps / 4;
  double zero_tokens = 0;
  for (int step = 0; step < opt.steps; ++step) {
    for (auto& i : rows) i = std::size_t(rng.below(data.n_train()));
    model.moe().set_lambda(ctl.lambda());
    model.step(data, data.train_x, data.train_y, rows, true);
    const spex::RoutingStats st = model.moe().stats(model.moe_cache());
    ctl.update(st.sparsity);
    monitor.update(st);
    r.no_token_steps += st.sparsity == 1.0;
    if (opt.trace > 0 && step % opt.trace == 0)
      std::printf("  step %4d  sparsity %.4f  zero-expert tokens %.3f  lambda %.3g  router |w| %.3f\n", step, st.sparsity,
                  st.zero_expert_fraction, ctl.lambda(), double(model.moe().router().weight().norm()));
    r.died |= monitor.dead();
    if (step >= opt.steps - tail) {
      r.sparsity += st.sparsity / tail;
      r.worst = std::max(r.worst, std::abs(st.sparsity - target));
      zero_tokens += st.zero_expert_fraction / tail;
    }
  }
  r.zero_token_share = zero_tokens;
  const spex::RoutingStats last = model.moe().stats(model.moe_cache());
  for (Index e = 0; e < last.load.size(); ++e) r.alive += last.load(e) > 0;
  std::vector<std::size_t> val(std::min<std::size_t>(data.n_val(), 4096));
  for (std::size_t i = 0; i < val.size(); ++i) val[i] = i;
  r.val_loss = model.step(data, data.val_x, data.val_y, val, false);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  example_setup();
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--steps") opt.steps = std::stoi(next());
    else if (a == "--lrs") opt.lrs = parse_list<double>(next());
    else if (a == "--seeds") opt.seeds = parse_list<int>(next());
    else if (a == "--remedy") opt.remedy = next() != "none";
    else if (a == "--trace") opt.trace = std::stoi(next());
    else if (a == "--rule") opt.sign_rule = next() == "sign";
    else if (a == "--dead-window") opt.dead_window = std::stoi(next());
    else if (a == "--text") opt.text.push_back(next());
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (opt.text.empty()) opt.text = compare::default_texts();
  const compare::Dataset data = compare::char_lm(opt.text, TwoBlockModel::kContext);
  const double target = spex::LambdaController::target_for(1, 8);
  std::printf("ReMoE after PEER, E 8, k 1, target sparsity %.3f, %d steps of 128 tokens, Adam, remedy %s\n", target, opt.steps,
              opt.remedy ? "on (MoEConfig's default)" : "off");
  std::printf("%-8s %-5s %-10s %-10s %-12s %-14s %-7s %-8s %s\n", "lr", "seed", "sparsity", "max |dev|", "no-token steps",
              "zero-expert tok", "alive", "val loss", "verdict");
  bool all_ok = true;
  for (double lr : opt.lrs)
    for (int seed : opt.seeds) {
      const RunResult r = train(data, lr, seed, opt);
      const bool ok = !r.died && std::abs(r.sparsity - target) <= 0.05;
      all_ok &= ok;
      std::printf("%-8.0e %-5d %-10.4f %-10.4f %-14d %-15.3f %-7d %-8.4f %s\n", lr, seed, r.sparsity, r.worst, r.no_token_steps,
                  r.zero_token_share, r.alive, r.val_loss, r.died ? "DIED" : ok ? "ok" : "off target");
    }
  std::printf("every run alive and on target: %s\n", all_ok ? "yes" : "no");
  return all_ok ? 0 : 1;
}
