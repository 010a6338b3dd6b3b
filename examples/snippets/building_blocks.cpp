// The pieces below the layers: retrieval, dense blocks, row-sparse gradients, metrics.
#include <cstdio>

#include <spex/spex.hpp>

int main() {
  spex::Rng rng(1);
  spex::RowMat<float> q(4, 16);
  spex::fill_normal(q, 1.0, rng);

  // Exact top-8 over N = 32^2 product keys, and the same by exhaustive search.
  spex::ProductKeys<float> keys(/*n=*/32, /*d_key=*/16, /*seed=*/2);
  spex::ProductKeys<float>::Workspace ws;
  spex::RowMat<float> scores(4, 8), scores_ref(4, 8);
  spex::IndexMat ids(4, 8), ids_ref(4, 8);
  keys.search(q, 8, scores, ids, ws);
  spex::ExhaustiveTopK<float> exact;
  exact.search(keys.full_keys(), q, 8, scores_ref, ids_ref);
  // On CPUs with AMX bf16 tiles or AVX512_BF16 (and builds that target them), scores in bf16 first, the rows
  // that may rank rescored exactly: the same ids. `always` takes them on any shape.
  keys.set_bf16_tiles(spex::Bf16Tiles::always);
  spex::IndexMat ids_tiles(4, 8);
  keys.search(q, 8, scores, ids_tiles, ws);
  std::printf("bf16 tiles %s on this machine\n", spex::kernels::bf16_tiles_ready() ? "available" : "not available");

  // Linear and Norm: backward assigns dx, like every layer (and takes dy, dx, cache, grads).
  spex::Linear<float> proj(16, 8, /*bias=*/true, rng);
  spex::Norm<float> bn(spex::NormKind::batch, 8);
  spex::RowMat<float> h(4, 8), hn(4, 8), dh(4, 8), dq(4, 16);
  spex::Norm<float>::Cache nc;
  auto pg = proj.make_grads();
  auto ng = bn.make_grads();
  proj.forward(q, h);
  bn.forward(h, hn, nc, /*training=*/true);
  bn.backward(hn, dh, nc, ng);
  proj.backward(q, dh, dq, pg);
  // They list their parameters like the layers; spex::frozen freezes any parameter of any block.
  spex::ParameterList<float> params = proj.parameters(pg, "proj.");
  spex::append_parameters(params, bn.parameters(ng, "norm."));
  const spex::RowMat<float> proj_before = proj.weight();
  spex::Sgd<float> sgd(spex::frozen(params, [](const spex::Parameter<float>& p) { return p.name.rfind("proj.", 0) == 0; }),
                       spex::SgdConfig{});
  sgd.step();  // steps norm.weight and norm.bias; proj.weight and proj.bias stay as they are

  // The GEMM every layer uses (C = A Bᵀ here), and the engine this build runs such a shape on.
  spex::RowMat<float> w(32, 16), out(4, 32);
  spex::fill_normal(w, 1.0, rng);
  spex::gemm(out, q, w.transpose(), /*accumulate=*/false);
  const spex::GemmEngine engine = spex::gemm_engine_for(64, 32, 16, /*a_transposed=*/false, /*b_transposed=*/true);
  std::printf("64 x 32 x 16 products run on %s\n", spex::gemm_engine_name(engine));

  // A row-sparse gradient of a 1000-row table.
  spex::RowMat<float> table = spex::RowMat<float>::Zero(1000, 8);
  spex::SparseRowGrad<float> g(table.rows(), table.cols());
  const float row[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  g.add_row(42, row);
  g.apply_sgd(table, 0.1f);

  // Usage of the experts a PEER layer retrieves (the paper's metrics).
  spex::Peer<float>::Config pc;
  pc.d_in = 16;
  pc.n_keys = 8;
  pc.heads = 2;
  pc.top_k = 4;
  pc.d_key = 8;
  spex::Peer<float> peer(pc, 3);
  spex::Peer<float>::Cache cache;
  spex::RowMat<float> y(4, 16);
  spex::ExpertUsage usage(peer.n_experts());
  peer.infer(q, y, cache);
  usage.add(cache.retrieval.ids, cache.retrieval.gates);
  std::printf("usage %.1f%%, SIMD: %s\n", usage.summary().usage_percent, spex::simd_arch_name());
  const bool gemm_ok = out.isApprox(spex::RowMat<float>(q * w.transpose()), 1e-5f);
  return ids == ids_ref && ids_tiles == ids_ref && table(42, 0) == -0.1f && gemm_ok && proj.weight() == proj_before ? 0 : 1;
}
