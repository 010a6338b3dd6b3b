#pragma once
// Routing statistics of a mixture-of-experts batch (docs/remoe.md, "What to watch"), computed from a
// B x E gate matrix (an entry is active when > 0): sparsity, active experts per token and their
// histogram, per-expert load and f_e, dead experts, tokens with no expert; and the flip rate
// of the routing mask between two passes over a fixed calibration batch; RoutingMonitor, which
// finds a layer whose router died.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "../core/check.hpp"
#include "../core/types.hpp"

namespace spex {

struct RoutingStats {
  double sparsity = 0;                 ///< 1 - nnz / (T E)
  double mean_active = 0;              ///< active experts per token, E (1 - S)
  std::vector<Index> active_histogram; ///< [n] = tokens with n active experts, n = 0..E
  Vec<double> load;                    ///< c_e / T: fraction of tokens routed to e
  Vec<double> f;                       ///< E c_e / (k T): 1 = fair share
  Index dead = 0;                      ///< experts with load < dead_threshold
  double zero_expert_fraction = 0;     ///< tokens with no active expert
  double max_over_mean_load = 0;       ///< the busiest expert's load over the mean load (1: balanced)
  // Filled by MoE::stats (not by routing_stats, which sees the gates only):
  Index dropped = 0;                   ///< TopK capacity: (token, expert) pairs dropped
  double bias_min = 0, bias_max = 0;   ///< TopK expert_bias: its range (0, 0 without one)
};

/// The router-quality report of one batch in one line: sparsity, active experts per token,
/// tokens with none, load per expert (as fractions of the tokens), max/mean load, dead experts,
/// dropped pairs and the expert bias's range.
inline std::string describe(const RoutingStats& s) {
  char head[256];
  std::snprintf(head, sizeof head, "sparsity %.4f, %.3f experts/token, %.1f%% tokens with none, max/mean load %.2f, %ld dead, %ld dropped",
                s.sparsity, s.mean_active, 100 * s.zero_expert_fraction, s.max_over_mean_load, long(s.dead), long(s.dropped));
  std::string out = head;
  if (s.bias_min != 0 || s.bias_max != 0) {
    char b[96];
    std::snprintf(b, sizeof b, ", bias [%.4g, %.4g]", s.bias_min, s.bias_max);
    out += b;
  }
  out += ", load";
  for (Index e = 0; e < s.load.size(); ++e) {
    char l[32];
    std::snprintf(l, sizeof l, " %.3f", s.load(e));
    out += l;
  }
  return out;
}

/// Statistics of one batch's gates. `k` is the routing budget; an expert is dead when its load
/// is below `dead_threshold` (the ReMoE paper's heat maps use 1/64).
template <class Derived>
RoutingStats routing_stats(const Eigen::MatrixBase<Derived>& gates, double k, double dead_threshold = 1.0 / 64) {
  using T = typename Derived::Scalar;
  const Index b = gates.rows(), e = gates.cols();
  SPEX_CHECK(k > 0, "budget k = " << k << " must be > 0");
  RoutingStats s;
  s.active_histogram.assign(static_cast<std::size_t>(e + 1), 0);
  s.load = Vec<double>::Zero(e);
  Index nnz = 0, zero_tokens = 0;
  for (Index t = 0; t < b; ++t) {
    Index active = 0;
    for (Index j = 0; j < e; ++j)
      if (gates(t, j) > T(0)) {
        ++active;
        s.load(j) += 1;
      }
    nnz += active;
    zero_tokens += active == 0;
    ++s.active_histogram[active];
  }
  if (b > 0) {
    s.sparsity = 1.0 - double(nnz) / double(b * e);
    s.mean_active = double(nnz) / double(b);
    s.load /= double(b);
    s.zero_expert_fraction = double(zero_tokens) / double(b);
  }
  s.f = s.load * (double(e) / k);
  for (Index j = 0; j < e; ++j) s.dead += s.load(j) < dead_threshold;
  const double mean = e > 0 ? s.load.mean() : 0.0;
  s.max_over_mean_load = mean > 0 ? s.load.maxCoeff() / mean : 0.0;
  return s;
}

/// Flip rate between two routing passes over the same tokens: the fraction of (token, expert)
/// mask entries that changed, sum |M_a - M_b| / (T E) (ReMoE App. A; flip count = E * rate).
template <class DA, class DB>
double flip_rate(const Eigen::MatrixBase<DA>& gates_a, const Eigen::MatrixBase<DB>& gates_b) {
  SPEX_CHECK(gates_a.rows() == gates_b.rows() && gates_a.cols() == gates_b.cols(),
             "gate matrices differ in shape: " << gates_a.rows() << " x " << gates_a.cols() << " vs "
                                               << gates_b.rows() << " x " << gates_b.cols());
  if (gates_a.size() == 0) return 0.0;
  Index flips = 0;
  for (Index t = 0; t < gates_a.rows(); ++t)
    for (Index j = 0; j < gates_a.cols(); ++j) flips += (gates_a(t, j) > 0) != (gates_b(t, j) > 0);
  return double(flips) / double(gates_a.size());
}

/// What RoutingMonitor does when a layer stops routing.
enum class DeadRoutingPolicy {
  report,  ///< dead() turns true; nothing else
  warn,    ///< also one line on stderr when it happens
  error,   ///< update() throws spex::Error
};

inline const char* to_string(DeadRoutingPolicy p) {
  return p == DeadRoutingPolicy::report ? "report" : p == DeadRoutingPolicy::warn ? "warn" : p == DeadRoutingPolicy::error ? "error" : "?";
}

/// Watches one ReLU-routed layer's training batches (its RoutingStats, one update per batch)
/// for the failure ReLU routing cannot recover from by itself: a router whose logits are
/// negative for every token gets no gradient, so a layer that routes no token stays so (and
/// its LambdaController sinks to its floor, the sparsity being above target). The layer is dead
/// once its routed share (1 - sparsity) stayed <= `floor` for `window` consecutive batches.
/// One monitor per layer: a model's average sparsity can be on target while one layer is dead.
/// Not thread-safe (one caller).
class RoutingMonitor {
 public:
  explicit RoutingMonitor(long window = 50, double floor = 0.0, DeadRoutingPolicy policy = DeadRoutingPolicy::warn,
                          std::string name = "MoE layer")
      : window_(window), floor_(floor), policy_(policy), name_(std::move(name)) {
    SPEX_CHECK(window >= 1, "RoutingMonitor window = " << window << " must be >= 1 batch");
    SPEX_CHECK(std::isfinite(floor) && floor >= 0 && floor < 1, "RoutingMonitor floor = " << floor << " must be in [0, 1)");
    SPEX_CHECK(policy == DeadRoutingPolicy::report || policy == DeadRoutingPolicy::warn || policy == DeadRoutingPolicy::error,
               "policy = " << int(policy) << " is not a DeadRoutingPolicy (report, warn, error)");
  }

