#pragma once
// Where a layer's experts run: the dispatch policy, the last template argument of Peer, Pkm and
// MoE. Local (the default) runs them in this process over the whole expert table.
// dist::ExpertParallel (dist/expert_parallel.hpp) runs them on their owner ranks over MPI: each
// rank holds a shard of the expert table and a replica of the rest, and the layer is the same
// class with the same methods (docs/expert_parallelism.md).
//
// What a policy provides; the layers use nothing else of it:
//   kSharded                 whether the layer runs the policy's expert phases (dist/) instead
//                            of calling its experts directly
//   rows()                   which rows of the expert table this process holds
//   local_rows_below(n)      how many of the expert ids [0, n) it holds
//   set_experts(n, what)     the table has n experts now (construction, grow); throws if the
//                            policy cannot hold them
//   collective(what, f)      runs f; a sharded policy turns a throw on any rank into the same
//                            throw on every rank, so that no rank is left waiting
//   check_same(what, v)      a sharded policy checks that every rank passed the same values
//   batch_reduction()        sums over the whole batch (nullptr: this process's batch is all of it)
//   replicated_grads(s, g)   where backward puts the gradients of the replicated parts (g itself
//                            here; a zeroed copy in the cache state `s` when sharded) and
//   sum_replicated(s, g)     adds them into g (here nothing: they are there already)
//   ProductKeyState<T, G>, MoEState<T, G>   what a layer's Cache holds for the policy
#include <cstdint>
#include <initializer_list>

#include "../core/batch_reduction.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"

namespace spex {

/// The default dispatch: every expert in this process. Stateless; layers that use it are
/// copyable and need no MPI.
struct Local {
  static constexpr bool kSharded = false;

  template <class T, class ReplicatedGrads>
  struct ProductKeyState {};
  template <class T, class ReplicatedGrads>
  struct MoEState {};

  RowStride rows() const { return RowStride{}; }
  Index local_rows_below(Index id_end) const { return id_end; }
  void set_experts(Index, const char*) {}
  template <class F>
  void collective(const char*, F&& f) const {
    f();
  }
  void check_same(const char*, std::initializer_list<std::int64_t>) const {}
  BatchReduction* batch_reduction() const { return nullptr; }
  template <class State, class Grads>
  Grads& replicated_grads(State&, Grads& g) const {
    return g;
  }
  template <class State, class Grads>
  void sum_replicated(State&, Grads&) const {}
};

}  // namespace spex
