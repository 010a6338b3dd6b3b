#pragma once
// Checkpoints of sharded layers (dist::ShardedPeer, ShardedPkm, ShardedMoE; needs spex::io as
// well as spex::dist): one directory,
//   replicated.safetensors              written once (rank 0): the replicated parameters (the
//                                       retrieval, the router), their optimizer state, the
//                                       layers' configs and the states added to replicated();
//   shard-<r>-of-<P>.safetensors        one per rank: its expert tables and their optimizer
//                                       state (Adam's m and v rows stay with their rows).
// A tensor belongs to the shards when its name has the component "experts." (the sharded
// layers name their tables so; name nothing replicated that way). Every file records P and a
// checkpoint id drawn at write time, so a directory that mixes files of two writes, or of
// another P, is refused.
// Loading needs the same layer configs. With the same P, rank r reads replicated.safetensors and
// its own shard. With another P (resharding), every rank maps all old shards and copies its
// rows: with round robin row i of rank r is expert i P + r, so a new rank r' takes its row i'
// (expert e = i' P' + r', P' ranks now) from old rank e mod P, row e / P, and its optimizer
// rows (Adam's m and v) the same way; an MoE expert is a block of rows.
// Both sides are collective: a failure on any rank (a file missing, a config that differs, a
// write that failed) throws on every rank; loading changes nothing unless every rank's files
// were valid. A failed write may leave a directory with some new files: their id tells them
// apart, and the loader refuses the mixture.
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../io/checkpoint.hpp"
#include "../io/layer_config.hpp"
#include "collectives.hpp"
#include "layers.hpp"

namespace spex {

namespace dist {

/// The metadata key of a sharded checkpoint's files.
inline constexpr const char* kShardKey = "spex.shard";

namespace detail {
inline std::string shard_file(const std::string& dir, int rank, int ranks) {
  return dir + "/shard-" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ".safetensors";
}
inline std::string replicated_file(const std::string& dir) { return dir + "/replicated.safetensors"; }

template <class P>
void split(const ParameterList<P>& all, ParameterList<P>& replicated, ParameterList<P>& sharded) {
  for (const auto& p : all) (is_sharded_name(p.name) ? sharded : replicated).push_back(p);
}
}  // namespace detail

/// Collects what to save, then write(dir) (collective). Holds pointers to what was added: it
/// must outlive write(). Usage: examples/snippets/dist/sharded_layers.cpp.
class ShardedCheckpointWriter {
 public:
  explicit ShardedCheckpointWriter(MPI_Comm comm) : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)) {}

  /// A sharded layer under `prefix`: replicated parameters and config once, tables per rank.
  template <class L>
  ShardedCheckpointWriter& add_layer(const std::string& prefix, const L& layer) {
    SPEX_CHECK(!layers_.contains(prefix), "add_layer: a layer with prefix '" << prefix << "' was already added");
    add(layer.parameters(prefix));
    layers_[prefix] = layer_entry(layer);
    return *this;
  }
  /// A value pool (dist::sharded_value_pool) under `prefix`: every rank its rows, in its shard.
  template <class T>
  ShardedCheckpointWriter& add_pool(const std::string& prefix, const ValuePool<T>& pool) {
    return add(pool.parameters(prefix));
  }
  /// An optimizer's state under `prefix`, split as its parameters are.
  template <class Opt>
  ShardedCheckpointWriter& add_optimizer(const std::string& prefix, const Opt& opt) {
    add(opt.state(prefix));
    nlohmann::json j = {{"kind", spex::detail::OptimizerKind<Opt>::name}};
    if constexpr (spex::detail::OptimizerKind<Opt>::has_steps) j["steps"] = opt.steps();
    replicated_.set_metadata(prefix, j.dump());
    return *this;
  }
  /// Parameters of any kind, split by name (is_sharded_name).
  template <class P>
  ShardedCheckpointWriter& add(const ParameterList<P>& params) {
    ParameterList<P> rep, sh;
    detail::split(params, rep, sh);
    replicated_.add(rep);
    shard_.add(sh);
    return *this;
  }
  /// The replicated file's writer, for states saved once (LambdaController, Rng, ...).
  SafetensorsWriter& replicated() { return replicated_; }

