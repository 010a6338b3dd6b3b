#pragma once
// The gradients of a block with a weight and a bias: Linear's and Norm's Grads.
#include "../core/types.hpp"

namespace spex {

template <class Weight, class Bias>
struct WeightBiasGrads {
  Weight weight;
  Bias bias;
  void zero() {
    weight.setZero();
    bias.setZero();
  }
  /// f(data, size) for each array, in a fixed order (sums over ranks).
  template <class F>
  void for_each_array(F&& f) {
    f(weight.data(), Index(weight.size()));
    f(bias.data(), Index(bias.size()));
  }
};

}  // namespace spex
