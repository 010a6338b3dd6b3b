#pragma once
// What compare_layers reports per variant, and the table it prints per task.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <spex/spex.hpp>

namespace compare {

/// ReMoE's sparsity after the warm-up. The warm-up ends at the first step whose 50-step mean
/// sparsity is within 0.01 of the target; from there on: every step's sparsity against the
/// target, and lambda's range.
struct SparsityReport {
  int settled_step = -1;             ///< -1: never settled
  double mean = 0;                   ///< mean sparsity after settling
  double max_step_deviation = 0;     ///< largest |S_step - target| after settling
  double within_3pct = 0;            ///< fraction of those steps with |S - target| <= 3% of target
  double lambda_min = 0, lambda_max = 0;
};

inline SparsityReport sparsity_report(const std::vector<double>& sparsity, const std::vector<double>& lambda, double target) {
  SparsityReport r;
  const std::size_t n = sparsity.size(), w = 50;
  double window = 0;
  for (std::size_t i = 0; i < n && r.settled_step < 0; ++i) {
    window += sparsity[i] - (i >= w ? sparsity[i - w] : 0.0);
    if (i + 1 >= w && std::abs(window / double(w) - target) <= 0.01) r.settled_step = int(i + 1);
  }
  if (r.settled_step < 0 || std::size_t(r.settled_step) >= n) return r;
  std::size_t inside = 0;
  r.lambda_min = r.lambda_max = lambda[std::size_t(r.settled_step)];
  for (std::size_t i = std::size_t(r.settled_step); i < n; ++i) {
    r.mean += sparsity[i];
    const double dev = std::abs(sparsity[i] - target);
    r.max_step_deviation = std::max(r.max_step_deviation, dev);
    inside += dev <= 0.03 * target;
    r.lambda_min = std::min(r.lambda_min, lambda[i]);
    r.lambda_max = std::max(r.lambda_max, lambda[i]);
  }
  r.within_3pct = double(inside) / double(n - std::size_t(r.settled_step));
  r.mean /= double(n - std::size_t(r.settled_step));
  return r;
}

struct Summary {
  std::string variant;
  spex::Index active = 0, total = 0;
  double flops = 0;  // forward FLOPs per token of the block
  double train_loss = 0, val_loss = 0, tokens_per_s = 0, optimizer_share = 0;
  bool has_usage = false;
  spex::UsageSummary usage;
  bool has_sparsity = false;
  SparsityReport sparsity_report;
  double eval_active = 0, eval_zero_tokens = 0;  // on the validation set: experts per token, tokens with none
  // PEER and PKM after training, expert tables stored compact for inference (bf16, int8): the
  // validation loss and the block output's error relative to float32 on the validation set.
  bool has_compact = false;
  double compact_val_loss[2] = {0, 0}, compact_rel_error[2] = {0, 0};
  // TopK MoE: the load balance on the validation set (the busiest expert's load over the mean,
  // averaged over the batches) and, with an expert bias, its range after training.
  bool has_balance = false;
  double max_over_mean = 0, bias_min = 0, bias_max = 0;
};

inline std::string fixed(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.4f", v);
  return b;
}

inline void print_table(const std::vector<Summary>& rows, double dense_flops) {
  std::printf("\n%-12s %10s %11s %9s %6s %11s %10s %10s %9s %8s\n", "variant", "active", "total", "kFLOP/tok", "/dense",
              "train loss", "val loss", "tokens/s", "opt share", "usage %");
  for (const auto& s : rows) {
    std::printf("%-12s %10lld %11lld %9.1f %5.2fx %11.4f %10.4f %10.0f %8.1f%%", s.variant.c_str(), (long long)s.active,
                (long long)s.total, s.flops / 1e3, s.flops / dense_flops, s.train_loss, s.val_loss, s.tokens_per_s,
                100 * s.optimizer_share);
    s.has_usage ? std::printf(" %8.1f\n", s.usage.usage_percent) : std::printf(" %8s\n", "-");
  }
  bool any_compact = false;
  for (const auto& s : rows) any_compact = any_compact || s.has_compact;
  if (any_compact) {
    std::printf("\nexpert tables stored compact for inference (validation loss, change vs float32; block output error):\n");
    std::printf("%-10s %10s %20s %20s %12s %12s\n", "variant", "f32 loss", "bf16 loss", "int8 loss", "bf16 error", "int8 error");
    for (const auto& s : rows) {
      if (!s.has_compact) continue;
      auto change = [&](double v) { return 100 * (v - s.val_loss) / s.val_loss; };
      std::printf("%-10s %10.4f %10.4f (%+6.3f%%) %10.4f (%+6.3f%%) %12.2e %12.2e\n", s.variant.c_str(), s.val_loss,
                  s.compact_val_loss[0], change(s.compact_val_loss[0]), s.compact_val_loss[1], change(s.compact_val_loss[1]),
                  s.compact_rel_error[0], s.compact_rel_error[1]);
    }
  }
  for (const auto& s : rows) {
    if (!s.has_sparsity) continue;
    const auto& r = s.sparsity_report;
    if (r.settled_step < 0) {
      std::printf("%s: the sparsity never settled at its target\n", s.variant.c_str());
      continue;
    }
    std::printf("%s: settled at step %d; after it: mean sparsity %.4f, largest step deviation %.4f, %.1f%% of steps within "
                "3%% of the target, lambda %.3g-%.3g; validation: %.3f experts per token, %.1f%% of tokens with none\n",
                s.variant.c_str(), r.settled_step, r.mean, r.max_step_deviation, 100 * r.within_3pct, r.lambda_min,
                r.lambda_max, s.eval_active, 100 * s.eval_zero_tokens);
  }
  for (const auto& s : rows)
    if (s.has_balance)
      std::printf("%s: validation load balance: busiest expert %.2fx the mean load%s\n", s.variant.c_str(), s.max_over_mean,
                  s.bias_min == s.bias_max ? "" : (", expert bias in [" + fixed(s.bias_min) + ", " + fixed(s.bias_max) + "]").c_str());
}

}  // namespace compare
