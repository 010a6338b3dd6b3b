// Two layers in one model: parameter names with prefixes, groups with their own learning
// rate and weight decay, one zero_grads() per step, Adam (lazy, SparseAdam's formula, for the
// row-sparse expert tables).
#include <cstdio>

#include <spex/spex.hpp>

int main() {
  spex::Peer<float>::Config pc;
  pc.d_in = 32;
  pc.n_keys = 16;
  pc.heads = 2;
  pc.top_k = 4;
  pc.d_key = 16;
  spex::Peer<float> block1(pc, 1), block2(pc, 2);
  auto g1 = block1.make_grads();  // grads are not assignable: the list below points into them
  auto g2 = block2.make_grads();

  spex::ParameterList<float> params = block1.parameters(g1, "block1.");
  spex::append_parameters(params, block2.parameters(g2, "block2."));
  const auto& w = spex::parameter(params, "block2.query.weight");  // lookup by name
  std::printf("%s is %lld x %lld\n", w.name.c_str(), (long long)w.rows, (long long)w.cols);

  std::vector<spex::GroupRule<float>> rules(1);
  rules[0].name = "experts";
  rules[0].pick = [](const spex::Parameter<float>& p) { return p.sparse_grad != nullptr; };
  rules[0].lr_scale = 10.0;       // follows the optimizer's lr (and its schedule)
  rules[0].weight_decay = 0.0;
  spex::AdamConfig ac;
  ac.lr = 1e-3;
  ac.weight_decay = 0.01;         // AdamW for the rest
  spex::Adam<float> opt(spex::make_groups(params, rules), ac);

  spex::RowMat<float> x = spex::RowMat<float>::Random(8, 32), h(8, 32), y(8, 32), dh(8, 32);
  spex::Peer<float>::Cache c1, c2;
  for (int step = 0; step < 3; ++step) {
    block1.forward(x, h, c1);
    block2.forward(h, y, c2);
    spex::zero_grads(params);           // backward accumulates
    block2.backward(y, dh, c2, g2);     // L = |y|^2 / 2
    block1.backward(dh, c1, g1);        // no dx needed
    spex::clip_grad_norm(params, 1.0);
    opt.step();
  }
  // A const model hands out read-only views (for saving).
  const spex::Peer<float>& frozen = block1;
  const spex::ParameterList<const float> ro = frozen.parameters("block1.");
  std::printf("%zu parameters, Adam step %ld\n", ro.size(), opt.steps());
  static_assert(spex::is_layer_v<spex::Peer<float>> && spex::is_layer_v<spex::MoE<float>>, "one vocabulary");
  return 0;
}
