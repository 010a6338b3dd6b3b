#pragma once
// The small model compare_layers trains: embeddings of a context window -> LayerNorm -> one
// block with a residual -> output projection -> softmax cross-entropy. Embeddings and expert
// tables get row-sparse gradients and lazy Adam; everything else dense Adam.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>

#include "blocks.hpp"
#include "data.hpp"

namespace compare {

/// The ReMoE paper's learning-rate schedule, shortened: linear warm-up over the first 1% of
/// the steps, then cosine decay to 10% of the peak at the last step. With a constant rate the
/// final losses wandered by up to 5x between evaluations (recall), which no ranking survives.
inline double learning_rate(int step, int steps, double peak) {
  const int warmup = std::max(1, steps / 100);
  if (step <= warmup) return peak * step / warmup;
  const double t = std::min(1.0, double(step - warmup) / std::max(1, steps - warmup));
  return peak * (0.1 + 0.45 * (1 + std::cos(3.141592653589793 * t)));
}

struct StepResult {
  double loss = 0;
  double optimizer_seconds = 0, total_seconds = 0;
};

template <class Block>
class Model {
 public:
  Model(int vocab, int context, Index emb, std::unique_ptr<Block> block, double lr, std::uint64_t seed)
      : vocab_(vocab), context_(context), emb_(emb), d_(context * emb), block_(std::move(block)),
        g_block_(block_->make_grads()) {
    spex::Rng rng(seed);
    embed_.resize(vocab, emb);
    spex::fill_normal(embed_, 1.0, rng);
    norm_ = spex::Norm<float>(spex::NormKind::layer, d_, d_);
    out_ = spex::Linear<float>(d_, vocab, true, rng);
    g_embed_.reset(vocab, emb);
    g_norm_ = norm_.make_grads();
    g_out_ = out_.make_grads();
    params_.push_back(spex::sparse_parameter<float>("embed", embed_, &g_embed_));
    params_.push_back(spex::dense_parameter<float>("norm.weight", norm_.weight(), &g_norm_.weight));
    params_.push_back(spex::dense_parameter<float>("norm.bias", norm_.bias(), &g_norm_.bias));
    spex::append_parameters(params_, block_->parameters(g_block_, "block."));
    params_.push_back(spex::dense_parameter<float>("out.weight", out_.weight(), &g_out_.weight));
    params_.push_back(spex::dense_parameter<float>("out.bias", out_.bias(), &g_out_.bias));
    spex::AdamConfig cfg;
    cfg.lr = lr;
    opt_ = std::make_unique<spex::Adam<float>>(params_, cfg);
  }

  Block& block() { return *block_; }
  /// Everything training changes (weights, buffers, Adam's moments and step count), for
  /// checkpoints (compare/checkpoint.hpp).
  spex::ParameterList<float>& parameters() { return params_; }
  spex::Adam<float>& optimizer() { return *opt_; }
  typename Block::Cache& block_cache() { return bc_; }
  /// The block's output of the last forward or evaluate batch (rows = that batch's examples).
  const Mat& block_output() const { return bo_; }
  const spex::ParameterList<float>& parameters() const { return params_; }

  /// Parameters a token touches: embeddings of its window, norm, the block's active part
  /// (`block_active`, the caller's count), output layer.
  Index active_params(Index block_active) const {
    return context_ * emb_ + 2 * d_ + block_active + out_.weight().size() + out_.bias().size();
  }
  Index total_params() const {
    Index n = 0;
    for (const auto& p : params_)
      if (p.trainable()) n += p.rows * p.cols;
    return n;
  }

  /// Data parallelism (sharded_training): called after backward, before the optimizer step,
  /// with the model's own parameters (not the block's: a sharded block sums its own), whose
  /// gradients it sums over the processes.
  void set_gradient_sum(std::function<void(spex::ParameterList<float>&)> f) {
    gradient_sum_ = std::move(f);
    own_params_.clear();
    for (const auto& p : params_)
      if (p.name.rfind("block.", 0) != 0) own_params_.push_back(p);
  }

