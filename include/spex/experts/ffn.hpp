#pragma once
// FFN experts for mixture-of-experts layers: E independent MLPs, each a GELU MLP
// W2 gelu(W1 x) or a SwiGLU MLP W2 (silu(W1a x) * (W1b x)) (the ReMoE reference's choice),
// bias-free. Weights are stacked: W1 is (E * h1) x d (h1 = hidden, or 2 * hidden for SwiGLU:
// the a half, then the b half) and W2 is (E * d_out) x hidden; expert e owns a block of rows
// of each. Tokens are grouped per expert (a counting sort), gathered into one contiguous
// block per expert and run through that expert as two GEMMs: never one GEMV per token.
// An expert with many tokens runs feature-major, in blocks of 128 to 255 tokens (FfnExperts::infer;
// forward too, keeping its rows for backward).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <thread>
#include <vector>

#include "../core/check.hpp"
#include "../core/gemm.hpp"
#include "../core/parallel.hpp"
#include "../core/parameter.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../kernels/activation.hpp"
#include "../kernels/transpose.hpp"
#include "../kernels/vector.hpp"
#include "../metrics/flops.hpp"

namespace spex {

enum class FfnKind { gelu, swiglu };

inline const char* to_string(FfnKind k) { return k == FfnKind::gelu ? "gelu" : "swiglu"; }

/// Token groups of a B x E gate matrix: the active (token, expert) pairs (gate != 0, and the
/// probes: per token one expert run with its gate 0, or -1), grouped by expert. Pair p = rows
/// [offsets[e], offsets[e+1]) of expert e: first its gated pairs (gate != 0) in token order,
/// then its pairs of gate 0 (probes) in token order; row_of(t, e) is the pair's row or -1.
struct ExpertGroups {
  std::vector<Index> offsets;  // E + 1
  std::vector<Index> token;    // per row
  RowMat<Index> row_of;        // B x E
  // The experts with tokens, most tokens first (ties: the lower index first): the order in which
  // threads that share the experts take them, the longest jobs first, so that no thread is left
  // with a big expert while the others wait.
  std::vector<Index> by_size;

  Index rows() const { return offsets.empty() ? 0 : offsets.back(); }
  Index count(Index e) const { return offsets[e + 1] - offsets[e]; }
  /// Expert e's gated pairs, rows [offsets[e], offsets[e] + gated(e)): the others have gate 0 and
  /// get no gradient (backward skips them).
  Index gated(Index e) const { return gated_[static_cast<std::size_t>(e)]; }
  /// Whether row r (one of expert e's) is a gated pair.
  bool gated_row(Index e, Index r) const { return r - offsets[static_cast<std::size_t>(e)] < gated(e); }

  /// Groups the pairs of `gates` (gate != 0) and the probes.
  template <class Derived>
  void build(const Eigen::MatrixBase<Derived>& gates, const std::vector<Index>& probes = {}) {
    build(gates, gates, probes);
  }
  /// Groups the pairs where `pairs` is not 0 and the probes; `gates` (the same shape) says which
  /// of them are gated (an expert-parallel owner's received pairs, whose probes have gate 0).
  /// Each token's row is read once into bit masks (its active and gated experts), and the
  /// counting and placing then visit only the set bits: a scan of every (token, expert) entry
  /// with a branch each took 1.1 ms at 4096 tokens x 64 experts, serial inside the forward.
  template <class DerivedP, class DerivedG>
  void build(const Eigen::MatrixBase<DerivedP>& pairs, const Eigen::MatrixBase<DerivedG>& gates,
             const std::vector<Index>& probes = {}) {
    const Index b = pairs.rows(), n_e = pairs.cols(), words = (n_e + 63) / 64;
    auto u = [](Index i) { return static_cast<std::size_t>(i); };
    offsets.assign(u(n_e + 1), 0);
    gated_.assign(u(n_e), 0);
    active_bits_.resize(u(b * words));
    gated_bits_.resize(u(b * words));
    for (Index t = 0; t < b; ++t) {
      const Index probe = probes.empty() ? -1 : probes[u(t)];
      for (Index w = 0; w < words; ++w) {
        const Index e0 = 64 * w, m = std::min<Index>(64, n_e - e0);
        const std::uint64_t probe_bit = probe >= e0 && probe < e0 + m ? std::uint64_t(1) << (probe - e0) : 0;
        const std::uint64_t active = nonzero_bits(pairs, t, e0, m) | probe_bit, gated = active & nonzero_bits(gates, t, e0, m);
        active_bits_[u(t * words + w)] = active;
        gated_bits_[u(t * words + w)] = gated;
        for_each_bit(active, [&](Index j) { ++offsets[u(e0 + j + 1)]; });
        for_each_bit(gated, [&](Index j) { ++gated_[u(e0 + j)]; });
      }
    }
    for (Index e = 0; e < n_e; ++e) offsets[u(e + 1)] += offsets[u(e)];
    token.resize(u(offsets[u(n_e)]));
    row_of.resize(b, n_e);
    // Per expert two cursors: its gated pairs from offsets[e] on, the others after them.
    std::vector<Index>& next = cursor_;
    next.resize(u(2 * n_e));
    for (Index e = 0; e < n_e; ++e) {
      next[u(2 * e)] = offsets[u(e)];
      next[u(2 * e + 1)] = offsets[u(e)] + gated_[u(e)];
    }
    for (Index t = 0; t < b; ++t) {
      row_of.row(t).setConstant(-1);
      for (Index w = 0; w < words; ++w) {
        const std::uint64_t gated = gated_bits_[u(t * words + w)];
        for_each_bit(active_bits_[u(t * words + w)], [&](Index j) {
          const Index e = 64 * w + j;
          Index& row = next[u(2 * e + ((gated >> j) & 1 ? 0 : 1))];
          row_of(t, e) = row;
          token[u(row++)] = t;
        });
      }
    }
    by_size.clear();
    for (Index e = 0; e < n_e; ++e)
      if (count(e) > 0) by_size.push_back(e);
    std::sort(by_size.begin(), by_size.end(), [&](Index a, Index b) { return count(a) != count(b) ? count(a) > count(b) : a < b; });
  }

