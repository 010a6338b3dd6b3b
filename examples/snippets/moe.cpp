// ReMoE (ReLU router, adaptive L1 penalty) and the classic TopK MoE.
#include <cstdio>

#include <spex/spex.hpp>

int main() {
  spex::MoE<float>::Config cfg;  // MoE<float> = MoE<float, ReluRouter<float>>: ReMoE
  cfg.d_in = 32;
  cfg.n_experts = 8;
  cfg.hidden = 64;
  cfg.experts_per_token = 1;     // ReLU: on average (target sparsity 1 - 1/8); TopK: exactly
  spex::MoE<float> remoe(cfg, /*seed=*/1);
  // Bounded lambda; the smoothed rule suits batches of hundreds to thousands of tokens
  // (spex::LambdaController(target) is the paper's sign rule, for batches of ~100k tokens).
  auto ctl = spex::LambdaController::for_small_batches(spex::LambdaController::target_for(1, 8));

  spex::RowMat<float> x = spex::RowMat<float>::Random(64, 32), y(64, 32), dx(64, 32);
  spex::MoE<float>::Cache cache;
  auto grads = remoe.make_grads();
  for (int step = 0; step < 3; ++step) {
    remoe.set_lambda(ctl.lambda());
    remoe.forward(x, y, cache);
    grads.zero();
    remoe.backward(y, dx, cache, grads);  // the penalty's gradient is included
    ctl.update(remoe.stats(cache).sparsity);  // once per optimizer step
  }
  std::printf("sparsity %.3f, lambda %.3g, penalty %.4f, %.0f FLOPs per token\n", remoe.stats(cache).sparsity,
              ctl.lambda(), remoe.aux_loss(cache), remoe.flops_per_token().total());

  spex::MoE<float, spex::TopKRouter<float>> topk(cfg, /*seed=*/2);  // softmax top-k + aux loss
  topk.infer(x, y);
  return y.allFinite() ? 0 : 1;
}
