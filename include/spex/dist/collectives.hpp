#pragma once
// What the ranks of a communicator do together, besides moving expert requests (exchange.hpp):
//  - all_or_none(comm, f): every rank runs its local work f; if it threw spex::Error on any
//    rank, it throws on every rank. A rank that threw alone would leave the others waiting in
//    the next collective for ever; with it, a bad input on one rank is an error on all.
//  - RankOrderSum: sums of per-rank vectors that are the same bits on every rank and do not
//    depend on the MPI library's reduction algorithm: every rank gathers all the parts and adds
//    them in rank order. Replicated parameters (a layer's retrieval) must stay identical on
//    every rank, or their top-k choices drift apart. It costs (P - 1) parts received per rank
//    instead of an all-reduce's ~2 (P - 1) / P; the replicated gradients are small (the query
//    network), the expert tables are never summed.
//  - sum_rows_over_ranks: a replicated table's row-sparse gradient (an embedding) summed;
//  - grad_norm, clip_grad_norm: optim's, over a model whose expert parameters are sharded.
// All ranks call the same functions in the same order.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/batch_reduction.hpp"
#include "../core/check.hpp"
#include "../core/sparse_rows.hpp"
#include "../core/types.hpp"
#include "../optim/param_groups.hpp"
#include "partition.hpp"

namespace spex {
namespace dist {

template <class T>
MPI_Datatype mpi_type();
template <>
inline MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <>
inline MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }
template <>
inline MPI_Datatype mpi_type<std::int64_t>() { return MPI_INT64_T; }

/// Throws spex::Error naming the MPI call when rc is not MPI_SUCCESS.
inline void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  SPEX_CHECK(false, call << " failed: " << std::string(text, static_cast<std::size_t>(len)));
}

inline int comm_rank(MPI_Comm comm) {
  int r = 0;
  check_mpi(MPI_Comm_rank(comm, &r), "MPI_Comm_rank");
  return r;
}
inline int comm_size(MPI_Comm comm) {
  int p = 0;
  check_mpi(MPI_Comm_size(comm, &p), "MPI_Comm_size");
  return p;
}

/// Runs f() on this rank, then throws spex::Error on every rank if it threw spex::Error on any,
/// with the same message everywhere: the first failing rank's, prefixed with `what` and that
/// rank (sent to the others only on failure). Other exceptions propagate unchanged (bad_alloc).
template <class F>
void all_or_none(MPI_Comm comm, const char* what, F&& f) {
  std::string problem;
  try {
    f();
  } catch (const Error& e) {
    problem = e.what();
  }
  const int rank = comm_rank(comm), mine = problem.empty() ? INT32_MAX : rank;
  int first = INT32_MAX;
  check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  if (first == INT32_MAX) return;
  long long length = static_cast<long long>(problem.size());
  check_mpi(MPI_Bcast(&length, 1, MPI_LONG_LONG, first, comm), "MPI_Bcast");
  problem.resize(static_cast<std::size_t>(length));
  check_mpi(MPI_Bcast(&problem[0], int(length), MPI_CHAR, first, comm), "MPI_Bcast");
  SPEX_CHECK(false, what << " on rank " << first << ": " << problem);
}

/// Throws spex::Error on every rank unless every rank passed the same `values` (a layer's
/// sizes and seed: ranks built with different configs would exchange garbage or wait for ever).
inline void check_same_on_all_ranks(MPI_Comm comm, const char* what, std::vector<std::int64_t> values) {
  std::vector<std::int64_t> lo(values.size()), hi(values.size());
  check_mpi(MPI_Allreduce(values.data(), lo.data(), int(values.size()), MPI_INT64_T, MPI_MIN, comm), "MPI_Allreduce");
  check_mpi(MPI_Allreduce(values.data(), hi.data(), int(values.size()), MPI_INT64_T, MPI_MAX, comm), "MPI_Allreduce");
  SPEX_CHECK(lo == hi, what << ": the ranks were given different configs or seeds (every rank must build the same layer)");
}

/// BatchReduction over the ranks of a communicator (see the file's comment). Not thread-safe
/// (a scratch buffer).
class RankOrderSum : public BatchReduction {
 public:
  explicit RankOrderSum(MPI_Comm comm) : comm_(comm), ranks_(comm_size(comm)) {}

  void sum(float* values, Index n) const override { sum_parts(values, n, floats_); }
  int ranks() const { return ranks_; }
  /// Bytes this rank sent to other ranks since construction (what a network would carry).
  std::uint64_t off_rank_bytes() const { return off_rank_bytes_; }
  void sum(double* values, Index n) const override { sum_parts(values, n, doubles_); }
  Index sum(Index count) const override {
    off_rank_bytes_ += sizeof(std::int64_t) * static_cast<std::uint64_t>(ranks_ - 1);
    std::int64_t in = count, out = 0;
    check_mpi(MPI_Allreduce(&in, &out, 1, MPI_INT64_T, MPI_SUM, comm_), "MPI_Allreduce");
    return out;
  }

