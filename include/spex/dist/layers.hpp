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

}  // namespace dist
}  // namespace spex
