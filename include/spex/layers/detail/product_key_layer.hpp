#pragma once
// What PEER and PKM share: the forward/backward skeleton around KeyRetrieval (their
// configuration: layers/product_key_config.hpp). The layers differ only in their experts
// (experts/neurons.hpp vs experts/values.hpp), plugged in through Layer::experts_forward /
// experts_backward.
#include <cmath>
#include <optional>
#include <string>

#include "../../core/check.hpp"
#include "../../core/compact_table.hpp"
#include "../../core/layer_state.hpp"
#include "../../core/parameter.hpp"
#include "../../core/types.hpp"
#include "../../kernels/activation.hpp"
#include "../../nn/gated_output.hpp"
#include "../../nn/rms_norm.hpp"
#include "../../select/key_retrieval.hpp"
#include "../dispatch.hpp"
#include "../product_key_config.hpp"

namespace spex {

namespace detail {

/// The layer skeleton. Layer provides: kName, check_config(config), draw_experts(config, rng, rows) and
/// unfilled_experts(config), experts_forward(x, c, y), experts_backward(dy, c, dx, g) (the
/// experts in this process), and Experts with parameters(prefix, grads*),
/// check_grads(grads, what), kReadsInput and grouped kernels (a sharded Dispatch runs those).
/// Dispatch: where the experts run (layers/dispatch.hpp); every method below is the same for
/// all dispatches, and with a sharded one it is a collective (every rank calls it in the same
/// order; a bad argument on any rank throws on every rank before anything changes).
template <class T, class Arch, class Layer, class Experts, class Dispatch>
class ProductKeyLayer {
 public:
  using Config = ProductKeyLayerConfig;
  using Scalar = T;

  /// The gradients of what every rank holds a replica of (the input norm, the retrieval and the
  /// output head).
  struct ReplicatedGrads {
    typename KeyRetrieval<T, Arch>::Grads retrieval;
    typename RmsNorm<T>::Grads input_norm;
    typename GatedOutput<T>::Grads head;
    void zero() {
      retrieval.zero();
      input_norm.zero();
      head.zero();
    }
    template <class F>
    void for_each_array(F&& f) {
      retrieval.for_each_array(f);
      input_norm.for_each_array(f);
      head.for_each_array(f);
    }
  };
  /// Per-call state, owned by the caller and reused across calls (no allocation once it has
  /// seen the largest batch). One cache per concurrent caller.
  struct Cache {
    RowMat<T> x;                                   // the input (normalized with input_rmsnorm), for backward
    RowMat<T> x_raw;                               // input_rmsnorm, training: the input before its norm
    typename RmsNorm<T>::Cache input_norm;
    typename KeyRetrieval<T, Arch>::Cache retrieval;
    IndexMat rows;                                 // per_head_tables: the table row of each pick
    typename Experts::Cache experts;
    RowMat<T> pre;                                 // expert pre-activations (PEER)
    RowMat<T> dgates;
    RowMat<T> dy_copy;                             // dy, when dx is the same matrix
    RowMat<T> dx_normalized;                       // input_rmsnorm: the gradient of the normalized input
    RowMat<T> memory, dmemory, dx_head;            // with an output head: the experts' output m, its gradient, the head's dx
    typename GatedOutput<T>::Cache head;
    typename Dispatch::template ProductKeyState<T, ReplicatedGrads> dispatch;  // a sharded dispatch's exchange
    PassTag pass;
  };
  /// Gradients; backward accumulates into them until zero(). Not assignable: parameter lists
  /// point into them (core/parameter.hpp, Lifetime; moving or destroying them makes those
  /// lists stale).
  struct Grads : ReplicatedGrads {
    typename Experts::Grads experts;
    StorageEpoch epoch;
    std::vector<Index> trainable_scratch;  // set_trainable_experts' table rows
    /// Clears every gradient (call once per optimizer step; backward accumulates).
    void zero() {
      ReplicatedGrads::zero();
      experts.zero();
    }
    Grads(ReplicatedGrads r, typename Experts::Grads e) : ReplicatedGrads(std::move(r)), experts(std::move(e)) {}
    Grads(Grads&&) = default;
    Grads(const Grads&) = default;
    Grads& operator=(const Grads&) = delete;
    Grads& operator=(Grads&&) = delete;
  };

