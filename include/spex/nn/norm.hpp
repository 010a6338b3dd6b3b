#pragma once
// Normalization of a batch of feature rows (PEER's query norm; docs/peer.md, "The query network"):
//  - batch: BatchNorm1d over the tokens of the batch, per feature; training uses the batch's
//    statistics and updates running ones (momentum, unbiased variance, as PyTorch), eval
//    uses the running ones. It couples the tokens of a batch, so in a causal model it leaks
//    statistics of later tokens into earlier ones (LayerNorm does not: the choice for causal
//    models). A token mask restricts the statistics to the real tokens of a padded batch.
//  - layer: LayerNorm over each group of `group` consecutive features of a row (per head).
//  - none: identity.
// Affine weight (gamma) and bias (beta) per feature in both.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/batch_reduction.hpp"
#include "../core/check.hpp"
#include "../core/parallel.hpp"
#include "../core/parameter.hpp"
#include "../core/types.hpp"
#include "weight_bias_grads.hpp"

namespace spex {

enum class NormKind { none, batch, layer };

inline const char* to_string(NormKind k) {
  switch (k) {
    case NormKind::none: return "none";
    case NormKind::batch: return "batch";
    case NormKind::layer: return "layer";
  }
  return "?";
}

/// Thread safety: forward in eval mode and backward are const; forward in training mode
/// updates the running statistics (BatchNorm), like PyTorch's train mode.
///
/// Usage: examples/snippets/building_blocks.cpp (compiled and run by the test suite).
template <class T>
class Norm {
 public:
  struct Cache {
    RowMat<T> xhat;            // normalized input, B x features
    Vec<T> inv_std;            // per feature (batch) or per (row, group) (layer)
    Vec<T> batch_mean, batch_var_unbiased;  // training BatchNorm: what commit_running_stats uses
    Index batch_tokens = 0;                 // training BatchNorm: tokens of the whole batch (real ones, with a mask)
    bool training = false;
    /// Training BatchNorm with a token mask: 1 for the tokens the statistics are over, 0 for
    /// padding (empty: every token). Set by the caller before forward_batch_stats().
    std::vector<unsigned char> mask;
  };
  using Grads = WeightBiasGrads<Vec<T>, Vec<T>>;

  Norm() = default;
  /// `group` is the LayerNorm group size (features must divide by it; 0: all features);
  /// ignored otherwise.
  Norm(NormKind kind, Index features, Index group = 0, T eps = T(1e-5), T momentum = T(0.1))
      : kind_(kind), features_(features), group_(group > 0 ? group : features), eps_(eps), momentum_(momentum) {
    SPEX_CHECK(kind == NormKind::none || kind == NormKind::batch || kind == NormKind::layer,
               "norm kind " << int(kind) << " is not a NormKind");
    SPEX_CHECK(features >= 1, "norm features = " << features << " must be >= 1");
    SPEX_CHECK(group >= 0, "norm group = " << group << " must be >= 0 (0: all features)");
    SPEX_CHECK(features % group_ == 0, "norm features = " << features << " is not a multiple of group = " << group_);
    check_positive(double(eps), "norm eps");
    check_range(double(momentum), 0, 1, "norm momentum");
    if (kind_ != NormKind::none) {
      weight_ = Vec<T>::Ones(features);
      bias_ = Vec<T>::Zero(features);
    }
    if (kind_ == NormKind::batch) {
      running_mean_ = Vec<T>::Zero(features);
      running_var_ = Vec<T>::Ones(features);
    }
  }

  NormKind kind() const { return kind_; }
  Index features() const { return features_; }
  Index group() const { return group_; }
  Vec<T>& weight() { return weight_; }
  const Vec<T>& weight() const { return weight_; }
  Vec<T>& bias() { return bias_; }
  const Vec<T>& bias() const { return bias_; }
  Vec<T>& running_mean() { return running_mean_; }
  const Vec<T>& running_mean() const { return running_mean_; }
  Vec<T>& running_var() { return running_var_; }
  const Vec<T>& running_var() const { return running_var_; }

  Grads make_grads() const { return Grads{Vec<T>::Zero(weight_.size()), Vec<T>::Zero(bias_.size())}; }

  /// prefix + "weight", "bias" (with their gradients in g; none for NormKind::none) and, for
  /// BatchNorm, the buffers prefix + "running_mean", "running_var" (no gradient): the layers'
  /// vocabulary, as Linear::parameters (the same lifetime rule).
  ParameterList<T> parameters(Grads& g, const std::string& prefix = "") {
    check_grads(g, "grads");
    return list(&g, prefix);
  }
  /// Writable values without gradients (loading weights).
  ParameterList<T> parameters(const std::string& prefix = "") { return list(nullptr, prefix); }
  /// Read-only values (saving weights).
  ParameterList<const T> parameters(const std::string& prefix = "") const {
    return read_only(const_cast<Norm*>(this)->list(nullptr, prefix));
  }

