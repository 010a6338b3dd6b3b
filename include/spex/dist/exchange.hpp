#pragma once
// Expert parallelism over MPI: each rank holds a shard of a layer's experts (partition.hpp) and
// its own tokens; a token's retrieved experts live on several ranks. ExpertExchange moves what
// the owners need to them and their results back, with MPI_Alltoallv:
//   plan(ids, gates)        the (token, expert, gate) requests, grouped by owner, go to the owners
//                           (h*k per token, or pick lists of any length per token: MoE routing);
//   to_owners(rows)         one row per (token, owner) pair (x forward, dy backward), never one per
//                           request: a token that retrieves 32 experts on 3 ranks is sent 3 times;
//   to_sources(partial)     each owner's partial row per received token comes back and is summed
//                           over the owners in rank order (deterministic for a given P);
//   requests_to_sources(v)  one value per request back to its (token, slot) (gate gradients).
// The owners read the requests as pick lists per received token (request_offsets/rows/gates/
// tokens) for the experts' grouped kernels; off_rank_bytes() counts what left this rank.
// All ranks call the same functions in the same order (collectives). Bad arguments on any rank
// make plan() throw spex::Error on every rank (none is left waiting), before anything is sent.
// MPI reports its own errors through the communicator's handler: the default aborts; with
// MPI_ERRORS_RETURN they throw spex::Error.
// Thread safety: none; one exchange per concurrent caller (and communicator). After the first
// batches of the largest size no call allocates.
#include <mpi.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/check.hpp"
#include "../core/types.hpp"
#include "collectives.hpp"
#include "partition.hpp"

namespace spex {
namespace dist {

template <class T>
class ExpertExchange {
 public:
  /// An exchange bound to no communicator (a layer's Cache binds it on first use: bind()).
  ExpertExchange() = default;
  explicit ExpertExchange(MPI_Comm comm) { bind(comm); }
  /// Binds to `comm`, dropping any plan.
  void bind(MPI_Comm comm) {
    comm_ = comm;
    rank_ = comm_rank(comm);
    ranks_ = comm_size(comm);
    const std::size_t p = static_cast<std::size_t>(ranks_);
    for (auto* v : {&send_tokens_, &send_requests_, &recv_tokens_, &recv_requests_}) v->assign(p, 0);
    batch_ = per_token_ = received_ = 0;
    request_begin_.assign(1, 0);
  }

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }

  /// Plans one batch: ids and gates (B x m) of this rank's B tokens, ids in [0, part.n_experts()),
  /// part over this communicator's ranks. Sends every request to its owner; afterwards this rank
  /// holds received_tokens() tokens (from all sources, source by source, each source's in its
  /// token order) and their requests. Bad arguments on any rank throw on every rank.
  void plan(CIndexMatRef ids, CMatRef<T> gates, const ExpertPartition& part) {
    const Index m = ids.cols();
    all_or_none(comm_, "ExpertExchange::plan", [&] {
      check_partition(part);
      check_shape(gates, ids.rows(), m, "gates");
      check_ids(ids, part.n_experts());
    });
    per_token_ = m;
    plan_requests(
        ids.rows(), [&](Index t) { return t * m; }, [&](Index t, Index j) { return ids(t, j); },
        [&](Index t, Index j) { return gates(t, j); }, [&](Index) { return m; }, part);
  }

  /// The same for tokens with pick lists of their own lengths (mixture-of-experts routing):
  /// token t's requests are [begin[t], begin[t + 1]) of ids and gates, B + 1 offsets.
  void plan(Index tokens, const Index* begin, const Index* ids, const T* gates, const ExpertPartition& part) {
    all_or_none(comm_, "ExpertExchange::plan", [&] {
      check_partition(part);
      SPEX_CHECK(tokens >= 0, "tokens = " << tokens << " must be >= 0");
      check_pick_lists(tokens, begin, ids, part.n_experts());
    });
    per_token_ = 0;
    plan_requests(
        tokens, [&](Index t) { return begin[t]; }, [&](Index t, Index j) { return ids[begin[t] + j]; },
        [&](Index t, Index j) { return gates[begin[t] + j]; }, [&](Index t) { return begin[t + 1] - begin[t]; }, part);
  }

