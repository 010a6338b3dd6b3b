#pragma once
// What fuzz_layer_files' units share: the small layers its files are built from, and how a
// mutated file is loaded into each (every loader, then inference and a training step). The
// loads are split over two units, product-key and MoE layers, so the fuzz build compiles them
// on two cores.
#include <spex/io/io.hpp>

#include "fuzz_util.hpp"

namespace layer_loads {

using ReMoEf = spex::MoE<float, spex::ReluRouter<float>>;
using TopKf = spex::MoE<float, spex::TopKRouter<float>>;

inline spex::ProductKeyLayerConfig pk_config(spex::TableStorage s = spex::TableStorage::native) {
  spex::ProductKeyLayerConfig c = fuzz_util::small_pk_config(2, 4);
  c.learn_keys = true;
  c.storage = s;
  c.expert_ids = spex::ExpertIds::shells;
  return c;
}

inline spex::MoEConfig moe_config() {
  spex::MoEConfig c;
  c.d_in = 4;
  c.n_experts = 3;
  c.hidden = 6;
  c.experts_per_token = 2;
  return c;
}

/// Loads `file` every way into a Peer<float> and a Pkm<double> (layer_loads_product_key.cpp).
void product_key_layers(const spex::SafetensorsFile& file);
/// Loads `file` every way into ReLU- and TopK-routed MoE layers (layer_loads_moe.cpp).
void moe_layers(const spex::SafetensorsFile& file);

// A loaded layer computes: inference on a small batch, and for native tables a training step.
template <class L>
void exercise(L& layer) {
  using T = typename L::Scalar;
  spex::RowMat<T> x = spex::RowMat<T>::Ones(3, layer.d_in()), y(3, layer.d_out());
  x(1, 0) = T(-2);
  fuzz_util::spex_error_or_success([&] { layer.infer(x, y); });
  fuzz_util::spex_error_or_success([&] {
    auto g = layer.make_grads();
    spex::Adam<T> adam(layer.parameters(g), spex::AdamConfig{});
    typename L::Cache c;
    layer.forward(x, y, c);
    layer.backward(spex::RowMat<T>::Ones(3, layer.d_out()), c, g);
    adam.step();
  });
}

template <class L>
void load_every_way(const spex::SafetensorsFile& file, L&& existing) {
  using Layer = std::decay_t<L>;
  spex::LoadOptions plain, mapped, lenient;
  mapped.map = true;
  lenient.strict = false;
  lenient.map = true;
  for (const spex::LoadOptions* o : {&plain, &mapped, &lenient})
    fuzz_util::spex_error_or_success([&] {
      Layer loaded = spex::load_layer<Layer>(file, "", *o);
      exercise(loaded);
    });
  if constexpr (std::is_same<typename Layer::Config, spex::ProductKeyLayerConfig>::value && std::is_same<typename Layer::Scalar, float>::value)
    for (spex::TableStorage s : {spex::TableStorage::bf16, spex::TableStorage::int8}) {
      spex::LoadOptions as;
      as.storage = s;
      fuzz_util::spex_error_or_success([&] {
        Layer loaded = spex::load_layer<Layer>(file, "", as);
        exercise(loaded);
      });
    }
  // Into an existing layer with a live optimizer: a failed load leaves it usable.
  auto g = existing.make_grads();
  spex::Adam<typename Layer::Scalar> adam(existing.parameters(g), spex::AdamConfig{});
  for (const spex::LoadOptions* o : {&plain, &mapped, &lenient}) fuzz_util::spex_error_or_success([&] {
      spex::SafetensorsLoader ld(file);
      ld.layer(existing, "", *o);
      ld.commit();
    });
  fuzz_util::spex_error_or_success([&] { adam.step(); });
  exercise(existing);
}

}  // namespace layer_loads