  /// BatchNorm over a batch split across processes (data parallelism): with a reduction, the
  /// training statistics and backward's batch means are the whole batch's (its parts summed by
  /// `r`), so every part normalizes as one process would ("synchronized BatchNorm"); the
  /// gradients of weight and bias stay this part's (the caller sums them with the others).
  /// Not owned: `r` must outlive the norm's use, and a copy of the norm shares it. nullptr:
  /// this process holds the whole batch (the default).
  void set_batch_reduction(const BatchReduction* r) { across_ = r; }
  const BatchReduction* batch_reduction() const { return across_; }

  /// Throws unless `g` has this norm's shapes (`what` names it in the message).
  void check_grads(const Grads& g, const char* what) const {
    SPEX_CHECK(g.weight.size() == weight_.size() && g.bias.size() == bias_.size(),
               what << " has norm gradients of " << g.weight.size() << " features, the layer's norm has "
                    << weight_.size() << ": grads were made by another layer");
  }

  /// Inference: y = norm(x) with running statistics (BatchNorm). y may be x itself.
  void forward(CMatRef<T> x, MatRef<T> y) const {
    check_input(x, y);
    if (kind_ == NormKind::none) {
      y = x;
    } else if (kind_ == NormKind::batch) {
      const Vec<T> scale = weight_.array() / (running_var_.array() + eps_).sqrt();
      const Vec<T> shift = bias_.array() - running_mean_.array() * scale.array();
      y = (x.array().rowwise() * scale.transpose().array()).rowwise() + shift.transpose().array();
    } else {
      layer_forward(x, y, nullptr);
    }
  }

  /// Training (batch statistics, running ones updated) or eval (running statistics) forward
  /// that keeps what backward needs in `cache`. BatchNorm in training needs B >= 2.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& cache, bool training) {
    if (training)
      forward_train(x, y, cache);
    else
      forward_eval(x, y, cache);
  }

  /// Eval-mode forward keeping what backward needs in `cache`.
  void forward_eval(CMatRef<T> x, MatRef<T> y, Cache& cache) const {
    check_input(x, y);
    cache.training = false;
    // Row by row over the threads: a layer's queries (PEER: 256 x 2048 values) made a serial
    // pass that the other threads waited through.
    if (kind_ == NormKind::none) {
      parallel_for(x.rows(), [&](Index r, int) { y.row(r) = x.row(r); });
    } else if (kind_ == NormKind::layer) {
      layer_forward(x, y, &cache);
    } else {
      cache.inv_std = (running_var_.array() + eps_).rsqrt();
      cache.xhat.resize(x.rows(), x.cols());
      parallel_for(x.rows(), [&](Index r, int) {
        cache.xhat.row(r) = (x.row(r) - running_mean_.transpose()).array() * cache.inv_std.transpose().array();
        y.row(r) = (cache.xhat.row(r).array() * weight_.transpose().array() + bias_.transpose().array()).matrix();
      });
    }
  }

  /// Training-mode forward: batch statistics (BatchNorm), then the running statistics updated.
  /// Throws, leaving them unchanged, when the batch's statistics are not finite.
  void forward_train(CMatRef<T> x, MatRef<T> y, Cache& cache) {
    forward_batch_stats(x, y, cache);
    commit_running_stats(cache);
  }

