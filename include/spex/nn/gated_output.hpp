#pragma once
// The output head of a memory layer (Memory+, "Memory Layers at Scale"; docs/pkm.md, "Gated
// output"): from the layer input x (B x d_in) and the memory's read m (B x d_value),
//   silu:    y = W_o (m ⊙ silu(W_g x + b_g)) + b_o      ("output.silu.*", "output.proj.*")
//   sigmoid: y <- sigmoid(w_s . x + b_s) y, per token     ("output.gate.*")
// either, both or neither (then y = m).
#include <cmath>
#include <string>

#include "../core/check.hpp"
#include "../core/parameter.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "linear.hpp"

namespace spex {

/// Thread safety: forward and backward are const (one cache per concurrent caller).
/// Usage (through Pkm's silu_output): examples/snippets/memory_layers.cpp.
template <class T>
class GatedOutput {
 public:
  struct Cache {
    RowMat<T> a;       // silu: W_g x + b_g
    RowMat<T> h;       // silu: m ⊙ silu(a)
    RowMat<T> z;       // sigmoid: y before the gate
    RowMat<T> s;       // sigmoid: B x 1, w_s . x + b_s
    RowMat<T> dz, dh, ds, da;  // backward scratch
  };
  struct Grads {
    typename Linear<T>::Grads silu, proj, gate;
    void zero() {
      silu.zero();
      proj.zero();
      gate.zero();
    }
    /// f(data, size) for each array, in a fixed order (sums over ranks).
    template <class F>
    void for_each_array(F&& f) {
      silu.for_each_array(f);
      proj.for_each_array(f);
      gate.for_each_array(f);
    }
  };

  GatedOutput() = default;
  /// The head of a layer with input width d_in, memory width d_value and output width d_out
  /// (d_value == d_out without `silu`). Weights drawn as PyTorch's Linear from `rng`.
  GatedOutput(Index d_in, Index d_value, Index d_out, bool silu, bool sigmoid, Rng& rng) : d_value_(d_value), d_out_(d_out) {
    SPEX_CHECK(silu || d_value == d_out, "d_value = " << d_value << " differs from d_out = " << d_out
                                                      << ": only the SiLU-gated output (silu_output) projects the memory to d_out");
    if (silu) {
      silu_ = Linear<T>(d_in, d_value, true, rng);
      proj_ = Linear<T>(d_value, d_out, true, rng);
    }
    if (sigmoid) gate_ = Linear<T>(d_in, 1, true, rng);
  }

  bool enabled() const { return silu() || sigmoid(); }
  bool silu() const { return silu_.out_features() > 0; }
  bool sigmoid() const { return gate_.out_features() > 0; }
  Linear<T>& silu_linear() { return silu_; }
  Linear<T>& projection() { return proj_; }
  Linear<T>& gate() { return gate_; }
  const Linear<T>& silu_linear() const { return silu_; }
  const Linear<T>& projection() const { return proj_; }
  const Linear<T>& gate() const { return gate_; }

  Grads make_grads() const { return Grads{silu_.make_grads(), proj_.make_grads(), gate_.make_grads()}; }
  void check_grads(const Grads& g, const char* what) const {
    silu_.check_grads(g.silu, what);
    proj_.check_grads(g.proj, what);
    gate_.check_grads(g.gate, what);
  }

  /// prefix + "silu.weight", "silu.bias", "proj.weight", "proj.bias" (silu), "gate.weight",
  /// "gate.bias" (sigmoid), with their gradients in g (none when g is null).
  ParameterList<T> parameters(Grads* g, const std::string& prefix) {
    ParameterList<T> out;
    if (silu()) {
      append_parameters(out, g ? silu_.parameters(g->silu, prefix + "silu.") : silu_.parameters(prefix + "silu."));
      append_parameters(out, g ? proj_.parameters(g->proj, prefix + "proj.") : proj_.parameters(prefix + "proj."));
    }
    if (sigmoid()) append_parameters(out, g ? gate_.parameters(g->gate, prefix + "gate.") : gate_.parameters(prefix + "gate."));
    return out;
  }

  /// y (B x d_out, assigned) from x and m. x is read before y is written (y may be x itself);
  /// m must not overlap y.
  void forward(CMatRef<T> x, CMatRef<T> m, MatRef<T> y, Cache& c) const {
    const Index b = x.rows();
    check_shape(m, b, d_value_, "the memory read");
    check_shape(y, b, d_out_, "y");
    if (sigmoid()) {
      c.s.resize(b, 1);
      gate_.forward(x, c.s);
    }
    if (silu()) {
      c.a.resize(b, d_value_);
      silu_.forward(x, c.a);
      c.h.resize(b, d_value_);
      c.h = m.array() * (c.a.array() / (T(1) + (-c.a.array()).exp()));
      if (!sigmoid()) return proj_.forward(c.h, y);
      c.z.resize(b, d_out_);
      proj_.forward(c.h, c.z);
    }
    // The sigmoid gate over z: the projection's output, or m itself.
    for (Index t = 0; t < b; ++t) {
      const T sg = T(1) / (T(1) + std::exp(-c.s(t, 0)));
      if (silu()) y.row(t) = c.z.row(t) * sg;
      else y.row(t) = m.row(t) * sg;
    }
  }

  /// From dy: dm (B x d_value, assigned), *dx += the input gradient when given, and the head's
  /// gradients accumulate into g (none when g is null: a frozen head).
  void backward(CMatRef<T> x, CMatRef<T> m, CMatRef<T> dy, MatRef<T> dm, MatRef<T>* dx, Cache& c, Grads* g) const {
    const Index b = x.rows();
    check_shape(dy, b, d_out_, "dy");
    check_shape(dm, b, d_value_, "dm");
    // Through the sigmoid gate: dz = sigma dy; ds = (dy . z) sigma (1 - sigma).
    if (sigmoid()) {
      c.dz.resize(b, d_out_);
      c.ds.resize(b, 1);
      for (Index t = 0; t < b; ++t) {
        const T sg = T(1) / (T(1) + std::exp(-c.s(t, 0)));
        const T zdy = silu() ? c.z.row(t).dot(dy.row(t)) : m.row(t).dot(dy.row(t));
        c.dz.row(t) = sg * dy.row(t);
        c.ds(t, 0) = zdy * sg * (T(1) - sg);
      }
      if (g) gate_.backward_accumulate(x, c.ds, dx, g->gate);
      else if (dx) gate_.backward_input_accumulate(c.ds, *dx);
    }
    const CMatRef<T> dz = sigmoid() ? CMatRef<T>(c.dz) : dy;
    if (!silu()) {
      dm = dz;
      return;
    }
    // Through the projection and the SiLU gate: dh = dz W_o; dm = dh ⊙ silu(a);
    // da = dh ⊙ m ⊙ silu'(a).
    c.dh.resize(b, d_value_);
    if (g) proj_.backward(c.h, dz, c.dh, g->proj);
    else c.dh.setZero(), proj_.backward_input_accumulate(dz, c.dh);
    const auto sig = (T(1) + (-c.a.array()).exp()).inverse();
    const auto silu_a = c.a.array() * sig;
    const auto dsilu = sig * (T(1) + c.a.array() * (T(1) - sig));
    c.da = c.dh.array() * m.array() * dsilu;
    dm = (c.dh.array() * silu_a).matrix();
    if (g) silu_.backward_accumulate(x, c.da, dx, g->silu);
    else if (dx) silu_.backward_input_accumulate(c.da, *dx);
  }

 private:
  Index d_value_ = 0, d_out_ = 0;
  Linear<T> silu_, proj_, gate_;
};

}  // namespace spex
