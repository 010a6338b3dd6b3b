// Lifelong learning with a growing PEER layer (docs/growth_and_freezing.md, "Lifelong learning").
//
// A stream of tasks, one after another: each is a set of associative-recall facts (a key, a
// random input vector, maps to one of `classes` values), disjoint from every other task's. The
// layer's output is the logits over the values (softmax cross-entropy); accuracy is the share of
// a task's facts recalled (argmax). Variants, each trained on the tasks in sequence with Adam:
//   full-ft      one PEER layer of the final size, everything trained on every task
//   grow+freeze  starts at n0^2 experts; after each task it freezes every expert it has (and the
//                sub-key rows and query network, as --freeze-query says) and grows by --grow
//   grow         the same growth, nothing frozen
//   sparse-ft    sparse memory finetuning: the full-ft layer, trained whole on task 1; from task 2
//                on the retrieval is frozen and each step trains only the --smf-top experts of
//                the batch ranked by TF-IDF against the earlier tasks' batches (TfIdfSlotRanking)
//   fixed        the full-ft layer trained on task 1 only, never updated after (the anchor: it
//                forgets nothing and learns nothing new)
//   dense        a dense FFN block (d -> hidden -> classes)
// and, as the reference for each task, a fresh n0^2 layer trained on that task alone.
// It prints the continual-learning matrix (accuracy on every task seen so far after each task),
// the forgetting of task 1 and the forgetting of the old tasks as the relative drop of each from
// right after it was learned to the end (averaged over tasks 1..T-1: the measure of the sparse
// memory finetuning paper), and writes DIR/lifelong.csv and DIR/lifelong.svg. With --seeds, the
// whole run repeats per seed and a summary gives each variant's forgetting and learning per seed.
//
// usage: lifelong [--quick] [--tasks T] [--facts F] [--steps S] [--n0 N] [--grow N]
//                 [--freeze-query yes|no] [--learn-keys] [--shift X] [--smf-top T]
//                 [--seed S | --seeds S1,S2,...] [--out DIR]
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <spex/spex.hpp>

#include "compare/blocks.hpp"
#include "compare/options.hpp"
#include "compare/plot.hpp"
#include "example_setup.hpp"

namespace {

using spex::Index;
using Mat = spex::RowMat<float>;

struct Options {
  int tasks = 5, facts = 512, steps = 600, batch = 64;
  Index d = 64;                 // input width and number of values (the logits)
  Index n0 = 32, grow = 16;     // sub-key rows: first layer, added per task
  bool freeze_query = true;
  bool learn_keys = false;      // train the sub-keys (new rows only, once frozen)
  double shift = 0.0;           // each task's inputs offset by shift * (a random unit vector of the task)
  double lr = 3e-3;
  int smf_top = 256;            // sparse-ft: experts trained per step
  std::uint64_t seed = 7;
  std::vector<std::uint64_t> seeds;  // --seeds: the whole run per seed
  std::string out = "lifelong_out";
};

constexpr const char* kUsage =
    "usage: lifelong [--quick] [--tasks T] [--facts F] [--steps S] [--n0 N] [--grow N]\n"
    "                [--freeze-query yes|no] [--learn-keys] [--shift X] [--smf-top T]\n"
    "                [--seed S | --seeds S1,S2,...] [--out DIR]\n";

Options parse(int argc, char** argv) {
  Options o;
  const auto count = compare::parse_count;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--quick") {
      o.tasks = 3;
      o.facts = 256;
      o.steps = 300;
    } else if (a == "--tasks") {
      o.tasks = count(a, value());
    } else if (a == "--facts") {
      o.facts = count(a, value());
    } else if (a == "--steps") {
      o.steps = count(a, value());
    } else if (a == "--learn-keys") {
      o.learn_keys = true;
    } else if (a == "--n0") {
      o.n0 = count(a, value());
    } else if (a == "--grow") {
      o.grow = count(a, value());
    } else if (a == "--smf-top") {
      o.smf_top = count(a, value());
    } else if (a == "--seeds") {
      const std::string list = value();
      std::size_t begin = 0;
      while (begin <= list.size()) {
        const std::size_t end = std::min(list.find(',', begin), list.size());
        o.seeds.push_back(std::uint64_t(count(a, list.substr(begin, end - begin).c_str())));
        begin = end + 1;
      }
    } else if (a == "--seed") {
      o.seed = std::uint64_t(count(a, value()));
    } else if (a == "--freeze-query") {
      const std::string v = value();
      if (v != "yes" && v != "no") throw std::invalid_argument("--freeze-query takes yes or no");
      o.freeze_query = v == "yes";
    } else if (a == "--shift") {
      char* end = nullptr;
      const char* v = value();
      o.shift = std::strtod(v, &end);
      if (*v == '\0' || *end != '\0' || !(o.shift >= 0 && o.shift < 1e6)) throw std::invalid_argument("--shift takes a number >= 0");
    } else if (a == "--out") {
      o.out = value();
    } else {
      throw std::invalid_argument("unknown argument '" + a + "'");
    }
  }
  return o;
}

