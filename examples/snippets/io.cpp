// Weights and checkpoints (spex::io, needs nlohmann-json3-dev): a layer saved with its config
// and built from the file alone, its expert tables memory-mapped in place, and a training
// checkpoint that resumes bit-exactly.
#include <cstdio>
#include <cstdlib>
#include <string>

#include <spex/io/io.hpp>
#include <spex/spex.hpp>

int main() {
  spex::Peer<float>::Config cfg;
  cfg.d_in = 32;
  cfg.n_keys = 16;
  cfg.heads = 2;
  cfg.top_k = 4;
  cfg.d_key = 16;
  spex::Peer<float> peer(cfg, 1);

  const std::string dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
  spex::save_layer(dir + "/peer.safetensors", peer);                          // weights + kind + config
  auto copy = spex::load_layer<spex::Peer<float>>(dir + "/peer.safetensors");  // built from the file
  spex::LoadOptions mapped;
  mapped.map = true;  // expert tables read in place from the page cache (shared, no copy)
  const auto served = spex::load_layer<spex::Peer<float>>(dir + "/peer.safetensors", "", mapped);
  spex::RowMat<float> x = spex::RowMat<float>::Random(4, 32), y1(4, 32), y2(4, 32);
  copy.infer(x, y1);
  served.infer(x, y2);
  std::printf("loaded copy == mapped: %s\n", y1 == y2 ? "yes" : "no");

  // Training state: weights and buffers, Adam's moments and step count, any RNG or counters.
  auto grads = peer.make_grads();
  spex::ParameterList<float> params = peer.parameters(grads);
  spex::Adam<float> opt(params, spex::AdamConfig{});
  spex::Rng data(7);
  spex::Peer<float>::Cache cache;
  for (int step = 0; step < 3; ++step) {
    spex::fill_normal(x, 1.0, data);
    peer.forward(x, y1, cache);
    spex::zero_grads(params);
    peer.backward(y1, cache, grads);  // L = |y|^2 / 2
    opt.step();
  }
  spex::SafetensorsWriter()
      .add_layer("model.", peer)
      .add_optimizer("optim.", opt)
      .add_state("data.rng", data)
      .set_metadata("step", "3")
      .write(dir + "/ckpt.safetensors");

  // Later, in a fresh process: same layer config, same parameter list; all-or-nothing.
  spex::SafetensorsLoader ld(dir + "/ckpt.safetensors");
  ld.layer(copy, "model.").state(data, "data.rng");
  auto copy_grads = copy.make_grads();
  spex::Adam<float> copy_opt(copy.parameters(copy_grads), spex::AdamConfig{});
  ld.optimizer(copy_opt, "optim.");
  ld.commit();
  std::printf("resumed at step %s, Adam step %ld\n", ld.metadata("step").c_str(), copy_opt.steps());
  return 0;
}
