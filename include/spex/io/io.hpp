#pragma once
// spex's file support: safetensors read (validated, memory-mapped) and write, layers with their
// configs, training checkpoints. Needs nlohmann/json (Debian: nlohmann-json3-dev; CMake target
// spex::io). The core (spex/spex.hpp) does not include it.
#include "checkpoint.hpp"
#include "compact_tables.hpp"
#include "dtype.hpp"
#include "layer_config.hpp"
#include "layers.hpp"
#include "parameter_load.hpp"
#include "safetensors.hpp"
