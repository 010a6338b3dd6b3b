#pragma once
// SGD with momentum (PyTorch's torch.optim.SGD: buf = mu buf + g, p -= lr buf; Nesterov
// optional; L2 weight decay added to the gradient). Dense parameters step every entry;
// row-sparse ones (expert tables) step only the rows their gradient holds, and with momentum
// keep a buffer per table row that only those rows update (lazy momentum). Frozen rows
// (Parameter::frozen_rows) are never stepped: values and momentum stay bit-identical.
#include <cmath>
#include <vector>

#include "../core/check.hpp"
#include "param_groups.hpp"

namespace spex {

struct SgdConfig {
  double lr = 0.01;
  double momentum = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

/// Throws spex::Error naming the first field out of range.
inline void validate(const SgdConfig& c) {
  check_at_least(c.lr, 0, "SGD lr");
  SPEX_CHECK(std::isfinite(c.momentum) && c.momentum >= 0 && c.momentum < 1,
             "SGD momentum = " << c.momentum << " must be in [0, 1)");
  check_at_least(c.weight_decay, 0, "SGD weight_decay");
  SPEX_CHECK(!c.nesterov || c.momentum > 0, "SGD with Nesterov needs momentum > 0");
}

/// Thread safety: step() mutates parameters and state; one caller at a time.
/// Usage: examples/snippets/training.cpp (compiled by the test suite).
template <class T>
class Sgd {
 public:
  Sgd(std::vector<ParamGroup<T>> groups, SgdConfig cfg) : groups_(std::move(groups)), cfg_(cfg) {
    validate(cfg_);
    detail::check_groups(groups_);
    for (auto& g : groups_)
      for (auto& p : g.params) buf_.push_back(RowMat<T>::Zero(cfg.momentum > 0 && p.trainable() ? p.rows : 0, p.cols));
  }
  Sgd(const ParameterList<T>& params, SgdConfig cfg)
      : Sgd(single_group(params), cfg) {}

  const SgdConfig& config() const { return cfg_; }
  /// Changes the settings (a learning-rate schedule); validated like the constructor's.
  void set_config(const SgdConfig& cfg) {
    validate(cfg);
    SPEX_CHECK((cfg.momentum > 0) == (cfg_.momentum > 0), "momentum cannot be switched on or off after construction");
    cfg_ = cfg;
  }
  const std::vector<ParamGroup<T>>& groups() const { return groups_; }
  /// Momentum buffer of the i-th parameter (in group order; empty without momentum).
  const RowMat<T>& momentum_buffer(std::size_t i) const { return buf_.at(i); }

  /// The state as named tensors, for checkpoints (io/checkpoint.hpp): "<prefix>momentum.<name>"
  /// of every trainable parameter, full shape (none without momentum). SGD has no other state.
  ParameterList<T> state(const std::string& prefix = "") { return detail::state_tensors<T>(groups_, prefix, "momentum", buf_); }
  ParameterList<const T> state(const std::string& prefix = "") const {
    return detail::state_tensors<const T>(groups_, prefix, "momentum", buf_);
  }

  /// One update of every parameter. Throws spex::Error, changing nothing, when a parameter's
  /// storage was replaced since the list was taken (core/parameter.hpp, Lifetime).
  void step() {
    for (const auto& g : groups_) check_current(g.params, "Sgd::step");
    std::size_t i = 0;
    for (auto& g : groups_) {
      const T lr = T(g.effective_lr(cfg_.lr)), wd = T(g.effective_weight_decay(cfg_.weight_decay));
      for (auto& p : g.params) {
        RowMat<T>& buf = buf_[i++];
        if (p.grad) {
          auto w = p.value_map();
          auto gr = p.grad_map();
          for (Index r = p.frozen_rows; r < p.rows; ++r) update_row(w.row(r), gr.row(r), buf, r, lr, wd);
        }
        if (p.sparse_grad) {
          auto w = p.value_map();
          const auto vals = p.sparse_grad->values();
          const auto& rows = p.sparse_grad->rows();
          for (Index s = 0; s < Index(rows.size()); ++s) update_row(w.row(rows[s]), vals.row(s), buf, rows[s], lr, wd);
        }
      }
    }
  }

 private:
  template <class W, class G>
  void update_row(W w, const G& grad, RowMat<T>& buf, Index r, T lr, T wd) const {
    const T mu = T(cfg_.momentum);
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