  /// Training-mode forward that leaves the running statistics alone: a layer calls
  /// commit_running_stats() once its whole pass has succeeded, so a pass that throws later
  /// changes nothing.
  /// With cache.mask set, the statistics are those of the masked-in tokens (every token is
  /// normalized with them); backward then treats the padded tokens' outputs as functions of the
  /// real tokens' statistics (exact: their dy should be zero, and the layers zero it).
  void forward_batch_stats(CMatRef<T> x, MatRef<T> y, Cache& cache) const {
    if (kind_ != NormKind::batch) return forward_eval(x, y, cache);
    check_input(x, y);
    cache.training = true;
    const bool masked = !cache.mask.empty();
    SPEX_CHECK(!masked || Index(cache.mask.size()) == x.rows(),
               "BatchNorm: the token mask has " << cache.mask.size() << " entries, the batch " << x.rows() << " tokens");
    Index real = x.rows();
    if (masked) real = Index(std::count(cache.mask.begin(), cache.mask.end(), 1));
    const Index b = across_ ? across_->sum(real) : real;
    SPEX_CHECK(b >= 2, "BatchNorm in training needs a batch of at least 2 " << (masked ? "real (masked-in) " : "") << "tokens, got " << b);
    cache.batch_tokens = b;
    auto masked_sum = [&](const auto& m) {  // column sums over the real tokens, in row order
      Vec<T> s = Vec<T>::Zero(features_);
      for (Index r = 0; r < m.rows(); ++r)
        if (cache.mask[static_cast<std::size_t>(r)]) s += m.row(r).transpose();
      return s;
    };
    cache.batch_mean = masked ? masked_sum(x) : Vec<T>(x.colwise().sum().transpose());
    batch_sum(cache.batch_mean);
    cache.batch_mean /= T(b);
    cache.xhat = x.rowwise() - cache.batch_mean.transpose();
    Vec<T> var = masked ? masked_sum(cache.xhat.array().square().matrix()) : Vec<T>(cache.xhat.array().square().colwise().sum().transpose());
    batch_sum(var);
    var /= T(b);  // biased, for normalizing
    for (Index f = 0; f < features_; ++f)
      SPEX_CHECK(std::isfinite(double(cache.batch_mean(f))) && std::isfinite(double(var(f))),
                 "BatchNorm: feature " << f << " of the batch has mean " << cache.batch_mean(f) << " and variance "
                                       << var(f) << " (its input holds NaN/Inf or values too large for the type)");
    cache.batch_var_unbiased = var * (T(b) / T(b - 1));
    cache.inv_std = (var.array() + eps_).rsqrt();
    cache.xhat.array().rowwise() *= cache.inv_std.transpose().array();
    y = (cache.xhat.array().rowwise() * weight_.transpose().array()).rowwise() + bias_.transpose().array();
  }

  /// Folds the batch statistics of a training forward_batch_stats() into the running ones
  /// (momentum, unbiased variance, as PyTorch); all-or-nothing: throws, changing nothing, if a
  /// new value would not be finite. No-op for LayerNorm and none.
  void commit_running_stats(const Cache& cache) {
    if (kind_ != NormKind::batch || !cache.training) return;
    SPEX_CHECK(cache.batch_mean.size() == features_ && cache.batch_var_unbiased.size() == features_,
               "BatchNorm: the cache holds no training statistics for " << features_ << " features");
    const Vec<T> mean = (T(1) - momentum_) * running_mean_ + momentum_ * cache.batch_mean;
    const Vec<T> var = (T(1) - momentum_) * running_var_ + momentum_ * cache.batch_var_unbiased;
    for (Index f = 0; f < features_; ++f)
      SPEX_CHECK(std::isfinite(double(mean(f))) && std::isfinite(double(var(f))),
                 "BatchNorm: the running statistics of feature " << f << " would become mean " << mean(f)
                                                                 << ", variance " << var(f) << "; left unchanged");
    running_mean_ = mean;
    running_var_ = var;
  }

  /// grads += d(weight, bias); dx = d(input) (assigned). dx may be dy itself. The layers'
  /// argument order: dy, dx, what forward left, grads.
  void backward(CMatRef<T> dy, MatRef<T> dx, const Cache& cache, Grads& grads) const {
    check_grads(grads, "grads");
    backward_impl(dy, cache, &grads, dx);
  }
  /// dx = d(input) only (a frozen norm: no gradient for weight and bias). dx may be dy itself.
  void backward_input(CMatRef<T> dy, MatRef<T> dx, const Cache& cache) const { backward_impl(dy, cache, nullptr, dx); }

