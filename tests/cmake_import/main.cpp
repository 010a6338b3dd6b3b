// A user's program built against the installed spex: product-key retrieval on a tiny index
// must agree with exhaustive search over the explicit keys.
#include <cstdio>

#include <spex/spex.hpp>

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
  std::puts("spex consumer: ok");
  return 0;
}
