#pragma once
// Adam and AdamW (Kingma & Ba; Loshchilov & Hutter), PyTorch's formulas.
// Dense parameters follow torch.optim.Adam / AdamW:
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)
// with weight decay either added to g (Adam, L2) or applied as p -= lr wd p (AdamW).
// Row-sparse parameters (expert tables) follow torch.optim.SparseAdam: only the rows the
// gradient holds (duplicates summed, as SparseAdam coalesces) update their m, v and values,
// every other row and its moments stay bit-identical, and eps is added to sqrt(v) before the
// bias correction:
//   p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
// t counts the optimizer's steps (SparseAdam counts a parameter's steps with a gradient; the
// two agree when every step() follows a backward, as in training). SparseAdam has no weight
// decay; here a group's weight decay applies to the held rows only. Dense Adam on a 1M-row
// table would touch 2 N d floats of state every step. Frozen rows (Parameter::frozen_rows)
// are never stepped: their values, m and v stay bit-identical.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/check.hpp"
#include "../core/parallel.hpp"
#include "../kernels/optim.hpp"
#include "param_groups.hpp"

namespace spex {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = true;  ///< AdamW (true) or Adam with L2 (false)
};

/// Throws spex::Error naming the first field out of range.
inline void validate(const AdamConfig& c) {
  check_at_least(c.lr, 0, "Adam lr");
  check_positive(c.eps, "Adam eps");
  check_at_least(c.weight_decay, 0, "Adam weight_decay");
  SPEX_CHECK(c.beta1 >= 0 && c.beta1 < 1, "Adam beta1 = " << c.beta1 << " must be in [0, 1)");
  SPEX_CHECK(c.beta2 >= 0 && c.beta2 < 1, "Adam beta2 = " << c.beta2 << " must be in [0, 1)");
}

/// Thread safety: step() mutates parameters and state; one caller at a time. State: m and v
/// of every trainable parameter's full shape (2x the weights, as any Adam). Results do not
/// depend on the thread count (every entry is updated by one thread, the same way).
/// Usage: examples/snippets/training.cpp (compiled by the test suite).
template <class T, class Arch = default_arch>
class Adam {
 public:
  Adam(std::vector<ParamGroup<T>> groups, AdamConfig cfg) : groups_(std::move(groups)), cfg_(cfg) {
    validate(cfg_);
    detail::check_groups(groups_);
    for (auto& g : groups_)
      for (auto& p : g.params) {
        const Index rows = p.trainable() ? p.rows : 0;
        m_.push_back(RowMat<T>::Zero(rows, p.cols));
        v_.push_back(RowMat<T>::Zero(rows, p.cols));
      }
  }
  Adam(const ParameterList<T>& params, AdamConfig cfg)
      : Adam(single_group(params), cfg) {}

  const AdamConfig& config() const { return cfg_; }
  /// Changes the settings (a learning-rate schedule); validated like the constructor's.
  void set_config(const AdamConfig& cfg) {
    validate(cfg);
    cfg_ = cfg;
  }
  void set_lr(double lr) {
    AdamConfig c = cfg_;
    c.lr = lr;
    set_config(c);
  }
  const std::vector<ParamGroup<T>>& groups() const { return groups_; }
  long steps() const { return t_; }
  /// Moments of the i-th parameter (in group order), for inspection and checkpoints.
  const RowMat<T>& first_moment(std::size_t i) const { return m_.at(i); }
  const RowMat<T>& second_moment(std::size_t i) const { return v_.at(i); }

  /// The state as named tensors, for checkpoints (io/checkpoint.hpp): "<prefix>m.<name>" and
  /// "<prefix>v.<name>" of every trainable parameter, full shape (rows a row-sparse table has
  /// not stepped yet hold zeros, as they do here). With steps() that is all of Adam's state.
  ParameterList<T> state(const std::string& prefix = "") { return detail::state_tensors<T>(groups_, prefix, "m", m_, "v", &v_); }
  ParameterList<const T> state(const std::string& prefix = "") const {
    return detail::state_tensors<const T>(groups_, prefix, "m", m_, "v", &v_);
  }
  /// Sets the step count (restoring a checkpoint); t >= 0.
  void set_steps(long t) {
    SPEX_CHECK(t >= 0, "Adam steps = " << t << " must be >= 0");
    t_ = t;
  }