  const Config& config() const { return cfg_; }
  /// Experts of the whole layer (with a sharded dispatch: of all shards).
  Index n_experts() const { return cfg_.n_experts; }
  /// Rows of each expert table of the whole layer: n_experts(), or heads * n_experts() with
  /// per-head tables (config().per_head_tables; row i * heads + h is head h's expert i).
  Index table_rows() const { return spex::detail::table_rows(cfg_); }
  /// Where the experts run (Local, or dist::ExpertParallel: its comm(), partition(), ...).
  const Dispatch& dispatch() const { return dispatch_; }
  /// Forward FLOPs per token (metrics/flops.hpp): the retrieval's parts and the h * k experts.
  FlopCount flops_per_token() const { return flops_per_token(cfg_); }
  /// The same from a config alone (nothing allocated): for choosing sizes at a FLOP budget.
  static FlopCount flops_per_token(const Config& config) {
    const Config c = resolve(config);
    FlopCount f = KeyRetrieval<T, Arch>::flops_per_token(retrieval_config(c));
    if (c.input_rmsnorm) f.query += 4.0 * double(c.d_in);  // the squared norm, then a scale and a gain per feature
    f.experts = Experts::flops_per_token(c.heads * c.top_k, c.d_in, c.d_value, c.glu).experts;
    // The output head: the SiLU gate's projection, silu and product, W_o; the sigmoid gate.
    if (c.silu_output) f.experts += flops::linear(c.d_in, c.d_value) + 6.0 * double(c.d_value) + flops::linear(c.d_value, c.d_out);
    if (c.sigmoid_gate) f.experts += flops::linear(c.d_in, 1) + double(c.d_out) + 4.0;
    return f;
  }
  Index d_in() const { return cfg_.d_in; }
  Index d_out() const { return cfg_.d_out; }
  KeyRetrieval<T, Arch>& retrieval() { return retrieval_; }
  const KeyRetrieval<T, Arch>& retrieval() const { return retrieval_; }
  /// The output head (config().silu_output, sigmoid_gate; disabled otherwise).
  GatedOutput<T>& output_head() { return head_; }
  const GatedOutput<T>& output_head() const { return head_; }
  /// The input RMSNorm (config().input_rmsnorm; disabled otherwise).
  RmsNorm<T>& input_norm() { return input_norm_; }
  const RmsNorm<T>& input_norm() const { return input_norm_; }
  /// The experts this process holds: all of them, or with a sharded dispatch its shard (row i is
  /// expert dispatch().partition().global_id(rank, i)).
  Experts& experts() { return experts_; }
  const Experts& experts() const { return experts_; }

  /// Gradients for this layer's shapes and frozen set (make them again after grow or freeze).
  Grads make_grads() const {
    require_native("make_grads");
    return Grads(ReplicatedGrads{retrieval_.make_grads(), input_norm_.make_grads(), head_.make_grads()},
                 experts_.make_grads(frozen_rows()));
  }

  /// What training leaves unchanged (config().frozen).
  const FrozenSet& frozen() const { return cfg_.frozen; }
  /// The frozen experts: ids [0, frozen_experts()) (frozen().keys^2).
  Index frozen_experts() const { return cfg_.frozen.keys * cfg_.frozen.keys; }
  /// The rows of experts() that are frozen: its first ones (a shard holds the frozen ids in its
  /// first rows too; per-head tables hold an expert's rows side by side).
  Index frozen_rows() const { return dispatch_.local_rows_below(frozen_experts() * table_sets()); }
  /// Freezes what `f` names and unfreezes the rest (FrozenSet; f.keys <= n_keys, shells ids
  /// unless 0 or n_keys). Typical: freeze({n_keys, true, true}) then grow(n_new, seed), and
  /// train: only the new experts learn. Gradients, parameter lists and optimizers made before
  /// must be made again (backward refuses gradients made for another frozen set). Checkpoints
  /// record the frozen set (io). Not thread-safe.
  void freeze(const FrozenSet& f) {
    Config c = cfg_;
    dispatch_.collective(Layer::kName, [&] {
      c.frozen = f;
      c = resolve(c);  // validates
    });
    dispatch_.check_same(Layer::kName, {c.frozen.keys, c.frozen.sub_keys, c.frozen.query});
    retrieval_.freeze(c.frozen.sub_keys ? c.frozen.keys : 0, c.frozen.query);
    cfg_ = c;
    storage_replaced();
  }

