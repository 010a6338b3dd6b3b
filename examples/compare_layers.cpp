// compare_layers: one small model trained six ways at equal forward FLOPs per token of its
// block, with the same optimizer (Adam with warm-up and cosine decay; lazy row-sparse Adam for
// embeddings and expert tables), steps and seed: a dense FFN block (hidden 4d), TopK MoE and
// ReMoE (8 experts of the same hidden, 1 per token), a DeepSeek-V3-style MoE (sigmoid scores,
// the selection bias instead of an aux loss, 1 routed and 1 shared expert of half the hidden),
// PEER and PKM (heads and top-k fixed, d_key the largest that keeps the block within the dense
// block's FLOPs). Two tasks:
// next-character prediction on English text, and associative recall of seeded (key -> value)
// facts, where total parameters decide how many facts fit.
//
//   compare_layers [--quick] [--steps N] [--horizon N] [--seed S] [--tasks LIST] [--variants LIST]
//                  [--lambda-rule sign|smoothed] [--penalty l1|l1_lb|l1_lb_spare_top] [--granularity G] [--learn-keys]
//                  [--table2]
//                  [--out DIR] [--save DIR] [--resume DIR] [--text FILE ...]
//
// Prints a progress line every few steps and a table per task (FLOPs per token, losses,
// throughput, PEER/PKM expert usage, ReMoE's sparsity after its warm-up); writes
// DIR/curves.csv and DIR/curves.svg (validation loss vs step per variant; ReMoE's sparsity and
// lambda vs step). --table2 instead trains PEER alone on char-lm at N = 128^2, 256^2, 512^2, with
// and without query BatchNorm, shared and per-head sub-keys, fixed and learned sub-keys, and
// prints usage, KL and Gini (the PEER paper's Table 2); it writes DIR/table2.csv.
// --save DIR writes a checkpoint per task and variant after the last step; --resume DIR
// continues those runs up to --steps: `--steps 100 --horizon 200 --save D` then
// `--steps 200 --resume D` prints and writes the same losses for steps 101-200 as one run of
// `--steps 200` (same options otherwise; --horizon is the learning-rate schedule's length).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "compare/checkpoint.hpp"
#include "compare/model.hpp"
#include "compare/options.hpp"
#include "compare/plot.hpp"
#include "compare/shapes.hpp"
#include "compare/summary.hpp"

#include "example_setup.hpp"

