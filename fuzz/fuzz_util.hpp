#pragma once
// What the fuzz targets share: the small layer configs they load into, and the rule that a
// loader either succeeds or throws spex::Error (anything else escapes to libFuzzer as a finding).
#include <spex/io/io.hpp>

namespace fuzz_util {

/// A product-key layer small enough that every loader runs in microseconds.
inline spex::ProductKeyLayerConfig small_pk_config(spex::Index heads = 1, spex::Index d_key = 2) {
  spex::ProductKeyLayerConfig c;
  c.d_in = 4;
  c.n_keys = 3;
  c.heads = heads;
  c.top_k = 2;
  c.d_key = d_key;
  return c;
}

/// Runs f(); a spex::Error is an answer, not a finding.
template <class F>
void spex_error_or_success(F&& f) {
  try {
    f();
  } catch (const spex::Error&) {
  }
}

}  // namespace fuzz_util
