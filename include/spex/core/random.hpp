#pragma once
// A small seeded generator with the same sequence on every platform and standard library
// (std::normal_distribution is implementation-defined), and the initializers the specs name.
#include <cmath>
#include <cstdint>

#include "check.hpp"
#include "types.hpp"

namespace spex {

/// splitmix64: fast, 64-bit state, good enough for initialization and synthetic data.
class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) : state_(seed) {}

  /// Everything that determines the sequence from here on (save it to resume bit-exactly).
  struct State {
    std::uint64_t counter = 0;
    double spare = 0.0;
    bool has_spare = false;
  };
  State state() const { return State{state_, spare_, has_spare_}; }
  void set_state(const State& s) {
    state_ = s.counter;
    spare_ = s.spare;
    has_spare_ = s.has_spare;
  }

  std::uint64_t next_u64() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return n == 0 ? 0 : next_u64() % n; }
  /// Standard normal (Box-Muller; the second value is kept for the next call).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double t = 6.283185307179586 * u2;
    spare_ = r * std::sin(t);
    has_spare_ = true;
    return r * std::cos(t);
  }
  /// An independent stream for a named sub-part (e.g. one table of a layer).
  Rng split(std::uint64_t salt) { return Rng(next_u64() ^ (salt * 0xD1B54A32D192ED03ull)); }

 private:
  std::uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

/// Fills m with U(lo, hi).
template <class Derived>
void fill_uniform(Eigen::DenseBase<Derived>& m, double lo, double hi, Rng& rng) {
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c)
      m(r, c) = static_cast<typename Derived::Scalar>(rng.uniform(lo, hi));
}

template <class Derived>
void fill_uniform(Eigen::DenseBase<Derived>&& m, double lo, double hi, Rng& rng) {
  fill_uniform(m, lo, hi, rng);
}

/// Fills m with N(0, stddev^2).
template <class Derived>
void fill_normal(Eigen::DenseBase<Derived>& m, double stddev, Rng& rng) {
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c)
      m(r, c) = static_cast<typename Derived::Scalar>(stddev * rng.normal());
}

/// Blocks of `block` rows first, first + step, first + 2 step, ... of a table: a round-robin
/// shard of its rows (block 1) or of its experts' blocks of rows (dist/partition.hpp). The
/// default is every row.
struct RowStride {
  Index first = 0, step = 1, block = 1;
  /// The same rows (block 1) counted from row `start` on: the stride over rows start, start + 1,
  /// ... (a grown table's new rows).
  RowStride from(Index start) const {
    const Index first_at = start <= first ? first : first + (start - first + step - 1) / step * step;
    return RowStride{first_at - start, step, 1};
  }
  /// How many of a table's `total` rows (whole blocks) the stride holds.
  Index rows_of(Index total) const {
    const Index blocks = total / block;
    return (blocks > first ? (blocks - first + step - 1) / step : 0) * block;
  }
};

/// The same for a writable expression passed by value (a table's rows, Table::Map; a block).
template <class Derived>
void fill_normal(Eigen::DenseBase<Derived>&& m, double stddev, Rng& rng) {
  fill_normal(m, stddev, rng);
}

/// Fills m with the rows `rows` selects out of what fill_normal would draw for a table of
/// `total` rows of m.cols() (the other rows are drawn and dropped): a shard of a table equal
/// to the same rows of the whole one, in 1/step of its memory.
template <class Derived>
void fill_normal(Eigen::DenseBase<Derived>& m, double stddev, Rng& rng, Index total, RowStride rows) {
  SPEX_CHECK(rows.step >= 1 && rows.first >= 0 && rows.block >= 1 && total % rows.block == 0,
             "row stride (first " << rows.first << ", step " << rows.step << ", block " << rows.block << ") of " << total
                                  << " rows needs first >= 0, step >= 1, whole blocks");
  SPEX_CHECK(m.rows() == rows.rows_of(total), "a shard of " << rows.rows_of(total) << " rows of " << total << " has " << m.rows());
  for (Index r = 0; r < total; ++r) {
    const Index blk = r / rows.block;
    const bool kept = blk >= rows.first && (blk - rows.first) % rows.step == 0;
    const Index local = ((blk - rows.first) / rows.step) * rows.block + r % rows.block;
    for (Eigen::Index c = 0; c < m.cols(); ++c) {
      const double v = stddev * rng.normal();
      if (kept) m(local, c) = static_cast<typename Derived::Scalar>(v);
    }
  }
}
template <class Derived>
void fill_normal(Eigen::DenseBase<Derived>&& m, double stddev, Rng& rng, Index total, RowStride rows) {
  fill_normal(m, stddev, rng, total, rows);
}

}  // namespace spex
