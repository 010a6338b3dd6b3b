#pragma once
// The layers with their experts sharded over MPI ranks: Peer, Pkm and MoE with the
// dist::ExpertParallel dispatch (expert_parallel.hpp says how they run). They are the
// one-process layers' classes, with every method and feature of those; the names below are
// short forms:
//   dist::ShardedPeer<float> peer(cfg, seed, MPI_COMM_WORLD);   // Peer<float, Arch, ExpertParallel>
// Usage: examples/snippets/dist/sharded_layers.cpp (compiled and run by the test suite under mpirun).
#include "../layers/moe.hpp"
#include "../layers/peer.hpp"
#include "../layers/pkm.hpp"
#include "expert_parallel.hpp"

#include <cstdint>
#include <memory>

namespace spex {
namespace dist {

/// Expert-parallel PEER.
template <class T = float, class Arch = default_arch>
using ShardedPeer = Peer<T, Arch, ExpertParallel>;
/// Expert-parallel PKM.
template <class T = float, class Arch = default_arch>
using ShardedPkm = Pkm<T, Arch, ExpertParallel>;
/// Expert-parallel MoE (ReMoE with ReluRouter, the classic MoE with TopKRouter; dropless).
template <class T = float, class Router = ReluRouter<T>, class Arch = default_arch>
using ShardedMoE = MoE<T, Router, Arch, ExpertParallel>;

/// A value pool (Memory+'s values shared by several Pkm layers) sharded over the ranks of `comm`
/// as the sharded layers' tables are: rank r holds slots r, r + P, ..., with the values the
/// one-process ValuePool(n_slots, d_value, seed) holds there. Build the ShardedPkm layers that
/// read it over the same communicator; save and load it with ShardedCheckpointWriter::add_pool
/// and ShardedCheckpointLoader::pool (dist/checkpoint.hpp). Collective: every rank passes the
/// same arguments, or every rank throws.
template <class T = float>
std::shared_ptr<ValuePool<T>> sharded_value_pool(Index n_slots, Index d_value, std::uint64_t seed, MPI_Comm comm = MPI_COMM_WORLD) {
  const int rank = comm_rank(comm), ranks = comm_size(comm);
  check_same_on_all_ranks(comm, "sharded_value_pool", {n_slots, d_value, std::int64_t(seed)});
  std::shared_ptr<ValuePool<T>> pool;
  all_or_none(comm, "sharded_value_pool", [&] {
    SPEX_CHECK(n_slots >= ranks, "sharded_value_pool: " << n_slots << " slots cannot be sharded over " << ranks << " ranks");
    pool = std::make_shared<ValuePool<T>>(n_slots, d_value, seed, RowStride{rank, ranks});
  });
  return pool;
}

}  // namespace dist
}  // namespace spex
