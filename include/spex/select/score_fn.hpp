#pragma once
// How scores become gates, for the product-key layers' retrieval (select/key_retrieval.hpp)
// and for MoE's TopK router (select/topk_router.hpp).
namespace spex {

/// Product-key layers: how the k retrieval scores of a head become gates: softmax over the
/// head's k (the PEER paper's default), an independent sigmoid, or ReLU (PEER-pytorch's
/// "non-competing" scores). TopK router: softmax over the experts (Switch, Mixtral) or an
/// independent sigmoid per expert (DeepSeek-V3); ReLU routing is ReluRouter's.
enum class ScoreFn { softmax, sigmoid, relu };

inline const char* to_string(ScoreFn s) {
  switch (s) {
    case ScoreFn::softmax: return "softmax";
    case ScoreFn::sigmoid: return "sigmoid";
    case ScoreFn::relu: return "relu";
  }
  return "?";
}

}  // namespace spex
