// A user's program built against the installed spex: product-key retrieval on a tiny index
// must agree with exhaustive search over the explicit keys.
#include <cstdio>

#include <spex/spex.hpp>
#if SPEX_CONSUMER_IO
#include <cstdlib>
#include <string>

#include <spex/io/io.hpp>
#endif
#if SPEX_CONSUMER_DIST
#include <spex/dist/exchange.hpp>
#endif

int main() {
  spex::ProductKeys<float> keys(16, 8, /*seed=*/1);
  spex::RowMat<float> q(4, 8);
  spex::Rng rng(2);
  spex::fill_normal(q, 1.0, rng);
  spex::RowMat<float> s(4, 3), s_ref(4, 3);
  spex::IndexMat ids(4, 3), ids_ref(4, 3);
  spex::ProductKeys<float>::Workspace ws;
  keys.search(q, 3, s, ids, ws);
  spex::ExhaustiveTopK<float> exact;
  exact.search(keys.full_keys(), q, 3, s_ref, ids_ref);
  if (ids != ids_ref) {
    std::puts("product keys and exhaustive search disagree");
    return 1;
  }
#if SPEX_CONSUMER_IO
  // A layer through a file and back, from the installed spex::io.
  spex::Pkm<float>::Config cfg;
  cfg.d_in = 8;
  cfg.n_keys = 4;
  cfg.heads = 1;
  cfg.top_k = 2;
  cfg.d_key = 4;
  const spex::Pkm<float> pkm(cfg, 3);
  const std::string path = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") + "/spex_consumer.safetensors";
  spex::save_layer(path, pkm);
  const auto back = spex::load_layer<spex::Pkm<float>>(path);
  spex::RowMat<float> y1(4, 8), y2(4, 8);
  pkm.infer(q, y1);
  back.infer(q, y2);
  if (y1 != y2) {
    std::puts("a layer saved and loaded through spex::io differs");
    return 1;
  }
#endif
#if SPEX_CONSUMER_ENGINES
  // spex::engines brings the engine spex was installed with (a CBLAS on Debian: OpenBLAS or BLIS).
  std::printf("spex::engines: %s%s\n", spex::gemm_engine_available(spex::GemmEngine::cblas) ? spex::gemm_engine_name(spex::GemmEngine::cblas) : "eigen only",
              spex::gemm_engine_available(spex::GemmEngine::xsmm) ? " and libxsmm" : "");
#else
  // spex::spex alone: Eigen's products, no engine library.
  if (spex::gemm_engine_available(spex::GemmEngine::cblas) || spex::gemm_engine_available(spex::GemmEngine::xsmm)) {
    std::puts("spex::spex alone links a GEMM engine");
    return 1;
  }
#endif
#if SPEX_CONSUMER_DIST
  // The installed spex::dist compiles against MPI's headers and links its library.
  const spex::dist::ExpertPartition part(10, 3);
  if (part.owner(7) != 1 || part.local_rows(0) != 4) {
    std::puts("spex::dist's partition differs");
    return 1;
  }
  std::printf("spex::dist with %s\n", MPI_VERSION >= 3 ? "MPI 3 or later" : "MPI before 3");
#endif
  std::puts("spex consumer: ok");
  return 0;
}
