#pragma once
// ReMoE's sparsity control (Wang et al., ICLR 2025; spec remoe.md sections 3-4): an L1 penalty
// on the ReLU router outputs R, or its load-balanced form, with a coefficient lambda that an
// adaptive controller moves by a factor alpha each training step toward the target sparsity
// 1 - k/E.
//
// Normalization (one choice, tested): per layer and per batch, 1/T with T the tokens of the
// batch, as the reference code does (each MoE layer adds its own term). The paper's total
// divides by the number of layers L as well; with one lambda shared by all layers that is the
// same objective with lambda scaled by 1/L.
//   l1:    L_reg = (1/T) sum_{t,e} R_te                       dL_reg/dR_te = 1/T
//   l1_lb: L_reg = (1/T) sum_{t,e} f_e R_te,  f_e = E c_e / (k T)   dL_reg/dR_te = f_e / T
// with c_e the number of tokens routed to e (R_te > 0), held constant (no gradient). l1_lb is
// the Switch balance loss E/(k T^2) sum_e (sum_t P_te) c_e with P := R; f_e = 1 when every
// expert gets exactly its k/E share.
#include <algorithm>
#include <cmath>
#include <string>

#include "../core/check.hpp"
#include "../core/types.hpp"

namespace spex {

enum class Penalty { none, l1, l1_lb };

inline const char* to_string(Penalty p) {
  switch (p) {
    case Penalty::none: return "none";
    case Penalty::l1: return "l1";
    case Penalty::l1_lb: return "l1_lb";
  }
  return "?";
}

/// Per-expert counts c_e = #{t : R_te > 0} of a B x E gate matrix.
template <class Derived>
Vec<double> routed_counts(const Eigen::MatrixBase<Derived>& gates) {
  using T = typename Derived::Scalar;
  Vec<double> c = Vec<double>::Zero(gates.cols());
  for (Index t = 0; t < gates.rows(); ++t)
    for (Index e = 0; e < gates.cols(); ++e) c(e) += gates(t, e) > T(0) ? 1.0 : 0.0;
  return c;
}

/// The penalty's per-expert weights w_e, so that L_reg = (1/T) sum_{t,e} w_e R_te and
/// dL_reg/dR_te = w_e / T on active entries: 1 for l1, f_e = E c_e / (k T) for l1_lb, 0 for none.
/// `k` is the routing budget (target 1 - k/E).
template <class Derived>
Vec<double> penalty_weights(Penalty p, const Eigen::MatrixBase<Derived>& gates, double k) {
  const Index b = gates.rows(), e = gates.cols();
  switch (p) {
    case Penalty::none: return Vec<double>::Zero(e);
    case Penalty::l1: return Vec<double>::Ones(e);
    case Penalty::l1_lb:
      SPEX_CHECK(k > 0, "the load-balanced penalty needs a budget k > 0, got " << k);
      if (b == 0) return Vec<double>::Zero(e);
      return routed_counts(gates) * (double(e) / (k * double(b)));
  }
  return Vec<double>::Zero(e);
}

/// Unscaled penalty value L_reg of a B x E gate matrix (accumulated in double).
template <class Derived>
double penalty_value(Penalty p, const Eigen::MatrixBase<Derived>& gates, double k) {
  const Index b = gates.rows();
  if (b == 0 || p == Penalty::none) return 0.0;
  const Vec<double> w = penalty_weights(p, gates, k);
  double s = 0;
  for (Index t = 0; t < b; ++t)
    for (Index e = 0; e < gates.cols(); ++e) s += w(e) * double(gates(t, e));
  return s / double(b);
}

/// Sparsity S = 1 - nnz / (T E) of a gate matrix (an entry is active when > 0).
template <class Derived>
double sparsity(const Eigen::MatrixBase<Derived>& gates) {
  using T = typename Derived::Scalar;
  if (gates.size() == 0) return 0.0;
  Index nnz = 0;
  for (Index t = 0; t < gates.rows(); ++t)
    for (Index e = 0; e < gates.cols(); ++e) nnz += gates(t, e) > T(0);
  return 1.0 - double(nnz) / double(gates.size());
}

/// The largest penalty coefficient spex accepts anywhere: far past any useful value (the
/// penalty would swamp every task gradient) and far below where lambda * w / T overflows float.
constexpr double kMaxLambda = 1e6;

/// The adaptive coefficient: lambda <- lambda * alpha^sign(target - S) once per optimizer step,
/// S being the sparsity of that step (averaged over layers and micro-batches by the caller).
/// S below target: lambda *= alpha; S at or above target: lambda /= alpha (the reference
/// decreases on equality). One controller may serve any number of layers.
///
/// Bounds: lambda stays in [min_lambda, max_lambda], by default [1e-12, 100]. The reference has
/// no bounds; without them a target the router cannot reach (a bias-free ReLU router on
/// zero-mean inputs stays near 50% active) multiplies lambda by alpha every step until it
/// overflows and the parameters turn NaN, and a dead router decays it to denormals. The bounds
/// make both impossible; stats() tells how many steps lambda sat on a bound, and
/// consecutive_steps_at_bound() > 0 for long means the target is not being reached.
///
/// Usage: examples/snippets/moe.cpp (compiled and run by the test suite).
class LambdaController {
 public:
  struct State {
    double lambda = 1e-8, alpha = 1.2, target = 0.875, min_lambda = 1e-12, max_lambda = 100.0;
    long steps = 0;
    long steps_at_min = 0, steps_at_max = 0;  ///< updates that ended on a bound
    long consecutive_at_bound = 0;            ///< the current run of such updates
  };

