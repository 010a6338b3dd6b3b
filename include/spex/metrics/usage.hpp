#pragma once
// Expert usage over an evaluation stream (PEER paper section 3.3; the PKM reference's
// eval_memory_usage): accumulate, batch by batch, the gate mass z'_i = sum_x g_i(x) and the
// pick counts of every expert, then summarize the normalized distributions z.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/check.hpp"
#include "../core/types.hpp"

namespace spex {

struct UsageSummary {
  double tokens = 0;           ///< tokens added
  Index used = 0;              ///< experts with non-zero gate mass
  double usage_percent = 0;    ///< 100 * used / N
  double kl_weighted = 0;      ///< KL(z || uniform) = log N + sum z log z, z from gate mass
  double kl_uniform = 0;       ///< the same with z from plain pick counts
  double gini = 0;             ///< 1 - 2 mean(cumsum(sort_asc(z)))
  Index top50 = 0, top90 = 0, top99 = 0;  ///< fewest experts holding 50 / 90 / 99% of the mass
};

/// Accumulates expert usage. Not thread-safe; add() from one thread (it is O(picks)).
///
/// Usage: examples/snippets/building_blocks.cpp (compiled and run by the test suite).
class ExpertUsage {
 public:
  explicit ExpertUsage(Index n_experts) : mass_(static_cast<std::size_t>(n_experts), 0.0), count_(mass_.size(), 0.0) {
    SPEX_CHECK(n_experts >= 1, "n_experts = " << n_experts << " must be >= 1");
  }

  Index n_experts() const { return static_cast<Index>(mass_.size()); }

  /// Adds a batch: ids (B x m) with their gates (B x m). Negative ids (padding) are skipped.
  template <class DerivedIds, class DerivedGates>
  void add(const Eigen::MatrixBase<DerivedIds>& ids, const Eigen::MatrixBase<DerivedGates>& gates) {
    check_shape(gates, ids.rows(), ids.cols(), "gates");
    for (Index t = 0; t < ids.rows(); ++t)
      for (Index j = 0; j < ids.cols(); ++j) {
        const Index e = ids(t, j);
        if (e < 0) continue;
        SPEX_CHECK(e < n_experts(), "expert id " << e << " is outside [0, " << n_experts() << ")");
        SPEX_CHECK(std::isfinite(double(gates(t, j))), "gate at (" << t << ", " << j << ") is not finite");
        mass_[e] += std::abs(double(gates(t, j)));
        count_[e] += 1.0;
      }
    tokens_ += double(ids.rows());
  }

  void reset() {
    std::fill(mass_.begin(), mass_.end(), 0.0);
    std::fill(count_.begin(), count_.end(), 0.0);
    tokens_ = 0;
  }

  /// Gate mass per expert as accumulated (not normalized).
  const std::vector<double>& mass() const { return mass_; }
  const std::vector<double>& counts() const { return count_; }

  UsageSummary summary() const {
    UsageSummary s;
    s.tokens = tokens_;
    const double n = double(mass_.size());
    for (double m : mass_) s.used += m != 0.0;
    s.usage_percent = 100.0 * double(s.used) / n;
    s.kl_weighted = kl_from_uniform(mass_);
    s.kl_uniform = kl_from_uniform(count_);
    std::vector<double> z = normalized(mass_);
    std::sort(z.begin(), z.end());
    double cum = 0, cum_sum = 0;
    std::vector<double> cumsum(z.size());
    for (std::size_t i = 0; i < z.size(); ++i) {
      cum += z[i];
      cumsum[i] = cum;
      cum_sum += cum;
    }
    s.gini = 1.0 - 2.0 * cum_sum / n;
    // N - searchsorted(cumsum, v) with numpy's side='left': the first i with cumsum[i] >= v.
    auto top = [&](double v) {
      return Index(mass_.size()) - Index(std::lower_bound(cumsum.begin(), cumsum.end(), v) - cumsum.begin());
    };
    s.top50 = top(0.5);
    s.top90 = top(0.1);
    s.top99 = top(0.01);
    return s;
  }

 private:
  static std::vector<double> normalized(const std::vector<double>& v) {
    double total = 0;
    for (double x : v) total += x;
    std::vector<double> z(v.size(), 0.0);
    if (total > 0)
      for (std::size_t i = 0; i < v.size(); ++i) z[i] = v[i] / total;
    return z;
  }
  /// log N + sum z log z with 0 log 0 = 0; 0 for an empty distribution.
  static double kl_from_uniform(const std::vector<double>& v) {
    const std::vector<double> z = normalized(v);
    double s = 0, total = 0;
    for (double x : z) {
      total += x;
      if (x > 0) s += x * std::log(x);
    }
    return total > 0 ? std::log(double(v.size())) + s : 0.0;
  }

  std::vector<double> mass_, count_;
  double tokens_ = 0;
};

}  // namespace spex