/// One task: `facts` inputs (rows of x) and the value each must recall.
struct Task {
  Mat x;
  std::vector<int> y;
};

std::vector<Task> make_tasks(const Options& o) {
  spex::Rng rng(o.seed);
  std::vector<Task> tasks(static_cast<std::size_t>(o.tasks));
  for (auto& t : tasks) {
    t.x.resize(o.facts, o.d);
    spex::fill_normal(t.x, 1.0, rng);
    spex::Vec<float> offset(o.d);
    spex::fill_normal(offset, 1.0, rng);
    t.x.rowwise() += float(o.shift) * offset.normalized().transpose();
    for (int i = 0; i < o.facts; ++i) t.y.push_back(int(rng.below(std::uint64_t(o.d))));
  }
  return tasks;
}

spex::ProductKeyLayerConfig peer_config(const Options& o, Index n) {
  spex::ProductKeyLayerConfig c;
  c.d_in = o.d;
  c.n_keys = n;
  c.heads = 4;
  c.top_k = 8;
  c.d_key = 32;
  c.expert_ids = spex::ExpertIds::shells;
  c.learn_keys = o.learn_keys;
  return c;
}

/// Share of the task's facts whose argmax over the layer's logits (eval mode) is their value.
template <class Block>
double accuracy(const Block& block, const Task& t) {
  Mat logits(t.x.rows(), t.x.cols());
  typename Block::Cache c;
  block.infer(t.x, logits, c);
  int right = 0;
  for (Index i = 0; i < logits.rows(); ++i) {
    Index best = 0;
    logits.row(i).maxCoeff(&best);
    right += best == t.y[std::size_t(i)];
  }
  return double(right) / double(logits.rows());
}

/// o.steps Adam steps of softmax cross-entropy on minibatches of the task; grads, parameter
/// list and optimizer made here (after a growth or a freeze they must be made again).
/// `step_hook(cache, grads)` runs after each forward, before the gradients are cleared and
/// backward runs (sparse-ft picks the step's trainable experts there).
struct NoHook {
  template <class C, class G>
  void operator()(const C&, G&) const {}
};
template <class Block, class Hook = NoHook>
void train(Block& block, const Task& t, const Options& o, spex::Rng& rng, Hook step_hook = {}) {
  auto grads = block.make_grads();
  const spex::ParameterList<float> params = block.parameters(grads);
  spex::AdamConfig ac;
  ac.lr = o.lr;
  spex::Adam<float> adam(params, ac);
  typename Block::Cache c;
  Mat x(o.batch, o.d), logits(o.batch, o.d), dlogits(o.batch, o.d), dx(o.batch, o.d);
  std::vector<int> y(static_cast<std::size_t>(o.batch));
  for (int s = 0; s < o.steps; ++s) {
    for (int i = 0; i < o.batch; ++i) {
      const Index f = Index(rng.below(std::uint64_t(t.x.rows())));
      x.row(i) = t.x.row(f);
      y[std::size_t(i)] = t.y[std::size_t(f)];
    }
    block.forward(x, logits, c);
    step_hook(c, grads);
    for (int i = 0; i < o.batch; ++i) {  // dL/dlogits = (softmax - onehot) / B
      spex::kernels::softmax(&logits(i, 0), &dlogits(i, 0), std::size_t(o.d));
      dlogits(i, y[std::size_t(i)]) -= 1.0f;
    }
    dlogits /= float(o.batch);
    spex::zero_grads(params);
    block.backward(dlogits, dx, c, grads);
    adam.step();
  }
}

