#pragma once
// Adam and AdamW (Kingma & Ba; Loshchilov & Hutter), PyTorch's formulas:
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// with weight decay either added to g (Adam, L2) or applied as p -= lr wd p (AdamW,
// decoupled). Row-sparse gradients (expert tables) get the lazy form of PyTorch's SparseAdam:
// only the rows the gradient holds update their m, v and values, with the bias correction of
// the global step; every other row and its moments stay bit-identical. Dense Adam on a 1M-row
// table would touch 2 N d floats of state every step.
#include <cmath>
#include <vector>

#include <algorithm>

#include "../core/check.hpp"
#include "../core/parallel.hpp"
#include "../kernels/optim.hpp"
#include "parameters.hpp"

namespace spex {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = true;  ///< AdamW (true) or Adam with L2 (false)
};

/// Thread safety: step() mutates parameters and state; one caller at a time. State: m and v
/// of every parameter's full shape (2x the weights, as any Adam).
///
///   auto groups = spex::split_groups<float>(params, "experts", 10.0,
///       [](const auto& p) { return p.sparse_grad != nullptr; });
///   spex::Adam<float> opt(groups, {1e-3});
///   opt.step();
template <class T, class Arch = default_arch>
class Adam {
 public:
  Adam(std::vector<ParamGroup<T>> groups, AdamConfig cfg) : groups_(std::move(groups)), cfg_(cfg) {
    SPEX_CHECK(cfg.lr >= 0 && cfg.eps > 0 && cfg.weight_decay >= 0, "lr, eps and weight_decay must be >= 0 (eps > 0)");
    SPEX_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1, "betas must be in [0, 1)");
    for (auto& g : groups_)
      for (auto& p : g.params) {
        const Index rows = p.trainable() ? p.rows : 0;
        m_.push_back(RowMat<T>::Zero(rows, p.cols));
        v_.push_back(RowMat<T>::Zero(rows, p.cols));
      }
  }
  Adam(const ParameterList<T>& params, AdamConfig cfg) : Adam(std::vector<ParamGroup<T>>{{"all", params, 1.0}}, cfg) {}

  AdamConfig& config() { return cfg_; }
  long steps() const { return t_; }
  /// Moments of the i-th parameter (in group order), for inspection and checkpoints.
  const RowMat<T>& first_moment(std::size_t i) const { return m_[i]; }
  const RowMat<T>& second_moment(std::size_t i) const { return v_[i]; }

  void step() {
    ++t_;
    const double c1 = 1.0 - std::pow(cfg_.beta1, double(t_)), c2 = 1.0 - std::pow(cfg_.beta2, double(t_));
    std::size_t i = 0;
    for (auto& g : groups_) {
      const double lr = cfg_.lr * g.lr_scale;
      const kernels::AdamStep<T> a{T(cfg_.beta1),
                                   T(cfg_.beta2),
                                   T(lr / c1),
                                   T(1.0 / std::sqrt(c2)),
                                   T(cfg_.eps),
                                   T(cfg_.decoupled ? lr * cfg_.weight_decay : 0.0),
                                   T(cfg_.decoupled ? 0.0 : cfg_.weight_decay)};
      for (auto& p : g.params) {
        RowMat<T>& m = m_[i];
        RowMat<T>& v = v_[i];
        ++i;
        if (p.grad) {  // dense: the whole parameter, contiguous, in chunks over the threads
          const Index n = p.rows * p.cols, chunks = (n + kChunk - 1) / kChunk;
          const T* grad = p.grad_is_zero() ? nullptr : p.grad;
          parallel_for(chunks, [&](Index c, int) {
            const Index off = c * kChunk, len = std::min(kChunk, n - off);
            kernels::adam_update<Arch>(p.value + off, grad ? grad + off : nullptr, m.data() + off, v.data() + off,
                                       static_cast<std::size_t>(len), a);
          });
        }
        if (p.sparse_grad) {  // lazy: the rows the gradient holds (random rows: memory-bound)
          const auto vals = p.sparse_grad->values();
          const auto& rows = p.sparse_grad->rows();
          const std::size_t w = static_cast<std::size_t>(p.cols);
          const Index n_rows = Index(rows.size()), per = std::max<Index>(1, kChunk / p.cols);
          parallel_for((n_rows + per - 1) / per, [&](Index c, int) {
            for (Index s = c * per; s < std::min(n_rows, (c + 1) * per); ++s) {
              const std::size_t off = static_cast<std::size_t>(rows[s]) * w;
              kernels::adam_update<Arch>(p.value + off, &vals(s, 0), m.data() + off, v.data() + off, w, a);
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
