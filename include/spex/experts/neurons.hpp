#pragma once
// PEER's single-neuron experts (He 2024, Eq. 6): expert i is a pair of rows u_i (down, d_in)
// and v_i (up, d_out), e_i(x) = act(u_i . x) v_i. A token with retrieved ids e_j and gates g_j
// gets y = sum_j g_j act(u_{e_j} . x) v_{e_j}. GLU experts (UltraMemV2's PEER-style values) have
// a third row w_i (down_linear, d_in): e_i(x) = act(u_i . x) (w_i . x) v_i. Per token this is one fused pass: gather-dot of
// the u rows, the activation and the gate on m scalars, gather-axpy of the v rows. The
// gathered rows are never copied out (PEER-pytorch's einsum materializes them: 512 MiB per
// call at its sizes). The tables lie side by side in one allocation (expert i's u row, its w
// row, then its v row: Table::side_by_side), so a pick's rows are one run of bytes. For
// inference the tables may be stored compact (bf16, or int8 with a scale per row:
// core/compact_table.hpp), side by side too; training needs them as T.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../core/check.hpp"
#include "../core/compact_table.hpp"
#include "../core/memory.hpp"
#include "../core/parameter.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../core/sparse_rows.hpp"
#include "../core/table.hpp"
#include "../core/types.hpp"
#include "../kernels/activation.hpp"
#include "../kernels/gather.hpp"
#include "../metrics/flops.hpp"

namespace spex {

/// Thread safety: const methods; distinct caches and grads per concurrent caller.
template <class T = float, class Arch = default_arch>
class NeuronExperts {
 public:
  /// Each expert reads the token (u . x): a sharded layer sends x to the owners.
  static constexpr bool kReadsInput = true;
  struct Cache {
    RowMat<T> coef_down, coef_up, coef_linear;  // backward scratch, B x m
    RowScatterPlan plan;
  };
  struct Grads {
    SparseRowGrad<T> down, up;
    SparseRowGrad<T> down_linear;  // GLU experts only
    void zero() {
      down.zero();
      up.zero();
      down_linear.zero();
    }
    /// Experts [0, frozen_rows()) get no gradient (make_grads).
    Index frozen_rows() const { return down.frozen_rows(); }
    /// f(SparseRowGrad&) for each table's gradient.
    template <class F>
    void for_each_table(F&& f) {
      f(down);
      f(up);
      if (down_linear.n_rows() > 0) f(down_linear);
    }
  };

  /// Throws unless `g` was made for tables of this shape (`what` names it).
  void check_grads(const Grads& g, const char* what) const {
    check_sparse_grad(g.down, down_, what, "experts.down");
    check_sparse_grad(g.up, up_, what, "experts.up");
    if (glu_) check_sparse_grad(g.down_linear, linear_, what, "experts.down_linear");
    else SPEX_CHECK(g.down_linear.n_rows() == 0, what << " holds a gradient for experts.down_linear, the experts are not GLU: grads were made by another layer");
  }

