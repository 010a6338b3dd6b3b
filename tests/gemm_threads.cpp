// The one-pool rule (DESIGN.md, Threading): after GEMMs on every engine, inside and outside
// spex's parallel loops, and a layer's forward and backward, the process has no more threads
// than OMP_NUM_THREADS allows. A pthread build of OpenBLAS or BLIS would start its own pool
// (as many threads as cores) and fail this. Usage: OMP_NUM_THREADS=n gemm_threads
#include <dirent.h>

#include <cstdio>
#include <cstdlib>

#include <spex/spex.hpp>

namespace {

int process_threads() {
  DIR* dir = opendir("/proc/self/task");
  if (!dir) return -1;
  int n = 0;
  while (const dirent* e = readdir(dir))
    if (e->d_name[0] != '.') ++n;
  closedir(dir);
  return n;
}

}  // namespace

int main() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (!env) {
    std::fprintf(stderr, "set OMP_NUM_THREADS\n");
    return 2;
  }
  const int allowed = std::atoi(env);
  using namespace spex;
  Rng rng(1);
  RowMat<float> x(512, 512), w(1024, 512), y(512, 1024), dx(512, 512);
  fill_normal(x, 1.0, rng);
  fill_normal(w, 1.0, rng);
  for (auto engine : {GemmEngine::eigen, GemmEngine::cblas, GemmEngine::xsmm}) {
    if (!gemm_engine_available(engine)) continue;
    // Outside a parallel region: one big call, as a user's own code might make.
    detail::gemm_block(engine, detail::gemm_operand(x), detail::gemm_operand(w.transpose()), y.data(), y.cols(), 512,
                       1024, false);
    detail::gemm_block(engine, detail::gemm_operand(y), detail::gemm_operand(w), dx.data(), dx.cols(), 512, 512, false);
  }
  gemm(y, x, w.transpose(), false);
  gemm(dx, y, w, false);

  MoE<float, ReluRouter<float>>::Config cfg;
  cfg.d_in = 64;
  cfg.hidden = 128;
  cfg.n_experts = 8;
  MoE<float, ReluRouter<float>> moe(cfg, 2);
  RowMat<float> xm(300, 64), ym(300, 64), dxm(300, 64);
  fill_normal(xm, 1.0, rng);
  MoE<float, ReluRouter<float>>::Cache cache;
  auto grads = moe.make_grads();
  moe.forward(xm, ym, cache);
  moe.backward(ym, dxm, cache, grads);

  const int threads = process_threads();
  std::printf("OMP_NUM_THREADS=%d: %d threads after GEMMs on %s%s and a MoE step\n", allowed, threads,
              gemm_engine_name(GemmEngine::cblas), gemm_engine_available(GemmEngine::xsmm) ? " + libxsmm" : "");
  return threads >= 1 && threads <= allowed ? 0 : 1;
}