/// acc[t][j]: accuracy on task j after training on tasks 0..t.
using Matrix = std::vector<std::vector<double>>;

struct Variant {
  std::string name;
  Matrix acc;
  Index experts = 0;  // at the end
};

/// Trains `block` on the tasks in order; `between(t)` runs after task t (growing, freezing);
/// `hook(t)` gives the step hook of task t (NoHook by default), `trains(t)` whether task t trains.
template <class Block, class Between, class HookOf = NoHook (*)(std::size_t)>
Variant run(const std::string& name, Block& block, const std::vector<Task>& tasks, const Options& o, Between between,
            HookOf hook = [](std::size_t) { return NoHook{}; }, bool (*trains)(std::size_t) = [](std::size_t) { return true; }) {
  Variant v{name, {}, 0};
  spex::Rng rng(o.seed + 100);
  for (std::size_t t = 0; t < tasks.size(); ++t) {
    if (trains(t)) train(block, tasks[t], o, rng, hook(t));
    std::vector<double> row;
    for (std::size_t j = 0; j <= t; ++j) row.push_back(accuracy(block, tasks[j]));
    v.acc.push_back(row);
    std::printf("  %-12s after task %zu:", name.c_str(), t + 1);
    for (double a : row) std::printf(" %5.1f%%", 100 * a);
    std::printf("\n");
    if (t + 1 < tasks.size()) between(t);
  }
  return v;
}

/// The old tasks' forgetting at the end: the mean over tasks j < T of (acc right after learning
/// j - acc after the last task) / acc right after learning j.
double forgetting(const Variant& v) {
  const std::size_t last = v.acc.size() - 1;
  if (last == 0) return 0;
  double sum = 0;
  for (std::size_t j = 0; j < last; ++j) sum += v.acc[j][j] > 0 ? (v.acc[j][j] - v.acc[last][j]) / v.acc[j][j] : 0;
  return sum / double(last);
}

/// The mean over tasks 2..T of each task's accuracy right after it was learned, over a fresh
/// layer's on it alone (how well new tasks are learned).
double learning(const Variant& v, const std::vector<double>& fresh) {
  double sum = 0;
  for (std::size_t t = 1; t < v.acc.size(); ++t) sum += v.acc[t][t] / fresh[t];
  return v.acc.size() > 1 ? sum / double(v.acc.size() - 1) : 1;
}

void print_matrix(const Variant& v) {
  std::printf("\n%s (rows: after task t; columns: accuracy on task j, %%)\n      ", v.name.c_str());
  for (std::size_t j = 0; j < v.acc.size(); ++j) std::printf("  task %zu", j + 1);
  std::printf("\n");
  for (std::size_t t = 0; t < v.acc.size(); ++t) {
    std::printf("  t=%zu", t + 1);
    for (double a : v.acc[t]) std::printf(" %7.1f", 100 * a);
    std::printf("\n");
  }
}

struct SeedResult {
  std::vector<Variant> variants;
  std::vector<double> fresh;
  bool targets = false;  // grow+freeze's goals reached
};

