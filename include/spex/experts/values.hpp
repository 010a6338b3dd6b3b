#pragma once
// Product-key memory's value-only experts (Lample et al. 2019): slot i holds one vector v_i and
// a token with retrieved ids e_j and gates g_j gets y = sum_j g_j v_{e_j} (EmbeddingBag with
// per-sample weights in the reference). PKM "retrieves memory vectors instead of functions".
#include <cmath>

#include "../core/check.hpp"
#include "../core/memory.hpp"
#include "../core/parameter.hpp"
#include "../core/parallel.hpp"
#include "../core/random.hpp"
#include "../core/sparse_rows.hpp"
#include "../core/table.hpp"
#include "../core/types.hpp"
#include "../kernels/gather.hpp"
#include "../metrics/flops.hpp"

namespace spex {

/// Thread safety: const methods; distinct caches and grads per concurrent caller.
template <class T = float, class Arch = default_arch>
class ValueExperts {
 public:
  struct Cache {
    RowScatterPlan plan;
  };
  struct Grads {
    SparseRowGrad<T> values;
    void zero() { values.zero(); }
  };

  /// Throws unless `g` was made for a table of this shape (`what` names it).
  void check_grads(const Grads& g, const char* what) const { check_sparse_grad(g.values, values_, what, "experts.values"); }

  ValueExperts() = default;
  /// N slots of d_out; values ~ N(0, 1/d_out) (the PKM reference's N(0, v_dim^-1/2)).
  ValueExperts(Index n_slots, Index d_out, Rng& rng) : ValueExperts(n_slots, d_out) {
    Rng r = rng.split(13);
    fill_normal(values_.mutable_matrix(), 1.0 / std::sqrt(double(d_out)), r);
  }
  /// Table allocated, values unspecified: for loaders that fill or map every row.
  ValueExperts(Index n_slots, Index d_out) : values_(checked_size(n_slots, d_out), d_out) {}

  Index n_experts() const { return values_.rows(); }
  Index d_out() const { return values_.cols(); }
  /// Forward FLOPs per token with `picks` (expert, gate) pairs: gate * value added into y.
  FlopCount flops_per_token(Index picks) const { return flops_per_token(picks, 0, d_out()); }
  static FlopCount flops_per_token(Index picks, Index /*d_in*/, Index d_out) {
    FlopCount f;
    f.experts = double(picks) * flops::linear(1, d_out);
    return f;
  }
  /// The table (N x d_out). Reading never copies; the writable form copies a memory-mapped
  /// table into owned memory first (core/table.hpp).
  typename Table<T>::ConstMap values() const { return values_.matrix(); }
  RowMat<T>& values() { return values_.mutable_matrix(); }
  const Table<T>& values_table() const { return values_; }
  Grads make_grads() const { return Grads{SparseRowGrad<T>(n_experts(), d_out())}; }
  /// "<prefix>values" with its row-sparse gradient in g (or none).
  ParameterList<T> parameters(const std::string& prefix, Grads* g) {
    return {sparse_parameter<T>(prefix + "values", values_, g ? &g->values : nullptr)};
  }
  /// Read-only: never copies a mapped table.
  ParameterList<const T> parameters(const std::string& prefix) const { return {table_parameter<T>(prefix + "values", values_)}; }

  /// y (B x d_out, assigned) = sum_j gates(t, j) v_{ids(t, j)}.
  void forward(CIndexMatRef ids, CMatRef<T> gates, MatRef<T> y) const {
    check_inputs(ids, gates);
    check_shape(y, ids.rows(), d_out(), "y");
    const std::size_t m = static_cast<std::size_t>(ids.cols()), d = static_cast<std::size_t>(d_out());
    parallel_for(ids.rows(), [&](Index t, int) {
      y.row(t).setZero();
      kernels::gather_axpy<Arch>(values_.data(), d, row_ptr(ids, t), row_ptr(gates, t), m, &y(t, 0), d);
    });
  }

  /// From dy (B x d_out): dgates (B x m, assigned) = v . dy; grads.values accumulate g dy.
  void backward(CIndexMatRef ids, CMatRef<T> gates, CMatRef<T> dy, MatRef<T> dgates, Grads& g, Cache& c) const {
    check_inputs(ids, gates);
    check_shape(dy, ids.rows(), d_out(), "dy");
    check_shape(dgates, ids.rows(), ids.cols(), "dgates");
    const std::size_t m = static_cast<std::size_t>(ids.cols()), d = static_cast<std::size_t>(d_out());
    parallel_for(ids.rows(), [&](Index t, int) {
      kernels::gather_dot<Arch>(values_.data(), d, row_ptr(ids, t), m, row_ptr(dy, t), d, &dgates(t, 0));
    });
    accumulate_rows<Arch>(ids, gates, dy, g.values, c.plan);
  }

 private:
  void check_inputs(const CIndexMatRef& ids, const CMatRef<T>& gates) const {
    check_shape(gates, ids.rows(), ids.cols(), "gates");
    check_ids(ids, n_experts());
  }

  static Index checked_size(Index n_slots, Index d_out) {
    SPEX_CHECK(n_slots >= 1 && d_out >= 1, "ValueExperts(" << n_slots << ", " << d_out << ") needs positive sizes");
    return n_slots;
  }

  Table<T> values_;
};

}  // namespace spex