 private:
  /// Bit j set iff m(t, e0 + j) != 0, for j < count <= 64: one SIMD compare per vector where
  /// the row is contiguous floats or doubles (a gate matrix), one entry at a time otherwise.
  template <class Derived>
  static std::uint64_t nonzero_bits(const Eigen::MatrixBase<Derived>& m, Index t, Index e0, Index count) {
    using S = typename Derived::Scalar;
    constexpr bool direct_rows = (int(Derived::Flags) & Eigen::DirectAccessBit) && (int(Derived::Flags) & Eigen::RowMajorBit);
    if constexpr (kernels::is_simd_scalar_v<S> && direct_rows) {
      if (m.innerStride() == 1)
        return kernels::nonzero_bits(m.derived().data() + t * m.outerStride() + e0, static_cast<std::size_t>(count));
    }
    std::uint64_t bits = 0;
    for (Index j = 0; j < count; ++j) bits |= std::uint64_t(m(t, e0 + j) != S(0)) << j;
    return bits;
  }
  /// f(j) for every set bit j of `bits`, lowest first.
  template <class F>
  static void for_each_bit(std::uint64_t bits, F&& f) {
    for (; bits != 0; bits &= bits - 1) f(Index(__builtin_ctzll(bits)));
  }

  std::vector<Index> gated_;   // per expert
  std::vector<Index> cursor_;  // build's scratch
  std::vector<std::uint64_t> active_bits_, gated_bits_;  // build's scratch: per token and 64 experts, who is active / gated
};

/// Thread safety: const methods; one cache and grads per concurrent caller.
///
/// Usage: see layers/moe.hpp, and examples/compare/blocks.hpp (a dense FFN block).
template <class T = float, class Arch = default_arch>
class FfnExperts {
 public:
  /// The blocks of one feature-major expert's tokens, as infer's adds in expert order take them.
  struct BlockTask {
    Index expert, first, tokens;
    Index before;  // the blocks of the experts before this one
  };