SeedResult run_seed(const Options& o) {
  const std::vector<Task> tasks = make_tasks(o);
  const Index n_final = o.n0 + o.grow * Index(o.tasks - 1);
  std::printf("lifelong: %d tasks of %d facts (d = %lld, %lld values), %d Adam steps of %d per task, shift %.1f\n"
              "PEER h = 4, k = 8: grown from %lld^2 to %lld^2 experts (+%lld sub-key rows per task); fixed: %lld^2; "
              "frozen after each task: experts, sub-key rows%s\n\n",
              o.tasks, o.facts, (long long)o.d, (long long)o.d, o.steps, o.batch, o.shift, (long long)o.n0,
              (long long)n_final, (long long)o.grow, (long long)n_final, o.freeze_query ? ", query network and norm" : "");

  // The reference: a fresh n0^2 layer per task, trained on it alone.
  std::vector<double> fresh;
  for (std::size_t t = 0; t < tasks.size(); ++t) {
    spex::Peer<float> layer(peer_config(o, o.n0), o.seed + 10 + t);
    spex::Rng rng(o.seed + 100);
    train(layer, tasks[t], o, rng);
    fresh.push_back(accuracy(layer, tasks[t]));
    std::printf("  fresh layer on task %zu alone: %5.1f%%\n", t + 1, 100 * fresh.back());
  }

  std::vector<Variant> variants;
  {
    spex::Peer<float> layer(peer_config(o, n_final), o.seed + 1);
    variants.push_back(run("full-ft", layer, tasks, o, [](std::size_t) {}));
    variants.back().experts = layer.n_experts();
  }
  {
    spex::Peer<float> layer(peer_config(o, o.n0), o.seed + 1);
    variants.push_back(run("grow+freeze", layer, tasks, o, [&](std::size_t t) {
      layer.freeze(spex::FrozenSet{layer.config().n_keys, true, o.freeze_query});
      layer.grow(layer.config().n_keys + o.grow, o.seed + 1000 + t);
    }));
    variants.back().experts = layer.n_experts();
  }
  {
    spex::Peer<float> layer(peer_config(o, o.n0), o.seed + 1);
    variants.push_back(run("grow", layer, tasks, o, [&](std::size_t t) {
      layer.grow(layer.config().n_keys + o.grow, o.seed + 1000 + t);
    }));
    variants.back().experts = layer.n_experts();
  }
  {
    // Sparse memory finetuning: task 1 trains the whole layer (its "pretraining"); after each
    // task its batches become background documents, and from task 2 on each step trains the
    // batch's top experts by TF-IDF only, the retrieval frozen.
    spex::Peer<float> layer(peer_config(o, n_final), o.seed + 1);
    spex::TfIdfSlotRanking ranking(layer.n_experts());
    auto add_background = [&](const Task& task) {
      spex::Peer<float>::Cache c;
      Mat y(o.batch, o.d);
      for (Index r = 0; r + o.batch <= task.x.rows(); r += o.batch) {
        layer.infer(task.x.middleRows(r, o.batch), y, c);
        ranking.add_background(c.retrieval.ids);
      }
    };
    auto restrict_step = [&](const spex::Peer<float>::Cache& c, spex::Peer<float>::Grads& g) {
      layer.set_trainable_experts(g, ranking.top(c.retrieval.ids, o.smf_top));
    };
    using Hook = std::function<void(const spex::Peer<float>::Cache&, spex::Peer<float>::Grads&)>;
    variants.push_back(run(
        "sparse-ft", layer, tasks, o,
        [&](std::size_t t) {
          if (t == 0) layer.freeze(spex::FrozenSet{0, true, true});
          add_background(tasks[t]);
        },
        [&](std::size_t t) { return t == 0 ? Hook([](const auto&, auto&) {}) : Hook(restrict_step); }));
    variants.back().experts = layer.n_experts();
  }
  {
    spex::Peer<float> layer(peer_config(o, n_final), o.seed + 1);
    variants.push_back(run(
        "fixed", layer, tasks, o, [](std::size_t) {}, [](std::size_t) { return NoHook{}; },
        [](std::size_t t) { return t == 0; }));
    variants.back().experts = layer.n_experts();
  }
  {
    compare::DenseBlock dense(o.d, 4 * o.d, o.seed + 1);
    variants.push_back(run("dense", dense, tasks, o, [](std::size_t) {}));
  }

  for (const auto& v : variants) print_matrix(v);
  const std::size_t last = tasks.size() - 1;
  std::printf("\nforgetting of task 1 (accuracy right after task 1 -> after task %zu):\n", last + 1);
  for (const auto& v : variants) {
    const double a1 = v.acc[0][0], an = v.acc[last][0];
    std::printf("  %-12s %5.1f%% -> %5.1f%%  (kept %.0f%%)\n", v.name.c_str(), 100 * a1, 100 * an, a1 > 0 ? 100 * an / a1 : 0.0);
  }
  std::printf("\neach task right after it was learned, against a fresh layer on it alone:\n");
  for (const auto& v : variants) {
    std::printf("  %-12s", v.name.c_str());
    for (std::size_t t = 0; t < tasks.size(); ++t) std::printf(" %5.1f%% (%3.0f%%)", 100 * v.acc[t][t], 100 * v.acc[t][t] / fresh[t]);
    std::printf("\n");
  }

  // The goals: grow + freeze keeps >= 90% of task 1 and learns each new task to >= 90% of a
  // fresh layer.
  const Variant& gf = variants[1];
  bool new_tasks_ok = true;
  for (std::size_t t = 0; t < tasks.size(); ++t) new_tasks_ok = new_tasks_ok && gf.acc[t][t] >= 0.9 * fresh[t];
  const bool kept = gf.acc[last][0] >= 0.9 * gf.acc[0][0];
  std::printf("\ngrow+freeze: task 1 kept >= 90%%: %s, every task >= 90%% of a fresh layer: %s\n", kept ? "yes" : "no",
              new_tasks_ok ? "yes" : "no");
  std::printf("\nforgetting of the old tasks (mean relative drop of tasks 1..%zu by the end) and learning (tasks 2..%zu "
              "right after, over a fresh layer):\n",
              last, last + 1);
  for (const auto& v : variants)
    std::printf("  %-12s forgetting %5.1f%%  learning %5.1f%%\n", v.name.c_str(), 100 * forgetting(v), 100 * learning(v, fresh));

  std::filesystem::create_directories(o.out);
  std::ofstream csv(o.out + "/lifelong.csv");
  csv << "variant,after_task,task,accuracy\n";
  for (const auto& v : variants)
    for (std::size_t t = 0; t < v.acc.size(); ++t)
      for (std::size_t j = 0; j <= t; ++j) csv << v.name << ',' << t + 1 << ',' << j + 1 << ',' << v.acc[t][j] << '\n';
  for (std::size_t t = 0; t < fresh.size(); ++t) csv << "fresh," << t + 1 << ',' << t + 1 << ',' << fresh[t] << '\n';
  std::vector<compare::Panel> panels;
  compare::Panel p1{"accuracy on task 1 after each task", "accuracy", {}, NAN};
  compare::Panel p2{"mean accuracy over the tasks seen so far", "accuracy", {}, NAN};
  for (const auto& v : variants) {
    compare::Series s1{v.name, {}, {}}, s2{v.name, {}, {}};
    for (std::size_t t = 0; t < v.acc.size(); ++t) {
      double mean = 0;
      for (double a : v.acc[t]) mean += a / double(v.acc[t].size());
      s1.x.push_back(double(t + 1));
      s1.y.push_back(v.acc[t][0]);
      s2.x.push_back(double(t + 1));
      s2.y.push_back(mean);
    }
    p1.series.push_back(s1);
    p2.series.push_back(s2);
  }
  panels.push_back(p1);
  panels.push_back(p2);
  compare::write_svg(o.out + "/lifelong.svg", panels);
  std::printf("wrote %s/lifelong.csv and %s/lifelong.svg\n", o.out.c_str(), o.out.c_str());
  return SeedResult{variants, fresh, kept && new_tasks_ok};
}

}  // namespace

