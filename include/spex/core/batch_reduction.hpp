#pragma once
// Sums over a batch that several processes hold a part of (data parallelism: each rank has
// its own tokens). The layers that couple the tokens of a batch (BatchNorm's statistics) use
// it, when given one, so that the statistics are the whole batch's, as in one process
// ("synchronized BatchNorm"). The MPI implementation is dist::RankOrderSum; spex's core has no
// MPI. Used by Norm (BatchNorm), TopKRouter and MoE's penalty (their batch statistics).
#include "types.hpp"

namespace spex {

class BatchReduction {
 public:
  virtual ~BatchReduction() = default;
  /// Replaces values[0, n) by their sums over every part of the batch. Every part gets the
  /// same bits (the sum's order is fixed), so replicated parameters stay identical.
  virtual void sum(float* values, Index n) const = 0;
  virtual void sum(double* values, Index n) const = 0;
  /// The sum of a count (tokens, ...) over every part.
  virtual Index sum(Index count) const = 0;
};

}  // namespace spex
