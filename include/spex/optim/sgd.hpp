#pragma once
// SGD with momentum (PyTorch's torch.optim.SGD: buf = mu buf + g, p -= lr buf; Nesterov
// optional; L2 weight decay added to the gradient). Dense parameters step every entry;
// row-sparse ones (expert tables) step only the rows their gradient holds, and with momentum
// keep a buffer per table row that only those rows update (lazy momentum).
#include <vector>

#include "../core/check.hpp"
#include "parameters.hpp"

namespace spex {

struct SgdConfig {
  double lr = 0.01;
  double momentum = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

/// Thread safety: step() mutates parameters and state; one caller at a time.
///
///   spex::Sgd<float> opt(model.parameters(&grads), {0.1, 0.9});
///   opt.step();   // after backward
template <class T>
class Sgd {
 public:
  Sgd(std::vector<ParamGroup<T>> groups, SgdConfig cfg) : groups_(std::move(groups)), cfg_(cfg) {
    SPEX_CHECK(cfg.lr >= 0 && cfg.momentum >= 0 && cfg.weight_decay >= 0, "lr, momentum and weight_decay must be >= 0");
    SPEX_CHECK(!cfg.nesterov || cfg.momentum > 0, "Nesterov needs momentum > 0");
    for (auto& g : groups_)
      for (auto& p : g.params) buf_.push_back(RowMat<T>::Zero(cfg.momentum > 0 && p.trainable() ? p.rows : 0, p.cols));
  }
  Sgd(const ParameterList<T>& params, SgdConfig cfg) : Sgd(std::vector<ParamGroup<T>>{{"all", params, 1.0}}, cfg) {}

  SgdConfig& config() { return cfg_; }

  void step() {
    std::size_t i = 0;
    for (auto& g : groups_) {
      const T lr = T(cfg_.lr * g.lr_scale);
      for (auto& p : g.params) {
        RowMat<T>& buf = buf_[i++];
        if (p.grad && !p.grad_is_zero()) {
          auto w = p.value_map();
          auto gr = p.grad_map();
          for (Index r = 0; r < p.rows; ++r) update_row(w.row(r), gr.row(r), buf, r, lr);
        }
        if (p.sparse_grad) {
          auto w = p.value_map();
          const auto vals = p.sparse_grad->values();
          const auto& rows = p.sparse_grad->rows();
          for (Index s = 0; s < Index(rows.size()); ++s) update_row(w.row(rows[s]), vals.row(s), buf, rows[s], lr);
        }
      }
    }
  }

 private:
  template <class W, class G>
  void update_row(W w, const G& grad, RowMat<T>& buf, Index r, T lr) const {
    const T mu = T(cfg_.momentum), wd = T(cfg_.weight_decay);
    for (Index c = 0; c < w.cols(); ++c) {
      T d = grad(c) + wd * w(c);
      if (mu > 0) {
        T& b = buf(r, c);
        b = mu * b + d;
        d = cfg_.nesterov ? d + mu * b : b;
      }
      w(c) -= lr * d;
    }
  }

  std::vector<ParamGroup<T>> groups_;
  SgdConfig cfg_;
  std::vector<RowMat<T>> buf_;
};

}  // namespace spex
