#pragma once
// SIMD activations (xsimd's exp, erf and tanh), their derivatives, and softmax over a row.
// The per-value forms live in scalar/activation.hpp and serve the tails.
#include "scalar/activation.hpp"
#include "vector.hpp"

namespace spex::kernels {

namespace detail {

#if SPEX_SIMD
/// y[i] = fb(x[i]) over whole batches, fs on the tail.
template <class Arch, class T, class FB, class FS>
void map1(const T* x, T* y, std::size_t n, FB fb, FS fs) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const std::size_t whole = n - n % W;  // the values of the whole batches
  std::size_t i = 0;
  for (; i < whole; i += W) fb(B::load_unaligned(x + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = fs(x[i]);
}

/// z[i] = fb(x[i], y[i]) over whole batches, fs on the tail.
template <class Arch, class T, class FB, class FS>
void map2(const T* x, const T* y, T* z, std::size_t n, FB fb, FS fs) {
  using B = xsimd::batch<T, Arch>;
  constexpr std::size_t W = B::size;
  const std::size_t whole = n - n % W;
  std::size_t i = 0;
  for (; i < whole; i += W) fb(B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(z + i);
  for (; i < n; ++i) z[i] = fs(x[i], y[i]);
}

/// xsimd::exp(x) with x first clamped to [-L, L], L = 750 (double) or 110 (float), and NaN
/// lanes kept out of it: exp there is already 0 or infinity (and NaN for NaN), so the result is
/// the same, but xsimd 8.1's exp converts its range reduction to an integer before it checks
/// the range, and |x| near 1e22 or a NaN makes that conversion undefined (found by fuzzing the
/// loaders: a softmax over scores of -2.7e22, and over inf - inf).
template <class B>
B exp_in_range(const B& x) {
  using T = typename B::value_type;
  const B limit(T(sizeof(T) == 4 ? 110 : 750));
  // x == x is false for NaN alone (xsimd 8.1's x != x compares ordered on AVX and AVX-512,
  // false for NaN there too).
  const auto number = x == x;
  const B clamped = xsimd::select(x < -limit, -limit, xsimd::select(x > limit, limit, x));
  return xsimd::select(number, xsimd::exp(xsimd::select(number, clamped, B(T(0)))), x);
}

template <class B>
B sigmoid_batch(const B& x) {
  using T = typename B::value_type;
  return B(T(1)) / (B(T(1)) + exp_in_range(-x));
}

/// x clamped to [-s, s] (scalar::clamp_saturated); NaN lanes stay NaN.
template <class B>
B clamp_saturated(const B& x) {
  using T = typename B::value_type;
  const B s = B(T(scalar::kActivationSaturation));
  return xsimd::select(x < -s, -s, xsimd::select(x > s, s, x));
}

template <class B>
B activate_batch(Activation a, const B& x) {
  using T = typename B::value_type;
  const B zero(T(0)), one(T(1)), half(T(0.5));
  const auto below = x < B(T(-scalar::kActivationSaturation));  // the limit 0 (no -inf * 0)
  switch (a) {
    case Activation::identity: return x;
    case Activation::relu: return xsimd::select(x < zero, zero, x);  // NaN stays NaN
    case Activation::gelu_tanh: {
      const B xc = clamp_saturated(x);  // the gate saturates; x itself multiplies it
      const B inner = B(T(0.7978845608028654)) * xsimd::fma(B(T(0.044715)) * xc, xc * xc, xc);
      return xsimd::select(below, zero, half * x * (one + xsimd::tanh(inner)));
    }
    case Activation::gelu_erf:
      return xsimd::select(below, zero, half * x * (one + xsimd::erf(clamp_saturated(x) * B(T(0.7071067811865476)))));
    case Activation::silu: return xsimd::select(below, zero, x * sigmoid_batch(x));
    case Activation::sigmoid: return sigmoid_batch(x);
  }
  return x;
}

template <class B>
B derivative_batch(Activation a, const B& x_in) {
  using T = typename B::value_type;
  const B x = clamp_saturated(x_in);
  const B zero(T(0)), one(T(1)), half(T(0.5));
  switch (a) {
    case Activation::identity: return one;
    case Activation::relu: return xsimd::select(x > zero, one, zero);
    case Activation::gelu_tanh: {
      const B k(T(0.7978845608028654));
      const B t = xsimd::tanh(k * xsimd::fma(B(T(0.044715)) * x, x * x, x));
      return half * (one + t) + half * x * (one - t * t) * k * xsimd::fma(B(T(3 * 0.044715)) * x, x, one);
    }
    case Activation::gelu_erf:
      return half * (one + xsimd::erf(x * B(T(0.7071067811865476)))) +
             x * B(T(0.3989422804014327)) * exp_in_range(B(T(-0.5)) * x * x);
    case Activation::silu: {
      const B s = sigmoid_batch(x);
      return s * (one + x * (one - s));
    }
    case Activation::sigmoid: {
      const B s = sigmoid_batch(x);
      return s * (one - s);
    }
  }
  return one;
}
#endif

}  // namespace detail

/// y = f(x) element-wise (y may alias x).
template <class Arch = default_arch, class T>
void activate(Activation a, const T* x, T* y, std::size_t n) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  detail::map1<Arch>(x, y, n, [a](const B& v) { return detail::activate_batch(a, v); },
                     [a](T v) { return scalar::activate(a, v); });
#else
  scalar::activate(a, x, y, n);
#endif
}

/// y = f'(x) element-wise (y may alias x); relu'(0) = 0.
template <class Arch = default_arch, class T>
void derivative(Activation a, const T* x, T* y, std::size_t n) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  detail::map1<Arch>(x, y, n, [a](const B& v) { return detail::derivative_batch(a, v); },
                     [a](T v) { return scalar::derivative(a, v); });
#else
  for (std::size_t i = 0; i < n; ++i) y[i] = scalar::derivative(a, x[i]);
#endif
}

/// dx = dy * f'(x) element-wise (dx may alias dy); relu'(0) = 0.
template <class Arch = default_arch, class T>
void activate_backward(Activation a, const T* x, const T* dy, T* dx, std::size_t n) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  detail::map2<Arch>(x, dy, dx, n, [a](const B& v, const B& g) { return g * detail::derivative_batch(a, v); },
                     [a](T v, T g) { return g * scalar::derivative(a, v); });
#else
  scalar::activate_backward(a, x, dy, dx, n);
#endif
}