  /// Sparse memory finetuning (docs/growth_and_freezing.md, "Sparse memory finetuning"): from now
  /// on only the experts `ids` (each in [0, n_experts()); per-head tables: every head's row of
  /// each) get gradients in `g`, so optimizers step only their rows and state; the others stay
  /// bit-identical, as frozen experts do. Clears g's expert gradients. Costs O(ids + the previous
  /// set) after the first call: meant to change every step (TfIdfSlotRanking picks the set).
  /// Freeze the retrieval with freeze({0, true, true}) to train nothing else. Not thread-safe.
  void set_trainable_experts(Grads& g, const std::vector<Index>& ids) const {
    std::vector<Index>& rows = g.trainable_scratch;
    rows.clear();
    const RowStride local = dispatch_.rows();
    const Index sets = table_sets();
    dispatch_.collective(Layer::kName, [&] {
      check_grads(g);
      for (Index id : ids) {
        SPEX_CHECK(id >= 0 && id < cfg_.n_experts, Layer::kName << "::set_trainable_experts: expert " << id << " is outside [0, n_experts = "
                                                              << cfg_.n_experts << ")");
        for (Index h = 0; h < sets; ++h) {
          const Index row = id * sets + h;  // a table row of the whole layer; this process holds some
          if ((row - local.first) % local.step == 0 && row >= local.first) rows.push_back((row - local.first) / local.step);
        }
      }
    });
    g.experts.for_each_table([&](auto& table) { table.set_trainable_rows(rows); });
  }
  /// Every expert trains again (past the frozen ones). Clears g's expert gradients.
  void clear_trainable_experts(Grads& g) const {
    g.experts.for_each_table([](auto& table) { table.clear_trainable_rows(); });
  }

  /// How the expert tables are stored (config().storage).
  TableStorage storage() const { return cfg_.storage; }
  /// Converts the expert tables to storage `s` in place: compact (bf16, int8) for inference
  /// after training, native again to train on (with the compact values). PEER's compact tables
  /// lie side by side (CompactTable::side_by_side); its tables are held in both forms until all
  /// are converted, so that a failure changes nothing. Not thread-safe: no call on the layer may
  /// run meanwhile.
  void set_storage(TableStorage s) {
    if (s == cfg_.storage) return;
    SPEX_CHECK(!Dispatch::kSharded, Layer::kName << "::set_storage: storage " << to_string(s)
                                                 << " is for inference in one process; shards are native");
    experts_.set_storage(s);
    cfg_.storage = s;
    storage_replaced();
  }
  /// Grows the expert pool in place from N = n^2 to n_new^2 (config().expert_ids must be
  /// shells): every existing expert keeps its id, its table rows and its sub-key rows; the new
  /// sub-key rows and expert rows are drawn as at construction from `seed`. The expert tables
  /// are copied once (into tables of the new size). Gradients and optimizers made before must be
  /// made again. Native tables only. Not thread-safe. Sharded: every rank draws the same new
  /// sub-keys and its rows of the same new experts (round robin appends the new ids at the end of
  /// every shard: the old rows keep their place).
  void grow(Index n_new, std::uint64_t seed) {
    Config grown;
    dispatch_.collective(Layer::kName, [&] {
      require_native("grow");
      grown = grown_config(cfg_, n_new, Layer::kName);
    });
    dispatch_.check_same(Layer::kName, {n_new, std::int64_t(seed)});
    if (n_new == cfg_.n_keys) return;
    Rng rng(seed);
    Rng key_rng = rng.split(1), table_rng = rng.split(2);
    // First, on every rank or none: it allocates the most, and changes nothing if that fails.
    dispatch_.collective(Layer::kName, [&] { experts_.grow(table_rows(), spex::detail::table_rows(grown), table_rng, dispatch_.rows()); });
    retrieval_.grow(n_new, key_rng.next_u64());
    dispatch_.set_experts(spex::detail::table_rows(grown), Layer::kName);
    cfg_ = grown;
    storage_replaced();
  }