  /// What the last plan() sends from this rank: token rows per to_owners() call (one per
  /// (token, owner) pair, this rank's own included) and requests (16 bytes of indices + one T
  /// each). For the bytes-per-token model (bench/bench_dist_exchange.cpp).
  Index sent_token_rows() const { return Index(token_of_.size()); }
  Index sent_requests() const { return Index(request_slot_.size()); }
  /// Of those, the ones that stay on this rank (no network traffic).
  Index own_token_rows() const { return send_tokens_[static_cast<std::size_t>(rank_)]; }

  /// Bytes this rank sent to other ranks since the last reset_traffic() (every exchange call:
  /// counts, requests, rows, values; what a network would carry from this rank).
  std::uint64_t off_rank_bytes() const { return off_rank_bytes_; }
  void reset_traffic() { off_rank_bytes_ = 0; }

  /// Tokens received by this rank's experts in the last plan() (one per (token, source) pair).
  Index received_tokens() const { return received_; }
  /// Requests of received token r: [request_begin(r), request_begin(r + 1)), in the source
  /// token's slot order.
  Index request_begin(Index r) const { return request_begin_[static_cast<std::size_t>(r)]; }
  /// The expert row (in this rank's shard) and gate of request q.
  Index request_row(Index q) const { return recv_rows_[static_cast<std::size_t>(q)]; }
  T request_gate(Index q) const { return recv_gates_[static_cast<std::size_t>(q)]; }
  /// The received requests as pick lists for the experts' grouped forms: received token r's
  /// requests are [offsets[r], offsets[r + 1]) of rows and gates (received_tokens() + 1
  /// offsets), and tokens[q] is request q's received token.
  Index received_requests() const { return request_begin_.back(); }
  const Index* request_offsets() const { return request_begin_.data(); }
  const Index* request_rows() const { return recv_rows_.data(); }
  const T* request_gates() const { return recv_gates_.data(); }
  const Index* request_tokens() const { return recv_token_.data(); }

  /// Sends row t of `rows` (B x w, this rank's tokens) to every rank that owns one of token t's
  /// experts; `received` becomes received_tokens() x w in received order.
  void to_owners(CMatRef<T> rows, RowMat<T>& received) {
    SPEX_CHECK(rows.rows() == batch_, "rows has " << rows.rows() << " rows, the planned batch " << batch_);
    const Index w = rows.cols(), sent = Index(token_of_.size());
    row_buffer_.resize(static_cast<std::size_t>(sent * w));
    Eigen::Map<RowMat<T>> out(row_buffer_.data(), sent, w);
    for (Index i = 0; i < sent; ++i) out.row(i) = rows.row(token_of_[static_cast<std::size_t>(i)]);
    received.resize(received_, w);
    alltoallv(row_buffer_.data(), send_tokens_, w, received.data(), recv_tokens_);
  }

  /// Sends each received token's row of `partial` (received_tokens() x w) back to its source;
  /// out (B x w) = for each token, the sum of the rows its owners sent, in rank order (tokens
  /// without a request: zero).
  void to_sources(CMatRef<T> partial, MatRef<T> out) {
    SPEX_CHECK(partial.rows() == received_, "partial has " << partial.rows() << " rows, " << received_ << " tokens were received");
    const Index w = partial.cols(), sent = Index(token_of_.size());
    check_shape(out, batch_, w, "out");
    packed_.resize(static_cast<std::size_t>(received_ * w));
    Eigen::Map<RowMat<T>>(packed_.data(), received_, w) = partial;  // contiguous rows for MPI
    row_buffer_.resize(static_cast<std::size_t>(sent * w));
    alltoallv(packed_.data(), recv_tokens_, w, row_buffer_.data(), send_tokens_);
    const Eigen::Map<const RowMat<T>> back(row_buffer_.data(), sent, w);
    out.setZero();
    for (Index i = 0; i < sent; ++i)  // owner by owner: the sum's order is the ranks'
      out.row(token_of_[static_cast<std::size_t>(i)]) += back.row(i);
  }

  /// One value per received request (in request order) back to its source's (token, slot):
  /// out (B x m) gets them; slots are all covered (every request has one owner).
  void requests_to_sources(const std::vector<T>& values, MatRef<T> out) {
    SPEX_CHECK(per_token_ > 0 || batch_ == 0, "the last plan had pick lists: pass a flat output (requests_to_sources(values, T*))");
    check_shape(out, batch_, per_token_, "out");
    values_back(values);
    for (std::size_t i = 0; i < request_slot_.size(); ++i)
      out(request_slot_[i] / per_token_, request_slot_[i] % per_token_) = back_[i];
  }
  /// The same after a plan from pick lists: out[p] for the request at place p of the lists
  /// (sent_requests() values).
  void requests_to_sources(const std::vector<T>& values, T* out) {
    values_back(values);
    for (std::size_t i = 0; i < request_slot_.size(); ++i) out[request_slot_[i]] = back_[i];
  }