  /// Writes the directory (which must exist): rank 0 the replicated file, every rank its shard.
  /// Collective; throws on every rank if any rank's write failed.
  void write(const std::string& dir, const WriteOptions& opt = {}) {
    std::uint64_t id = 0;
    if (rank_ == 0) id = (std::uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
    check_mpi(MPI_Bcast(&id, 1, MPI_UINT64_T, 0, comm_), "MPI_Bcast");
    all_or_none(comm_, "ShardedCheckpointWriter::write", [&] {
      nlohmann::json meta = {{"ranks", ranks_}, {"id", std::to_string(id)}};
      if (rank_ == 0) {
        nlohmann::json rep = meta;
        rep["rank"] = "replicated";
        rep["minor"] = kFormatMinor;  // of the layer entries (io/layer_config.hpp)
        rep["layers"] = layers_;
        SafetensorsWriter w = replicated_;
        w.set_metadata(kShardKey, rep.dump());
        w.write(detail::replicated_file(dir), opt);
      }
      meta["rank"] = rank_;
      SafetensorsWriter w = shard_;
      w.set_metadata(kShardKey, meta.dump());
      w.write(detail::shard_file(dir, rank_, ranks_), opt);
    });
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0, ranks_ = 1;
  SafetensorsWriter replicated_, shard_;
  nlohmann::json layers_ = nlohmann::json::object();
};

/// Stages a sharded checkpoint's parts, then commit() restores all of them. Every staging call
/// is collective and throws on every rank if any rank's part is invalid; nothing changes before
/// commit(). After a throw, discard the loader (other ranks' parts may be staged).
/// Resharding: a checkpoint of P' ranks loads into P ranks (see the file's comment); the shards'
/// tensors must be stored as the layers' T, and layers are staged before their optimizers (the
/// rows of an optimizer's state follow its layer's experts).
class ShardedCheckpointLoader {
 public:
  /// Opens `dir`'s replicated file and this rank's shard; both must be of this communicator's P
  /// and of one write.
  ShardedCheckpointLoader(const std::string& dir, MPI_Comm comm) : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)) {
    all_or_none(comm_, "ShardedCheckpointLoader", [&] {
      replicated_.emplace(detail::replicated_file(dir));
      const nlohmann::json rep = shard_meta(replicated_->file());
      SPEX_CHECK(rep["ranks"].is_number_integer() && rep["ranks"].get<int>() >= 1,
                 replicated_->file().path() << ": '" << kShardKey << "' holds no rank count");
      file_ranks_ = rep["ranks"].get<int>();
      layers_ = rep.contains("layers") && rep["layers"].is_object() ? rep["layers"] : nlohmann::json::object();
      minor_ = rep.contains("minor") && rep["minor"].is_number_integer() ? rep["minor"].get<int>() : kFormatMinor;
      // The same P: this rank's shard. Another P: every old shard (mapped; only the rows this
      // rank's experts need are read).
      for (int s = 0; s < file_ranks_; ++s) {
        if (file_ranks_ == ranks_ && s != rank_) continue;
        SafetensorsFile f(detail::shard_file(dir, s, file_ranks_));
        const nlohmann::json mine = shard_meta(f);
        SPEX_CHECK(rep["id"] == mine["id"] && mine["rank"] == s && mine["ranks"] == file_ranks_,
                   f.path() << " is not rank " << s << "'s shard of the write that made " << replicated_->file().path());
        if (file_ranks_ == ranks_) shard_.emplace(std::move(f));
        else old_shards_.push_back(std::move(f));
      }
    });
  }

  /// Whether the checkpoint was written by another number of ranks (its shards are then read
  /// row by row into this run's partition).
  bool resharding() const { return file_ranks_ != ranks_; }

