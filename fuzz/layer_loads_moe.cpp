// fuzz_layer_files: a mutated file loaded into the MoE layers (layer_loads.hpp).
#include "layer_loads.hpp"

namespace layer_loads {

void moe_layers(const spex::SafetensorsFile& file) {
  load_every_way(file, ReMoEf(moe_config(), 13));
  load_every_way(file, TopKf(moe_config(), 14));
}

}  // namespace layer_loads