  NeuronExperts() = default;
  /// N experts; u, v ~ N(0, 1/d_in) and N(0, 1/d_out) (docs/peer.md, "Initialization"). Stored
  /// compact, the tables are the same draws rounded or quantized block by block (the float
  /// tables never exist at once).
  /// With `glu`, w ~ N(0, 1/d_in) too (rng's split 14).
  NeuronExperts(Index n_experts, Index d_in, Index d_out, kernels::Activation act, bool glu, Rng& rng,
                TableStorage storage = TableStorage::native)
      : act_(act), glu_(glu), storage_(checked_storage<T>(storage)) {
    checked_size(n_experts, d_in, d_out);
    Rng r1 = rng.split(11), r2 = rng.split(12), r3 = rng.split(14);
    if (storage == TableStorage::native) {
      draw_native(n_experts, d_in, d_out, r1, r2, r3, RowStride{});
    } else {
      allocate_compact(storage, n_experts, d_in, d_out);
      fill_compact(cdown_, normal_rows(d_in, 1.0 / std::sqrt(double(d_in)), r1), "experts.down");
      fill_compact(cup_, normal_rows(d_out, 1.0 / std::sqrt(double(d_out)), r2), "experts.up");
      if (glu_) fill_compact(clinear_, normal_rows(d_in, 1.0 / std::sqrt(double(d_in)), r3), "experts.down_linear");
    }
  }
  /// The shard `rows` of the N experts the constructor above draws from `rng` (row i is expert
  /// rows.first + i * rows.step), with the same values; native storage (dist/).
  NeuronExperts(Index n_experts, Index d_in, Index d_out, kernels::Activation act, bool glu, Rng& rng, RowStride rows)
      : act_(act), glu_(glu) {
    checked_size(n_experts, d_in, d_out);
    Rng r1 = rng.split(11), r2 = rng.split(12), r3 = rng.split(14);
    draw_native(n_experts, d_in, d_out, r1, r2, r3, rows);
  }
  /// Tables allocated, values unspecified: for loaders that fill or map every row.
  NeuronExperts(Index n_experts, Index d_in, Index d_out, kernels::Activation act, bool glu,
                TableStorage storage = TableStorage::native)
      : act_(act), glu_(glu), storage_(checked_storage<T>(storage)) {
    checked_size(n_experts, d_in, d_out);
    if (storage == TableStorage::native) {
      std::vector<Table<T>> t = native_side_by_side(n_experts, d_in, d_out);
      take_native(t);
    } else {
      allocate_compact(storage, n_experts, d_in, d_out);
    }
  }
  /// A copy; tables of their own are copied side by side, as the original's are (views stay
  /// views of the same memory).
  NeuronExperts(const NeuronExperts& o) : act_(o.act_), glu_(o.glu_), storage_(o.storage_) {
    if (!o.compact()) {
      if (o.down_.is_view() || o.up_.is_view() || o.linear_.is_view()) {
        down_ = o.down_;
        up_ = o.up_;
        linear_ = o.linear_;
        return;
      }
      std::vector<Table<T>> t = native_copies(o);
      take_native(t);
      return;
    }
    if (o.cdown_.is_view() || o.cup_.is_view() || o.clinear_.is_view()) {  // views stay views of the same memory
      cdown_ = o.cdown_;
      cup_ = o.cup_;
      clinear_ = o.clinear_;
      return;
    }
    std::vector<CompactTable> t = copy_side_by_side(glu_ ? std::vector<const CompactTable*>{&o.cdown_, &o.clinear_, &o.cup_}
                                                         : std::vector<const CompactTable*>{&o.cdown_, &o.cup_});
    take_compact(t);
  }
  NeuronExperts& operator=(const NeuronExperts& o) {
    if (this != &o) *this = NeuronExperts(o);
    return *this;
  }
  NeuronExperts(NeuronExperts&&) noexcept = default;
  NeuronExperts& operator=(NeuronExperts&&) noexcept = default;

  /// Grows to n_new experts (at least n_experts()): rows 0 .. N - 1 stay, the new rows are drawn
  /// as at construction (rng's splits 11, 12 and 14). Each table is copied once. Native tables only.
  void grow(Index n_new, Rng& rng) { grow(n_experts(), n_new, rng, RowStride{}); }
  /// A shard's growth (dist/): the shard `rows` of n_old experts becomes the shard `rows` of
  /// n_new, its new rows the ones grow(n_new) of the whole table would draw.
  void grow(Index n_old, Index n_new, Rng& rng, RowStride rows) {
    require_native("grow");
    SPEX_CHECK(rows.rows_of(n_old) == n_experts(), "NeuronExperts::grow: the shard holds " << n_experts() << " rows, not its "
                                                                                           << rows.rows_of(n_old) << " of " << n_old);
    SPEX_CHECK(n_new >= n_old, "NeuronExperts::grow(" << n_new << ") below the " << n_old << " experts it has");
    Rng r1 = rng.split(11), r2 = rng.split(12), r3 = rng.split(14);
    const Index local = rows.rows_of(n_new), added = local - n_experts();
    // Every table grown (side by side) before any is replaced: a failed allocation changes nothing.
    std::vector<Table<T>> t = native_side_by_side(local, d_in(), d_out());
    Table<T>&down = t[0], &up = t.back();
    down.copy_rows_from(down_, n_experts());
    up.copy_rows_from(up_, n_experts());
    fill_normal(down.mutable_matrix().bottomRows(added), 1.0 / std::sqrt(double(d_in())), r1, n_new - n_old, rows.from(n_old));
    fill_normal(up.mutable_matrix().bottomRows(added), 1.0 / std::sqrt(double(d_out())), r2, n_new - n_old, rows.from(n_old));
    if (glu_) {
      t[1].copy_rows_from(linear_, n_experts());
      fill_normal(t[1].mutable_matrix().bottomRows(added), 1.0 / std::sqrt(double(d_in())), r3, n_new - n_old, rows.from(n_old));
    }
    take_native(t);
  }