  /// A sharded layer saved under `prefix`: its config must be the layer's.
  template <class L>
  ShardedCheckpointLoader& layer(L& layer, const std::string& prefix = "", const LoadOptions& opt = {}) {
    all_or_none(comm_, "ShardedCheckpointLoader::layer", [&] {
      const std::string where = replicated_->file().path() + ": layer '" + prefix + "'";
      SPEX_CHECK(layers_.contains(prefix), where << ": not in the checkpoint");
      const auto entry = read_layer_entry<L>(layers_[prefix], minor_, where);
      nlohmann::json a = config_to_json(entry.config), b = config_to_json(layer.config());
      a.erase("check_finite");
      b.erase("check_finite");
      SPEX_CHECK(a == b, where << ": the file's config " << a.dump() << " differs from the layer's " << b.dump());
      experts_of_[prefix] = layer.table_rows();
      stage(layer.parameters(prefix), prefix, opt);
      if constexpr (LayerKind<L>::has_lambda) {
        check_range(entry.lambda, 0, kMaxLambda, "lambda in the file");
        lambdas_.push_back([&layer, lambda = entry.lambda] { layer.set_lambda(lambda); });
      }
    });
    return *this;
  }
  /// A value pool saved by add_pool(prefix, ...), of the same number of slots and d_value;
  /// stage it before the optimizers that step it (their rows follow the pool's slots).
  template <class T>
  ShardedCheckpointLoader& pool(ValuePool<T>& pool, const std::string& prefix, const LoadOptions& opt = {}) {
    all_or_none(comm_, "ShardedCheckpointLoader::pool", [&] {
      SPEX_CHECK(pool.rows().step == ranks_ && pool.rows().first == rank_,
                 "ShardedCheckpointLoader::pool: the pool holds rank " << pool.rows().first << "'s slots of " << pool.rows().step
                     << " ranks, the loader's rank is " << rank_ << " of " << ranks_
                     << " (dist::sharded_value_pool over the loader's communicator)");
      experts_of_[prefix] = pool.n_slots();
      stage(pool.parameters(prefix), prefix, opt);
    });
    return *this;
  }
  /// An optimizer's state saved by add_optimizer(prefix, ...) for the same parameter list.
  template <class Opt>
  ShardedCheckpointLoader& optimizer(Opt& opt, const std::string& prefix) {
    all_or_none(comm_, "ShardedCheckpointLoader::optimizer", [&] {
      auto all = opt.state(prefix);
      decltype(all) rep, sh;
      detail::split(all, rep, sh);
      replicated_->optimizer(opt, prefix, rep);
      stage_sharded(sh, prefix, LoadOptions{});
    });
    return *this;
  }
  /// The replicated file's loader, for states saved through ShardedCheckpointWriter::replicated().
  /// A staging call on it that throws must throw on every rank alike (they read the same file).
  SafetensorsLoader& replicated() { return *replicated_; }

  /// Restores everything staged, on every rank, or nothing on any: first every rank checks
  /// that its loaders can commit (no staging call failed, no staged storage replaced since:
  /// core/parameter.hpp, Lifetime), then all write, which cannot fail.
  LoadReport commit() {
    all_or_none(comm_, "ShardedCheckpointLoader::commit", [&] {
      replicated_->check_ready();
      if (shard_) shard_->check_ready();
      for (const auto& [name, stamps] : resharded_stamps_) check_current(name, stamps, "ShardedCheckpointLoader::commit");
    });
    resharded_stamps_.clear();
    LoadReport r = replicated_->commit(), s = shard_ ? shard_->commit() : LoadReport{};
    for (auto& f : resharded_) f();
    resharded_.clear();
    s.copied.insert(s.copied.end(), resharded_names_.begin(), resharded_names_.end());
    resharded_names_.clear();
    for (auto& f : lambdas_) f();
    lambdas_.clear();
    r.copied.insert(r.copied.end(), s.copied.begin(), s.copied.end());
    r.mapped.insert(r.mapped.end(), s.mapped.begin(), s.mapped.end());
    r.missing.insert(r.missing.end(), s.missing.begin(), s.missing.end());
    r.unexpected.insert(r.unexpected.end(), s.unexpected.begin(), s.unexpected.end());
    return r;
  }

 private:
  template <class T>
  void stage(const ParameterList<T>& params, const std::string& prefix, const LoadOptions& opt) {
    ParameterList<T> rep, sh;
    detail::split(params, rep, sh);
    replicated_->parameters(rep, prefix, opt);
    stage_sharded(sh, prefix, opt);
  }

  template <class T>
  void stage_sharded(const ParameterList<T>& sh, const std::string& prefix, const LoadOptions& opt) {
    if (!resharding()) {
      shard_->parameters(sh, prefix, opt);
      return;
    }
    for (const auto& p : sh) stage_resharded(p, opt);
  }