  /// One update of every parameter. Throws spex::Error, changing nothing, when a parameter's
  /// storage was replaced since the list was taken (core/parameter.hpp, Lifetime) or the step
  /// count would overflow.
  void step() {
    for (const auto& g : groups_) check_current(g.params, "Adam::step");
    SPEX_CHECK(t_ < std::numeric_limits<long>::max(), "Adam::step: the step count is at its maximum " << t_);
    ++t_;
    const double c1 = 1.0 - std::pow(cfg_.beta1, double(t_)), c2 = 1.0 - std::pow(cfg_.beta2, double(t_));
    std::size_t i = 0;
    for (auto& g : groups_) {
      const double lr = g.effective_lr(cfg_.lr), wd = g.effective_weight_decay(cfg_.weight_decay);
      const kernels::AdamStep<T> dense{T(cfg_.beta1), T(cfg_.beta2), T(lr / c1), T(1.0 / std::sqrt(c2)), T(cfg_.eps),
                                       T(cfg_.decoupled ? lr * wd : 0.0), T(cfg_.decoupled ? 0.0 : wd)};
      // SparseAdam: m / (sqrt(v) + eps) * sqrt(c2) = m / (sqrt(v) / sqrt(c2) + eps / sqrt(c2)).
      kernels::AdamStep<T> sparse = dense;
      sparse.eps = T(cfg_.eps / std::sqrt(c2));
      for (auto& p : g.params) {
        RowMat<T>& m = m_[i];
        RowMat<T>& v = v_[i];
        ++i;
        if (p.grad && p.contiguous()) {  // dense: the rows not frozen, contiguous, in chunks over the threads
          const Index n = p.trainable_entries(), base = p.frozen_entries(), chunks = (n + kChunk - 1) / kChunk;
          parallel_for(chunks, [&](Index c, int) {
            const Index off = base + c * kChunk, len = std::min(kChunk, base + n - off);
            kernels::adam_update<Arch>(p.value + off, p.grad + off, m.data() + off, v.data() + off,
                                       static_cast<std::size_t>(len), dense);
          });
        } else if (p.grad) {  // dense over values whose rows lie apart: row by row
          const std::size_t w = static_cast<std::size_t>(p.cols);
          parallel_for(p.rows - p.frozen_rows, [&](Index i, int) {
            const Index r = p.frozen_rows + i;
            const std::size_t off = static_cast<std::size_t>(r) * w;
            kernels::adam_update<Arch>(p.row(r), p.grad + off, m.data() + off, v.data() + off, w, dense);
          });
        }
        if (p.sparse_grad) {  // lazy: the rows the gradient holds (random rows: memory-bound)
          const auto vals = p.sparse_grad->values();
          const auto& rows = p.sparse_grad->rows();
          const std::size_t w = static_cast<std::size_t>(p.cols);
          const Index n_rows = Index(rows.size()), per = std::max<Index>(1, kChunk / std::max<Index>(1, p.cols));
          parallel_for((n_rows + per - 1) / per, [&](Index c, int) {
            for (Index s = c * per; s < std::min(n_rows, (c + 1) * per); ++s) {
              const std::size_t off = static_cast<std::size_t>(rows[s]) * w;
              kernels::adam_update<Arch>(p.row(rows[s]), &vals(s, 0), m.data() + off, v.data() + off, w, sparse);
            }
          });
        }
      }
    }
  }

 private:
  static constexpr Index kChunk = 16384;  // entries per parallel task
  std::vector<ParamGroup<T>> groups_;
  AdamConfig cfg_;
  std::vector<RowMat<T>> m_, v_;
  long t_ = 0;
};

}  // namespace spex