  /// How the tables are stored: native (T, trainable) or compact (bf16, int8; inference).
  TableStorage storage() const { return storage_; }
  /// Converts the tables to storage `s` in place. native -> compact rounds (bf16) or quantizes
  /// (int8); compact -> native gives the values the compact tables compute with (exact); bf16
  /// <-> int8 goes through them. The new tables are stored side by side (a pick's rows of every
  /// table in one run of bytes: CompactTable::side_by_side, Table::side_by_side). Every new table is made before any
  /// is replaced (the peak is the tables in both forms), so a failure (a value the storage
  /// cannot hold, memory) changes nothing.
  void set_storage(TableStorage s) {
    checked_storage<T>(s);
    if (s == storage_) return;
    if constexpr (std::is_same<T, float>::value) {
      if (s == TableStorage::native) {
        std::vector<Table<T>> t = native_side_by_side(cdown_.rows(), cdown_.cols(), cup_.cols());
        copy_native(cdown_, t[0]);
        if (glu_) copy_native(clinear_, t[1]);
        copy_native(cup_, t.back());
        take_native(t);
        cdown_ = CompactTable();
        cup_ = CompactTable();
        clinear_ = CompactTable();
      } else {
        const Index n = n_experts(), din = d_in(), dout = d_out();
        std::vector<CompactTable> t = compact_side_by_side(s, n, din, dout);
        fill_compact(t[0], rows_of(down_, cdown_), "experts.down");
        if (glu_) fill_compact(t[1], rows_of(linear_, clinear_), "experts.down_linear");
        fill_compact(t.back(), rows_of(up_, cup_), "experts.up");
        take_compact(t);
        down_ = Table<T>();
        up_ = Table<T>();
        linear_ = Table<T>();
      }
    }
    storage_ = s;
  }
  /// The compact tables (empty while stored native).
  const CompactTable& compact_down() const { return cdown_; }
  const CompactTable& compact_up() const { return cup_; }
  CompactTable& compact_down() { return cdown_; }
  CompactTable& compact_up() { return cup_; }
  /// Bytes the tables take (rows and int8 scales).
  std::size_t table_bytes() const {
    return storage_ == TableStorage::native ? sizeof(T) * static_cast<std::size_t>(down_.size() + up_.size() + linear_.size())
                                            : cdown_.bytes() + cup_.bytes() + clinear_.bytes();
  }

  Index n_experts() const { return compact() ? cdown_.rows() : down_.rows(); }
  Index d_in() const { return compact() ? cdown_.cols() : down_.cols(); }
  Index d_out() const { return compact() ? cup_.cols() : up_.cols(); }
  /// Forward FLOPs per token with `picks` (expert, gate) pairs: u . x, the activation, its
  /// gate, and gate * act * v added into y.
  /// GLU experts add w . x and its product.
  FlopCount flops_per_token(Index picks) const { return flops_per_token(picks, d_in(), d_out(), glu_); }
  static FlopCount flops_per_token(Index picks, Index d_in, Index d_out, bool glu = false) {
    FlopCount f;
    f.experts = double(picks) * (flops::linear(d_in, 1) + flops::linear(1, d_out) + 2.0 + (glu ? flops::linear(d_in, 1) + 1.0 : 0.0));
    return f;
  }
  kernels::Activation activation() const { return act_; }
  /// Whether the experts are GLU: act(u . x) (w . x) v.
  bool glu() const { return glu_; }
  /// The native tables (N x d_in and N x d_out, row i = expert i; rows ld() apart, the tables
  /// side by side). Reading never copies; the writable forms (and parameters(prefix, grads))
  /// first copy memory-mapped tables into owned memory, side by side (own_tables()). Compact
  /// tables are compact_down() / compact_up().
  typename Table<T>::ConstMap down() const { return native_table(down_).matrix(); }
  typename Table<T>::ConstMap up() const { return native_table(up_).matrix(); }
  typename Table<T>::Map down() { return own_tables().down_.mutable_matrix(); }
  typename Table<T>::Map up() { return own_tables().up_.mutable_matrix(); }
  const Table<T>& down_table() const { return native_table(down_); }
  const Table<T>& up_table() const { return native_table(up_); }
  /// GLU experts' w table (N x d_in; empty otherwise).
  typename Table<T>::ConstMap down_linear() const { return native_table(linear_).matrix(); }
  typename Table<T>::Map down_linear() { return own_tables().linear_.mutable_matrix(); }
  const CompactTable& compact_down_linear() const { return clinear_; }