  /// Parameter p (this rank's rows of a sharded table, or of an optimizer's state for one) from
  /// the old shards: expert e = i P + rank, the i-th of this rank, was row e / P' of old rank
  /// e mod P'; an expert is `block` rows (1 for product-key tables, an FFN's rows for MoE).
  template <class T>
  void stage_resharded(const Parameter<T>& p, const LoadOptions& opt) {
    const Index n = experts_of(p.name), mine = RowStride{rank_, ranks_}.rows_of(n);
    SPEX_CHECK(mine > 0 && p.rows % mine == 0, p.name << ": " << p.rows << " rows are not whole experts of " << mine);
    const Index block = p.rows / mine, width = p.cols;
    auto staged = std::make_shared<std::vector<T>>(static_cast<std::size_t>(p.rows * width));
    for (Index i = 0; i < mine; ++i) {
      const Index e = i * ranks_ + rank_, old = e % file_ranks_, row = e / file_ranks_;
      const SafetensorsFile& f = old_shards_[static_cast<std::size_t>(old)];
      const TensorInfo& t = f.at(p.name);
      SPEX_CHECK(t.dtype == dtype_of<std::remove_const_t<T>>(),
                 f.path() << ": " << p.name << " is stored as " << to_string(t.dtype) << "; resharding reads the layer's own dtype");
      const Index old_rows = RowStride{old, file_ranks_}.rows_of(n) * block;
      SPEX_CHECK(shape_matches(t.shape, old_rows, width),
                 f.path() << ": " << p.name << " has shape " << shape_string(t.shape) << ", rank " << old << " of " << file_ranks_
                          << " holds " << old_rows << " x " << width);
      std::memcpy(staged->data() + i * block * width, f.data(t) + static_cast<std::size_t>(row * block * width) * sizeof(T),
                  static_cast<std::size_t>(block * width) * sizeof(T));
    }
    if (opt.check_finite)
      for (std::size_t k = 0; k < staged->size(); ++k)
        SPEX_CHECK(std::isfinite(double((*staged)[k])), p.name << ": a non-finite value in the old shards");
    resharded_.push_back([p, staged] {
      for (Index r = 0; r < p.rows; ++r) std::copy(staged->begin() + r * p.cols, staged->begin() + (r + 1) * p.cols, p.row(r));
    });
    resharded_names_.push_back(p.name);
    resharded_stamps_.emplace_back(p.name, p.stamps);
  }

  /// The number of experts of the staged layer whose rows tensor `name` holds: the layer whose
  /// prefix + "experts." the name contains (the longest such prefix), else, for an optimizer
  /// built over unprefixed names, the one layer staged (or all staged layers, if they agree).
  Index experts_of(const std::string& name) const {
    SPEX_CHECK(!experts_of_.empty(), name << ": no layer staged (stage layers before their optimizers)");
    const std::pair<const std::string, Index>* best = nullptr;
    for (const auto& kv : experts_of_)
      if (name.find(kv.first + "experts.") != std::string::npos && (!best || kv.first.size() > best->first.size())) best = &kv;
    if (best && !best->first.empty()) return best->second;
    const Index n = experts_of_.begin()->second;
    for (const auto& kv : experts_of_)
      SPEX_CHECK(kv.second == n, name << ": which staged layer's experts it holds is ambiguous (name the optimizer's parameters with "
                                         "the layers' prefixes)");
    return n;
  }

  static nlohmann::json shard_meta(const SafetensorsFile& f) {
    const std::string where = f.path();
    return spex::detail::guard_json(where, [&] {
      SPEX_CHECK(f.metadata().count(kShardKey), where << ": not a file of a sharded checkpoint (no '" << kShardKey << "')");
      const nlohmann::json j = nlohmann::json::parse(f.metadata().at(kShardKey));
      SPEX_CHECK(j.is_object() && j.contains("ranks") && j.contains("id") && j.contains("rank"),
                 where << ": not a file of a sharded checkpoint ('" << kShardKey << "' lacks ranks, id or rank)");
      return j;
    });
  }

  MPI_Comm comm_;
  int rank_ = 0, ranks_ = 1;
  std::optional<SafetensorsLoader> replicated_, shard_;
  int file_ranks_ = 1;
  std::vector<SafetensorsFile> old_shards_;        // resharding: every old shard
  std::map<std::string, Index> experts_of_;        // staged layers: prefix -> experts
  std::vector<std::function<void()>> resharded_;   // resharding: the staged copies
  std::vector<std::string> resharded_names_;
  std::vector<std::pair<std::string, ParameterStamps>> resharded_stamps_;  // checked by commit()
  nlohmann::json layers_;
  int minor_ = kFormatMinor;
  std::vector<std::function<void()>> lambdas_;
};

}  // namespace dist
}  // namespace spex
