#pragma once
// Shared experts (DeepSeek-MoE/V3, Qwen2-MoE; docs/topk_moe.md): FFNs every token uses, their
// output added to the routed experts'. `count` shared experts of `hidden` each are one FFN of
// hidden count * hidden (the sum of FFNs is the FFN of their concatenated hidden units),
// stored as an FfnExperts of one expert. Optionally gated per token by sigmoid(x . w_g)
// (Qwen2-MoE's shared_expert_gate, Megatron-Core's shared expert gate).
#include <string>

#include "../core/check.hpp"
#include "../core/gemm.hpp"
#include "../core/parameter.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../kernels/activation.hpp"
#include "ffn.hpp"

namespace spex {

/// Thread safety: const methods; one cache and grads per concurrent caller.
template <class T = float, class Arch = default_arch>
class SharedExperts {
 public:
  struct Cache {
    RowMat<T> gates;  // B x 1: 1, or sigmoid(x . w_g)
    ExpertGroups groups;
    typename FfnExperts<T, Arch>::Cache ffn;
    RowMat<T> y;       // B x d_out: the shared output, gate applied
    RowMat<T> dgates;  // B x 1
  };
  /// Dense gradients of the FFN and the gate weight (1 x d; empty without a gate).
  struct Grads {
    typename FfnExperts<T, Arch>::Grads ffn;
    RowMat<T> gate;
    void zero() {
      ffn.zero();
      gate.setZero();
    }
    /// f(pointer, size) for every gradient array, in a fixed order.
    template <class F>
    void for_each_array(F&& f) {
      f(ffn.w1.data(), Index(ffn.w1.size()));
      f(ffn.w2.data(), Index(ffn.w2.size()));
      f(gate.data(), Index(gate.size()));
    }
  };

  /// No shared experts: forward adds nothing, no parameters.
  SharedExperts() = default;
  /// `count` >= 1 experts of `hidden` units each for d-wide tokens; FFN weights as FfnExperts
  /// draws them, the gate (when `gated`) ~ N(0, gate_std^2).
  SharedExperts(FfnKind kind, Index count, Index d, Index hidden, Index d_out, bool gated, double gate_std, Rng& rng)
      : count_(count), gated_(gated) {
    SPEX_CHECK(count >= 1 && hidden >= 1, "shared experts: count = " << count << " and hidden = " << hidden << " must be >= 1");
    Rng r = rng.split(41);
    ffn_ = FfnExperts<T, Arch>(kind, 1, d, checked_mul(count, hidden, "shared_experts * shared_hidden"), r, d_out);
    if (gated) {
      gate_.resize(1, d);
      Rng g = rng.split(42);
      fill_normal(gate_, gate_std, g);
    }
  }

  bool empty() const { return count_ == 0; }
  Index count() const { return count_; }
  bool gated() const { return gated_; }
  /// The FFN of all shared experts (its hidden is count * hidden).
  FfnExperts<T, Arch>& ffn() { return ffn_; }
  const FfnExperts<T, Arch>& ffn() const { return ffn_; }
  /// The gate weight, 1 x d (empty without a gate).
  RowMat<T>& gate() { return gate_; }
  const RowMat<T>& gate() const { return gate_; }

  Grads make_grads() const { return Grads{empty() ? typename FfnExperts<T, Arch>::Grads{} : ffn_.make_grads(), RowMat<T>::Zero(gate_.rows(), gate_.cols())}; }
  void check_grads(const Grads& g, const char* what) const {
    if (!empty()) ffn_.check_grads(g.ffn, what);
    SPEX_CHECK(g.gate.rows() == gate_.rows() && g.gate.cols() == gate_.cols(),
               what << " holds a shared expert gate gradient of " << g.gate.rows() << " x " << g.gate.cols() << ", the layer's gate is "
                    << gate_.rows() << " x " << gate_.cols() << ": grads were made by another layer");
  }
  /// prefix + "w1", "w2" and, gated, "gate.weight"; none when empty.
  ParameterList<T> parameters(const std::string& prefix, Grads* g) {
    ParameterList<T> out;
    if (empty()) return out;
    out = ffn_.parameters(prefix, g ? &g->ffn : nullptr);
    if (gated_) out.push_back(dense_parameter<T>(prefix + "gate.weight", gate_, g ? &g->gate : nullptr));
    return out;
  }
  /// Forward FLOPs per token.
  double flops_per_token() const {
    if (empty()) return 0;
    return ffn_.flops_per_token(1.0).experts + (gated_ ? flops::linear(ffn_.d_in(), 1) + 1.0 : 0.0);
  }

  /// c.y = the shared output for x (B x d); add it to the layer's output with add_to.
  void forward(CMatRef<T> x, Cache& c) const { run(x, c, true); }
  /// The same for inference (FfnExperts::infer: equal to rounding); c cannot be used for backward.
  void infer(CMatRef<T> x, Cache& c) const { run(x, c, false); }
  void add_to(MatRef<T> y, const Cache& c) const {
    if (!empty()) y += c.y;
  }

  /// From dy (B x d_out) after forward(x, c): grads accumulate, *dx += the input gradient.
  void backward(CMatRef<T> x, CMatRef<T> dy, Cache& c, Grads& g, MatRef<T>* dx) const {
    if (empty()) return;
    c.dgates.resize(x.rows(), 1);
    ffn_.backward(x, c.gates, c.groups, dy, c.dgates, dx, g.ffn, c.ffn);
    if (!gated_) return;
    // gate = sigmoid(x . w_g): dlogit = dgate * s (1 - s) (0 where the gate underflowed to 0:
    // the FFN skipped that token, and s (1 - s) = 0 there anyway).
    for (Index t = 0; t < x.rows(); ++t) c.dgates(t, 0) *= c.gates(t, 0) * (T(1) - c.gates(t, 0));
    gemm(g.gate, c.dgates.transpose(), x, true);
    if (dx) gemm(*dx, c.dgates, gate_, true);
  }

 private:
  void run(CMatRef<T> x, Cache& c, bool training) const {
    if (empty()) return;
    const Index b = x.rows();
    c.gates.resize(b, 1);
    if (gated_) {
      gemm(c.gates, x, gate_.transpose(), false);
      kernels::activate<Arch>(kernels::Activation::sigmoid, c.gates.data(), c.gates.data(), static_cast<std::size_t>(b));
    } else {
      c.gates.setOnes();
    }
    c.groups.build(c.gates);
    c.y.resize(b, ffn_.d_out());
    if (training)
      ffn_.forward(x, c.gates, c.groups, c.y, c.ffn);
    else
      ffn_.infer(x, c.gates, c.groups, c.y, c.ffn);
  }

  Index count_ = 0;
  bool gated_ = false;
  FfnExperts<T, Arch> ffn_;
  RowMat<T> gate_;
};

}  // namespace spex
