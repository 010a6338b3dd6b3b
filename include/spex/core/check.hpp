#pragma once
// Argument and shape checks that stay on in release builds: a bad argument throws
// spex::Error with a message that names it, never undefined behaviour.
#include <cmath>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>

#include "types.hpp"

namespace spex {

/// The one exception type spex throws for bad arguments, shapes and data.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
[[noreturn]] inline void throw_error(const char* where, const std::string& what) {
  throw Error(std::string("spex: ") + where + ": " + what);
}
}  // namespace detail

}  // namespace spex

/// SPEX_CHECK(cond, "x has " << x.cols() << " columns, expected " << d): the message is a
/// stream expression, built only when the check fails.
#define SPEX_CHECK(cond, msg)                                  \
  do {                                                         \
    if (!(cond)) {                                             \
      std::ostringstream spex_check_os_;                       \
      spex_check_os_ << msg;                                   \
      ::spex::detail::throw_error(__func__, spex_check_os_.str()); \
    }                                                          \
  } while (0)

namespace spex {

/// Throws naming `what` and the first (row, col) holding NaN or Inf.
template <class Mat>
void check_finite(const Mat& m, const char* what) {
  // x * 0 is 0 for finite x and NaN for NaN and Inf; Eigen's sum() is vectorized (allFinite()
  // is not). The loop below only runs to name the culprit.
  using S = typename Mat::Scalar;
  if (!std::isnan(static_cast<double>((m.array() * S(0)).sum()))) return;
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c)
      SPEX_CHECK(std::isfinite(m(r, c)),
                 what << " holds a non-finite value " << m(r, c) << " at (" << r << ", " << c << ")");
}

/// Throws unless `m` is rows x cols, naming `what`.
template <class Mat>
void check_shape(const Mat& m, Eigen::Index rows, Eigen::Index cols, const char* what) {
  SPEX_CHECK(m.rows() == rows && m.cols() == cols,
             what << " is " << m.rows() << " x " << m.cols() << ", expected " << rows << " x " << cols);
}

/// Throws unless every id lies in [0, n), naming the first bad one.
template <class Mat>
void check_ids(const Mat& ids, Index n) {
  for (Eigen::Index r = 0; r < ids.rows(); ++r)
    for (Eigen::Index c = 0; c < ids.cols(); ++c)
      SPEX_CHECK(ids(r, c) >= 0 && ids(r, c) < n,
                 "expert id " << ids(r, c) << " at (" << r << ", " << c << ") is outside [0, " << n << ")");
}

}  // namespace spex