  struct Cache {
    // Rows and columns as the call needs them or more: the buffers only grow (see infer).
    RowMat<T> xg, h, a, yg;  // per routed row: gathered input, pre-activations, activations, output
    RowMat<T> dyg, da, dh, dxg;
    // forward's and infer's feature-major scratch, one slot per thread that runs experts: an
    // expert's xg, h, a and yg transposed (a column per token, rows feature_major_stride(count)
    // apart), reused expert after expert so that it stays in the thread's cache (see
    // FeatureMajorSlot).
    Vec<T> fm_scratch;
    Index fm_slot_stride = 0;  // a slot's columns: the widest block's stride so far and more (only grows)
    // infer's token-major scratch, one slot per thread that runs experts: an expert's xg, h and
    // a (its yg goes to the rows of yg that combine reads), reused expert after expert.
    Vec<T> tm_scratch;
    // infer's blocks in expert order (adds_in_expert_order).
    std::vector<BlockTask> blocks;
  };
  /// forward and infer run an expert feature-major from this many tokens on (fewer: token-major).
  static constexpr Index kFeatureMajorTokens = 16;
  /// Whether forward and infer run an expert of n tokens feature-major: from kFeatureMajorTokens on, except
  /// where a CBLAS with AVX-512 kernels serves the products and libxsmm does not: there from
  /// kGemmTileRows tokens on x W1ᵀ's packed copy of the weights pays for itself (docs/performance.md,
  /// "MoE experts: what was tried"). Decided from the shape, the build, the CPU and the
  /// environment, never from timings.
  static bool runs_feature_major(Index n) {
    return n >= kFeatureMajorTokens &&
           (n < kGemmTileRows || gemm_engine_available(GemmEngine::xsmm) || !gemm_cblas_serves_large());
  }
  /// A feature-major expert runs in blocks of kFeatureMajorBlockTokens to twice that many tokens
  /// less one: blocks whose transposes, pre-activations and outputs stay in the thread's cache
  /// while the expert's weights are read once per block (one block of a whole expert of 512 or
  /// 4096 tokens spilled them: docs/performance.md).
  static constexpr Index kFeatureMajorBlockTokens = 128;
  /// The blocks an expert of n feature-major tokens runs in: n / kFeatureMajorBlockTokens (at
  /// least one), of n / blocks tokens each (the first n % blocks one more). From n alone, so the
  /// threads never change them.
  static Index feature_major_blocks(Index n) { return std::max<Index>(1, n / kFeatureMajorBlockTokens); }
  /// Whether infer on `threads` threads adds each feature-major block's outputs to y as soon as
  /// the blocks of the experts before its own have added theirs (the blocks handed to the threads
  /// in expert order), rather than running the experts side by side, writing their output rows
  /// and combining those after (which wrote and read back 8 rows per token at 8 experts per
  /// token: docs/performance.md, "MoE experts: what was tried"). When every expert with tokens
  /// runs feature-major, on one thread, or on more where every expert fills whole blocks
  /// (kFeatureMajorBlockTokens or more): blocks of 128 to 255 tokens take about the same time, so
  /// a thread seldom waits long for the expert before; smaller experts of uneven sizes made it
  /// wait (and y must not share x's memory: infer checks). Both ways add each token's outputs in
  /// expert order with the same roundings, so y has the same bits either way.
  static bool adds_in_expert_order(const ExpertGroups& groups, int threads) {
    if (groups.by_size.empty()) return false;
    for (Index e : groups.by_size) {
      const Index n = groups.count(e);
      if (!runs_feature_major(n) || (threads > 1 && n < kFeatureMajorBlockTokens)) return false;
    }
    return true;
  }
  /// Dense gradients of W1 and W2; backward accumulates until zero().
  struct Grads {
    RowMat<T> w1, w2;
    void zero() {
      w1.setZero();
      w2.setZero();
    }
  };

  FfnExperts() = default;
  /// Init N(0, std^2) with std = 1/sqrt(d) for W1 and 1/sqrt(hidden) for W2.
  FfnExperts(FfnKind kind, Index n_experts, Index d, Index hidden, Rng& rng, Index d_out = 0)
      : FfnExperts(kind, n_experts, d, hidden, rng, d_out, RowStride{}) {}
  /// The shard `experts` of the E experts the constructor above draws from `rng` (its expert
  /// i is expert experts.first + i * experts.step; experts.block must be 1), with the same
  /// weights (dist/).
  FfnExperts(FfnKind kind, Index n_experts, Index d, Index hidden, Rng& rng, Index d_out, RowStride experts)
      : kind_(kind), d_(d), hidden_(hidden), d_out_(d_out > 0 ? d_out : d) {
    SPEX_CHECK(n_experts >= 1 && d >= 1 && hidden >= 1 && d_out >= 0,
               "FfnExperts(" << n_experts << " experts, d = " << d << ", hidden = " << hidden << ") needs positive sizes");
    SPEX_CHECK(experts.block == 1 && experts.first >= 0 && experts.first < n_experts && experts.step >= 1,
               "expert shard (first " << experts.first << ", step " << experts.step << ", block " << experts.block
                                      << ") of " << n_experts << " experts needs block 1, first in [0, E), step >= 1");
    SPEX_CHECK(kind == FfnKind::gelu || kind == FfnKind::swiglu, "ffn kind " << int(kind) << " is not an FfnKind");
    const Index w1_rows = checked_mul(n_experts, h1(), "expert rows of W1"), w2_rows = checked_mul(n_experts, d_out_, "expert rows of W2");
    n_experts_ = experts.rows_of(n_experts);
    w1_.resize(n_experts_ * h1(), d);
    w2_.resize(n_experts_ * d_out_, hidden);
    Rng r1 = rng.split(21), r2 = rng.split(22);
    fill_normal(w1_, 1.0 / std::sqrt(double(d)), r1, w1_rows, RowStride{experts.first, experts.step, h1()});
    fill_normal(w2_, 1.0 / std::sqrt(double(hidden)), r2, w2_rows, RowStride{experts.first, experts.step, d_out_});
  }