  /// "<prefix>down" and "<prefix>up" with their row-sparse gradients in g (or none); nothing
  /// while the tables are compact (they are not parameters of T then: compact_tables()).
  ParameterList<T> parameters(const std::string& prefix, Grads* g) {
    if (compact()) return {};
    own_tables();
    ParameterList<T> out{sparse_parameter<T>(prefix + "down", down_, g ? &g->down : nullptr),
                         sparse_parameter<T>(prefix + "up", up_, g ? &g->up : nullptr)};
    if (glu_) out.push_back(sparse_parameter<T>(prefix + "down_linear", linear_, g ? &g->down_linear : nullptr));
    return out;
  }
  /// Read-only: never copies a mapped table.
  ParameterList<const T> parameters(const std::string& prefix) const {
    if (compact()) return {};
    ParameterList<const T> out{table_parameter<T>(prefix + "down", down_), table_parameter<T>(prefix + "up", up_)};
    if (glu_) out.push_back(table_parameter<T>(prefix + "down_linear", linear_));
    return out;
  }
  /// The compact tables by name ("<prefix>down", "<prefix>up"); none while stored native.
  CompactTableList compact_tables(const std::string& prefix) {
    if (!compact()) return {};
    CompactTableList out{{prefix + "down", &cdown_}, {prefix + "up", &cup_}};
    if (glu_) out.push_back({prefix + "down_linear", &clinear_});
    return out;
  }
  ConstCompactTableList compact_tables(const std::string& prefix) const {
    if (!compact()) return {};
    ConstCompactTableList out{{prefix + "down", &cdown_}, {prefix + "up", &cup_}};
    if (glu_) out.push_back({prefix + "down_linear", &clinear_});
    return out;
  }

  /// Row-sparse gradients for both tables (training: N <= 2^31 - 1, see SparseRowGrad); the
  /// experts [0, frozen_rows) frozen: never held by them.
  Grads make_grads(Index frozen_rows = 0) const {
    require_native("make_grads");
    return Grads{SparseRowGrad<T>(n_experts(), d_in(), frozen_rows), SparseRowGrad<T>(n_experts(), d_out(), frozen_rows),
                 glu_ ? SparseRowGrad<T>(n_experts(), d_in(), frozen_rows) : SparseRowGrad<T>()};
  }

  /// y (B x d_out, assigned) = sum_j gates(t, j) act(u_{ids(t,j)} . x_t) v_{ids(t,j)} (GLU:
  /// times w_{ids(t,j)} . x_t); keeps the pre-activations in `pre` for backward: B x m of u . x
  /// (GLU: B x 2m, then the m values w . x). Ids must lie in [0, N).
  void forward(CMatRef<T> x, CIndexMatRef ids, CMatRef<T> gates, MatRef<T> y, RowMat<T>& pre) const {
    const Index b = x.rows(), m = ids.cols();
    check_inputs(x, ids, gates);
    check_shape(y, b, d_out(), "y");
    pre.resize(b, glu_ ? 2 * m : m);
    parallel_for(b, [&](Index t, int) {
      forward_token(row_ptr(ids, t), row_ptr(gates, t), static_cast<std::size_t>(m), row_ptr(x, t), &pre(t, 0),
                    glu_ ? &pre(t, m) : nullptr, &y(t, 0));
    });
  }

  /// The same for tokens with pick lists of their own lengths (an expert shard's received
  /// requests, dist/): token t's picks are [begin[t], begin[t + 1]) of ids and gates (B + 1
  /// offsets); pre gets begin[B] pre-activations (GLU: then begin[B] values w . x). Tokens
  /// without a pick get y = 0.
  void forward_grouped(CMatRef<T> x, const Index* begin, const Index* ids, const T* gates, MatRef<T> y,
                       std::vector<T>& pre) const {
    const Index b = x.rows();
    SPEX_CHECK(x.cols() == d_in(), "x has " << x.cols() << " columns, expected d_in = " << d_in());
    check_shape(y, b, d_out(), "y");
    check_pick_lists(b, begin, ids, n_experts());
    const Index picks = begin[b];
    pre.resize(static_cast<std::size_t>(glu_ ? 2 * picks : picks));
    parallel_for(b, [&](Index t, int) {
      forward_token(ids + begin[t], gates + begin[t], static_cast<std::size_t>(begin[t + 1] - begin[t]), row_ptr(x, t),
                    pre.data() + begin[t], glu_ ? pre.data() + picks + begin[t] : nullptr, &y(t, 0));
    });
  }

