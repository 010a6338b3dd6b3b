#pragma once
// What lets a layer recognise its own caches: every layer object has an identity, and every
// cache records which layer filled it, with which pass (training forward or inference) and
// for how many tokens. backward() accepts only a cache whose last pass was a training forward
// of the same layer object, so a cache from another layer, or one that an infer() call
// overwrote since, is a spex::Error instead of a silently mixed gradient.
#include <atomic>
#include <cstdint>

#include "check.hpp"
#include "types.hpp"

namespace spex::detail {

/// A process-wide unique id; copies and assignments take a fresh one (a copied or reassigned
/// layer is a different layer for the caches).
class LayerId {
 public:
  LayerId() : id_(next()) {}
  LayerId(const LayerId&) : id_(next()) {}
  LayerId& operator=(const LayerId&) {
    id_ = next();
    return *this;
  }
  std::uint64_t value() const { return id_; }

 private:
  static std::uint64_t next() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }
  std::uint64_t id_;
};

/// Kept in a layer's Cache: the last pass that filled it.
struct PassTag {
  enum Kind { empty, training, inference };
  std::uint64_t layer = 0;
  Kind kind = empty;
  Index tokens = 0;

  /// Marks the cache unusable (a pass began; if it throws, the cache stays unusable).
  void invalidate() {
    kind = empty;
    layer = 0;
  }
  void set(const LayerId& id, Kind k, Index b) {
    layer = id.value();
    kind = k;
    tokens = b;
  }
  /// Throws unless the last pass was a training forward of layer `id` over `tokens` rows.
  void check_for_backward(const LayerId& id, Index dy_rows, const char* layer_name) const {
    SPEX_CHECK(kind != empty, layer_name << "::backward: the cache holds no forward pass (none ran, or the last one threw)");
    SPEX_CHECK(layer == id.value(), layer_name << "::backward: the cache was filled by another layer object");
    SPEX_CHECK(kind == training,
               layer_name << "::backward: the cache's last pass was infer(), not a training forward(); "
                             "run forward(x, y, cache) again before backward");
    SPEX_CHECK(dy_rows == tokens,
               layer_name << "::backward: dy has " << dy_rows << " rows but the cache holds a forward pass of " << tokens << " tokens");
  }
};

}  // namespace spex::detail