  /// One batch's statistics (the layer's stats(cache) after its training forward).
  void update(const RoutingStats& s) {
    ++batches_;
    const double routed = 1.0 - s.sparsity;
    run_ = routed <= floor_ ? run_ + 1 : 0;
    longest_ = std::max(longest_, run_);
    if (run_ < window_ || dead_) {
      dead_ = dead_ && run_ > 0;  // routing came back
      return;
    }
    dead_ = true;
    ++deaths_;
    if (policy_ == DeadRoutingPolicy::warn)
      std::fprintf(stderr, "spex: %s routed no more than %.3g of its token-expert pairs for %ld batches (batch %ld): its router is dead\n",
                   name_.c_str(), floor_, run_, batches_);
    SPEX_CHECK(policy_ != DeadRoutingPolicy::error, name_ << " routed no more than " << floor_ << " of its token-expert pairs for " << run_
                                                          << " consecutive batches (batch " << batches_ << "): its router is dead");
  }

  /// Whether the layer is dead now (the current run of non-routing batches reached the window).
  bool dead() const { return dead_; }
  /// Times the layer was found dead; the longest run of non-routing batches; batches seen.
  long deaths() const { return deaths_; }
  long longest_run() const { return longest_; }
  long batches() const { return batches_; }

 private:
  long window_;
  double floor_;
  DeadRoutingPolicy policy_;
  std::string name_;
  long batches_ = 0, run_ = 0, longest_ = 0, deaths_ = 0;
  bool dead_ = false;
};

}  // namespace spex