  /// From dy (B x d_out): dgates (B x m, assigned); grads.down/up accumulate row-sparse;
  /// *dx += the input gradient when dx is given.
  void backward(CMatRef<T> x, CIndexMatRef ids, CMatRef<T> gates, const RowMat<T>& pre, CMatRef<T> dy,
                MatRef<T> dgates, MatRef<T>* dx, Grads& g, Cache& c) const {
    const Index b = x.rows(), m = ids.cols();
    require_native("backward");
    check_inputs(x, ids, gates);
    check_shape(pre, b, glu_ ? 2 * m : m, "pre");
    check_shape(dy, b, d_out(), "dy");
    check_shape(dgates, b, m, "dgates");
    if (dx) check_shape(*dx, b, d_in(), "dx");
    c.coef_down.resize(b, m);
    c.coef_up.resize(b, m);
    if (glu_) c.coef_linear.resize(b, m);
    parallel_for(b, [&](Index t, int) {
      backward_token(row_ptr(ids, t), row_ptr(gates, t), &pre(t, 0), glu_ ? &pre(t, m) : nullptr, static_cast<std::size_t>(m),
                     row_ptr(dy, t), &dgates(t, 0), &c.coef_up(t, 0), &c.coef_down(t, 0), glu_ ? &c.coef_linear(t, 0) : nullptr,
                     dx ? &(*dx)(t, 0) : nullptr);
    });
    accumulate_rows<Arch>(ids, c.coef_up, dy, g.up, c.plan);
    accumulate_rows<Arch>(ids, c.coef_down, x, g.down, c.plan);
    if (glu_) accumulate_rows<Arch>(ids, c.coef_linear, x, g.down_linear, c.plan);
  }

  /// backward() for forward_grouped(): token[p] is pick p's token (begin's inverse); dgates
  /// gets begin[B] values; grads accumulate, each row in pick order.
  void backward_grouped(CMatRef<T> x, const Index* begin, const Index* ids, const Index* token, const T* gates,
                        const std::vector<T>& pre, CMatRef<T> dy, T* dgates, MatRef<T>* dx, Grads& g, Cache& c) const {
    const Index b = x.rows();
    require_native("backward");
    SPEX_CHECK(x.cols() == d_in(), "x has " << x.cols() << " columns, expected d_in = " << d_in());
    check_pick_lists(b, begin, ids, n_experts());
    const Index picks = begin[b];
    SPEX_CHECK(Index(pre.size()) == (glu_ ? 2 : 1) * picks, "pre holds " << pre.size() << " values for " << picks << " picks");
    check_shape(dy, b, d_out(), "dy");
    if (dx) check_shape(*dx, b, d_in(), "dx");
    c.coef_down.resize(1, picks);
    c.coef_up.resize(1, picks);
    if (glu_) c.coef_linear.resize(1, picks);
    parallel_for(b, [&](Index t, int) {
      const Index p = begin[t];
      backward_token(ids + p, gates + p, pre.data() + p, glu_ ? pre.data() + picks + p : nullptr,
                     static_cast<std::size_t>(begin[t + 1] - p), row_ptr(dy, t), dgates + p, c.coef_up.data() + p,
                     c.coef_down.data() + p, glu_ ? c.coef_linear.data() + p : nullptr, dx ? &(*dx)(t, 0) : nullptr);
    });
    accumulate_rows<Arch>(ids, c.coef_up.data(), token, picks, dy, g.up, c.plan);
    accumulate_rows<Arch>(ids, c.coef_down.data(), token, picks, x, g.down, c.plan);
    if (glu_) accumulate_rows<Arch>(ids, c.coef_linear.data(), token, picks, x, g.down_linear, c.plan);
  }

 private:
  /// Picks whose activations a token's forward and backward hold on the stack at a time.
  static constexpr std::size_t kChunk = 64;