  FfnKind kind() const { return kind_; }
  Index n_experts() const { return n_experts_; }
  Index d_in() const { return d_; }
  Index d_out() const { return d_out_; }
  Index hidden() const { return hidden_; }
  /// Forward FLOPs per token using `experts_per_token` experts (may be fractional: an average):
  /// per expert W1 (d x h1), the activation (SwiGLU: silu and product), W2 (hidden x d_out),
  /// and the gated sum into y.
  FlopCount flops_per_token(double experts_per_token) const {
    return flops_per_token(kind_, d_, hidden_, d_out_, experts_per_token);
  }
  static FlopCount flops_per_token(FfnKind kind, Index d, Index hidden, Index d_out, double experts_per_token) {
    const bool glu = kind == FfnKind::swiglu;
    FlopCount f;
    f.experts = experts_per_token * (flops::linear(d, glu ? 2 * hidden : hidden) + (glu ? 2.0 : 1.0) * double(hidden) +
                                     flops::linear(hidden, d_out) + 2.0 * double(d_out));
    return f;
  }
  /// Rows of W1 per expert: hidden (GELU) or 2 * hidden (SwiGLU).
  Index h1() const { return kind_ == FfnKind::swiglu ? 2 * hidden_ : hidden_; }
  RowMat<T>& w1() { return w1_; }
  const RowMat<T>& w1() const { return w1_; }
  RowMat<T>& w2() { return w2_; }
  const RowMat<T>& w2() const { return w2_; }
  Grads make_grads() const {
    return Grads{RowMat<T>::Zero(w1_.rows(), w1_.cols()), RowMat<T>::Zero(w2_.rows(), w2_.cols())};
  }
  /// Throws unless `g` has this FFN's shapes (`what` names it).
  void check_grads(const Grads& g, const char* what) const {
    SPEX_CHECK(g.w1.rows() == w1_.rows() && g.w1.cols() == w1_.cols() && g.w2.rows() == w2_.rows() && g.w2.cols() == w2_.cols(),
               what << " holds expert gradients of " << g.w1.rows() << " x " << g.w1.cols() << " and " << g.w2.rows() << " x "
                    << g.w2.cols() << ", the layer's weights are " << w1_.rows() << " x " << w1_.cols() << " and "
                    << w2_.rows() << " x " << w2_.cols() << ": grads were made by another layer");
  }
  /// "<prefix>w1" and "<prefix>w2" with their gradients in g, or none.
  ParameterList<T> parameters(const std::string& prefix, Grads* g) {
    return {dense_parameter<T>(prefix + "w1", w1_, g ? &g->w1 : nullptr),
            dense_parameter<T>(prefix + "w2", w2_, g ? &g->w2 : nullptr)};
  }

  /// y (B x d_out, assigned) = sum_e gates(t, e) FFN_e(x_t) over the active pairs of `groups`
  /// (built from the same gates), keeping in `c` what backward needs: each pair's rows of xg, h,
  /// a and yg. Parallel over experts; each expert's GEMMs single-threaded. An expert with enough
  /// tokens (runs_feature_major) runs feature-major as in infer, its rows then copied from the
  /// transposed blocks: its products take the weights as stored, where x W1ᵀ and a W2ᵀ packed a
  /// copy of them per call (1.16x faster at E 64 and 1.25x at E 8, 512 tokens: docs/performance.md,
  /// "MoE experts: what was tried"). y has the same bits on any number of threads.
  void forward(CMatRef<T> x, CMatRef<T> gates, const ExpertGroups& groups, MatRef<T> y, Cache& c) const {
    check_forward_args(x, gates, y);
    const Index rows = groups.rows();  // the buffers only grow (see infer)
    grow_rows(c.xg, rows, d_);
    grow_rows(c.h, rows, h1());
    grow_rows(c.a, rows, hidden_);
    grow_rows(c.yg, rows, d_out_);
    const Index slots = experts_in_parallel(groups) ? Index(max_threads()) : 1;
    grow_feature_major_slots(groups, slots, c);
    for_each_expert(groups, [&](Index e, int slot) {
      const Index r0 = groups.offsets[e], n = groups.count(e);
      if (runs_feature_major(n)) {
        run_feature_major_blocks(x, groups, e, feature_major_slot(c, slot), c, /*token_rows=*/true);
        return;
      }
      run_token_major(x, groups, e, c.xg.middleRows(r0, n), c.h.middleRows(r0, n), c.a.middleRows(r0, n), c);
    });
    combine(gates, groups, y, c);
  }