 private:
  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out;
    if (kind_ != NormKind::none) {
      out.push_back(dense_parameter<T>(prefix + "weight", weight_, g ? &g->weight : nullptr));
      out.push_back(dense_parameter<T>(prefix + "bias", bias_, g ? &g->bias : nullptr));
    }
    if (kind_ == NormKind::batch) {
      out.push_back(dense_parameter<T>(prefix + "running_mean", running_mean_, static_cast<Vec<T>*>(nullptr)));
      out.push_back(dense_parameter<T>(prefix + "running_var", running_var_, static_cast<Vec<T>*>(nullptr)));
    }
    return out;
  }

  void backward_impl(CMatRef<T> dy, const Cache& cache, Grads* grads, MatRef<T> dx) const {
    check_shape(dx, dy.rows(), features_, "dx");
    check_no_partial_overlap(dy, dx, "dy", "dx");
    if (kind_ == NormKind::none) {
      dx = dy;
      return;
    }
    check_shape(dy, cache.xhat.rows(), features_, "dy");
    if (grads) {
      grads->weight += (dy.array() * cache.xhat.array()).colwise().sum().transpose().matrix();
      grads->bias += dy.colwise().sum().transpose();
    }
    const Index b = dy.rows();
    if (kind_ == NormKind::batch) {
      const Vec<T> g = weight_.array() * cache.inv_std.array();
      if (!cache.training) {
        dx = dy.array().rowwise() * g.transpose().array();
        return;
      }
      // dx = g (dy - mean(dy) - xhat mean(dy xhat)), per feature over the (whole) batch. With a
      // mask: the sums run over every token (padded outputs depend on the statistics too), are
      // divided by the real tokens, and only the real tokens (which the statistics read) take
      // the mean terms.
      Vec<T> sums(2 * features_);
      sums.head(features_) = dy.colwise().sum().transpose();
      sums.tail(features_) = (dy.array() * cache.xhat.array()).colwise().sum().transpose();
      batch_sum(sums);
      const Vec<T> mean_dy = sums.head(features_) / T(cache.batch_tokens);
      const Vec<T> mean_dy_xhat = sums.tail(features_) / T(cache.batch_tokens);
      const bool masked = !cache.mask.empty();
      SPEX_CHECK(!masked || Index(cache.mask.size()) == b, "BatchNorm: the token mask has " << cache.mask.size() << " entries, dy " << b << " rows");
      for (Index r = 0; r < b; ++r) {
        if (masked && !cache.mask[static_cast<std::size_t>(r)]) {
          dx.row(r) = (dy.row(r).array() * g.transpose().array()).matrix();
          continue;
        }
        dx.row(r) = ((dy.row(r) - mean_dy.transpose()).array() - cache.xhat.row(r).array() * mean_dy_xhat.transpose().array()) *
                    g.transpose().array();
      }
      return;
    }
    // LayerNorm: the same formula within each group of a row.
    const Index groups = features_ / group_;
    for (Index r = 0; r < b; ++r)
      for (Index gi = 0; gi < groups; ++gi) {
        const auto dyg = dy.row(r).segment(gi * group_, group_).array() *
                         weight_.segment(gi * group_, group_).transpose().array();
        const auto xh = cache.xhat.row(r).segment(gi * group_, group_).array();
        const T m1 = dyg.mean(), m2 = (dyg * xh).mean();
        dx.row(r).segment(gi * group_, group_) = ((dyg - m1 - xh * m2) * cache.inv_std(r * groups + gi)).matrix();
      }
  }

  void check_input(const CMatRef<T>& x, const MatRef<T>& y) const {
    SPEX_CHECK(x.cols() == features_, "the norm's input has " << x.cols() << " columns, expected " << features_ << " features");
    check_shape(y, x.rows(), features_, "the norm's output");
    check_no_partial_overlap(x, y, "the norm's input", "its output");
  }

  /// LayerNorm per group; keeps xhat and 1/std in `cache` when given. y may alias x.
  void layer_forward(CMatRef<T> x, MatRef<T> y, Cache* cache) const {
    const Index b = x.rows(), groups = features_ / group_;
    if (cache) {
      cache->xhat.resize(b, features_);
      cache->inv_std.resize(b * groups);
    }
    parallel_for(b, [&](Index r, int) {
      for (Index gi = 0; gi < groups; ++gi) {
        const Index c0 = gi * group_;
        const T mean = x.row(r).segment(c0, group_).mean();
        const T var = (x.row(r).segment(c0, group_).array() - mean).square().mean();
        const T inv = T(1) / std::sqrt(var + eps_);
        if (cache) {
          cache->inv_std(r * groups + gi) = inv;
          cache->xhat.row(r).segment(c0, group_) = (x.row(r).segment(c0, group_).array() - mean) * inv;
        }
        y.row(r).segment(c0, group_) = ((x.row(r).segment(c0, group_).array() - mean) * inv *
                                        weight_.segment(c0, group_).transpose().array() +
                                        bias_.segment(c0, group_).transpose().array()).matrix();
      }
    });
  }

  /// Sums a per-feature vector over the parts of the batch (nothing to do in one process).
  void batch_sum(Vec<T>& v) const {
    if (across_) across_->sum(v.data(), v.size());
  }

  NormKind kind_ = NormKind::none;
  const BatchReduction* across_ = nullptr;
  Index features_ = 0, group_ = 1;
  T eps_ = T(1e-5), momentum_ = T(0.1);
  Vec<T> weight_, bias_, running_mean_, running_var_;
};

}  // namespace spex