  LambdaController() = default;
  explicit LambdaController(double target, double lambda0 = 1e-8, double alpha = 1.2) {
    State s;
    s.target = target;
    s.lambda = lambda0;
    s.alpha = alpha;
    set_state(s);
  }
  /// Target 1 - k/E; unchanged by granularity (E*G experts, k*G budget).
  static double target_for(double k, double n_experts) {
    SPEX_CHECK(std::isfinite(k) && std::isfinite(n_experts) && k > 0 && k <= n_experts,
               "target_for(k = " << k << ", E = " << n_experts << ") needs 0 < k <= E");
    return 1.0 - k / n_experts;
  }

  double lambda() const { return s_.lambda; }
  double target() const { return s_.target; }
  double alpha() const { return s_.alpha; }
  long steps() const { return s_.steps; }
  long consecutive_steps_at_bound() const { return s_.consecutive_at_bound; }
  /// Bounds lambda to [lo, hi] (0 < lo <= hi <= kMaxLambda) after every update, and now.
  void set_clamp(double lo, double hi) {
    State s = s_;
    s.min_lambda = lo;
    s.max_lambda = hi;
    s.lambda = std::min(std::max(s.lambda, lo), hi);
    set_state(s);
  }

  /// One step with this step's measured sparsity.
  void update(double measured_sparsity) {
    SPEX_CHECK(std::isfinite(measured_sparsity) && measured_sparsity >= 0 && measured_sparsity <= 1,
               "measured sparsity " << measured_sparsity << " must be in [0, 1]");
    const double next = measured_sparsity < s_.target ? s_.lambda * s_.alpha : s_.lambda / s_.alpha;
    s_.lambda = std::min(std::max(next, s_.min_lambda), s_.max_lambda);
    ++s_.steps;
    const bool at_min = next <= s_.min_lambda, at_max = next >= s_.max_lambda;
    s_.steps_at_min += at_min;
    s_.steps_at_max += at_max;
    s_.consecutive_at_bound = (at_min || at_max) ? s_.consecutive_at_bound + 1 : 0;
  }

  /// Everything needed to resume training (save it with the checkpoint).
  const State& state() const { return s_; }
  /// Validates every field (throws spex::Error naming it) and takes `s`.
  void set_state(const State& s) {
    SPEX_CHECK(std::isfinite(s.alpha) && s.alpha > 1, "alpha = " << s.alpha << " must be finite and > 1");
    SPEX_CHECK(std::isfinite(s.target) && s.target >= 0 && s.target < 1, "target sparsity " << s.target << " must be in [0, 1)");
    SPEX_CHECK(std::isfinite(s.min_lambda) && std::isfinite(s.max_lambda) && s.min_lambda > 0 &&
                   s.min_lambda <= s.max_lambda && s.max_lambda <= kMaxLambda,
               "lambda bounds [" << s.min_lambda << ", " << s.max_lambda << "] must satisfy 0 < min <= max <= " << kMaxLambda);
    SPEX_CHECK(std::isfinite(s.lambda) && s.lambda >= s.min_lambda && s.lambda <= s.max_lambda,
               "lambda = " << s.lambda << " must be in [" << s.min_lambda << ", " << s.max_lambda << "]");
    SPEX_CHECK(s.steps >= 0 && s.steps_at_min >= 0 && s.steps_at_max >= 0 && s.consecutive_at_bound >= 0,
               "step counters must be >= 0");
    s_ = s;
  }

 private:
  State s_;
};

}  // namespace spex