  /// Bytes of the expert tables as stored.
  std::size_t table_bytes() const { return experts_.table_bytes(); }
  /// The compact expert tables by name (prefix + "experts.down", ...); none while native.
  CompactTableList compact_tables(const std::string& prefix = "") { return experts_.compact_tables(prefix + "experts."); }
  ConstCompactTableList compact_tables(const std::string& prefix = "") const { return experts_.compact_tables(prefix + "experts."); }

  /// Training forward: y (B x d_out) from x (B x d_in); fills `cache` for backward. Updates
  /// BatchNorm's running statistics, only once the whole pass has succeeded (a pass that
  /// throws changes nothing in the layer). y may be x itself (same matrix), no other overlap.
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c) {
    c.retrieval.norm.mask.clear();
    forward_impl(x, y, c);
  }
  /// Training forward of a padded batch: `mask` (one flag per row of x) is true for the real
  /// tokens. BatchNorm's statistics (the batch's, and the running ones it updates) are the real
  /// tokens' only; padded rows are normalized with them and get an output, and backward takes
  /// their dy as zero (they train nothing and pass no dx). For causal models prefer
  /// norm = NormKind::layer, which couples no tokens at all (docs/peer.md, "The query norm").
  void forward(CMatRef<T> x, MatRef<T> y, Cache& c, CTokenMaskRef mask) {
    SPEX_CHECK(mask.size() == x.rows(), Layer::kName << "::forward: the token mask has " << mask.size() << " entries, x has "
                                                     << x.rows() << " rows");
    c.retrieval.norm.mask.assign(mask.data(), mask.data() + mask.size());
    forward_impl(x, y, c);
  }

  /// Inference forward with eval-mode norm; const and thread-safe with one cache per thread.
  /// A cache it fills cannot be used for backward.
  void infer(CMatRef<T> x, MatRef<T> y, Cache& c) const {
    c.pass.invalidate();
    run(x, y, c, false);
    c.pass.set(id_, PassTag::inference, x.rows());
  }

  /// Inference forward with a cache of its own (allocates on every call).
  void infer(CMatRef<T> x, MatRef<T> y) const {
    Cache c;
    infer(x, y, c);
  }

  /// From dy (B x d_out) after forward(x, y, c) on this layer: grads accumulate (dense for
  /// the query network, norm and sub-keys; row-sparse for the expert tables, only the rows
  /// retrieved in this batch); dx (B x d_in) is assigned. dx may be dy itself.
  void backward(CMatRef<T> dy, MatRef<T> dx, Cache& c, Grads& g) const { backward_impl(dy, &dx, c, g); }
  /// The same without the input gradient.
  void backward(CMatRef<T> dy, Cache& c, Grads& g) const { backward_impl(dy, nullptr, c, g); }

  /// Every parameter, named prefix + "input_norm.gamma" (with input_rmsnorm), "query.weight", "norm.weight", "norm.bias",
  /// "norm.running_mean", "norm.running_var" (buffers, no gradient), "keys.c1", "keys.c2"
  /// (or "keys.h<head>.c1" ... with per-head keys), then the experts' tables, paired with
  /// their gradients in `g`. Compact expert tables are not parameters of T: a compact layer
  /// lists its retrieval here and its tables in compact_tables().
  ParameterList<T> parameters(Grads& g, const std::string& prefix = "") {
    check_grads(g);
    return list(&g, prefix);
  }
  /// Writable values without gradients (loading weights).
  ParameterList<T> parameters(const std::string& prefix = "") { return list(nullptr, prefix); }
  /// Read-only values (saving weights from a const layer).
  ParameterList<const T> parameters(const std::string& prefix = "") const {
    // Retrieval's list only takes addresses; the experts' const list never copies a mapped table.
    auto& self = const_cast<ProductKeyLayer&>(*this);
    ParameterList<const T> out = read_only(prefixed(self.input_norm_.parameters(nullptr, "input_norm."), prefix));
    append_parameters(out, read_only(prefixed(self.retrieval_.parameters(nullptr), prefix)));
    append_parameters(out, experts_.parameters("experts."), prefix);
    append_parameters(out, read_only(prefixed(self.head_.parameters(nullptr, "output."), prefix)));
    return stamped(std::move(out), epoch_);
  }

