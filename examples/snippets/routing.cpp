// DeepSeek-V3's routing in spex: sigmoid scores, the selection bias moved each step instead of
// an auxiliary loss, group-limited top-k, renormalized and scaled gates, shared experts; the
// router-quality report and a monitor that catches a dead ReLU router.
#include <cstdio>

#include <spex/spex.hpp>

int main() {
  spex::MoEConfig cfg;
  cfg.d_in = 32;
  cfg.n_experts = 16;
  cfg.hidden = 16;
  cfg.experts_per_token = 4;
  cfg.score = spex::ScoreFn::sigmoid;  // DeepSeek-V3 / Megatron --moe-router-score-function sigmoid
  cfg.renormalize = true;               // the 4 selected scores sum to 1 ...
  cfg.route_scale = 2.5;                // ... then times routed_scaling_factor
  cfg.expert_bias = true;               // aux-loss-free balancing
  cfg.aux_coeff = 0.0;
  cfg.n_groups = 4;                     // 4 groups of 4 experts, a token uses its best 2
  cfg.group_topk = 2;
  cfg.group_score_experts = 2;          // a group scores its best two (DeepSeek-V3)
  cfg.shared_experts = 1;               // an always-on FFN of hidden 16
  spex::MoE<float, spex::TopKRouter<float>> moe(cfg, /*seed=*/1);

  spex::RowMat<float> x = spex::RowMat<float>::Random(64, 32), y(64, 32), dx(64, 32);
  spex::MoE<float, spex::TopKRouter<float>>::Cache cache;
  auto grads = moe.make_grads();
  for (int step = 0; step < 3; ++step) {
    moe.forward(x, y, cache);
    grads.zero();
    moe.backward(y, dx, cache, grads);
    // ... the optimizer step, then once per step (loads summed over its micro-batches):
    moe.update_expert_bias(moe.expert_load(cache), /*rate=*/1e-3);
  }
  std::printf("%s\n", spex::describe(moe.stats(cache)).c_str());

  // ReLU routing: one monitor per layer; DeadRoutingPolicy::error throws instead of warning.
  spex::MoEConfig relu_cfg;
  relu_cfg.d_in = 32;
  spex::MoE<float> remoe(relu_cfg, /*seed=*/2);
  spex::RoutingMonitor monitor(/*window=*/50, /*floor=*/0.0, spex::DeadRoutingPolicy::warn, "block 2 ReMoE");
  spex::MoE<float>::Cache rc;
  remoe.forward(x, y, rc);
  monitor.update(remoe.stats(rc));
  return monitor.dead() ? 1 : 0;
}