  /// The same y for inference: equal to forward's to rounding (other GEMM engines serve the
  /// products), and `c` cannot be used for backward. An expert with enough tokens
  /// (runs_feature_major) runs feature-major: its tokens are gathered as the columns of xᵀ and
  /// the products hᵀ = W1 xᵀ, yᵀ = W2 aᵀ take the weights as they are stored, without the per-call
  /// packed copy of W1 and W2 that x W1ᵀ costs (docs/performance.md, "MoE experts: what was
  /// tried"), 128 to 255 tokens at a time (feature_major_blocks); where adds_in_expert_order
  /// says so, each block's outputs go straight to y. The others (a batch of one among them) run
  /// as in forward. y may be x itself (then the outputs are combined after all experts ran); y
  /// has the same bits on any number of threads.
  void infer(CMatRef<T> x, CMatRef<T> gates, const ExpertGroups& groups, MatRef<T> y, Cache& c) const {
    check_forward_args(x, gates, y);
    const Index n_e = Index(groups.offsets.size()) - 1;
    Index token_major = 0;  // the most tokens of a token-major expert
    for (Index e = 0; e < n_e; ++e)
      if (!runs_feature_major(groups.count(e))) token_major = std::max(token_major, groups.count(e));
    const bool in_expert_order = adds_in_expert_order(groups, max_threads()) &&
                                 !detail::operands_overlap(detail::gemm_operand(x), detail::gemm_operand(y));
    // The buffers only grow: the routed rows and the feature-major columns change from batch to
    // batch, and resizing them to each batch reallocated them on most calls. The kernels address
    // them by row and offset, never by their sizes.
    if (!in_expert_order) grow_rows(c.yg, groups.rows(), d_out_);
    const Index threads = in_expert_order || experts_in_parallel(groups) ? Index(max_threads()) : 1;
    grow_feature_major_slots(groups, threads, c);
    // A token-major expert's xg, h and a in its thread's slot, which stays in cache from expert
    // to expert, where whole-batch buffers (forward's, kept for backward) went to memory and back.
    const Index tm_slot = token_major * (d_ + h1() + hidden_);
    grow(c.tm_scratch, threads * tm_slot);
    auto fm_slot = [&](int slot) { return feature_major_slot(c, slot); };
    if (in_expert_order) {
      add_blocks_in_expert_order(x, gates, groups, y, threads, fm_slot, c);
      return;
    }
    for_each_expert(groups, [&](Index e, int slot) {
      const Index n = groups.count(e);
      if (runs_feature_major(n)) {
        run_feature_major_blocks(x, groups, e, fm_slot(slot), c, /*token_rows=*/false);
        return;
      }
      T* next = c.tm_scratch.data() + slot * tm_slot;
      auto block = [&](Index cols) {  // the next n x cols block of the slot
        Eigen::Map<RowMat<T>> b(next, n, cols);
        next += n * cols;
        return b;
      };
      auto xg = block(d_);
      auto h = block(h1());
      auto a = block(hidden_);
      run_token_major(x, groups, e, xg, h, a, c);
    });
    combine(gates, groups, y, c);
  }

  /// From dy (B x d_out): dgates (B x E, assigned; zero off the active pairs), grads accumulate,
  /// *dx (B x d) += the input gradient when given. A pair of gate 0 (a probe) gets its dgate and
  /// nothing else: its rows would add zeros to the gradients, so the products skip them.
  void backward(CMatRef<T> x, CMatRef<T> gates, const ExpertGroups& groups, CMatRef<T> dy, MatRef<T> dgates,
                MatRef<T>* dx, Grads& g, Cache& c) const {
    check_shape(dy, x.rows(), d_out_, "dy");
    check_shape(dgates, x.rows(), n_experts_, "dgates");
    check_grads(g, "grads");
    const Index rows = groups.rows();
    grow_rows(c.dyg, rows, d_out_);
    grow_rows(c.da, rows, hidden_);
    grow_rows(c.dh, rows, h1());
    grow_rows(c.dxg, rows, d_);
    parallel_for(x.rows(), [&](Index t, int) {
      for (Index e = 0; e < n_experts_; ++e) {
        const Index r = groups.row_of(t, e);
        if (r < 0) {
          dgates(t, e) = T(0);
          continue;
        }
        dgates(t, e) = dy.row(t).dot(c.yg.row(r));
        if (groups.gated_row(e, r)) c.dyg.row(r) = gates(t, e) * dy.row(t);
      }
    });
    for_each_expert(groups, [&](Index e, int) {
      const Index r0 = groups.offsets[e], n = groups.gated(e);
      if (n == 0) return;
      auto gw1 = g.w1.middleRows(e * h1(), h1());
      auto gw2 = g.w2.middleRows(e * d_out_, d_out_);
      auto w1e = w1_.middleRows(e * h1(), h1());
      auto w2e = w2_.middleRows(e * d_out_, d_out_);
      auto dyg = c.dyg.middleRows(r0, n);
      auto da = c.da.middleRows(r0, n);
      auto dh = c.dh.middleRows(r0, n);
      gemm(gw2, dyg.transpose(), c.a.middleRows(r0, n), true);
      gemm(da, dyg, w2e, false);
      parallel_for(n, [&](Index r, int) { activate_row_backward(&c.h(r0 + r, 0), &da(r, 0), &dh(r, 0)); });
      gemm(gw1, dh.transpose(), c.xg.middleRows(r0, n), true);
      if (dx) gemm(c.dxg.middleRows(r0, n), dh, w1e, false);
    });
    if (!dx) return;
    parallel_for(x.rows(), [&](Index t, int) {
      for (Index e = 0; e < n_experts_; ++e) {
        const Index r = groups.row_of(t, e);
        if (r >= 0 && groups.gated_row(e, r)) dx->row(t) += c.dxg.row(r);
      }
    });
  }

 private:
  /// Whether for_each_expert runs the experts over the threads, one expert each: when there are
  /// enough experts with tokens to keep the threads busy.
  static bool experts_in_parallel(const ExpertGroups& groups) { return Index(groups.by_size.size()) >= 2 * Index(max_threads()); }
  /// Runs body(e, slot) for every expert with tokens: over the threads one expert each, the
  /// biggest first (experts_in_parallel; slot is the thread's number), otherwise one after the
  /// other with each expert's products and activations spread over the threads (slot 0; a dense
  /// FFN is one expert). The results are the same either way: gemm's tiles and the row loops do
  /// not depend on who runs them.
  template <class F>
  static void for_each_expert(const ExpertGroups& groups, F&& body) {
    if (experts_in_parallel(groups)) {
      parallel_for_dynamic(Index(groups.by_size.size()),
                           [&](Index i, int thread) { body(groups.by_size[static_cast<std::size_t>(i)], thread); });
    } else {
      for (Index e : groups.by_size) body(e, 0);
    }
  }

