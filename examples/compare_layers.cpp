// compare_layers: one small model trained five ways at the same active parameters per token,
// with the same optimizer (Adam; lazy row-sparse Adam for embeddings and expert tables), steps
// and seed: a dense FFN block, TopK MoE, ReMoE, PEER and PKM. Two tasks: next-character
// prediction on English text, and associative recall of seeded (key -> value) facts, where
// total parameters decide how many facts fit.
//
//   compare_layers [--quick] [--steps N] [--out DIR] [--save DIR] [--resume DIR] [--text FILE ...]
//
// Prints a progress line every few steps and a table per task; writes DIR/curves.csv and
// DIR/curves.svg (loss vs step per variant; ReMoE's sparsity vs step). --save DIR writes a
// checkpoint per task and variant after the last step; --resume DIR continues those runs up to
// --steps: `--steps 100 --save D` then `--steps 200 --resume D` prints and writes the same
// losses for steps 101-200 as one run of `--steps 200` (same options otherwise).
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "compare/checkpoint.hpp"
#include "compare/model.hpp"
#include "compare/plot.hpp"

#include "example_setup.hpp"

namespace {

using namespace compare;

struct Options {
  bool quick = false;
  int steps = 4000;
  std::string out = "compare_out";
  std::string save, resume;       // checkpoint directories (compare/checkpoint.hpp)
  std::vector<std::string> text;  // default: the license texts every Debian system ships (base-files)
};

std::vector<std::string> default_texts() {
  std::vector<std::string> paths;
  for (const char* f : {"Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2", "GPL-3",
                        "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0"}) {
    const std::string p = std::string("/usr/share/common-licenses/") + f;
    if (std::filesystem::exists(p)) paths.push_back(p);
  }
  if (paths.empty()) throw std::runtime_error("no text in /usr/share/common-licenses: pass --text FILE");
  return paths;
}

struct Curve {
  std::string task, variant;
  std::vector<double> step, train_loss, sparsity, lambda;
  std::vector<double> eval_step, val_loss;
};

struct Summary {
  std::string variant;
  Index active = 0, total = 0;
  double train_loss = 0, val_loss = 0, tokens_per_s = 0, optimizer_share = 0, usage = -1, sparsity = -1;
  double sparsity_dev = -1;  // largest |50-step mean - target| over the second half
};

// Sizes of one task: the dense hidden size H sets the active budget of every variant.
struct TaskShape {
  int context;
  Index emb, hidden, peer_k, pkm_k, n_keys;
};

template <class Block>
Summary run(const std::string& variant, const Dataset& data, const TaskShape& ts, std::unique_ptr<Block> block,
            Index block_active, const Options& opt, std::vector<Curve>& curves) {
  const std::uint64_t seed = 7;
  Model<Block> model(data.vocab, data.context, ts.emb, std::move(block), 3e-3, seed);
  spex::LambdaController ctl(spex::LambdaController::target_for(1, 8));
  spex::Rng rng(seed + 1);
  const Index batch = 128;
  const int log_every = std::max(1, opt.steps / 10), eval_every = std::max(1, opt.steps / 20);
  const std::size_t n_val = std::min<std::size_t>(data.n_val(), 4096);
  Summary sum;
  sum.variant = variant;
  std::vector<std::size_t> rows(batch);
  RunHistory h;
  if (!opt.resume.empty()) {
    h = load_run(checkpoint_path(opt.resume, data.name, variant), model, ctl, rng);
    std::printf("  [%s/%s] resumed after step %d from %s\n", data.name.c_str(), variant.c_str(), h.steps_done, opt.resume.c_str());
  }
  for (int step = h.steps_done + 1; step <= opt.steps; ++step) {
    for (auto& r : rows) r = rng.below(data.n_train());
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
                  double(step) * batch / h.seconds);
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
  sum.tokens_per_s = double(opt.steps) * batch / h.seconds;
  sum.optimizer_share = h.opt_seconds / h.seconds;
  if constexpr (is_remoe<Block>::value) {
    // After the warm-up: the mean over the second half, and the largest deviation of a 50-step
    // moving average from the target (a single step's sparsity is one batch's: it jitters).
    const std::size_t n = curve.sparsity.size(), half = n / 2;
    double acc = 0, dev = 0;
    for (std::size_t i = half; i < n; ++i) {
      acc += curve.sparsity[i];
      if (i >= 49) {
        double m = 0;
        for (std::size_t j = i - 49; j <= i; ++j) m += curve.sparsity[j] / 50;
        dev = std::max(dev, std::abs(m - ctl.target()));
      }
    }
    sum.sparsity = acc / double(n - half);
    sum.sparsity_dev = dev;
  }
  if constexpr (is_product_key<Block>::value) {
    spex::ExpertUsage usage(model.block().n_experts());
    model.evaluate(data.val_x, data.val_y, 0, data.n_val(), [&](const typename Block::Cache& c) {
      usage.add(c.retrieval.ids, c.retrieval.gates);
    });
    sum.usage = usage.summary().usage_percent;
  }
  curves.push_back(std::move(curve));
  return sum;
}

std::vector<Summary> run_task(const Dataset& data, const TaskShape& ts, const Options& opt, std::vector<Curve>& curves) {
  const Index d = data.context * ts.emb, h = ts.hidden;
  std::printf("\n== %s: %zu train / %zu val examples, vocab %d, d = %lld, active FFN hidden %lld ==\n",
              data.name.c_str(), data.n_train(), data.n_val(), data.vocab, (long long)d, (long long)h);
  std::vector<Summary> out;
  out.push_back(run("dense", data, ts, std::make_unique<DenseBlock>(d, h, 11), 2 * d * h, opt, curves));

  spex::MoEConfig moe;
  moe.d_in = d;
  moe.n_experts = 8;
  moe.hidden = h;
  moe.experts_per_token = 1;
  moe.ffn = spex::FfnKind::gelu;
  moe.router_init_std = 1.0 / std::sqrt(double(d));
  out.push_back(run("topk-moe", data, ts, std::make_unique<TopKBlock>(moe, 12), 2 * d * h + d * 8, opt, curves));
  out.push_back(run("remoe", data, ts, std::make_unique<ReMoEBlock>(moe, 13), 2 * d * h + d * 8, opt, curves));

  spex::ProductKeyLayerConfig pk;
  pk.d_in = d;
  pk.n_keys = ts.n_keys;
  pk.heads = 16;
  pk.top_k = ts.peer_k;
  pk.d_key = 32;
  pk.norm = spex::NormKind::batch;
  pk.shared_keys = false;  // measured: keys shared by the heads retrieved half as many distinct experts
  const Index query = d * pk.heads * pk.d_key;
  const auto size_name = [](Index n) { return std::to_string(n * n / 1024) + "k"; };
  // The default run also trains PEER at N = 128^2, for usage at two sizes.
  std::vector<Index> peer_sizes{ts.n_keys};
  if (ts.n_keys > 128) peer_sizes.insert(peer_sizes.begin(), 128);
  for (Index n : peer_sizes) {
    pk.n_keys = n;
    out.push_back(run("peer-" + size_name(n), data, ts, std::make_unique<PeerBlock>(pk, 14),
                      2 * d * pk.heads * pk.top_k + query, opt, curves));
  }
  pk.n_keys = ts.n_keys;
  pk.top_k = ts.pkm_k;
  out.push_back(run("pkm-" + size_name(ts.n_keys), data, ts, std::make_unique<PkmBlock>(pk, 15),
                    d * pk.heads * pk.top_k + query, opt, curves));

  std::printf("\n%-10s %12s %12s %11s %10s %11s %9s %9s %9s %9s\n", "variant", "active", "total", "train loss",
              "val loss", "tokens/s", "opt share", "usage %", "sparsity", "max dev");
  for (const auto& s : out) {
    std::printf("%-10s %12lld %12lld %11.4f %10.4f %11.0f %8.1f%%", s.variant.c_str(), (long long)s.active,
                (long long)s.total, s.train_loss, s.val_loss, s.tokens_per_s, 100 * s.optimizer_share);
    s.usage >= 0 ? std::printf(" %9.1f", s.usage) : std::printf(" %9s", "-");
    s.sparsity >= 0 ? std::printf(" %9.3f %9.4f\n", s.sparsity, s.sparsity_dev) : std::printf(" %9s %9s\n", "-", "-");
  }
  return out;
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
  bool custom_text = false, custom_steps = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      opt.quick = true;
    } else if (a == "--steps" && i + 1 < argc) {
      opt.steps = std::atoi(argv[++i]);
      custom_steps = true;
    } else if (a == "--out" && i + 1 < argc) {
      opt.out = argv[++i];
    } else if (a == "--save" && i + 1 < argc) {
      opt.save = argv[++i];
    } else if (a == "--resume" && i + 1 < argc) {
      opt.resume = argv[++i];
    } else if (a == "--text" && i + 1 < argc) {
      if (!custom_text) opt.text.clear();
      custom_text = true;
      opt.text.push_back(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: compare_layers [--quick] [--steps N] [--out DIR] [--save DIR] [--resume DIR] [--text FILE ...]\n");
      return 2;
    }
  }
  if (opt.quick && !custom_steps) opt.steps = 300;
  if (!custom_text) opt.text = default_texts();
  if (opt.steps < 10) {
    std::fprintf(stderr, "--steps must be at least 10\n");
    return 2;
  }
  try {
    std::printf("compare_layers: %d steps per variant, batch 128, Adam lr 3e-3, seed 7 (%s, %d threads)\n", opt.steps,
                spex::default_arch::name(), spex::max_threads());
    std::vector<Curve> curves;
    const Index n_keys = opt.quick ? 128 : 256;
    run_task(char_lm(opt.text, 8), TaskShape{8, 16, 64, 4, 8, n_keys}, opt, curves);
    run_task(recall(opt.quick ? 2048 : 4096, 3, 5), TaskShape{4, 16, 32, 2, 4, n_keys}, opt, curves);
    write_outputs(curves, opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_layers: %s\n", e.what());
    return 1;
  }
  return 0;
}