  /// Throws unless `g` was made by a layer of this one's shapes.
  void check_grads(const Grads& g) const {
    retrieval_.check_grads(g.retrieval, "grads");
    input_norm_.check_grads(g.input_norm, "grads");
    head_.check_grads(g.head, "grads");
    experts_.check_grads(g.experts, "grads");
    SPEX_CHECK(g.experts.frozen_rows() == frozen_rows(),
               "grads were made for " << g.experts.frozen_rows() << " frozen expert rows, the layer has " << frozen_rows()
                                      << ": make_grads() again after freezing");
  }

 protected:
  /// Validates cfg (on every rank), checks that every rank has the same config and seed, and
  /// draws from `seed` the retrieval, then the Layer's experts (Layer::draw_experts: the rows
  /// dispatch_.rows() of the tables, or compact tables) from the same generator.
  ProductKeyLayer(const Config& cfg, std::uint64_t seed, Dispatch dispatch) : dispatch_(std::move(dispatch)) {
    Rng rng(seed);
    construct(cfg, rng, seed);
    experts_ = Layer::draw_experts(cfg_, rng, dispatch_.rows());
    draw_head(rng);
  }
  /// The experts made by `make_experts(resolved config, dispatch_.rows())` instead of drawn (a
  /// Pkm reading a value pool; a throw there throws on every rank); the rest drawn from `seed`
  /// as above.
  template <class MakeExperts>
  ProductKeyLayer(const Config& cfg, std::uint64_t seed, Dispatch dispatch, MakeExperts make_experts) : dispatch_(std::move(dispatch)) {
    Rng rng(seed);
    construct(cfg, rng, seed);
    dispatch_.collective(Layer::kName, [&] { experts_ = make_experts(cfg_, dispatch_.rows()); });
    draw_head(rng);
  }
  /// The tables allocated, not filled (loaders: io/layers.hpp); the retrieval drawn from seed 0.
  ProductKeyLayer(const Config& cfg, Unfilled) {
    static_assert(!Dispatch::kSharded, "sharded layers load through dist::ShardedCheckpointLoader");
    Rng rng(0);
    construct(cfg, rng, 0);
    experts_ = Layer::unfilled_experts(cfg_);
    draw_head(rng);
  }

  /// The output head, drawn after everything else (a layer without one draws what it always did).
  void draw_head(Rng& rng) {
    if (cfg_.silu_output || cfg_.sigmoid_gate)
      head_ = GatedOutput<T>(cfg_.d_in, cfg_.d_value, cfg_.d_out, cfg_.silu_output, cfg_.sigmoid_gate, rng);
  }

  void construct(const Config& cfg, Rng& rng, std::uint64_t seed) {
    dispatch_.collective(Layer::kName, [&] {
      cfg_ = resolve(cfg);
      Layer::check_config(cfg_);
      SPEX_CHECK(!Dispatch::kSharded || cfg_.storage == TableStorage::native,
                 Layer::kName << ": storage " << to_string(cfg_.storage) << " is for inference in one process; shards are native");
      dispatch_.set_experts(spex::detail::table_rows(cfg_), Layer::kName);
    });
    dispatch_.check_same(Layer::kName, {cfg_.n_experts, cfg_.d_in, cfg_.d_out, cfg_.heads, cfg_.top_k, cfg_.d_key, int(cfg_.norm), cfg_.norm_per_half,
                                        int(cfg_.score), cfg_.learn_keys, cfg_.shared_keys, cfg_.frozen.keys, cfg_.input_rmsnorm,
                                        cfg_.per_head_tables, cfg_.glu, cfg_.silu_output, cfg_.sigmoid_gate, cfg_.d_value,
                                        std::int64_t(seed)});
    input_norm_ = RmsNorm<T>(cfg_.input_rmsnorm ? cfg_.d_in : 0);
    retrieval_ = KeyRetrieval<T, Arch>(retrieval_config(cfg_), rng);
    retrieval_.norm().set_batch_reduction(dispatch_.batch_reduction());
  }