  /// At least `rows` rows of `cols` columns in m, an eighth more when it grows (row counts
  /// wander from batch to batch); its contents are unspecified after a change.
  static void grow_rows(RowMat<T>& m, Index rows, Index cols) {
    if (m.rows() < rows || m.cols() != cols) m.resize(rows + rows / 8, cols);
  }
  enum class Fill { unspecified, zeros };
  /// At least n values in v, an eighth more when it grows; after a change its contents are
  /// unspecified or zeros, as `fill` says.
  static void grow(Vec<T>& v, Index n, Fill fill = Fill::unspecified) {
    if (v.size() >= n) return;
    if (fill == Fill::zeros)
      v.setZero(n + n / 8);
    else
      v.resize(n + n / 8);
  }

  void check_forward_args(CMatRef<T> x, CMatRef<T> gates, MatRef<T> y) const {
    SPEX_CHECK(x.cols() == d_, "x has " << x.cols() << " columns, expected d = " << d_);
    check_shape(gates, x.rows(), n_experts_, "gates");
    check_shape(y, x.rows(), d_out_, "y");
  }

  /// Expert e's rows of c.yg, token-major: its tokens gathered as the rows of xg, h = x W1ᵀ,
  /// a = act(h), yg = a W2ᵀ (xg, h and a: forward's rows of c, which backward reads, or infer's
  /// scratch; n rows each).
  void run_token_major(CMatRef<T> x, const ExpertGroups& groups, Index e, MatRef<T> xg, MatRef<T> h, MatRef<T> a,
                       Cache& c) const {
    const Index r0 = groups.offsets[e], n = groups.count(e);
    parallel_for(n, [&](Index r, int) { xg.row(r) = x.row(groups.token[r0 + r]); });
    gemm(h, xg, w1_.middleRows(e * h1(), h1()).transpose(), false);
    const bool glu = kind_ == FfnKind::swiglu;  // h_b follows h_a in a row
    parallel_for(n, [&](Index r, int) { activate(&h(r, 0), glu ? &h(r, hidden_) : nullptr, &a(r, 0), hidden_); });
    gemm(c.yg.middleRows(r0, n), a, w2_.middleRows(e * d_out_, d_out_).transpose(), false);
  }

  /// Tokens in block b of the `blocks` an expert of n tokens runs in (feature_major_blocks), and
  /// the first of them (counted from the expert's first).
  static Index block_tokens(Index n, Index blocks, Index b) { return n / blocks + (b < n % blocks ? 1 : 0); }
  static Index block_first(Index n, Index blocks, Index b) { return b * (n / blocks) + std::min(b, n % blocks); }

  /// Where run_feature_major adds its outputs: y's token rows, each output scaled by its gate,
  /// once `*added` (the blocks added so far) reaches `before` (the blocks of the experts before
  /// this one), unless `*failed` (another block threw) says to give up.
  struct AddTo {
    CMatRef<T> gates;
    MatRef<T> y;
    const std::atomic<Index>* added;
    Index before;
    const std::atomic<bool>* failed;
  };

  /// y (assigned) from every expert's feature-major blocks (adds_in_expert_order): the blocks
  /// handed to the threads one at a time in expert order, each added to y when the experts
  /// before its own are. A thread waits only for blocks that threads already run, which wait
  /// only for earlier ones, so the first unfinished block always runs on.
  template <class SlotOf>
  void add_blocks_in_expert_order(CMatRef<T> x, CMatRef<T> gates, const ExpertGroups& groups, MatRef<T> y, Index threads,
                                  SlotOf&& slot_of, Cache& c) const {
    parallel_for(y.rows(), [&](Index t, int) { y.row(t).setZero(); });
    c.blocks.clear();
    Index before = 0;
    for (Index e = 0; e + 1 < Index(groups.offsets.size()); ++e) {
      const Index n = groups.count(e), blocks = n == 0 ? 0 : feature_major_blocks(n);
      for (Index b = 0; b < blocks; ++b) c.blocks.push_back({e, block_first(n, blocks, b), block_tokens(n, blocks, b), before});
      before += blocks;
    }
    std::atomic<Index> next{0}, added{0};
    std::atomic<bool> failed{false};
    parallel_for(threads, [&](Index, int slot) {
      for (Index i = next++; i < Index(c.blocks.size()) && !failed; i = next++) {
        const BlockTask& task = c.blocks[static_cast<std::size_t>(i)];
        try {
          run_feature_major(x, groups, task.expert, task.first, task.tokens, slot_of(slot), c,
                            AddTo{gates, y, &added, task.before, &failed});
        } catch (...) {
          failed = true;
          throw;
        }
        added.fetch_add(1, std::memory_order_release);
      }
    });
  }