  /// One token's forward: pre (m) = u . x over its picks (GLU: lin (m) = w . x), y (d_out,
  /// assigned) = sum_j gates_j act(pre_j) (lin_j) v_{ids_j}.
  void forward_token(const Index* ids, const T* gates, std::size_t m, const T* x, T* pre, T* lin, T* y) const {
    const std::size_t din = static_cast<std::size_t>(d_in()), dout = static_cast<std::size_t>(d_out());
    if (compact()) rows_dot(cdown_, ids, m, x, pre);
    else kernels::gather_dot<Arch>(down_.data(), ld(down_), ids, m, x, din, pre);
    if (lin) {
      if (compact()) rows_dot(clinear_, ids, m, x, lin);
      else kernels::gather_dot<Arch>(linear_.data(), ld(linear_), ids, m, x, din, lin);
    }
    // Gate-scaled activations in chunks on the stack, then one gather-axpy of the v rows.
    for (std::size_t i = 0; i < dout; ++i) y[i] = T(0);
    T c[kChunk];
    for (std::size_t j0 = 0; j0 < m; j0 += kChunk) {
      const std::size_t len = std::min(kChunk, m - j0);
      kernels::activate<Arch>(act_, pre + j0, c, len);
      for (std::size_t j = 0; j < len; ++j) c[j] *= gates[j0 + j];
      if (lin)
        for (std::size_t j = 0; j < len; ++j) c[j] *= lin[j0 + j];
      if (compact()) rows_axpy(cup_, ids + j0, c, len, y);
      else kernels::gather_axpy<Arch>(up_.data(), ld(up_), ids + j0, c, len, y, dout);
    }
  }

  /// One token's backward: dgates (m, assigned), the coefficients of its rows' gradients
  /// (dv += coef_up dy, du += coef_down x, GLU: dw += coef_linear x), and dx (d_in) += its
  /// input gradient when given. lin and coef_linear: GLU only (else null).
  void backward_token(const Index* ids, const T* gates, const T* pre, const T* lin, std::size_t m, const T* dy, T* dgates,
                      T* coef_up, T* coef_down, T* coef_linear, T* dx) const {
    const std::size_t din = static_cast<std::size_t>(d_in()), dout = static_cast<std::size_t>(d_out());
    T* tv = dgates;  // first v . dy, then overwritten by dgates
    kernels::gather_dot<Arch>(up_.data(), ld(up_), ids, m, dy, dout, tv);
    // The activations and their derivatives in chunks on the stack (forward_token's values).
    T z[kChunk], dz[kChunk];
    for (std::size_t j0 = 0; j0 < m; j0 += kChunk) {
      const std::size_t len = std::min(kChunk, m - j0);
      kernels::activate<Arch>(act_, pre + j0, z, len);
      kernels::derivative<Arch>(act_, pre + j0, dz, len);
      for (std::size_t i = 0; i < len; ++i) {
        const std::size_t j = j0 + i;
        const T vdy = tv[j], l = lin ? lin[j] : T(1);
        coef_up[j] = gates[j] * z[i] * l;                 // dv += g z l dy
        coef_down[j] = gates[j] * vdy * dz[i] * l;        // du += g (v.dy) act'(a) l x
        if (lin) coef_linear[j] = gates[j] * vdy * z[i];  // dw += g (v.dy) z x
        tv[j] = z[i] * l * vdy;                           // dL/dg
      }
    }
    if (dx) {
      kernels::gather_axpy<Arch>(down_.data(), ld(down_), ids, coef_down, m, dx, din);
      if (lin) kernels::gather_axpy<Arch>(linear_.data(), ld(linear_), ids, coef_linear, m, dx, din);
    }
  }

  bool compact() const { return storage_ != TableStorage::native; }
  static std::size_t ld(const Table<T>& t) { return static_cast<std::size_t>(t.ld()); }

  /// Native tables that read a mapped file (a mapped load: tables apart) become owned copies
  /// side by side, all built before any is replaced; nothing happens to owned tables.
  NeuronExperts& own_tables() {
    require_native("down()/up()");
    if (down_.is_view() || up_.is_view() || linear_.is_view()) {
      std::vector<Table<T>> t = native_copies(*this);
      take_native(t);
    }
    return *this;
  }
  /// Copies of o's native tables (owned or views), side by side: down, (GLU: linear,) up.
  std::vector<Table<T>> native_copies(const NeuronExperts& o) const {
    std::vector<Table<T>> t = native_side_by_side(o.down_.rows(), o.down_.cols(), o.up_.cols());
    t[0].copy_rows_from(o.down_, o.down_.rows());
    if (glu_) t[1].copy_rows_from(o.linear_, o.linear_.rows());
    t.back().copy_rows_from(o.up_, o.up_.rows());
    return t;
  }