  void forward_impl(CMatRef<T> x, MatRef<T> y, Cache& c) {
    c.pass.invalidate();
    run(x, y, c, true);
    retrieval_.commit_running_stats(c.retrieval);
    c.pass.set(id_, PassTag::training, x.rows());
  }

  void backward_impl(CMatRef<T> dy_in, MatRef<T>* dx, Cache& c, Grads& g) const {
    std::optional<CMatRef<T>> checked;
    dispatch_.collective(Layer::kName, [&] {
      require_native("backward");
      checked.emplace(checked_backward_dy(c.pass, id_, Layer::kName, dy_in, cfg_.d_in, cfg_.d_out, cfg_.check_finite, dx, c.dy_copy));
      check_grads(g);
    });
    const std::vector<unsigned char>& mask = c.retrieval.norm.mask;
    if (!mask.empty()) {  // a masked forward: the padded tokens' dy is zero
      if (checked->data() != c.dy_copy.data()) c.dy_copy = *checked;
      for (Index t = 0; t < c.dy_copy.rows(); ++t)
        if (!mask[static_cast<std::size_t>(t)]) c.dy_copy.row(t).setZero();
      checked.emplace(c.dy_copy);
    }
    const CMatRef<T>& dy = *checked;
    c.dgates.resize(dy.rows(), retrieval_.per_token());
    // With the input norm, the paths below give the gradient of the normalized input; its
    // gain's gradient needs it even when the caller wants no dx.
    const bool norm_grads = input_norm_.enabled() && !cfg_.frozen.query;
    std::optional<MatRef<T>> scratch;
    if (!dx && norm_grads) {
      c.dx_normalized.resize(dy.rows(), cfg_.d_in);
      scratch.emplace(c.dx_normalized);
    }
    MatRef<T>* dxn = dx ? dx : scratch ? &*scratch : nullptr;
    ReplicatedGrads& rg = dispatch_.replicated_grads(c.dispatch, static_cast<ReplicatedGrads&>(g));
    // The output head first: it turns dy into the gradient of the experts' output m.
    std::optional<CMatRef<T>> dm;
    if (head_.enabled()) {
      c.dmemory.resize(dy.rows(), cfg_.d_value);
      std::optional<MatRef<T>> head_dx;
      if (dxn) {
        c.dx_head.setZero(dy.rows(), cfg_.d_in);
        head_dx.emplace(c.dx_head);
      }
      head_.backward(c.x, c.memory, dy, c.dmemory, head_dx ? &*head_dx : nullptr, c.head, cfg_.frozen.query ? nullptr : &rg.head);
      dm.emplace(c.dmemory);
    }
    const CMatRef<T>& dexperts = dm ? *dm : dy;
    if constexpr (Dispatch::kSharded) {
      dispatch_.product_key_backward(experts_, dexperts, c.dispatch, MatRef<T>(c.dgates), dxn, g.experts, c.experts);
    } else {
      if (dxn) dxn->setZero();
      self().experts_backward(dexperts, c, dxn, g);
    }
    if (head_.enabled() && dxn) *dxn += c.dx_head;
    retrieval_.backward(c.x, c.dgates, c.retrieval, rg.retrieval, dxn);
    if (input_norm_.enabled() && dxn) input_norm_.backward(c.x_raw, *dxn, *dxn, c.input_norm, norm_grads ? &rg.input_norm : nullptr);
    dispatch_.sum_replicated(c.dispatch, static_cast<ReplicatedGrads&>(g));
  }

