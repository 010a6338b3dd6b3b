// spex retrieval demo: exact top-k over N = 1024^2 product keys, checked against exhaustive
// search over the explicit N keys on a sample of the batch, with both timings.
//   retrieval_demo [n=1024] [d_key=256] [k=16] [batch=256] [sample=64]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <spex/spex.hpp>

#include "example_setup.hpp"

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  example_setup();
  const spex::Index n = argc > 1 ? std::atoll(argv[1]) : 1024;
  const spex::Index d_key = argc > 2 ? std::atoll(argv[2]) : 256;
  const spex::Index k = argc > 3 ? std::atoll(argv[3]) : 16;
  const spex::Index batch = argc > 4 ? std::atoll(argv[4]) : 256;
  const spex::Index sample = std::min<spex::Index>(argc > 5 ? std::atoll(argv[5]) : 64, batch);
  try {
    std::printf("spex retrieval demo: N = %lld^2 = %lld keys, d_key = %lld, k = %lld, batch = %lld (%s, %d threads)\n",
                (long long)n, (long long)(n * n), (long long)d_key, (long long)k, (long long)batch,
                spex::default_arch::name(), spex::max_threads());
    spex::ProductKeys<float> keys(n, d_key, /*seed=*/1);
    spex::RowMat<float> queries(batch, d_key);
    spex::Rng rng(2);
    spex::fill_normal(queries, 1.0, rng);

    spex::RowMat<float> scores(batch, k);
    spex::IndexMat ids(batch, k);
    spex::ProductKeys<float>::Workspace ws;
    keys.search(queries, k, scores, ids, ws);  // warm-up: sizes the workspace
    const int reps = 20;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) keys.search(queries, k, scores, ids, ws);
    const double pk_qps = double(batch) * reps / seconds_since(t0);

    std::printf("building the %lld explicit keys for exhaustive search (%.2f GiB)...\n", (long long)(n * n),
                double(n * n * d_key * sizeof(float)) / (1 << 30));
    const spex::RowMat<float> full = keys.full_keys();
    spex::RowMat<float> ex_scores(sample, k);
    spex::IndexMat ex_ids(sample, k);
    spex::ExhaustiveTopK<float> exhaustive;
    t0 = std::chrono::steady_clock::now();
    exhaustive.search(full, queries.topRows(sample), k, ex_scores, ex_ids);
    const double ex_qps = double(sample) / seconds_since(t0);

    spex::Index mismatches = 0;
    for (spex::Index q = 0; q < sample; ++q)
      if (ids.row(q) != ex_ids.row(q)) ++mismatches;
    std::printf("product keys : %10.0f queries/s\n", pk_qps);
    std::printf("exhaustive   : %10.0f queries/s\n", ex_qps);
    std::printf("speedup      : %10.0fx\n", pk_qps / ex_qps);
    std::printf("ids equal to exhaustive search on %lld of %lld sampled queries\n", (long long)(sample - mismatches),
                (long long)sample);
    std::printf("first query: expert ids");
    for (spex::Index j = 0; j < std::min<spex::Index>(k, 8); ++j) std::printf(" %lld", (long long)ids(0, j));
    std::printf(" ...\n");
    return mismatches == 0 ? 0 : 1;
  } catch (const spex::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
