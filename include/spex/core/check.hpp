#pragma once
// Argument and shape checks that stay on in release builds: a bad argument throws
// spex::Error with a message that names it, never undefined behaviour.
#include <cmath>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "types.hpp"

namespace spex {

/// The one exception type spex throws for bad arguments, shapes and data.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
[[noreturn]] inline void throw_error(const std::string& what) { throw Error("spex: " + what); }
}  // namespace detail

}  // namespace spex

/// SPEX_CHECK(cond, "x has " << x.cols() << " columns, expected " << d): the message is a
/// stream expression, built only when the check fails. Messages name the user's argument or
/// config field ("x", "dy", "top_k"), never an internal function.
#define SPEX_CHECK(cond, msg)                                  \
  do {                                                         \
    if (!(cond)) {                                             \
      std::ostringstream spex_check_os_;                       \
      spex_check_os_ << msg;                                   \
      ::spex::detail::throw_error(spex_check_os_.str()); \
    }                                                          \
  } while (0)

namespace spex {

/// Throws unless `m` is rows x cols, naming `what`.
template <class Mat>
void check_shape(const Mat& m, Eigen::Index rows, Eigen::Index cols, const char* what) {
  SPEX_CHECK(m.rows() == rows && m.cols() == cols,
             what << " is " << m.rows() << " x " << m.cols() << ", expected " << rows << " x " << cols);
}

/// Throws unless `v` is finite and in [lo, hi], naming `what` (a config field or argument).
inline void check_range(double v, double lo, double hi, const std::string& what) {
  SPEX_CHECK(std::isfinite(v) && v >= lo && v <= hi, what << " = " << v << " must be finite and in [" << lo << ", " << hi << "]");
}

/// Throws unless `v` is finite and >= lo, naming `what`.
inline void check_at_least(double v, double lo, const std::string& what) {
  SPEX_CHECK(std::isfinite(v) && v >= lo, what << " = " << v << " must be finite and >= " << lo);
}

/// Throws unless `v` is finite and > 0, naming `what`.
inline void check_positive(double v, const std::string& what) {
  SPEX_CHECK(std::isfinite(v) && v > 0, what << " = " << v << " must be finite and > 0");
}

/// a * b, throwing instead of overflowing (sizes computed from user input: n_keys^2, E * G).
inline Index checked_mul(Index a, Index b, const char* what) {
  Index r = 0;
  SPEX_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r),
             what << " = " << a << " * " << b << " is negative or overflows 64 bits");
  return r;
}

namespace detail {
/// The bytes [first, last) a (possibly strided) matrix view spans; empty views span nothing.
template <class Mat>
std::pair<const char*, const char*> byte_span(const Mat& m) {
  if (m.rows() == 0 || m.cols() == 0) return {nullptr, nullptr};
  const char* first = reinterpret_cast<const char*>(m.data());
  const Index elems = (Index(m.rows()) - 1) * Index(m.outerStride()) + Index(m.cols());
  return {first, first + elems * Index(sizeof(typename Mat::Scalar))};
}
}  // namespace detail

/// Whether two views share memory: exactly the same view (same data, stride and shape), some
/// other overlap, or none.
enum class Overlap { none, identical, partial };

template <class A, class B>
Overlap overlap(const A& a, const B& b) {
  const auto sa = detail::byte_span(a), sb = detail::byte_span(b);
  if (!sa.first || !sb.first || sa.second <= sb.first || sb.second <= sa.first) return Overlap::none;
  const bool same = static_cast<const void*>(a.data()) == static_cast<const void*>(b.data()) &&
                    a.rows() == b.rows() && a.cols() == b.cols() && a.outerStride() == b.outerStride();
  return same ? Overlap::identical : Overlap::partial;
}

/// Throws if `out` overlaps `in` other than being the very same view (which the caller
/// supports), naming both.
template <class A, class B>
void check_no_partial_overlap(const A& in, const B& out, const char* in_name, const char* out_name) {
  SPEX_CHECK(overlap(in, out) != Overlap::partial,
             out_name << " overlaps " << in_name << " in memory (only the very same matrix is allowed)");
}

/// Throws unless every id lies in [0, n), naming the first bad one.
template <class Mat>
void check_ids(const Mat& ids, Index n) {
  for (Eigen::Index r = 0; r < ids.rows(); ++r)
    for (Eigen::Index c = 0; c < ids.cols(); ++c)
      SPEX_CHECK(ids(r, c) >= 0 && ids(r, c) < n,
                 "expert id " << ids(r, c) << " at (" << r << ", " << c << ") is outside [0, " << n << ")");
}

/// Throws unless the pick lists of `tokens` tokens are well formed: token t's picks are
/// [begin[t], begin[t + 1]) of ids, begin[0] = 0, non-decreasing, every id in [0, n).
inline void check_pick_lists(Index tokens, const Index* begin, const Index* ids, Index n) {
  SPEX_CHECK(begin[0] == 0, "the first token's picks begin at " << begin[0] << ", not 0");
  for (Index t = 0; t < tokens; ++t)
    SPEX_CHECK(begin[t + 1] >= begin[t], "token " << t << "'s picks end at " << begin[t + 1] << " before they begin at " << begin[t]);
  for (Index p = 0; p < begin[tokens]; ++p)
    SPEX_CHECK(ids[p] >= 0 && ids[p] < n, "pick " << p << " names expert " << ids[p] << ", outside [0, " << n << ")");
}

}  // namespace spex
