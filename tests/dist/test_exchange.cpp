// ExpertExchange (dist/exchange.hpp) under mpirun with P ranks: a global batch split over the
// ranks, experts round robin (dist/partition.hpp). Each owner computes, for every received token,
// sum over its requests of gate * (V(id) + x), with V a function of the expert id; summed back,
// that must equal the one-process sum over the token's experts (to rounding: the owners' partial
// sums are added in rank order), each owner must receive one x per (token, owner) pair, and per-
// request values must come back to their (token, slot) exactly. Exit code 0 on every rank = pass.
#include <cmath>
#include <vector>

#include <spex/core/random.hpp>
#include <spex/dist/exchange.hpp>

#include "dist_test_util.hpp"

namespace {

using namespace dist_test;

double value(Index id, Index c) { return std::sin(0.37 * double(id) + double(c)); }

void check_partition() {
  for (int p : {1, 2, 3, 4, 7})
    for (Index n : {0, 1, 5, 50}) {
      spex::dist::ExpertPartition part(n, p);
      Index total = 0;
      for (int r = 0; r < p; ++r) {
        total += part.local_rows(r);
        for (Index row = 0; row < part.local_rows(r); ++row) {
          const Index id = part.global_id(r, row);
          expect(id < n && part.owner(id) == r && part.local_row(id) == row, "partition round trip");
        }
      }
      expect(total == n, "partition covers every expert once");
    }
}

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  check_partition();

  const Index n_experts = 50, total = 37, m = 6, d = 5;
  // The same global batch on every rank (seeded), each rank taking its block of tokens.
  spex::Rng rng(11);
  spex::IndexMat ids(total, m);
  Mat gates(total, m), x(total, d);
  for (Index t = 0; t < total; ++t)
    for (Index j = 0; j < m; ++j) ids(t, j) = Index(rng.below(std::uint64_t(n_experts)));
  for (Index j = 0; j < m; ++j) ids(3, j) = 7 * j;  // token 3: experts on few ranks
  spex::fill_normal(gates, 1.0, rng);
  spex::fill_normal(x, 1.0, rng);
  const Index first = total * rank / ranks, last = total * (rank + 1) / ranks, b = last - first;

  const spex::dist::ExpertPartition part(n_experts, ranks);
  spex::dist::ExpertExchange<double> ex(MPI_COMM_WORLD);
  for (int round = 0; round < 2; ++round) {  // the same exchange reused: buffers stay valid
    ex.plan(ids.middleRows(first, b), gates.middleRows(first, b), part);
    Mat xr;
    ex.to_owners(x.middleRows(first, b), xr);
    // One x per (token, owner): the received tokens are the global tokens with an expert here.
    Index expected = 0;
    for (Index t = 0; t < total; ++t) {
      bool here = false;
      for (Index j = 0; j < m; ++j) here = here || part.owner(ids(t, j)) == rank;
      expected += here;
    }
    expect(ex.received_tokens() == expected, "one token row per (token, owner) pair");
    Mat partial = Mat::Zero(ex.received_tokens(), d);
    std::vector<double> per_request;
    for (Index r = 0; r < ex.received_tokens(); ++r)
      for (Index q = ex.request_begin(r); q < ex.request_begin(r + 1); ++q) {
        const Index id = part.global_id(rank, ex.request_row(q));
        for (Index c = 0; c < d; ++c) partial(r, c) += ex.request_gate(q) * (value(id, c) + xr(r, c));
        per_request.push_back(ex.request_gate(q) * double(id));
      }
    Mat y(b, d), back(b, m);
    ex.to_sources(partial, y);
    ex.requests_to_sources(per_request, back);
    double worst = 0;
    for (Index t = 0; t < b; ++t)
      for (Index c = 0; c < d; ++c) {
        double ref = 0;
        for (Index j = 0; j < m; ++j) ref += gates(first + t, j) * (value(ids(first + t, j), c) + x(first + t, c));
        worst = std::max(worst, std::abs(y(t, c) - ref));
      }
    expect(worst < 1e-12, "outputs summed over the owners equal the one-process sum");
    bool exact = true;
    for (Index t = 0; t < b; ++t)
      for (Index j = 0; j < m; ++j) exact = exact && back(t, j) == gates(first + t, j) * double(ids(first + t, j));
    expect(exact, "per-request values return to their (token, slot)");
  }
  // A bad id on the last rank only: every rank throws (none is left waiting in the exchange).
  spex::IndexMat bad = ids.middleRows(first, b);
  if (rank == ranks - 1) bad(0, 0) = n_experts;
  bool threw = false;
  try {
    ex.plan(bad, gates.middleRows(first, b), part);
  } catch (const spex::Error&) {
    threw = true;
  }
  expect(threw, "an id outside the pool on one rank throws spex::Error on every rank");
  // ... and the exchange still works afterwards.
  ex.plan(ids.middleRows(first, b), gates.middleRows(first, b), part);
  expect(ex.received_tokens() > 0 || ranks > total, "the exchange works after a refused plan");

  return finish("dist exchange passed");
}
