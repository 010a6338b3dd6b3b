#pragma once
// The five blocks compare_layers trains, behind one interface (the one spex's layers share):
// make_grads, forward (training), infer (eval), backward, parameters. Only the dense FFN needs
// a wrapper: one expert that every token uses.
#include <spex/spex.hpp>

namespace compare {

using spex::Index;
using Mat = spex::RowMat<float>;

/// A dense FFN block: FfnExperts with one expert and a gate of 1 for every token.
class DenseBlock {
 public:
  struct Cache {
    Mat x, gates, dgates;
    spex::ExpertGroups groups;
    spex::FfnExperts<float>::Cache ffn;
  };
  using Grads = spex::FfnExperts<float>::Grads;

  DenseBlock(Index d, Index hidden, std::uint64_t seed) {
    spex::Rng rng(seed);
    ffn_ = spex::FfnExperts<float>(spex::FfnKind::gelu, 1, d, hidden, rng);
  }
  Grads make_grads() const { return ffn_.make_grads(); }
  void forward(spex::CMatRef<float> x, spex::MatRef<float> y, Cache& c) {
    c.x = x;
    infer(x, y, c);
  }
  void infer(spex::CMatRef<float> x, spex::MatRef<float> y, Cache& c) const {
    if (c.gates.rows() != x.rows()) {
      c.gates = Mat::Ones(x.rows(), 1);
      c.groups.build(c.gates);
    }
    ffn_.forward(x, c.gates, c.groups, y, c.ffn);
  }
  void backward(spex::CMatRef<float> dy, spex::MatRef<float> dx, Cache& c, Grads& g) const {
    dx.setZero();
    c.dgates.resize(dy.rows(), 1);
    ffn_.backward(c.x, c.gates, c.groups, dy, c.dgates, &dx, g, c.ffn);
  }
  spex::ParameterList<float> parameters(Grads& g, const std::string& prefix = "") {
    return ffn_.parameters(prefix + "experts.", &g);
  }

 private:
  spex::FfnExperts<float> ffn_;
};

using ReMoEBlock = spex::MoE<float, spex::ReluRouter<float>>;
using TopKBlock = spex::MoE<float, spex::TopKRouter<float>>;
using PeerBlock = spex::Peer<float>;
using PkmBlock = spex::Pkm<float>;

template <class B> struct is_remoe : std::false_type {};
template <> struct is_remoe<ReMoEBlock> : std::true_type {};
template <class B> struct is_product_key : std::false_type {};
template <> struct is_product_key<PeerBlock> : std::true_type {};
template <> struct is_product_key<PkmBlock> : std::true_type {};

}  // namespace compare
