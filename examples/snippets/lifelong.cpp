// Lifelong learning: a PEER layer learns a task, freezes every expert it has (with their sub-key
// rows and the query network), grows, and learns the next task with its new experts only. The
// frozen parts stay bit-identical; examples/lifelong.cpp measures what that keeps of old tasks.
#include <cstdio>

#include <spex/spex.hpp>

namespace {

void train(spex::Peer<float>& layer, const spex::RowMat<float>& x, const spex::RowMat<float>& target, int steps) {
  auto grads = layer.make_grads();  // made again after every grow or freeze
  const spex::ParameterList<float> params = layer.parameters(grads);  // frozen rows are marked in it
  spex::Adam<float> adam(params, spex::AdamConfig{});
  spex::Peer<float>::Cache cache;
  spex::RowMat<float> y(x.rows(), layer.d_out());
  for (int s = 0; s < steps; ++s) {
    layer.forward(x, y, cache);
    spex::zero_grads(params);
    layer.backward((y - target) / float(x.rows()), cache, grads);
    adam.step();
  }
}

}  // namespace

int main() {
  spex::Peer<float>::Config cfg;
  cfg.d_in = 32;
  cfg.n_keys = 16;
  cfg.heads = 4;
  cfg.top_k = 8;
  cfg.d_key = 16;
  cfg.expert_ids = spex::ExpertIds::shells;  // ids that survive growth
  spex::Peer<float> layer(cfg, 1);
  const spex::RowMat<float> x1 = spex::RowMat<float>::Random(64, 32), t1 = spex::RowMat<float>::Random(64, 32);
  const spex::RowMat<float> x2 = spex::RowMat<float>::Random(64, 32), t2 = spex::RowMat<float>::Random(64, 32);
  train(layer, x1, t1, 20);

  const spex::RowMat<float> up = layer.experts().up(), query = layer.retrieval().query().weight();
  layer.freeze(spex::FrozenSet{layer.config().n_keys, /*sub_keys=*/true, /*query=*/true});  // all it has
  layer.grow(24, 2);  // 16^2 -> 24^2 experts: the 256 old ones keep their ids and rows
  train(layer, x2, t2, 20);

  const bool kept = layer.experts().up().topRows(up.rows()) == up && layer.retrieval().query().weight() == query;
  std::printf("%lld experts, %lld frozen, frozen rows and query unchanged: %s\n", (long long)layer.n_experts(),
              (long long)layer.frozen_experts(), kept ? "yes" : "no");
  return kept ? 0 : 1;
}
