// fuzz_layer_files: a mutated file loaded into the product-key layers (layer_loads.hpp).
#include "layer_loads.hpp"

namespace layer_loads {

void product_key_layers(const spex::SafetensorsFile& file) {
  load_every_way(file, spex::Peer<float>(pk_config(), 11));
  load_every_way(file, spex::Pkm<double>(pk_config(), 12));
}

}  // namespace layer_loads