int main(int argc, char** argv) {
  example_setup();
  Options o;
  try {
    o = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n%s", e.what(), kUsage);
    return 2;
  }
  if (o.seeds.empty()) o.seeds.push_back(o.seed);
  std::vector<SeedResult> results;
  const std::string out = o.out;
  for (std::uint64_t seed : o.seeds) {
    o.seed = seed;
    o.out = o.seeds.size() > 1 ? out + "/seed" + std::to_string(seed) : out;
    if (o.seeds.size() > 1) std::printf("\n=== seed %llu ===\n", (unsigned long long)seed);
    results.push_back(run_seed(o));
  }
  if (results.size() > 1) {
    std::printf("\nover seeds");
    for (std::uint64_t s : o.seeds) std::printf(" %llu", (unsigned long long)s);
    std::printf(": forgetting of the old tasks / learning of the new ones (%%)\n");
    for (std::size_t v = 0; v < results[0].variants.size(); ++v) {
      std::printf("  %-12s", results[0].variants[v].name.c_str());
      for (const auto& r : results) std::printf("  %5.1f / %5.1f", 100 * forgetting(r.variants[v]), 100 * learning(r.variants[v], r.fresh));
      std::printf("\n");
    }
    std::printf("(sparse memory finetuning's paper, on NaturalQuestions after learning new facts: forgetting 11%% sparse, 71%% LoRA, "
                "89%% full finetuning)\n");
  }
  bool all = true;
  for (const auto& r : results) all = all && r.targets;
  std::printf("\ngrow+freeze targets on every seed: %s\n", all ? "yes" : "no");
  return 0;
}