 private:
  template <class T>
  void sum_parts(T* values, Index n, std::vector<T>& parts) const {
    if (n == 0 || ranks_ == 1) return;
    SPEX_CHECK(n <= Index(INT32_MAX), "a sum of " << n << " values exceeds MPI's int counts");
    const std::size_t len = static_cast<std::size_t>(n);
    parts.resize(len * static_cast<std::size_t>(ranks_));
    off_rank_bytes_ += sizeof(T) * len * static_cast<std::uint64_t>(ranks_ - 1);
    check_mpi(MPI_Allgather(values, static_cast<int>(n), mpi_type<T>(), parts.data(), static_cast<int>(n), mpi_type<T>(), comm_),
              "MPI_Allgather");
    for (std::size_t i = 0; i < len; ++i) {
      T s = parts[i];
      for (int r = 1; r < ranks_; ++r) s += parts[static_cast<std::size_t>(r) * len + i];
      values[i] = s;
    }
  }

  MPI_Comm comm_;
  int ranks_ = 1;
  mutable std::vector<float> floats_;
  mutable std::vector<double> doubles_;
  mutable std::uint64_t off_rank_bytes_ = 0;
};

/// One gradient array of a replicated part: this rank's `local` values, to be summed over the
/// ranks into `total` (n values each).
template <class T>
struct RankSum {
  const T* local;
  T* total;
  Index n;
};

/// total += the sum over the ranks of every rank's local, for every span; one gather for all
/// of them (packed into `flat`, a reusable buffer).
template <class T>
void add_rank_sums(const RankOrderSum& r, const std::vector<RankSum<T>>& spans, std::vector<T>& flat) {
  Index n = 0;
  for (const auto& s : spans) n += s.n;
  flat.resize(static_cast<std::size_t>(n));
  Index at = 0;
  for (const auto& s : spans) {
    std::copy(s.local, s.local + s.n, flat.data() + at);
    at += s.n;
  }
  r.sum(flat.data(), n);
  at = 0;
  for (const auto& s : spans) {
    for (Index i = 0; i < s.n; ++i) s.total[i] += flat[static_cast<std::size_t>(at + i)];
    at += s.n;
  }
}

/// A row-sparse gradient of a replicated table (an embedding, in data-parallel training)
/// becomes its sum over the ranks: every rank then holds the union of the ranks' rows, each
/// summed in rank order (the same bits on every rank). Collective. `rows` and `values` are
/// reusable buffers.
template <class T>
void sum_rows_over_ranks(SparseRowGrad<T>& g, MPI_Comm comm, std::vector<std::int64_t>& rows, std::vector<T>& values) {
  const int ranks = comm_size(comm);
  if (ranks == 1) return;
  const std::int64_t mine = g.nnz_rows(), width = g.width();
  std::vector<std::int64_t> counts(static_cast<std::size_t>(ranks));
  check_mpi(MPI_Allgather(&mine, 1, MPI_INT64_T, counts.data(), 1, MPI_INT64_T, comm), "MPI_Allgather");
  std::vector<int> row_counts(counts.size()), row_displs(counts.size()), value_counts(counts.size()), value_displs(counts.size());
  std::int64_t total = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    SPEX_CHECK((total + counts[r]) * width <= INT32_MAX, "a row-sparse gradient of " << (total + counts[r]) << " rows of "
                                                                                      << width << " exceeds MPI's int counts");
    row_counts[r] = int(counts[r]);
    row_displs[r] = int(total);
    value_counts[r] = int(counts[r] * width);
    value_displs[r] = int(total * width);
    total += counts[r];
  }
  rows.resize(static_cast<std::size_t>(total));
  values.resize(static_cast<std::size_t>(total * width));
  check_mpi(MPI_Allgatherv(g.rows().data(), int(mine), MPI_INT64_T, rows.data(), row_counts.data(), row_displs.data(), MPI_INT64_T, comm),
            "MPI_Allgatherv");
  check_mpi(MPI_Allgatherv(g.values().data(), int(mine * width), mpi_type<T>(), values.data(), value_counts.data(),
                           value_displs.data(), mpi_type<T>(), comm),
            "MPI_Allgatherv");
  g.zero();
  for (std::int64_t i = 0; i < total; ++i) g.add_row(rows[static_cast<std::size_t>(i)], values.data() + i * width);
}

/// The L2 norm of all the gradients of a model sharded over the ranks (optim's grad_norm over
/// every rank's `params`): the shards' parameters (is_sharded_name) counted on every rank, the
/// replicated ones once. The same on every rank. Collective.
template <class T>
double grad_norm(const ParameterList<T>& params, const RankOrderSum& sum) {
  if (sum.ranks() == 1) return spex::grad_norm(params);  // one process's sum, bit for bit
  ParameterList<T> replicated, sharded;
  for (const auto& p : params) (is_sharded_name(p.name) ? sharded : replicated).push_back(p);
  double sharded_sq = spex::grad_norm(sharded);
  sharded_sq *= sharded_sq;
  sum.sum(&sharded_sq, 1);
  const double r = spex::grad_norm(replicated);
  return std::sqrt(r * r + sharded_sq);
}

/// clip_grad_norm over a model sharded over the ranks: every rank scales its gradients by the
/// same factor, from grad_norm(params, sum). Returns the norm before clipping. Collective.
template <class T>
double clip_grad_norm(const ParameterList<T>& params, double max_norm, const RankOrderSum& sum) {
  return clip_grad_norm_to(params, grad_norm(params, sum), max_norm);
}

}  // namespace dist
}  // namespace spex