  /// The forward pass; changes nothing in the layer (forward() commits the norm's statistics).
  /// Training keeps x in the cache for backward (before y, which may be x, overwrites it); the
  /// input norm writes the normalized input there in either mode.
  void run(CMatRef<T> x_in, MatRef<T> y, Cache& c, bool training) const {
    const bool own_copy = training || input_norm_.enabled();
    dispatch_.collective(Layer::kName, [&] {
      if (training) require_native("forward");
      check_input(x_in, y);
      if (input_norm_.enabled()) {
        if (training) c.x_raw = x_in;
        c.x.resize(x_in.rows(), cfg_.d_in);
        input_norm_.forward(training ? CMatRef<T>(c.x_raw) : x_in, c.x, c.input_norm);
      } else if (training) {
        c.x = x_in;
      }
      retrieval_.project(own_copy ? CMatRef<T>(c.x) : x_in, c.retrieval);
    });
    // A sharded BatchNorm's sums are collective, and it throws on every rank or none.
    dispatch_.collective(Layer::kName, [&] {
      retrieval_.forward_projected(c.retrieval, training);
      if (cfg_.per_head_tables) head_rows(c);
    });
    const CMatRef<T> x = own_copy ? CMatRef<T>(c.x) : x_in;
    if (head_.enabled()) {
      c.memory.resize(x.rows(), cfg_.d_value);
      run_experts(x, c, c.memory);
      dispatch_.collective(Layer::kName, [&] { head_.forward(x, c.memory, y, c.head); });
    } else {
      run_experts(x, c, y);
    }
    dispatch_.collective(Layer::kName, [&] {
      if (cfg_.check_finite) check_output_finite(y, Layer::kName);
    });
  }

  /// The picked experts' outputs into y (assigned), in this process or on their owners.
  void run_experts(CMatRef<T> x, Cache& c, MatRef<T> y) const {
    if constexpr (Dispatch::kSharded) dispatch_.product_key_forward(experts_, x, expert_rows(c), CMatRef<T>(c.retrieval.gates), c.dispatch, y);
    else self().experts_forward(x, c, y);
  }

  /// Tables per expert id: heads with per-head tables, else 1.
  Index table_sets() const { return cfg_.per_head_tables ? cfg_.heads : 1; }
  /// The table row of every pick (B x h*k): the retrieved ids, or with per-head tables
  /// id * heads + head (Cache::rows, filled by run()).
  CIndexMatRef expert_rows(const Cache& c) const { return cfg_.per_head_tables ? CIndexMatRef(c.rows) : CIndexMatRef(c.retrieval.ids); }
  void head_rows(Cache& c) const {
    const Index b = c.retrieval.ids.rows(), k = cfg_.top_k, heads = cfg_.heads;
    c.rows.resize(b, heads * k);
    for (Index t = 0; t < b; ++t)
      for (Index j = 0; j < heads * k; ++j) c.rows(t, j) = c.retrieval.ids(t, j) * heads + j / k;
  }

  ParameterList<T> list(Grads* g, const std::string& prefix) {
    ParameterList<T> out = prefixed(input_norm_.parameters(g && !cfg_.frozen.query ? &g->input_norm : nullptr, "input_norm."), prefix);
    append_parameters(out, prefixed(retrieval_.parameters(g ? &g->retrieval : nullptr), prefix));
    append_parameters(out, experts_.parameters("experts.", g ? &g->experts : nullptr), prefix);
    append_parameters(out, prefixed(head_.parameters(g && !cfg_.frozen.query ? &g->head : nullptr, "output."), prefix));
    return stamped(std::move(out), epoch_, g ? &g->epoch : nullptr);
  }

  // grow, freeze and set_storage: every parameter list and cache taken before is stale
  // (core/parameter.hpp, Lifetime; a cache is refused by backward as another layer's).
  void storage_replaced() {
    epoch_.advance();
    id_ = LayerId();
  }

  void require_native(const char* what) const {
    SPEX_CHECK(cfg_.storage == TableStorage::native,
               Layer::kName << "::" << what << ": the expert tables are stored as " << to_string(cfg_.storage)
                            << " (inference only); training needs them as T: set_storage(TableStorage::native)");
  }

  void check_input(const CMatRef<T>& x, const MatRef<T>& y) const {
    check_forward_args(x, y, cfg_.d_in, cfg_.d_out, cfg_.check_finite, Layer::kName);
  }

  const Layer& self() const { return static_cast<const Layer&>(*this); }
  Layer& self() { return static_cast<Layer&>(*this); }

  Dispatch dispatch_;
  Config cfg_;
  RmsNorm<T> input_norm_;
  GatedOutput<T> head_;
  KeyRetrieval<T, Arch> retrieval_;
  Experts experts_;
  LayerId id_;
  StorageEpoch epoch_;  // advanced when the storage lists point into is replaced
};

}  // namespace detail
}  // namespace spex