  /// One optimizer step on examples [rows] of the dataset. The loss is the mean over
  /// `batch_tokens` examples (0: rows.size(); more when rows are one process's part of a batch).
  StepResult train_step(const std::vector<int>& xs, const std::vector<int>& ys, const std::vector<std::size_t>& rows,
                        Index batch_tokens = 0) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    StepResult r;
    const Index b = Index(rows.size()), total = batch_tokens > 0 ? batch_tokens : b;
    r.loss = forward(xs, ys, rows, true);
    // dL/dlogits = (softmax - onehot) / B
    dlogits_ = probs_ / float(total);
    for (Index i = 0; i < b; ++i) dlogits_(i, ys[rows[i]]) -= 1.0f / float(total);
    spex::zero_grads(params_);
    dh_.resize(b, d_);
    out_.backward(h_, dlogits_, dh_, g_out_);
    dxn_.resize(b, d_);
    block_->backward(dh_, dxn_, bc_, g_block_);
    norm_.backward(dxn_, dxn_, nc_, g_norm_);
    dh_ += dxn_;  // the residual: dx = dh + d(norm path)
    for (Index i = 0; i < b; ++i)
      for (int j = 0; j < context_; ++j) g_embed_.add_row(xs[rows[i] * context_ + j], &dh_(i, j * emb_));
    if (gradient_sum_) gradient_sum_(own_params_);
    const auto t1 = clock::now();
    opt_->step();
    const auto t2 = clock::now();
    r.optimizer_seconds = std::chrono::duration<double>(t2 - t1).count();
    r.total_seconds = std::chrono::duration<double>(t2 - t0).count();
    return r;
  }

  /// Mean loss over examples [first, first + n) of (xs, ys) in eval mode.
  double evaluate(const std::vector<int>& xs, const std::vector<int>& ys, std::size_t first, std::size_t n,
                  const std::function<void(const typename Block::Cache&)>& on_batch = nullptr) {
    double total = 0;
    const std::size_t bs = 512;
    std::vector<std::size_t> rows;
    for (std::size_t s = first; s < first + n; s += bs) {
      rows.clear();
      for (std::size_t i = s; i < std::min(first + n, s + bs); ++i) rows.push_back(i);
      total += forward(xs, ys, rows, false) * double(rows.size());
      if (on_batch) on_batch(bc_);
    }
    return total / double(n);
  }

 private:
  double forward(const std::vector<int>& xs, const std::vector<int>& ys, const std::vector<std::size_t>& rows, bool train) {
    const Index b = Index(rows.size());
    x_.resize(b, d_);
    for (Index i = 0; i < b; ++i)
      for (int j = 0; j < context_; ++j) x_.row(i).segment(j * emb_, emb_) = embed_.row(xs[rows[i] * context_ + j]);
    xn_.resize(b, d_);
    norm_.forward(x_, xn_, nc_, train);
    bo_.resize(b, d_);
    if (train)
      block_->forward(xn_, bo_, bc_);
    else
      block_->infer(xn_, bo_, bc_);
    h_ = x_ + bo_;
    logits_.resize(b, vocab_);
    out_.forward(h_, logits_);
    probs_.resize(b, vocab_);
    double loss = 0;
    for (Index i = 0; i < b; ++i) {
      spex::kernels::softmax(&logits_(i, 0), &probs_(i, 0), std::size_t(vocab_));
      loss -= std::log(std::max(double(probs_(i, ys[rows[i]])), 1e-30));
    }
    return loss / double(b);
  }

  int vocab_, context_;
  Index emb_, d_;
  Mat embed_;
  spex::Norm<float> norm_;
  std::unique_ptr<Block> block_;
  spex::Linear<float> out_;
  spex::SparseRowGrad<float> g_embed_;
  spex::Norm<float>::Grads g_norm_;
  typename Block::Grads g_block_;  // made once: the parameter list points into it
  spex::Linear<float>::Grads g_out_;
  spex::ParameterList<float> params_;
  spex::ParameterList<float> own_params_;  // params_ but the block's (set_gradient_sum)
  std::function<void(spex::ParameterList<float>&)> gradient_sum_;
  std::unique_ptr<spex::Adam<float>> opt_;
  spex::Norm<float>::Cache nc_;
  typename Block::Cache bc_;
  Mat x_, xn_, bo_, h_, logits_, probs_, dlogits_, dh_, dxn_;
};

}  // namespace compare
