// Expert parallelism over MPI (docs/expert_parallelism.md): PEER and ReMoE with
// their experts sharded over the ranks, a training step, Memory+'s value pool shared by two
// sharded PKM layers, and a sharded checkpoint.
// Run: mpirun -np 2 snippet_dist_sharded_layers
#include <mpi.h>

#include <cstdio>
#include <filesystem>

#include <spex/dist/checkpoint.hpp>
#include <spex/optim/adam.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  {
    spex::ProductKeyLayerConfig cfg;
    cfg.d_in = 64;
    cfg.n_experts = 64 * 64;
    cfg.heads = 4;
    cfg.top_k = 8;
    cfg.d_key = 32;
    // What spex::Peer<float>(cfg, 1) would be; this rank holds experts rank, rank + P, ...
    spex::dist::ShardedPeer<float> peer(cfg, /*seed=*/1, MPI_COMM_WORLD);

    // Each rank has its own tokens (its part of the batch); every call below is collective.
    spex::RowMat<float> x = spex::RowMat<float>::Random(16, 64), y(16, 64), dx(16, 64);
    spex::dist::ShardedPeer<float>::Cache cache;
    auto grads = peer.make_grads();
    spex::Adam<float> adam(peer.parameters(grads), spex::AdamConfig{});
    peer.forward(x, y, cache);
    peer.backward(y, dx, cache, grads);  // dL/dy = y; the retrieval's gradients are the whole batch's
    adam.step();                         // the same retrieval on every rank, this rank's expert rows

    // ReMoE: every rank's controller sees the whole batch's sparsity, so all hold one lambda.
    spex::MoEConfig moe_cfg;
    moe_cfg.d_in = 64;
    moe_cfg.n_experts = 8;
    spex::dist::ShardedMoE<float> moe(moe_cfg, /*seed=*/2, MPI_COMM_WORLD);
    auto controller = spex::LambdaController::for_small_batches(spex::LambdaController::target_for(1, 8));
    spex::dist::ShardedMoE<float>::Cache moe_cache;
    auto moe_grads = moe.make_grads();
    moe.set_lambda(controller.lambda());
    moe.forward(x, y, moe_cache);
    moe.backward(y, moe_cache, moe_grads);
    controller.update(moe.sparsity(moe_cache));

    // Memory+: two PKM layers reading one value table, sharded as the layers' tables are.
    spex::ProductKeyLayerConfig mem = cfg;
    mem.norm = spex::NormKind::layer;
    mem.silu_output = true;
    auto pool = spex::dist::sharded_value_pool<float>(64 * 64, /*d_value=*/64, /*seed=*/3, MPI_COMM_WORLD);
    spex::dist::ShardedPkm<float> mem_a(mem, pool, /*seed=*/4, MPI_COMM_WORLD), mem_b(mem, pool, /*seed=*/5, MPI_COMM_WORLD);
    spex::dist::ShardedPkm<float>::Cache ca, cb;
    auto ga = mem_a.make_grads();
    auto gb = mem_b.make_grads();
    pool->zero_grad();
    mem_a.forward(x, y, ca);
    mem_b.forward(x, dx, cb);
    mem_a.backward(y, ca, ga);   // both add to the pool's one gradient (this rank's slots)
    mem_b.backward(dx, cb, gb);

    // A checkpoint: replicated.safetensors once, shard-<r>-of-<P>.safetensors per rank.
    const std::string dir = (std::filesystem::temp_directory_path() / "spex_sharded_snippet").string();
    if (rank == 0) std::filesystem::create_directories(dir);
    MPI_Barrier(MPI_COMM_WORLD);
    spex::dist::ShardedCheckpointWriter(MPI_COMM_WORLD)
        .add_layer("peer.", peer)
        .add_optimizer("adam.", adam)
        .add_layer("mem_a.", mem_a)
        .add_layer("mem_b.", mem_b)
        .add_pool("pool.", *pool)
        .write(dir);
    spex::dist::ShardedPeer<float> restored(cfg, /*seed=*/99, MPI_COMM_WORLD);
    spex::dist::ShardedCheckpointLoader(dir, MPI_COMM_WORLD).layer(restored, "peer.").pool(*pool, "pool.").commit();
    std::printf("rank %d: %lld of %lld experts, %.2f MiB of tables\n", rank, (long long)peer.dispatch().partition().local_rows(rank),
                (long long)peer.n_experts(), double(peer.table_bytes()) / (1 << 20));
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) std::filesystem::remove_all(dir);
  }
  MPI_Finalize();
  return 0;
}
