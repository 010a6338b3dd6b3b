#pragma once
// What lets a layer recognise its own caches: every layer object has an identity, and every
// cache records which layer filled it, with which pass (training forward or inference) and
// for how many tokens. backward() accepts only a cache whose last pass was a training forward
// of the same layer object, so a cache from another layer, or one that an infer() call
// overwrote since, is a spex::Error instead of a silently mixed gradient. Also here: the
// argument checks every layer's forward and backward share.
#include <atomic>
#include <cstdint>

#include "check.hpp"
#include "finite.hpp"
#include "types.hpp"

namespace spex::detail {

/// Tag of the layer constructors that allocate the expert tables without filling them; only
/// the loaders (io/layers.hpp, through LayerFactory) use them, and they fill or map every row.
struct Unfilled {};
struct LayerFactory;

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
  /// Throws unless a pass of layer `id` (training or inference) filled the cache: what reads a
  /// pass's results (stats, aux_loss) needs one. `what` names the caller.
  void check_filled(const LayerId& id, const char* what) const {
    SPEX_CHECK(kind != empty, what << ": the cache holds no pass (none ran, or the last one threw): run forward or infer first");
    SPEX_CHECK(layer == id.value(), what << ": the cache was filled by another layer object");
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

/// The checks of a layer's forward/infer arguments: x is B x d_in, y is B x d_out, y is x
/// itself or does not overlap it, and (when asked) x is finite.
template <class T>
void check_forward_args(const CMatRef<T>& x, const MatRef<T>& y, Index d_in, Index d_out, bool finite, const char* layer) {
  SPEX_CHECK(x.cols() == d_in, layer << ": x has " << x.cols() << " columns, expected d_in = " << d_in);
  check_shape(y, x.rows(), d_out, "y");
  check_no_partial_overlap(x, y, "x", "y");
  if (finite) check_finite(x, "x");
}

/// The check of a layer's output after a pass (when the layer checks finiteness): a finite x
/// can still overflow float inside the experts (|x| near 1e30 through an FFN), and a layer
/// never hands out a silent NaN or Inf. The pass is then refused like any other bad input.
template <class T>
void check_output_finite(const MatRef<T>& y, const char* layer) {
  const auto at = find_non_finite(y);
  SPEX_CHECK(at.first < 0, layer << ": the output holds " << y(at.first, at.second) << " at token " << at.first << ", feature "
                                 << at.second << " for a finite input: the experts overflowed " << (sizeof(T) == 4 ? "float" : "double")
                                 << " (scale the input down)");
}

/// The checks of a layer's backward arguments, before anything is written: the cache holds a
/// training forward of this layer over dy's rows, dy is B x d_out (and finite when asked), dx
/// (when given) is B x d_in and is dy itself or does not overlap it. Returns the dy to read:
/// a copy in `dy_copy` when dx is dy, since layers zero dx before they read dy.
template <class T>
CMatRef<T> checked_backward_dy(const PassTag& pass, const LayerId& id, const char* layer, const CMatRef<T>& dy, Index d_in,
                               Index d_out, bool finite, const MatRef<T>* dx, RowMat<T>& dy_copy) {
  pass.check_for_backward(id, dy.rows(), layer);
  SPEX_CHECK(dy.cols() == d_out, "dy has " << dy.cols() << " columns, expected d_out = " << d_out);
  if (finite) check_finite(dy, "dy");
  if (!dx) return dy;
  check_shape(*dx, dy.rows(), d_in, "dx");
  check_no_partial_overlap(dy, *dx, "dy", "dx");
  if (overlap(dy, *dx) == Overlap::none) return dy;
  dy_copy = dy;
  return CMatRef<T>(dy_copy);
}

}  // namespace spex::detail