  /// The row stride of a feature-major block of n tokens: n rounded up to whole cache lines, and
  /// an odd number of lines, so that the block's rows spread over the cache sets (a stride of a
  /// power of two put them on a few sets: 5x slower at 4096 tokens).
  static Index feature_major_stride(Index n) {
    Index stride = round_up_to_lines(n);
    if ((stride / kLineValues) % 2 == 0) stride += kLineValues;
    return stride;
  }
  /// n values rounded up to whole 64-byte lines.
  static constexpr Index kLineValues = Index(64 / sizeof(T));
  static Index round_up_to_lines(Index n) { return (n + kLineValues - 1) / kLineValues * kLineValues; }

  /// One thread's feature-major scratch: xᵀ, hᵀ, aᵀ and yᵀ one after the other, each of
  /// `columns` columns (the widest block's stride).
  struct FeatureMajorSlot {
    T* data;
    Index columns;
  };
  /// Values in one FeatureMajorSlot of c.
  Index fm_slot_size(const Cache& c) const { return c.fm_slot_stride * (d_ + h1() + hidden_ + d_out_); }
  /// Thread `slot`'s FeatureMajorSlot of c.
  FeatureMajorSlot feature_major_slot(Cache& c, int slot) const {
    return FeatureMajorSlot{c.fm_scratch.data() + slot * fm_slot_size(c), c.fm_slot_stride};
  }
  /// `slots` feature-major slots in c wide enough for the blocks of every expert of `groups` that
  /// runs feature-major (none when no expert does).
  void grow_feature_major_slots(const ExpertGroups& groups, Index slots, Cache& c) const {
    Index widest = 0;  // the widest block's stride
    for (Index e : groups.by_size)
      if (const Index n = groups.count(e); runs_feature_major(n))
        widest = std::max(widest, feature_major_stride(block_tokens(n, feature_major_blocks(n), 0)));
    if (widest > c.fm_slot_stride) c.fm_slot_stride = feature_major_stride(widest + widest / 8);
    // The activation reads the padding columns of hᵀ too (run_feature_major): new storage is
    // zeroed, and after that they hold what earlier products wrote there.
    grow(c.fm_scratch, (widest == 0 ? 0 : slots) * fm_slot_size(c), Fill::zeros);
  }

  /// Expert e's feature-major blocks (feature_major_blocks) one after the other in `slot`, each
  /// by run_feature_major, its outputs to c.yg, with `token_rows` as there.
  void run_feature_major_blocks(CMatRef<T> x, const ExpertGroups& groups, Index e, FeatureMajorSlot slot, Cache& c,
                                bool token_rows) const {
    const Index n = groups.count(e), blocks = feature_major_blocks(n);
    for (Index b = 0; b < blocks; ++b)
      run_feature_major(x, groups, e, block_first(n, blocks, b), block_tokens(n, blocks, b), slot, c, std::nullopt, token_rows);
  }

