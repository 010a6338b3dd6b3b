#pragma once
// Activations, their derivatives and softmax, one value or one row at a time: the reference
// for kernels/activation.hpp, and the per-value form the layers use on single pre-activations.
#include <cmath>
#include <cstddef>
#include <limits>

namespace spex::kernels {

/// Element-wise activations. gelu_tanh is the tanh approximation, gelu_erf the exact form.
enum class Activation { identity, relu, gelu_tanh, gelu_erf, silu, sigmoid };

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::identity: return "identity";
    case Activation::relu: return "relu";
    case Activation::gelu_tanh: return "gelu_tanh";
    case Activation::gelu_erf: return "gelu_erf";
    case Activation::silu: return "silu";
    case Activation::sigmoid: return "sigmoid";
  }
  return "?";
}

namespace scalar {

/// Beyond |x| > kActivationSaturation every activation here equals its limit to the last bit,
/// in float and double (exp(-800) underflows to 0 in both): x or 0 for the GELUs and SiLU, 1
/// or 0 for the sigmoid and every derivative. Derivatives are evaluated on x clamped to that
/// range and the GELUs and SiLU return 0 below it, so that x^2 or x * exp(-x^2) cannot
/// overflow into inf * 0 = NaN for large or infinite inputs. NaN stays NaN.
constexpr double kActivationSaturation = 800.0;

template <class T>
T clamp_saturated(T x) {
  const T s = T(kActivationSaturation);
  return x < -s ? -s : (x > s ? s : x);  // NaN compares false: stays NaN
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

/// f(x)
template <class T>
T activate(Activation a, T x) {
  constexpr T kSqrt2OverPi = T(0.7978845608028654);
  constexpr T kInvSqrt2 = T(0.7071067811865476);
  switch (a) {
    case Activation::identity: return x;
    case Activation::relu: return x < T(0) ? T(0) : x;  // NaN stays NaN
    case Activation::gelu_tanh: {
      if (x < -T(kActivationSaturation)) return T(0);
      const T xc = clamp_saturated(x);  // the gate saturates; x itself multiplies it
      return T(0.5) * x * (T(1) + std::tanh(kSqrt2OverPi * (xc + T(0.044715) * xc * xc * xc)));
    }
    case Activation::gelu_erf:
      if (x < -T(kActivationSaturation)) return T(0);
      return T(0.5) * x * (T(1) + std::erf(clamp_saturated(x) * kInvSqrt2));
    case Activation::silu:
      if (x < -T(kActivationSaturation)) return T(0);
      return x * sigmoid(x);
    case Activation::sigmoid: return sigmoid(x);
  }
  return x;
}

/// f'(x); relu'(0) = 0 as in PyTorch.
template <class T>
T derivative(Activation a, T x) {
  x = clamp_saturated(x);
  constexpr T kSqrt2OverPi = T(0.7978845608028654);
  constexpr T kInvSqrt2 = T(0.7071067811865476);
  constexpr T kInvSqrt2Pi = T(0.3989422804014327);
  switch (a) {
    case Activation::identity: return T(1);
    case Activation::relu: return x > T(0) ? T(1) : T(0);
    case Activation::gelu_tanh: {
      const T t = std::tanh(kSqrt2OverPi * (x + T(0.044715) * x * x * x));
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * kSqrt2OverPi * (T(1) + T(3 * 0.044715) * x * x);
    }
    case Activation::gelu_erf:
      return T(0.5) * (T(1) + std::erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * std::exp(T(-0.5) * x * x);
    case Activation::silu: {
      const T s = sigmoid(x);
      return s * (T(1) + x * (T(1) - s));
    }
    case Activation::sigmoid: {
      const T s = sigmoid(x);
      return s * (T(1) - s);
    }
  }
  return T(1);
}

/// y = f(x) element-wise (y may alias x).
template <class T>
void activate(Activation a, const T* x, T* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = activate(a, x[i]);
}

/// dx = dy * f'(x) element-wise (dx may alias dy).
template <class T>
void activate_backward(Activation a, const T* x, const T* dy, T* dx, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dx[i] = dy[i] * derivative(a, x[i]);
}

/// y = softmax(x), shifted by the max for stability (y may alias x). A row whose entries are
/// all -inf has no defined softmax; it gets the limit of equal logits, 1/n each.
template <class T>
void softmax(const T* x, T* y, std::size_t n) {
  if (n == 0) return;
  T m = -std::numeric_limits<T>::infinity();
  for (std::size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  if (m == -std::numeric_limits<T>::infinity()) {
    for (std::size_t i = 0; i < n; ++i) y[i] = T(1) / T(n);
    return;
  }
  T s = 0;
  for (std::size_t i = 0; i < n; ++i) s += (y[i] = std::exp(x[i] - m));
  const T inv = T(1) / s;
  for (std::size_t i = 0; i < n; ++i) y[i] *= inv;
}

/// dx = y * (dy - <y, dy>) for y = softmax(x) (dx may alias dy).
template <class T>
void softmax_backward(const T* y, const T* dy, T* dx, std::size_t n) {
  T s = 0;
  for (std::size_t i = 0; i < n; ++i) s += y[i] * dy[i];
  for (std::size_t i = 0; i < n; ++i) dx[i] = y[i] * (dy[i] - s);
}

}  // namespace scalar
}  // namespace spex::kernels