  /// Native tables side by side, values unspecified: down, (GLU: linear,) up.
  std::vector<Table<T>> native_side_by_side(Index n_experts, Index d_in, Index d_out) const {
    return Table<T>::side_by_side(n_experts, glu_ ? std::vector<Index>{d_in, d_in, d_out} : std::vector<Index>{d_in, d_out});
  }
  /// The native tables from `t`: down, (GLU: linear,) up.
  void take_native(std::vector<Table<T>>& t) {
    down_ = std::move(t[0]);
    if (glu_) linear_ = std::move(t[1]);
    up_ = std::move(t.back());
  }

  /// Native tables holding the rows `rows` of N experts, drawn as N(0, 1/d_in) and N(0, 1/d_out).
  void draw_native(Index n_experts, Index d_in, Index d_out, Rng& r1, Rng& r2, Rng& r3, RowStride rows) {
    std::vector<Table<T>> t = native_side_by_side(rows.rows_of(n_experts), d_in, d_out);
    fill_normal(t[0].mutable_matrix(), 1.0 / std::sqrt(double(d_in)), r1, n_experts, rows);
    fill_normal(t.back().mutable_matrix(), 1.0 / std::sqrt(double(d_out)), r2, n_experts, rows);
    if (glu_) fill_normal(t[1].mutable_matrix(), 1.0 / std::sqrt(double(d_in)), r3, n_experts, rows);
    take_native(t);
  }

  void require_native(const char* what) const {
    SPEX_CHECK(!compact(), "NeuronExperts::" << what << ": the tables are stored as " << to_string(storage_)
                                              << " (inference only); training needs them as T: set_storage(TableStorage::native)");
  }
  const Table<T>& native_table(const Table<T>& t) const {
    require_native("down()/up()");
    return t;
  }


  /// Compact tables side by side, values unspecified (see set_storage): down, (GLU: linear,) up.
  std::vector<CompactTable> compact_side_by_side(TableStorage s, Index n_experts, Index d_in, Index d_out) const {
    return CompactTable::side_by_side(s, n_experts, glu_ ? std::vector<Index>{d_in, d_in, d_out} : std::vector<Index>{d_in, d_out});
  }
  void allocate_compact(TableStorage s, Index n_experts, Index d_in, Index d_out) {
    std::vector<CompactTable> t = compact_side_by_side(s, n_experts, d_in, d_out);
    take_compact(t);
  }
  /// The compact tables from `t`: down, (GLU: linear,) up.
  void take_compact(std::vector<CompactTable>& t) {
    cdown_ = std::move(t[0]);
    if (glu_) clinear_ = std::move(t[1]);
    cup_ = std::move(t.back());
  }

  static void rows_dot(const CompactTable& t, const Index* ids, std::size_t m, const T* x, T* out) {
    if constexpr (std::is_same<T, float>::value) gather_dot<Arch>(t, ids, m, x, out);
  }
  static void rows_axpy(const CompactTable& t, const Index* ids, const T* alpha, std::size_t m, T* y) {
    if constexpr (std::is_same<T, float>::value) gather_axpy<Arch>(t, ids, alpha, m, y);
  }

  void check_inputs(const CMatRef<T>& x, const CIndexMatRef& ids, const CMatRef<T>& gates) const {
    SPEX_CHECK(x.cols() == d_in(), "x has " << x.cols() << " columns, expected d_in = " << d_in());
    SPEX_CHECK(ids.rows() == x.rows(), "ids have " << ids.rows() << " rows, x has " << x.rows());
    check_shape(gates, ids.rows(), ids.cols(), "gates");
    check_ids(ids, n_experts());
  }

  static void checked_size(Index n_experts, Index d_in, Index d_out) {
    SPEX_CHECK(n_experts >= 1 && d_in >= 1 && d_out >= 1,
               "NeuronExperts(" << n_experts << ", " << d_in << ", " << d_out << ") needs positive sizes");
  }

  Table<T> down_, up_, linear_;          // native storage (linear_: GLU only)
  CompactTable cdown_, cup_, clinear_;    // compact storage
  kernels::Activation act_ = kernels::Activation::gelu_erf;
  bool glu_ = false;
  TableStorage storage_ = TableStorage::native;
};

}  // namespace spex
