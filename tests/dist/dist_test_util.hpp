#pragma once
// What the MPI test programs share: failures counted per rank (exit code 0 on every rank =
// pass), relative differences, and the check that replicated parameters hold the same bits on
// every rank.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>

#include <spex/core/parameter.hpp>

namespace dist_test {

using spex::Index;
using Mat = spex::RowMat<double>;

inline int rank = 0, ranks = 1, failures = 0;

inline void start(int* argc, char*** argv) {
  MPI_Init(argc, argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
}

/// Prints `passed` on rank 0 when no rank failed here, finalizes MPI, and returns the exit code.
inline int finish(const char* passed) {
  if (rank == 0 && failures == 0) std::printf("%s on %d ranks\n", passed, ranks);
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}

inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, what.c_str());
    ++failures;
  }
}

/// Expects every rank to hold the same `text` (an error message: every rank gets the same one).
inline void expect_same_on_all_ranks(const std::string& text, const std::string& what) {
  const long long h = static_cast<long long>(std::hash<std::string>()(text) >> 1);
  long long lo = 0, hi = 0;
  MPI_Allreduce(&h, &lo, 1, MPI_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&h, &hi, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  expect(lo == hi, what + ": every rank has the same message, this one has: " + text);
}

/// Largest |a - b| / max(1, |b|) over the entries (infinite when the shapes differ).
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return INFINITY;
  double worst = 0;
  for (Index r = 0; r < a.rows(); ++r)
    for (Index c = 0; c < a.cols(); ++c)
      worst = std::max(worst, std::abs(double(a(r, c)) - double(b(r, c))) / std::max(1.0, std::abs(double(b(r, c)))));
  return worst;
}

/// This rank's tokens [first, first + count) of `total`, in rank order; with `first_empty`
/// (and P > 1) rank 0 has none.
inline std::pair<Index, Index> my_tokens(Index total, bool first_empty) {
  if (!first_empty || ranks == 1) return {total * rank / ranks, total * (rank + 1) / ranks - total * rank / ranks};
  if (rank == 0) return {0, 0};
  const int r = rank - 1, p = ranks - 1;
  return {total * r / p, total * (r + 1) / p - total * r / p};
}

/// What the sharded layers promise against one process: bit for bit with one rank, else the
/// order of floating-point sums (relative differences of a few units in the last place).
inline double tolerance() { return ranks == 1 ? 0.0 : 1e-12; }

inline void expect_close(double diff, const std::string& what) {
  expect(diff <= tolerance(), what + ": relative difference " + std::to_string(diff));
}

/// Every parameter of `params` whose name does not start with `sharded` holds the same bits on
/// every rank.
inline void expect_replicas_identical(const spex::ParameterList<double>& params, const std::string& sharded) {
  for (const auto& p : params) {
    if (p.name.rfind(sharded, 0) == 0) continue;
    Mat mine = p.value_map(), lo(p.rows, p.cols), hi(p.rows, p.cols);
    MPI_Allreduce(mine.data(), lo.data(), int(mine.size()), MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(mine.data(), hi.data(), int(mine.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    expect(lo == hi, p.name + " differs between the ranks");
  }
}

}  // namespace dist_test
