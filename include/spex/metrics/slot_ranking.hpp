#pragma once
// Which memory slots (experts) are specific to new data: the TF-IDF ranking of sparse memory
// finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"; docs/
// growth_and_freezing.md, "Sparse memory finetuning"). Each batch is a document and each expert
// id a term. Background batches (data the layer must not forget) give every slot a document
// frequency df(i): the number of them that used it. For a new batch, with c(i) its uses of slot i:
//   tf(i) = c(i) / sum_j c(j),   idf(i) = log((D + 1) / (df(i) + 1)),   score = tf * idf,
// D the number of background batches: a slot every background batch used scores 0, a slot none
// used scores most. The top t slots by score (ties: smaller id first) are the ones to train.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/check.hpp"
#include "../core/types.hpp"

namespace spex {

/// Thread safety: none (the methods reuse internal scratch).
///
/// Usage: examples/snippets/memory_layers.cpp (compiled and run by the test suite), examples/lifelong.cpp.
class TfIdfSlotRanking {
 public:
  TfIdfSlotRanking() = default;
  explicit TfIdfSlotRanking(Index n_slots) {
    SPEX_CHECK(n_slots >= 1, "TfIdfSlotRanking: n_slots = " << n_slots << " must be >= 1");
    df_.assign(static_cast<std::size_t>(n_slots), 0);
  }

  Index n_slots() const { return Index(df_.size()); }
  Index background_batches() const { return batches_; }
  /// The number of background batches that used slot `i`.
  std::int64_t document_frequency(Index i) const { return df_.at(static_cast<std::size_t>(i)); }

  /// One background batch: the expert ids it retrieved (any shape, e.g. a cache's
  /// retrieval.ids, B x h*k); each slot counts once however often the batch used it.
  void add_background(CIndexMatRef ids) {
    distinct(ids);
    for (std::size_t s = 0; s < ids_.size(); s = next_run(s)) ++df_[static_cast<std::size_t>(ids_[s])];
    ++batches_;
  }

  /// The slots of batch `ids` (expert ids it retrieved) with the t highest TF-IDF scores, best
  /// first; fewer when the batch used fewer distinct slots.
  const std::vector<Index>& top(CIndexMatRef ids, Index t) {
    SPEX_CHECK(t >= 0, "TfIdfSlotRanking::top: t = " << t << " must be >= 0");
    distinct(ids);
    scored_.clear();
    const double total = double(ids_.size());
    for (std::size_t s = 0; s < ids_.size(); s = next_run(s)) {
      const Index id = ids_[s];
      const double tf = double(next_run(s) - s) / total;
      scored_.push_back({tf * idf(id), id});
    }
    const std::size_t keep = std::min(scored_.size(), static_cast<std::size_t>(t));
    std::partial_sort(scored_.begin(), scored_.begin() + std::ptrdiff_t(keep), scored_.end(),
                      [](const Scored& a, const Scored& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); });
    top_.clear();
    for (std::size_t i = 0; i < keep; ++i) top_.push_back(scored_[i].id);
    return top_;
  }

  /// log((D + 1) / (df(i) + 1)).
  double idf(Index i) const { return std::log(double(batches_ + 1) / double(df_[static_cast<std::size_t>(i)] + 1)); }

 private:
  struct Scored {
    double score;
    Index id;
  };

  /// The batch's ids sorted into ids_ (checked to lie in [0, n_slots)).
  void distinct(CIndexMatRef ids) {
    ids_.clear();
    for (Index r = 0; r < ids.rows(); ++r)
      for (Index c = 0; c < ids.cols(); ++c) {
        const Index id = ids(r, c);
        SPEX_CHECK(id >= 0 && id < n_slots(), "TfIdfSlotRanking: expert id " << id << " is outside [0, " << n_slots() << ")");
        ids_.push_back(id);
      }
    std::sort(ids_.begin(), ids_.end());
  }
  std::size_t next_run(std::size_t s) const {
    std::size_t e = s;
    while (e < ids_.size() && ids_[e] == ids_[s]) ++e;
    return e;
  }

  std::vector<std::int64_t> df_;
  std::int64_t batches_ = 0;
  std::vector<Index> ids_, top_;
  std::vector<Scored> scored_;
};

}  // namespace spex
