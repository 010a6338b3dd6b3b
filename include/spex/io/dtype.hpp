#pragma once
// The element types of safetensors files and the conversions spex performs between them and a
// layer's scalar T. Floating conversions round to nearest, ties to even, directly from the
// source value (a double is never rounded twice on its way to f16 or bf16); NaN stays NaN,
// values beyond the target's range become infinities. Integer tensors (I64, I32) are read as
// indices, never converted to floats.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "../core/check.hpp"
#include "../kernels/scalar/compact.hpp"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "spex io reads and writes safetensors (little-endian) by memcpy: a little-endian host is required"
#endif

namespace spex {

/// Every dtype the safetensors format names. Files with any of them parse (spex-inspect lists
/// them); layers load F64, F32, F16 and BF16, and index readers I64 and I32.
enum class DType { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

inline const char* to_string(DType t) {
  switch (t) {
    case DType::BOOL: return "BOOL";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::F8_E5M2: return "F8_E5M2";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I16: return "I16";
    case DType::U16: return "U16";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::U32: return "U32";
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::U64: return "U64";
  }
  return "?";
}

/// The dtype named `s`, or false.
inline bool parse_dtype(const std::string& s, DType& out) {
  for (int i = 0; i <= int(DType::U64); ++i)
    if (s == to_string(DType(i))) {
      out = DType(i);
      return true;
    }
  return false;
}

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::BOOL: case DType::U8: case DType::I8: case DType::F8_E5M2: case DType::F8_E4M3: return 1;
    case DType::I16: case DType::U16: case DType::F16: case DType::BF16: return 2;
    case DType::I32: case DType::U32: case DType::F32: return 4;
    case DType::F64: case DType::I64: case DType::U64: return 8;
  }
  return 0;
}

/// F64, F32, F16, BF16: the dtypes a floating parameter loads from and saves to.
inline bool is_float_dtype(DType t) { return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16; }

template <class T>
constexpr DType dtype_of() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value || std::is_same<T, std::int64_t>::value ||
                    std::is_same<T, std::int32_t>::value,
                "spex io stores float, double, int64 and int32");
  if constexpr (std::is_same<T, float>::value) return DType::F32;
  else if constexpr (std::is_same<T, double>::value) return DType::F64;
  else if constexpr (std::is_same<T, std::int64_t>::value) return DType::I64;
  else return DType::I32;
}

namespace detail {

/// Bits of the IEEE-754 binary format with `exp_bits` exponent and `man_bits` fraction bits
/// nearest to x, ties to even (a quiet NaN for NaN). Exact: scaling by powers of two is exact
/// in double, and nearbyint rounds to nearest even in the default rounding mode.
inline std::uint32_t encode_binary(double x, int exp_bits, int man_bits) {
  const std::uint32_t sign = std::signbit(x) ? (1u << (exp_bits + man_bits)) : 0u;
  const std::uint32_t exp_all = (1u << exp_bits) - 1;
  if (std::isnan(x)) return sign | (exp_all << man_bits) | (1u << (man_bits - 1));
  const double a = std::fabs(x);
  if (std::isinf(a)) return sign | (exp_all << man_bits);
  if (a == 0) return sign;
  const int bias = (1 << (exp_bits - 1)) - 1, min_exp = 1 - bias;
  int e = 0;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e)
  int q = std::max(e - 1, min_exp) - man_bits;  // the value of the last fraction bit: 2^q
  double m = std::nearbyint(std::ldexp(a, -q));
  const double implicit = std::ldexp(1.0, man_bits);
  if (m >= 2 * implicit) {  // rounding carried into the next binade
    m /= 2;
    ++q;
  }
  if (m < implicit) return sign | static_cast<std::uint32_t>(m);  // subnormal (exponent field 0)
  const long biased = long(q) + man_bits + bias;
  if (biased >= long(exp_all)) return sign | (exp_all << man_bits);  // overflow: infinity
  return sign | (std::uint32_t(biased) << man_bits) | (static_cast<std::uint32_t>(m) - (1u << man_bits));
}

inline double decode_binary(std::uint32_t bits, int exp_bits, int man_bits) {
  const std::uint32_t exp_all = (1u << exp_bits) - 1;
  const bool neg = (bits >> (exp_bits + man_bits)) & 1u;
  const std::uint32_t ex = (bits >> man_bits) & exp_all, fr = bits & ((1u << man_bits) - 1);
  const int bias = (1 << (exp_bits - 1)) - 1;
  double v;
  if (ex == exp_all) v = fr ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (ex == 0) v = std::ldexp(double(fr), 1 - bias - man_bits);
  else v = std::ldexp(double(fr | (1u << man_bits)), int(ex) - bias - man_bits);
  return neg ? -v : v;
}

}  // namespace detail

inline std::uint16_t to_f16(double x) { return static_cast<std::uint16_t>(detail::encode_binary(x, 5, 10)); }
inline std::uint16_t to_bf16(double x) { return static_cast<std::uint16_t>(detail::encode_binary(x, 8, 7)); }
inline double from_f16(std::uint16_t b) { return detail::decode_binary(b, 5, 10); }
inline double from_bf16(std::uint16_t b) { return kernels::scalar::bf16_to_float(b); }

/// Converts n values of floating dtype `src` (raw little-endian bytes) to T.
template <class T>
void convert_from_bytes(const unsigned char* src, DType src_type, T* dst, std::size_t n) {
  switch (src_type) {
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, src + 8 * i, 8);
        dst[i] = static_cast<T>(v);
      }
      return;
    case DType::F32:
      for (std::size_t i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, src + 4 * i, 4);
        dst[i] = static_cast<T>(v);
      }
      return;
    case DType::F16:
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        dst[i] = static_cast<T>(src_type == DType::F16 ? from_f16(b) : from_bf16(b));
      }
      return;
    default:
      SPEX_CHECK(false, "cannot convert " << to_string(src_type) << " to a floating value");
  }
}

/// Converts n values of T to floating dtype `dst_type` (raw little-endian bytes).
template <class T>
void convert_to_bytes(const T* src, std::size_t n, DType dst_type, unsigned char* dst) {
  switch (dst_type) {
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(src[i]);
        std::memcpy(dst + 8 * i, &v, 8);
      }
      return;
    case DType::F32:
      for (std::size_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(src[i]);
        std::memcpy(dst + 4 * i, &v, 4);
      }
      return;
    case DType::F16:
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint16_t b = dst_type == DType::F16 ? to_f16(double(src[i])) : to_bf16(double(src[i]));
        std::memcpy(dst + 2 * i, &b, 2);
      }
      return;
    default:
      SPEX_CHECK(false, "cannot store a floating value as " << to_string(dst_type));
  }
}

}  // namespace spex