 private:
  void values_back(const std::vector<T>& values) {
    SPEX_CHECK(Index(values.size()) == request_begin_.back(),
               values.size() << " values for " << request_begin_.back() << " received requests");
    back_.resize(request_slot_.size());
    alltoallv(values.data(), recv_requests_, 1, back_.data(), send_requests_);
  }

  void check_partition(const ExpertPartition& part) const {
    SPEX_CHECK(ranks_ >= 1, "the exchange is bound to no communicator");
    SPEX_CHECK(part.ranks() == ranks_, "the partition is over " << part.ranks() << " ranks, the communicator has " << ranks_);
  }

  /// plan()'s work, once the arguments are known good on every rank: B tokens, token t's
  /// requests j in [0, count(t)) with expert id(t, j) and gate gate(t, j), and its place
  /// first(t) + j in the caller's flat list of requests.
  template <class First, class Id, class Gate, class Count>
  void plan_requests(Index b, First first, Id id, Gate gate, Count count, const ExpertPartition& part) {
    batch_ = b;
    // Requests grouped by owner, then token, then slot; one token entry per (token, owner).
    // A counting sort over the owners: one pass counts, one pass places.
    const std::size_t p = static_cast<std::size_t>(ranks_);
    Index n_requests = 0;
    for (Index t = 0; t < b; ++t) n_requests += count(t);
    std::fill(send_tokens_.begin(), send_tokens_.end(), 0);
    std::fill(send_requests_.begin(), send_requests_.end(), 0);
    last_token_.assign(p, -1);
    owner_of_.resize(static_cast<std::size_t>(n_requests));
    for (Index t = 0, q = 0; t < b; ++t)
      for (Index j = 0; j < count(t); ++j, ++q) {
        const int o = part.owner(id(t, j));
        owner_of_[static_cast<std::size_t>(q)] = o;
        ++send_requests_[o];
        if (last_token_[o] != t) {
          last_token_[o] = t;
          ++send_tokens_[o];
        }
      }
    token_first_.assign(p, 0);
    request_at_.assign(p, 0);
    for (std::size_t o = 1; o < p; ++o) {
      token_first_[o] = token_first_[o - 1] + send_tokens_[o - 1];
      request_at_[o] = request_at_[o - 1] + send_requests_[o - 1];
    }
    token_at_ = token_first_;
    token_of_.resize(static_cast<std::size_t>(token_first_[p - 1] + send_tokens_[p - 1]));
    request_slot_.resize(static_cast<std::size_t>(n_requests));
    send_meta_.resize(2 * static_cast<std::size_t>(n_requests));
    send_gates_.resize(static_cast<std::size_t>(n_requests));
    last_token_.assign(p, -1);
    for (Index t = 0, k = 0; t < b; ++t)
      for (Index j = 0; j < count(t); ++j, ++k) {
        const int o = owner_of_[static_cast<std::size_t>(k)];
        if (last_token_[o] != t) {
          last_token_[o] = t;
          token_of_[static_cast<std::size_t>(token_at_[o]++)] = t;
        }
        const std::size_t q = static_cast<std::size_t>(request_at_[o]++);
        request_slot_[q] = first(t) + j;
        // The token's place in what o receives from here, and the expert's row there.
        send_meta_[2 * q] = token_at_[o] - 1 - token_first_[o];
        send_meta_[2 * q + 1] = part.local_row(id(t, j));
        send_gates_[q] = gate(t, j);
      }
    // Counts: tokens and requests per pair of ranks.
    counts_out_.resize(2 * p);
    counts_in_.resize(counts_out_.size());
    for (int o = 0; o < ranks_; ++o) {
      counts_out_[2 * o] = send_tokens_[o];
      counts_out_[2 * o + 1] = send_requests_[o];
    }
    check_mpi(MPI_Alltoall(counts_out_.data(), 2, MPI_INT64_T, counts_in_.data(), 2, MPI_INT64_T, comm_), "MPI_Alltoall");
    off_rank_bytes_ += 2 * sizeof(std::int64_t) * static_cast<std::uint64_t>(ranks_ - 1);
    received_ = 0;
    Index received_requests = 0;
    for (int s = 0; s < ranks_; ++s) {
      recv_tokens_[s] = counts_in_[2 * s];
      recv_requests_[s] = counts_in_[2 * s + 1];
      received_ += recv_tokens_[s];
      received_requests += recv_requests_[s];
    }
    // The requests: (token place, local row) pairs and the gates.
    const std::size_t rq = static_cast<std::size_t>(received_requests);
    recv_meta_.resize(2 * rq);
    recv_gates_.resize(rq);
    alltoallv(send_meta_.data(), send_requests_, 2, recv_meta_.data(), recv_requests_);
    alltoallv(send_gates_.data(), send_requests_, 1, recv_gates_.data(), recv_requests_);
    // Requests arrive source by source, each source's grouped by token in its order, so they
    // are already grouped by received token: the offsets per token follow from the places.
    request_begin_.assign(static_cast<std::size_t>(received_ + 1), 0);
    recv_rows_.resize(rq);
    recv_token_.resize(rq);
    Index token_base = 0, q = 0;
    for (int s = 0; s < ranks_; ++s) {
      for (Index r = 0; r < recv_requests_[s]; ++r, ++q) {
        const Index place = recv_meta_[2 * q];
        SPEX_CHECK(place >= 0 && place < recv_tokens_[s], "rank " << s << " sent a request for token " << place
                                                                  << " of the " << recv_tokens_[s] << " it sent");
        SPEX_CHECK(q == 0 || recv_token_[q - 1] <= token_base + place, "rank " << s << " sent its requests out of token order");
        recv_token_[q] = token_base + place;
        recv_rows_[q] = recv_meta_[2 * q + 1];
        ++request_begin_[token_base + place + 1];
      }
      token_base += recv_tokens_[s];
    }
    for (Index r = 0; r < received_; ++r) request_begin_[r + 1] += request_begin_[r];
  }
  /// MPI_Alltoallv of `width` values per counted item, counts per rank, in items.
  template <class V>
  void alltoallv(const V* send, const std::vector<Index>& send_items, Index width, V* recv, const std::vector<Index>& recv_items) {
    displacements(send_items, width, send_counts_, send_displs_);
    displacements(recv_items, width, recv_counts_, recv_displs_);
    for (int o = 0; o < ranks_; ++o)
      if (o != rank_) off_rank_bytes_ += sizeof(V) * static_cast<std::uint64_t>(send_counts_[static_cast<std::size_t>(o)]);
    check_mpi(MPI_Alltoallv(send, send_counts_.data(), send_displs_.data(), mpi_type<V>(), recv, recv_counts_.data(),
                            recv_displs_.data(), mpi_type<V>(), comm_),
              "MPI_Alltoallv");
  }

