#pragma once
// compare_layers' command line.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <spex/spex.hpp>

namespace compare {

constexpr const char* kUsage =
    "usage: compare_layers [--quick] [--steps N] [--horizon N] [--seed S] [--tasks LIST] [--variants LIST]\n"
    "                      [--lambda-rule sign|smoothed] [--penalty l1|l1_lb|l1_lb_spare_top]\n"
    "                      [--granularity G] [--learn-keys] [--table2]\n"
    "                      [--out DIR] [--save DIR] [--resume DIR]\n"
    "                      [--text FILE ...]\n";

struct Options {
  bool quick = false;
  bool table2 = false;            // PEER usage by N, query norm and key sharing instead of the comparison
  int steps = 4000;
  int horizon = 0;                // the learning-rate schedule's length (0: steps)
  std::uint64_t seed = 7;
  std::vector<std::string> tasks, variants;  // empty: all
  spex::LambdaRule rule = spex::LambdaRule::smoothed;  // ReMoE's lambda controller
  spex::Penalty penalty = spex::MoEConfig().penalty;   // ReMoE's sparsity penalty
  int granularity = 1;                                  // MoE: E = 8 G experts of hidden 4d / G, k = G
  bool learn_keys = false;                              // PEER/PKM: train the sub-keys
  std::string out = "compare_out";
  std::string save, resume;       // checkpoint directories (compare/checkpoint.hpp)
  std::vector<std::string> text;  // default: the license texts every Debian system ships (base-files)

  int schedule_steps() const { return horizon > 0 ? horizon : steps; }
  bool wants_task(const std::string& t) const { return tasks.empty() || std::count(tasks.begin(), tasks.end(), t) > 0; }
  bool wants(const std::string& v) const { return variants.empty() || std::count(variants.begin(), variants.end(), v) > 0; }
};

inline std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

inline int parse_count(const std::string& flag, const char* v) {
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (*v == '\0' || *end != '\0' || n < 1 || n > 100000000) throw std::invalid_argument(flag + " takes a count, not '" + v + "'");
  return int(n);
}

/// Throws std::invalid_argument (the caller prints kUsage) on anything it does not know.
inline Options parse_options(int argc, char** argv) {
  Options opt;
  bool custom_text = false, custom_steps = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--quick") {
      opt.quick = true;
    } else if (a == "--table2") {
      opt.table2 = true;
    } else if (a == "--steps") {
      opt.steps = parse_count(a, value());
      custom_steps = true;
    } else if (a == "--horizon") {
      opt.horizon = parse_count(a, value());
    } else if (a == "--seed") {
      opt.seed = std::uint64_t(parse_count(a, value()));
    } else if (a == "--tasks") {
      opt.tasks = split_list(value());
    } else if (a == "--variants") {
      opt.variants = split_list(value());
    } else if (a == "--lambda-rule") {
      const std::string r = value();
      if (r != "sign" && r != "smoothed") throw std::invalid_argument("--lambda-rule is sign or smoothed, not " + r);
      opt.rule = r == "sign" ? spex::LambdaRule::sign : spex::LambdaRule::smoothed;
    } else if (a == "--penalty") {
      const std::string v = value();
      bool known = false;
      for (spex::Penalty p : {spex::Penalty::l1, spex::Penalty::l1_lb, spex::Penalty::l1_lb_spare_top})
        if (v == spex::to_string(p)) opt.penalty = p, known = true;
      if (!known) throw std::invalid_argument("--penalty is l1, l1_lb or l1_lb_spare_top, not " + v);
    } else if (a == "--learn-keys") {
      opt.learn_keys = true;
    } else if (a == "--granularity") {
      opt.granularity = parse_count(a, value());
    } else if (a == "--out") {
      opt.out = value();
    } else if (a == "--save") {
      opt.save = value();
    } else if (a == "--resume") {
      opt.resume = value();
    } else if (a == "--text") {
      if (!custom_text) opt.text.clear();
      custom_text = true;
      opt.text.push_back(value());
    } else {
      throw std::invalid_argument("unknown argument " + a);
    }
  }
  if (!custom_steps) opt.steps = opt.quick ? 300 : opt.table2 ? 1000 : 4000;
  if (opt.steps < 10) throw std::invalid_argument("--steps must be at least 10");
  for (const auto& t : opt.tasks)
    if (t != "char-lm" && t != "recall") throw std::invalid_argument("--tasks takes char-lm and/or recall, not " + t);
  return opt;
}

}  // namespace compare
