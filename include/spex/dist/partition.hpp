#pragma once
// Which rank owns which expert when a layer's expert tables are sharded over P ranks.
//
// Round robin: expert `id` lives on rank id mod P, as row id / P of that rank's table. Why not
// contiguous id ranges: with ExpertIds::shells a grown layer's new experts take the highest ids,
// so ranges would give every new expert to the last rank (and, with the row_major numbering, a
// range of ids is a range of i1 rows, which retrieval does not visit evenly). Round robin spreads
// every id range, grown or not, evenly over the ranks; each rank holds ceil or floor of N / P rows.
// No MPI here: the partition is plain arithmetic, usable (and tested) without MPI.
#include <string>

#include "../core/check.hpp"
#include "../core/types.hpp"

namespace spex {
namespace dist {

class ExpertPartition {
 public:
  ExpertPartition() = default;
  /// n_experts over `ranks` ranks (>= 1).
  ExpertPartition(Index n_experts, int ranks) : n_(n_experts), p_(ranks) {
    SPEX_CHECK(ranks >= 1, "ranks = " << ranks << " must be >= 1");
    SPEX_CHECK(n_experts >= 0, "n_experts = " << n_experts << " must be >= 0");
  }
  Index n_experts() const { return n_; }
  int ranks() const { return p_; }
  /// The rank that owns expert `id` (0 <= id < n_experts).
  int owner(Index id) const { return static_cast<int>(id % p_); }
  /// Its row in the owner's table.
  Index local_row(Index id) const { return id / p_; }
  /// The expert id of row `row` on rank `rank`.
  Index global_id(int rank, Index row) const { return row * p_ + rank; }
  /// Rows of rank `rank`'s table: the ids rank, rank + P, ... below n_experts.
  Index local_rows(int rank) const { return local_rows_below(rank, n_); }
  /// Rows of rank `rank` that hold the experts below `id_end`: its first ones (a grown layer's
  /// old experts, which FrozenSet freezes, are the first rows of every shard).
  Index local_rows_below(int rank, Index id_end) const { return id_end > rank ? (id_end - rank + p_ - 1) / p_ : 0; }

 private:
  Index n_ = 0;
  int p_ = 1;
};

/// Whether a parameter or tensor named `name` belongs to the shards: the sharded layers name
/// their expert tables "...experts.<table>" (a component "experts."), and nothing replicated is
/// named so. Checkpoints and gradient norms split parameter lists by it.
inline bool is_sharded_name(const std::string& name) {
  return name.rfind("experts.", 0) == 0 || name.find(".experts.") != std::string::npos;
}

}  // namespace dist
}  // namespace spex