  static void displacements(const std::vector<Index>& items, Index width, std::vector<int>& counts, std::vector<int>& displs) {
    counts.resize(items.size());
    displs.resize(items.size());
    Index at = 0;
    for (std::size_t i = 0; i < items.size(); ++i) {
      const Index n = items[i] * width;
      SPEX_CHECK(at + n <= Index(INT_MAX), "an exchange of " << at + n << " values exceeds MPI's int counts: use smaller batches");
      counts[i] = static_cast<int>(n);
      displs[i] = static_cast<int>(at);
      at += n;
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, ranks_ = 0;
  Index batch_ = 0, per_token_ = 0, received_ = 0;
  std::uint64_t off_rank_bytes_ = 0;
  std::vector<Index> send_tokens_, send_requests_, recv_tokens_, recv_requests_;  // per rank, in items
  std::vector<Index> token_of_;       // sent token entries, owner by owner: the local token
  std::vector<Index> last_token_, token_first_, token_at_, request_at_;  // plan()'s counting sort, per owner
  std::vector<int> owner_of_;         // per (token, slot)
  std::vector<Index> request_slot_;   // sent requests, owner by owner: t * m + j
  std::vector<std::int64_t> counts_out_, counts_in_, send_meta_, recv_meta_;
  std::vector<T> send_gates_, recv_gates_, row_buffer_, packed_, back_;
  std::vector<Index> request_begin_ = std::vector<Index>(1, 0);
  std::vector<Index> recv_rows_, recv_token_;  // per received request: its row here, its received token
  std::vector<int> send_counts_, send_displs_, recv_counts_, recv_displs_;
};

}  // namespace dist
}  // namespace spex
