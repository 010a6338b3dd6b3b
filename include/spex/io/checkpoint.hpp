#pragma once
// Saving and restoring everything training needs to resume bit-exactly, in one safetensors file:
// parameters and buffers (BatchNorm running statistics), layers with their configs, optimizer
// state (Adam's m, v and step count, SGD's momentum), the lambda controller's state, RNG states
// and any strings of the caller's (a data position).
//
//   SafetensorsWriter w;                        // holds pointers: the objects must outlive write()
//   w.add(model_params, "model.").add_optimizer("optim.", adam).add_state("lambda", ctl);
//   w.set_metadata("data.position", std::to_string(step));
//   w.write("ckpt.safetensors");
//
//   SafetensorsLoader ld("ckpt.safetensors");   // maps and validates the file
//   ld.parameters(model_params_named_as_in_file, "model.").optimizer(adam, "optim.").state(ctl, "lambda");
//   ld.commit();                                // writes everything, or nothing if any part failed
//
// Each staging call validates its part at once (every conversion and rounding included) and
// throws spex::Error naming what is wrong; commit() then writes all staged parts, or refuses
// before writing any (a staging call threw, or a staged object's storage was replaced since:
// see SafetensorsLoader's contract below). Scalar state lives in __metadata__ as JSON
// strings: "<prefix>" -> {"kind": "Adam", "steps": t} (or {"kind": "Sgd"}), "<key>" -> the
// LambdaController's or Rng's fields; doubles are written with 17 significant digits, so they
// read back bit for bit.
// The writer is io/safetensors_writer.hpp, the loader io/safetensors_loader.hpp, next to the
// format (io/safetensors.hpp); this header brings both.
#include "safetensors_loader.hpp"
#include "safetensors_writer.hpp"