  /// Rows [first, first + n) of expert e's rows of c.yg, feature-major: those tokens gathered as
  /// the columns of xᵀ in the slot, hᵀ = W1 xᵀ, aᵀ = act(hᵀ), yᵀ = W2 aᵀ, then yᵀ's columns copied
  /// to the rows of c.yg, or with `add` each column times its gate added to its token's row of y.
  /// With `token_rows` (forward) the same rows of c.xg, c.h and c.a get the gathered inputs,
  /// pre-activations and activations, which backward reads.
  /// The slot is the calling thread's (or the one all threads share when the experts run one
  /// after the other), reused by its next expert: the blocks stay in cache between the steps,
  /// where one block per expert over the whole batch went to memory (tens of MB at 512 tokens).
  void run_feature_major(CMatRef<T> x, const ExpertGroups& groups, Index e, Index first, Index n, FeatureMajorSlot slot,
                         Cache& c, std::optional<AddTo> add = std::nullopt, bool token_rows = false) const {
    const Index r0 = groups.offsets[e] + first, stride = feature_major_stride(n);
    T* next = slot.data;
    auto block = [&](Index rows) {  // the next rows x n block of the slot
      Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>> b(next, rows, n, Eigen::OuterStride<>(stride));
      next += rows * slot.columns;
      return b;
    };
    auto xt = block(d_);
    auto ht = block(h1());
    auto at = block(hidden_);
    auto yt = block(d_out_);
    // copy(t0, count) for the expert's tokens in blocks of 16 (a whole tile of
    // kernels::transpose_rows), the blocks spread over the threads.
    auto by_token_blocks = [&](auto&& copy) {
      constexpr Index kBlock = 16;
      parallel_for((n + kBlock - 1) / kBlock, [&](Index b, int) { copy(b * kBlock, std::min(n - b * kBlock, kBlock)); });
    };
    auto u = [](Index i) { return static_cast<std::size_t>(i); };
    by_token_blocks([&](Index t0, Index count) {
      if (token_rows) {  // backward reads xg: the rows copied, then transposed from there
        for (Index j = 0; j < count; ++j) c.xg.row(r0 + t0 + j) = x.row(groups.token[r0 + t0 + j]);
        kernels::transpose_rows<Arch>([&](std::size_t j) { return &c.xg(r0 + t0 + Index(j), 0); }, u(count), u(d_),
                                      &xt(0, t0), u(stride));
        return;
      }
      kernels::transpose_rows<Arch>([&](std::size_t j) { return x.row(groups.token[r0 + t0 + Index(j)]).data(); }, u(count),
                                    u(d_), &xt(0, t0), u(stride));
    });
    gemm(ht, w1_.middleRows(e * h1(), h1()), xt, false);
    // The rows' first n values rounded up to whole cache lines (a multiple of every SIMD width),
    // padding included (zeros, or what an earlier call's product wrote there: see infer), so the
    // activation runs without a scalar tail and not over the stride's extra line; nothing reads
    // the padding of aᵀ (the GEMM below takes the first n columns).
    const bool glu = kind_ == FfnKind::swiglu;
    const Index width = round_up_to_lines(n);
    parallel_for(hidden_, [&](Index i, int) { activate(&ht(i, 0), glu ? &ht(hidden_ + i, 0) : nullptr, &at(i, 0), width); });
    if (token_rows)  // backward reads h and a by rows
      by_token_blocks([&](Index t0, Index count) {
        kernels::transpose_rows<Arch>([&](std::size_t j) { return &ht(Index(j), t0); }, u(h1()), u(count), &c.h(r0 + t0, 0),
                                      u(c.h.cols()));
        kernels::transpose_rows<Arch>([&](std::size_t j) { return &at(Index(j), t0); }, u(hidden_), u(count), &c.a(r0 + t0, 0),
                                      u(c.a.cols()));
      });
    gemm(yt, w2_.middleRows(e * d_out_, d_out_), at, false);
    if (add)  // wait for the experts before this one
      while (add->added->load(std::memory_order_acquire) < add->before) {
        if (add->failed->load()) return;
        std::this_thread::yield();
      }
    by_token_blocks([&](Index t0, Index count) {
      auto column = [&](std::size_t j) { return &yt(Index(j), t0); };
      if (!add) {
        kernels::transpose_rows<Arch>(column, u(d_out_), u(count), &c.yg(r0 + t0, 0), u(c.yg.cols()));
        return;
      }
      auto token = [&](std::size_t i) { return groups.token[r0 + t0 + Index(i)]; };
      kernels::transpose_rows_axpy<Arch, T>(column, u(d_out_), u(count), [&](std::size_t i) { return add->gates(token(i), e); },
                                            [&](std::size_t i) { return &add->y(token(i), 0); });
    });
  }

  /// y (assigned) = the gate-weighted sum of each token's rows of c.yg, in expert order, each
  /// added by kernels::axpy (the roundings infer's adds in expert order make).
  void combine(CMatRef<T> gates, const ExpertGroups& groups, MatRef<T> y, const Cache& c) const {
    parallel_for(y.rows(), [&](Index t, int) {
      y.row(t).setZero();
      for (Index e = 0; e < n_experts_; ++e) {
        const Index r = groups.row_of(t, e);
        if (r >= 0) kernels::axpy<Arch>(gates(t, e), &c.yg(r, 0), &y(t, 0), static_cast<std::size_t>(d_out_));
      }
    });
  }

  /// a[0, n) = act(h): gelu(h_a), or silu(h_a) * h_b (SwiGLU; h_b unused for GELU).
  void activate(const T* h_a, const T* h_b, T* a, Index n_in) const {
    const std::size_t n = static_cast<std::size_t>(n_in);
    if (kind_ == FfnKind::gelu) {
      kernels::activate<Arch>(kernels::Activation::gelu_erf, h_a, a, n);
    } else {
      kernels::activate<Arch>(kernels::Activation::silu, h_a, a, n);
      for (std::size_t i = 0; i < n; ++i) a[i] *= h_b[i];
    }
  }
  /// dh from da for one row.
  void activate_row_backward(const T* h, const T* da, T* dh) const {
    const std::size_t n = static_cast<std::size_t>(hidden_);
    if (kind_ == FfnKind::gelu) {
      kernels::activate_backward<Arch>(kernels::Activation::gelu_erf, h, da, dh, n);
    } else {
      // a = silu(h_a) h_b: dh_a = da h_b silu'(h_a), dh_b = da silu(h_a).
      for (std::size_t i = 0; i < n; ++i) {
        dh[i] = da[i] * h[n + i];
        dh[n + i] = da[i] * kernels::scalar::activate(kernels::Activation::silu, h[i]);
      }
      kernels::activate_backward<Arch>(kernels::Activation::silu, h, dh, dh, n);
    }
  }

  FfnKind kind_ = FfnKind::gelu;
  Index n_experts_ = 0, d_ = 0, hidden_ = 0, d_out_ = 0;
  RowMat<T> w1_, w2_;
};

}  // namespace spex