namespace {

using namespace compare;

constexpr Index kMoEExperts = 8, kMoEPerToken = 1;
constexpr double kBiasRate = 1e-3;  // Megatron-Core's default expert bias update rate

struct Curve {
  std::string task, variant;
  std::vector<double> step, train_loss, sparsity, lambda;
  std::vector<double> eval_step, val_loss;
};

spex::MoEConfig moe_config(const TaskShape& ts, spex::Penalty penalty, int granularity) {
  spex::MoEConfig moe;
  moe.d_in = ts.d();
  moe.n_experts = kMoEExperts;
  moe.hidden = ts.hidden();
  moe.experts_per_token = kMoEPerToken;
  moe.ffn = spex::FfnKind::gelu;
  moe.router_init_std = 1.0 / std::sqrt(double(ts.d()));
  moe.penalty = penalty;
  moe.granularity = granularity;
  return moe;
}

std::string size_name(Index n) { return std::to_string(n * n / 1024) + "k"; }

/// Validation loss and block output error of a trained PEER or PKM block with its expert tables
/// stored as bf16 and as int8 (each converted from the trained float tables). Converts the
/// model's block: call it after everything else that uses the model.
template <class Block>
void compact_accuracy(Model<Block>& model, const Dataset& data, Summary& sum) {
  std::vector<Mat> reference;  // the float block's outputs, batch by batch
  model.evaluate(data.val_x, data.val_y, 0, data.n_val(), [&](const typename Block::Cache&) { reference.push_back(model.block_output()); });
  const Block trained = model.block();
  const spex::TableStorage storages[2] = {spex::TableStorage::bf16, spex::TableStorage::int8};
  for (int i = 0; i < 2; ++i) {
    model.block() = trained;
    model.block().set_storage(storages[i]);
    double err = 0, norm = 0;
    std::size_t batch = 0;
    sum.compact_val_loss[i] = model.evaluate(data.val_x, data.val_y, 0, data.n_val(), [&](const typename Block::Cache&) {
      err += (model.block_output() - reference[batch]).squaredNorm();
      norm += reference[batch++].squaredNorm();
    });
    sum.compact_rel_error[i] = std::sqrt(err / norm);
  }
  sum.has_compact = true;
}

template <class Block>
Summary run(const std::string& variant, const Dataset& data, const TaskShape& ts, std::unique_ptr<Block> block,
            Index block_active, double block_flops, const Options& opt, std::vector<Curve>& curves) {
  const std::uint64_t seed = opt.seed;
  Model<Block> model(data.vocab, data.context, ts.emb, std::move(block), kPeakLr, seed);
  const double target = spex::LambdaController::target_for(kMoEPerToken, kMoEExperts);  // unchanged by granularity
  // --quick's 300 steps are shorter than the smoothed rule's warm-up at alpha 1.05 (~380
  // steps from 1e-8): it moves lambda at the paper's 1.2 there.
  spex::LambdaController ctl = opt.rule == spex::LambdaRule::sign
                                   ? spex::LambdaController(target)
                                   : spex::LambdaController::for_small_batches(target, 0.9, 0.05, 1e-8, opt.quick ? 1.2 : 1.05);
  spex::Rng rng(seed + 1);
  const int log_every = std::max(1, opt.steps / 10), eval_every = std::max(1, opt.steps / 20);
  const std::size_t n_val = std::min<std::size_t>(data.n_val(), 4096);
  Summary sum;
  sum.variant = variant;
  sum.flops = block_flops;
  std::vector<std::size_t> rows(kBatch);
  RunHistory h;
  if (!opt.resume.empty()) {
    h = load_run(checkpoint_path(opt.resume, data.name, variant), model, ctl, rng);
    std::printf("  [%s/%s] resumed after step %d from %s\n", data.name.c_str(), variant.c_str(), h.steps_done, opt.resume.c_str());
  }
  for (int step = h.steps_done + 1; step <= opt.steps; ++step) {
    for (auto& r : rows) r = rng.below(data.n_train());
    model.optimizer().set_lr(learning_rate(step, opt.schedule_steps(), kPeakLr));
    if constexpr (is_remoe<Block>::value) model.block().set_lambda(ctl.lambda());
    const StepResult res = model.train_step(data.train_x, data.train_y, rows);
    h.seconds += res.total_seconds;
    h.opt_seconds += res.optimizer_seconds;
    h.ema = std::isnan(h.ema) ? res.loss : 0.95 * h.ema + 0.05 * res.loss;
    double s = NAN;
    if constexpr (is_remoe<Block>::value) {
      s = model.block().stats(model.block_cache()).sparsity;
      h.lambda.push_back(ctl.lambda());
      ctl.update(s);
    }
    if constexpr (std::is_same<Block, TopKBlock>::value) {  // auxiliary-loss-free balancing (DeepSeek-V3)
      if (model.block().config().expert_bias) model.block().update_expert_bias(model.block().expert_load(model.block_cache()), kBiasRate);
    }
    h.step.push_back(step);
    h.train_loss.push_back(res.loss);
    h.sparsity.push_back(s);
    h.steps_done = step;
    if (step % eval_every == 0 || step == opt.steps) {
      h.eval_step.push_back(step);
      h.val_loss.push_back(model.evaluate(data.val_x, data.val_y, 0, n_val));
    }
    if (step % log_every == 0 || step == opt.steps) {
      std::printf("  [%s/%s] step %5d  loss %.4f  %8.0f tokens/s", data.name.c_str(), variant.c_str(), step, h.ema,
                  double(step) * kBatch / h.seconds);
      if constexpr (is_remoe<Block>::value) std::printf("  sparsity %.3f  lambda %.3g", s, ctl.lambda());
      std::printf("\n");
    }
  }
  if (!opt.save.empty()) {
    std::filesystem::create_directories(opt.save);
    save_run(checkpoint_path(opt.save, data.name, variant), model, ctl, rng, h);
  }
  Curve curve{data.name, variant, h.step, h.train_loss, h.sparsity, h.lambda, h.eval_step, h.val_loss};
  sum.active = model.active_params(block_active);
  sum.total = model.total_params();
  sum.train_loss = h.ema;
  sum.val_loss = model.evaluate(data.val_x, data.val_y, 0, data.n_val());
  sum.tokens_per_s = double(opt.steps) * kBatch / h.seconds;
  sum.optimizer_share = h.opt_seconds / h.seconds;
  if constexpr (is_remoe<Block>::value) {
    sum.has_sparsity = true;
    sum.sparsity_report = sparsity_report(curve.sparsity, curve.lambda, ctl.target());
    double active = 0, zero = 0;
    model.evaluate(data.val_x, data.val_y, 0, data.n_val(), [&](const typename Block::Cache& c) {
      const spex::RoutingStats st = model.block().stats(c);
      active += st.mean_active * double(c.router.gates.rows());
      zero += st.zero_expert_fraction * double(c.router.gates.rows());
    });
    sum.eval_active = active / double(data.n_val());
    sum.eval_zero_tokens = zero / double(data.n_val());
  }
  if constexpr (std::is_same<Block, TopKBlock>::value) {
    double ratio = 0;
    int batches = 0;
    model.evaluate(data.val_x, data.val_y, 0, data.n_val(), [&](const typename Block::Cache& c) {
      ratio += model.block().stats(c).max_over_mean_load;
      ++batches;
    });
    sum.has_balance = true;
    sum.max_over_mean = ratio / std::max(1, batches);
    if (model.block().config().expert_bias) {
      sum.bias_min = double(model.block().router().expert_bias().minCoeff());
      sum.bias_max = double(model.block().router().expert_bias().maxCoeff());
    }
  }
  if constexpr (is_product_key<Block>::value) {
    spex::ExpertUsage usage(model.block().n_experts());
    model.evaluate(data.val_x, data.val_y, 0, data.n_val(), [&](const typename Block::Cache& c) {
      usage.add(c.retrieval.ids, c.retrieval.gates);
    });
    sum.has_usage = true;
    sum.usage = usage.summary();
    compact_accuracy(model, data, sum);  // last: it converts the block's tables
  }
  curves.push_back(std::move(curve));
  return sum;
}

std::vector<Summary> run_task(const Dataset& data, const TaskShape& ts, const Options& opt, std::vector<Curve>& curves) {
  const Index d = ts.d(), h = ts.hidden();
  const double dense_flops = dense_block_flops(ts);
  std::printf("\n== %s: %zu train / %zu val examples, vocab %d, d = %lld, dense hidden %lld, %.1f kFLOP/token ==\n",
              data.name.c_str(), data.n_train(), data.n_val(), data.vocab, (long long)d, (long long)h, dense_flops / 1e3);
  std::vector<Summary> out;
  const std::uint64_t s = opt.seed;
  if (opt.wants("dense"))
    out.push_back(run("dense", data, ts, std::make_unique<DenseBlock>(d, h, s + 4), 2 * d * h, dense_flops, opt, curves));

  const spex::MoEConfig moe = moe_config(ts, opt.penalty, opt.granularity);
  const Index moe_active = 2 * d * h * kMoEPerToken + d * moe.total_experts();
  if (opt.wants("topk-moe")) {
    auto b = std::make_unique<TopKBlock>(moe, s + 5);
    const double f = b->flops_per_token().total();
    out.push_back(run("topk-moe", data, ts, std::move(b), moe_active, f, opt, curves));
  }
  if (opt.wants("remoe")) {
    auto b = std::make_unique<ReMoEBlock>(moe, s + 6);
    const double f = b->flops_per_token().total();
    out.push_back(run("remoe", data, ts, std::move(b), moe_active, f, opt, curves));
  }
  if (opt.wants("deepseek-moe")) {
    // DeepSeek-V3's routing at the same FLOPs: sigmoid scores, the selection bias moved each
    // step instead of an aux loss, 1 routed and 1 shared expert of half the hidden size each.
    spex::MoEConfig ds = moe;
    ds.hidden = h / 2;
    ds.score = spex::ScoreFn::sigmoid;
    ds.expert_bias = true;
    ds.aux_coeff = 0.0;
    ds.shared_experts = 1;
    auto b = std::make_unique<TopKBlock>(ds, s + 7);
    const double f = b->flops_per_token().total();
    const Index active = 2 * 2 * d * (h / 2) + d * ds.total_experts();
    out.push_back(run("deepseek-moe", data, ts, std::move(b), active, f, opt, curves));
  }

  spex::ProductKeyLayerConfig peer = pk_config(ts, ts.budget_n, ts.peer_k, opt.learn_keys);
  peer.d_key = d_key_for_budget<PeerBlock>(peer, ts.budget_n, dense_flops);
  for (Index n : ts.peer_n) {
    peer.n_keys = n;
    const std::string name = "peer-" + size_name(n);
    if (!opt.wants(name)) continue;
    const Index active = 2 * d * peer.heads * peer.top_k + d * peer.heads * peer.d_key;
    out.push_back(run(name, data, ts, std::make_unique<PeerBlock>(peer, s + 7), active,
                      PeerBlock::flops_per_token(peer).total(), opt, curves));
  }
  spex::ProductKeyLayerConfig pkm = pk_config(ts, ts.pkm_n, ts.pkm_k, opt.learn_keys);
  pkm.d_key = d_key_for_budget<PkmBlock>(pkm, ts.budget_n, dense_flops);
  const std::string pkm_name = "pkm-" + size_name(ts.pkm_n);
  if (opt.wants(pkm_name)) {
    const Index active = d * pkm.heads * pkm.top_k + d * pkm.heads * pkm.d_key;
    out.push_back(run(pkm_name, data, ts, std::make_unique<PkmBlock>(pkm, s + 8), active,
                      PkmBlock::flops_per_token(pkm).total(), opt, curves));
  }
  std::printf("\nPEER: %lld heads x top-%lld, d_key %lld; PKM: %lld heads x top-%lld, d_key %lld (the largest within the dense "
              "block's FLOPs at N = %lld^2)\n",
              (long long)peer.heads, (long long)peer.top_k, (long long)peer.d_key, (long long)pkm.heads,
              (long long)pkm.top_k, (long long)pkm.d_key, (long long)ts.budget_n);
  print_table(out, dense_flops);
  return out;
}

/// The PEER paper's Table 2 at small scale: expert usage, KL from uniform and Gini of PEER on
/// char-lm by N, query norm, sub-key sharing and sub-key learning.
void run_table2(const Dataset& data, const TaskShape& ts, const Options& opt) {
  const double dense_flops = dense_block_flops(ts);
  spex::ProductKeyLayerConfig peer = pk_config(ts, ts.budget_n, ts.peer_k, opt.learn_keys);
  peer.d_key = d_key_for_budget<PeerBlock>(peer, ts.budget_n, dense_flops);
  std::printf("\n== PEER usage on %s after %d steps: %lld heads x top-%lld, d_key %lld ==\n", data.name.c_str(), opt.steps,
              (long long)peer.heads, (long long)peer.top_k, (long long)peer.d_key);
  std::filesystem::create_directories(opt.out);
  std::ofstream csv(opt.out + "/table2.csv");
  csv << "n_experts,query_norm,sub_keys,learn_keys,usage_percent,kl_weighted,kl_uniform,gini,val_loss\n";
  std::printf("%9s %6s %9s %8s %8s %7s %7s %6s %9s\n", "N", "norm", "sub-keys", "learned", "usage %", "KL", "KL(cnt)", "Gini",
              "val loss");
  std::vector<Curve> curves;
  for (Index n : {Index(128), Index(256), Index(512)})
    for (bool learn : {false, true})
      for (bool shared : {true, false})
        for (spex::NormKind norm : {spex::NormKind::batch, spex::NormKind::none}) {
          peer.n_keys = n;
          peer.shared_keys = shared;
          peer.learn_keys = learn;
          peer.norm = norm;
          const Summary s = run("peer-" + size_name(n), data, ts, std::make_unique<PeerBlock>(peer, opt.seed + 7), 0,
                                PeerBlock::flops_per_token(peer).total(), opt, curves);
          const auto& u = s.usage;
          std::printf("%9lld %6s %9s %8s %8.1f %7.3f %7.3f %6.3f %9.4f\n", (long long)(n * n),
                      norm == spex::NormKind::batch ? "batch" : "none", shared ? "shared" : "per-head", learn ? "yes" : "no",
                      u.usage_percent, u.kl_weighted, u.kl_uniform, u.gini, s.val_loss);
          csv << n * n << ',' << spex::to_string(norm) << ',' << (shared ? "shared" : "per-head") << ',' << (learn ? 1 : 0)
              << ',' << u.usage_percent << ',' << u.kl_weighted << ',' << u.kl_uniform << ',' << u.gini << ',' << s.val_loss
              << '\n';
        }
  std::printf("\nwrote %s/table2.csv\n", opt.out.c_str());
}

std::string full(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

void write_outputs(const std::vector<Curve>& curves, const Options& opt) {
  std::filesystem::create_directories(opt.out);
  std::ofstream csv(opt.out + "/curves.csv");
  csv.precision(17);  // every bit of the doubles: runs with other thread counts must match exactly
  csv << "task,variant,step,train_loss,val_loss,sparsity,lambda\n";
  for (const auto& c : curves) {
    std::size_t e = 0;
    for (std::size_t i = 0; i < c.step.size(); ++i) {
      const bool has_eval = e < c.eval_step.size() && c.eval_step[e] == c.step[i];
      csv << c.task << ',' << c.variant << ',' << c.step[i] << ',' << c.train_loss[i] << ','
          << (has_eval ? full(c.val_loss[e++]) : "") << ',' << (std::isnan(c.sparsity[i]) ? "" : full(c.sparsity[i]))
          << ',' << (c.lambda.empty() ? "" : full(c.lambda[i])) << '\n';
    }
  }
  std::map<std::string, Panel> loss;
  Panel sparsity{"ReMoE: sparsity per step (dashed: target 1 - k/E)", "sparsity", {}, 0.875};
  for (const auto& c : curves) {
    Panel& p = loss[c.task];
    p.title = c.task + ": validation loss (first 4096 validation examples)";
    p.y_label = "loss";
    p.series.push_back({c.variant, c.eval_step, c.val_loss});
    if (c.variant == "remoe") sparsity.series.push_back({c.task, c.step, c.sparsity});
  }
  std::vector<Panel> panels;
  for (auto& kv : loss) panels.push_back(kv.second);
  panels.push_back(sparsity);
  write_svg(opt.out + "/curves.svg", panels);
  std::printf("\nwrote %s/curves.csv and %s/curves.svg\n", opt.out.c_str(), opt.out.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  example_setup();
  Options opt;
  try {
    opt = parse_options(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "compare_layers: %s\n%s", e.what(), kUsage);
    return 2;
  }
  try {
    if (opt.text.empty()) opt.text = default_texts();
    std::printf("compare_layers: %d steps per variant, batch %lld, Adam lr 3e-3 (warm-up, cosine to 3e-4), seed %llu "
                "(%s, %d threads)\n",
                opt.steps, (long long)kBatch, (unsigned long long)opt.seed, spex::default_arch::name(), spex::max_threads());
    // PEER sizes: N = 128^2 and 256^2 (--quick: 128^2); FLOPs matched at 256^2 (--quick: 128^2).
    const Index budget_n = opt.quick ? 128 : 256;
    const std::vector<Index> peer_n = opt.quick ? std::vector<Index>{128} : std::vector<Index>{128, 256};
    const TaskShape lm = char_lm_shape(budget_n, peer_n), facts = recall_shape(budget_n, peer_n);
    if (opt.table2) {
      run_table2(char_lm(opt.text, lm.context), lm, opt);
      return 0;
    }
    std::vector<Curve> curves;
    if (opt.wants_task("char-lm")) run_task(char_lm(opt.text, lm.context), lm, opt, curves);
    if (opt.wants_task("recall")) run_task(recall(opt.quick ? 8192 : 32768, facts.context - 1, 5), facts, opt, curves);
    write_outputs(curves, opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_layers: %s\n", e.what());
    return 1;
  }
  return 0;
}
