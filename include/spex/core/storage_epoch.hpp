#pragma once
// How a parameter list notices that the storage it points into was replaced. A Parameter holds
// raw pointers into a layer (its weights, its expert tables) and into a Grads object; an
// optimizer keeps such a list for its whole life. Some operations replace that storage under a
// live list: a mapped load (the table then reads the file and its owned memory is freed),
// grow() and set_storage() (new tables), freeze() (other frozen rows), assigning or destroying
// the layer or the Grads. Each of these objects owns a StorageEpoch and advances it whenever
// its storage is replaced; a list records the epochs it was taken at (StorageStamp), and every
// user of a list (optimizers' step(), zero_grads, clipping, loaders and writers) checks them
// first, so a stale list is a spex::Error naming the parameter and what to make again, never
// a write into freed memory.
//
// Cost: one shared counter per owning object, one comparison per parameter per use.
// Thread safety: advancing happens in the owner's non-const operations, which are never
// concurrent with anything else on it; checking only reads.
#include <cstdint>
#include <memory>
#include <utility>

namespace spex {

/// What a stamp is of: names the object to make again in errors.
enum class StampKind { layer, table, grads };

inline const char* to_string(StampKind k) {
  switch (k) {
    case StampKind::layer: return "its layer was grown, frozen, converted (set_storage), loaded into or assigned";
    case StampKind::table: return "its expert table was replaced (a mapped load, a conversion or a growth)";
    case StampKind::grads: return "its Grads object was destroyed or moved";
  }
  return "?";
}

/// The epoch of an owning object at the time a parameter list was taken. A default stamp
/// tracks nothing and is always current (a list built by hand from a user's own matrices).
class StorageStamp {
 public:
  StorageStamp() = default;
  StorageStamp(std::shared_ptr<const std::uint64_t> counter, StampKind kind)
      : counter_(std::move(counter)), seen_(counter_ ? *counter_ : 0), kind_(kind) {}

  bool current() const { return !counter_ || *counter_ == seen_; }
  bool tracks() const { return counter_ != nullptr; }
  StampKind kind() const { return kind_; }

 private:
  std::shared_ptr<const std::uint64_t> counter_;
  std::uint64_t seen_ = 0;
  StampKind kind_ = StampKind::layer;
};

/// Owned by an object whose storage parameter lists point into. Copies are other storage (a
/// fresh epoch); a move hands the epoch on to the destination after advancing it (the lists
/// point at the source object); assignment and destruction advance it. Moves never allocate.
class StorageEpoch {
 public:
  StorageEpoch() : counter_(std::make_shared<std::uint64_t>(0)) {}
  StorageEpoch(const StorageEpoch&) : StorageEpoch() {}
  StorageEpoch(StorageEpoch&& o) noexcept : counter_(std::move(o.counter_)) { advance(); }
  StorageEpoch& operator=(const StorageEpoch&) {
    advance();
    return *this;
  }
  StorageEpoch& operator=(StorageEpoch&& o) noexcept {
    advance();
    o.advance();
    std::swap(counter_, o.counter_);
    return *this;
  }
  ~StorageEpoch() { advance(); }

  /// Every list taken before this is stale from now on.
  void advance() {
    if (counter_) ++*counter_;
  }
  /// The stamp a list taken now records. A moved-from owner gets a fresh epoch first.
  StorageStamp stamp(StampKind kind) const {
    if (!counter_) counter_ = std::make_shared<std::uint64_t>(0);
    return StorageStamp(counter_, kind);
  }

 private:
  mutable std::shared_ptr<std::uint64_t> counter_;
};

}  // namespace spex