/// y = softmax(x), shifted by the max (y may alias x); an all -inf row gives 1/n each.
template <class Arch = default_arch, class T>
void softmax(const T* x, T* y, std::size_t n) {
#if SPEX_SIMD
  if (n == 0) return;
  const T m = max<Arch>(x, n);
  if (m == -std::numeric_limits<T>::infinity()) {
    for (std::size_t i = 0; i < n; ++i) y[i] = T(1) / T(n);
    return;
  }
  using B = xsimd::batch<T, Arch>;
  const B vm(m);
  detail::map1<Arch>(x, y, n, [&vm](const B& v) { return detail::exp_in_range(v - vm); },
                     [m](T v) { return std::exp(v - m); });
  scale<Arch>(T(1) / sum<Arch>(y, n), y, n);
#else
  scalar::softmax(x, y, n);
#endif
}

/// dx = y * (dy - <y, dy>) for y = softmax(x) (dx may alias dy).
template <class Arch = default_arch, class T>
void softmax_backward(const T* y, const T* dy, T* dx, std::size_t n) {
#if SPEX_SIMD
  using B = xsimd::batch<T, Arch>;
  const T s = dot<Arch>(y, dy, n);
  const B vs(s);
  detail::map2<Arch>(y, dy, dx, n, [&vs](const B& p, const B& g) { return p * (g - vs); },
                     [s](T p, T g) { return p * (g - s); });
#else
  scalar::softmax_backward(y, dy, dx, n);
#endif
}

}  // namespace spex::kernels
