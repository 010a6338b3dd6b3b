// Compact expert tables (core/compact_table.hpp): the conversions against io's exact ones and
// the quantization bound, and Peer/Pkm storing their tables as bf16 or int8: the same retrieved
// ids, the outputs of a float layer holding the compact values, the accuracy goals on random
// tables, and training refused.
#include <cmath>
#include <cstring>

#include <spex/io/dtype.hpp>
#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>
#include <spex/optim/adam.hpp>

#include "io_util.hpp"
#include "test_util.hpp"

using namespace spex;

namespace {

ProductKeyLayerConfig compact_config(TableStorage s = TableStorage::native) {
  ProductKeyLayerConfig c;
  c.d_in = 48;
  c.n_keys = 24;
  c.heads = 3;
  c.top_k = 5;
  c.d_key = 16;
  c.storage = s;
  return c;
}

RowMat<float> batch(Index d, std::uint64_t seed, Index rows = 40) { return spex_test::randn_mat(rows, d, seed).cast<float>(); }

template <class L>
RowMat<float> infer(const L& layer, const RowMat<float>& x, typename L::Cache& c) {
  RowMat<float> y(x.rows(), layer.d_out());
  layer.infer(x, y, c);
  return y;
}

/// Every row of the compact table equals the float row rounded (bf16) or quantized (int8).
// `native`: the float rows (an Eigen row-major map, rows possibly apart in memory).
template <class M>
void check_rows_are_compact_of(const CompactTable& t, const M& native) {
  std::vector<float> row(static_cast<std::size_t>(t.cols()));
  CompactTable one(t.storage(), 1, t.cols());
  std::vector<float> expect(row.size());
  for (Index r = 0; r < t.rows(); ++r) {
    t.get_row(r, row.data());
    one.set_rows(0, 1, &native(r, 0));
    one.get_row(0, expect.data());
    REQUIRE(std::memcmp(row.data(), expect.data(), sizeof(float) * row.size()) == 0);
  }
}

}  // namespace

TEST_CASE("float_to_bf16 rounds as io's exact double-based conversion does", "[compact]") {
  Rng rng(1);
  std::vector<float> values = {0.f, -0.f, 1.f, -1.f, 3.0e38f, -3.4e38f, 1e-40f, -1e-45f, 1.00390625f, 1.01171875f,
                               std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min()};
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t bits = static_cast<std::uint32_t>(rng.next_u64());
    float f;
    std::memcpy(&f, &bits, sizeof f);
    values.push_back(f);
  }
  int nan = 0;
  for (float f : values) {
    const std::uint16_t b = kernels::scalar::float_to_bf16(f);
    if (std::isnan(f)) {
      ++nan;
      REQUIRE(std::isnan(kernels::scalar::bf16_to_float(b)));
      continue;
    }
    REQUIRE(b == to_bf16(double(f)));
  }
  CHECK(nan > 0);  // random bit patterns include NaNs
}

TEST_CASE("quantize_row_i8: scale = max|x| / 127, every value within half a step", "[compact]") {
  for (std::size_t d : {std::size_t(1), std::size_t(7), std::size_t(64), std::size_t(513)}) {
    const auto x = spex_test::randn<float>(d, 3 + d);
    std::vector<std::int8_t> q(d);
    const float s = kernels::scalar::quantize_row_i8(x.data(), d, q.data());
    float absmax = 0;
    for (float v : x) absmax = std::max(absmax, std::fabs(v));
    CHECK(s == absmax / 127.f);
    int top = 0;
    for (std::size_t i = 0; i < d; ++i) {
      REQUIRE(std::fabs(x[i] - s * float(q[i])) <= 0.5f * s * (1 + 1e-6f));
      top = std::max(top, std::abs(int(q[i])));
    }
    CHECK(top == 127);
  }
  std::vector<float> zeros(9, 0.f);
  std::vector<std::int8_t> q(9, 5);
  CHECK(kernels::scalar::quantize_row_i8(zeros.data(), 9, q.data()) == 0.f);
  CHECK(std::all_of(q.begin(), q.end(), [](std::int8_t v) { return v == 0; }));
}

TEST_CASE("CompactTable: rows in and out, non-finite rows named, views copied before writing", "[compact]") {
  for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
    const auto v = spex_test::randn<float>(5 * 7, 11);
    CompactTable t(s, 5, 7);
    t.set_rows(0, 5, v.data());
    CHECK(t.bytes() == (s == TableStorage::bf16 ? 5u * 7 * 2 : 5u * (7 + 4)));
    std::vector<float> row(7);
    for (Index r = 0; r < 5; ++r) {
      t.get_row(r, row.data());
      for (int i = 0; i < 7; ++i) CHECK(std::fabs(row[i] - v[r * 7 + i]) <= 0.01 * std::fabs(v[r * 7 + i]) + (s == TableStorage::int8 ? 0.02 : 0));
    }
    std::vector<float> bad(v.begin(), v.begin() + 14);
    bad[9] = std::nanf("");
    CHECK_THROWS_WITH(t.set_rows(2, 2, bad.data(), "experts.up"), Catch::Contains("experts.up: row 3") && Catch::Contains("column 2"));
    CHECK_THROWS_WITH(t.set_rows(4, 2, v.data()), Catch::Contains("on 5 rows"));
    CHECK_THROWS_WITH(t.get_row(5, row.data()), Catch::Contains("get_row(5)"));
    CHECK_THROWS_AS(s == TableStorage::bf16 ? (void)t.i8() : (void)t.bf16(), Error);
    // A view reads someone else's memory; writing copies it first and leaves that memory alone.
    CompactTable src(s, 5, 7);
    src.set_rows(0, 5, v.data());
    auto owner = std::make_shared<CompactTable>(src);
    const void* rows = s == TableStorage::bf16 ? static_cast<const void*>(owner->bf16()) : owner->i8();
    CompactTable view(s, 5, 7);
    view.adopt_view(rows, s == TableStorage::int8 ? owner->scales() : nullptr, owner);
    CHECK(view.is_view());
    view.set_rows(0, 1, v.data() + 7);  // row 0 := row 1
    CHECK_FALSE(view.is_view());
    std::vector<float> a(7), b(7);
    view.get_row(0, a.data());
    src.get_row(1, b.data());
    CHECK(a == b);
    owner->get_row(0, a.data());
    src.get_row(0, b.data());
    CHECK(a == b);
  }
  CHECK_THROWS_WITH(CompactTable(TableStorage::native, 2, 2), Catch::Contains("not native"));
  CHECK_THROWS_WITH(CompactTable(TableStorage::bf16, 0, 2), Catch::Contains("positive"));
}

TEST_CASE("Table::side_by_side: one allocation, rows ld apart, and its copies, views and moves", "[compact]") {
  std::vector<Table<double>> t = Table<double>::side_by_side(5, {3, 2});
  REQUIRE(t.size() == 2);
  CHECK(t[0].ld() == 5);
  CHECK(t[1].ld() == 5);
  CHECK(t[1].data() == t[0].data() + 3);  // row r of table 1 follows row r of table 0
  for (Index r = 0; r < 5; ++r) {
    for (Index c = 0; c < 3; ++c) t[0].mutable_matrix()(r, c) = 10.0 * r + c;
    for (Index c = 0; c < 2; ++c) t[1].mutable_matrix()(r, c) = -10.0 * r - c;
  }
  CHECK(t[0].data()[5] == 10.0);  // row 1, column 0, one ld on
  CHECK(t[0].data()[3] == -0.0);  // table 1's row 0 between table 0's rows 0 and 1
  CHECK(t[0].data()[4] == -1.0);
  // A copy has rows of its own, contiguous; a grown table too.
  const Table<double> copy = t[1];
  CHECK(copy.ld() == 2);
  CHECK(RowMat<double>(copy.matrix()) == RowMat<double>(t[1].matrix()));
  const Table<double> grown = t[0].grown(7);
  CHECK(grown.ld() == 3);
  CHECK(RowMat<double>(grown.matrix().topRows(5)) == RowMat<double>(t[0].matrix()));
  // A view reads its memory contiguous; table 1 keeps the shared allocation alive.
  auto file = std::make_shared<std::vector<double>>(15, 1.5);
  t[0].adopt_view(file->data(), 5, 3, file);
  CHECK(t[0].ld() == 3);
  CHECK(t[1].matrix()(4, 1) == -41.0);
  CHECK(t[0].mutable_data() != file->data());  // written: an owned, contiguous copy
  CHECK(t[0].ld() == 3);
  CHECK(RowMat<double>(t[0].matrix()) == RowMat<double>::Constant(5, 3, 1.5));
  // A move leaves the source empty.
  Table<double> moved = std::move(t[1]);
  CHECK(moved.matrix()(2, 0) == -20.0);
  CHECK(t[1].rows() == 0);
  CHECK(t[1].data() == nullptr);
  CHECK_THROWS_WITH(Table<double>::side_by_side(2, {3, 0}), Catch::Contains("columns 0"));
  // A table's rows fill through its map (a temporary), the rows of the table beside untouched.
  std::vector<Table<double>> u = Table<double>::side_by_side(4, {2, 3});
  u[1].mutable_matrix().setConstant(9.0);
  Rng rng(3);
  fill_normal(u[0].mutable_matrix(), 1.0, rng);
  CHECK(RowMat<double>(u[1].matrix()) == RowMat<double>::Constant(4, 3, 9.0));
  CHECK(u[0].matrix()(3, 1) != 9.0);
}

TEST_CASE("CompactTable::side_by_side: rows of each table its own, read by the gathers as tables apart", "[compact]") {
  for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
    INFO(to_string(s));
    const Index n = 9;
    const auto va = spex_test::randn<float>(n * 7, 21), vb = spex_test::randn<float>(n * 5, 22), vc = spex_test::randn<float>(n * 7, 25);
    std::vector<CompactTable> t = CompactTable::side_by_side(s, n, {7, 5});
    REQUIRE(t.size() == 2);
    CHECK(t[0].ld() == 12);
    CHECK(t[1].ld() == 12);
    CHECK(t[1].cols() == 5);
    CHECK(t[0].bytes() + t[1].bytes() == CompactTable(s, n, 12).bytes() + (s == TableStorage::int8 ? 4u * n : 0u));
    t[0].set_rows(0, n, va.data());
    t[1].set_rows(0, n, vb.data());
    CompactTable a(s, n, 7), b(s, n, 5);  // the same values, tables apart
    a.set_rows(0, n, va.data());
    b.set_rows(0, n, vb.data());
    CHECK(a.ld() == 7);
    auto same_rows = [](const CompactTable& x, const CompactTable& y) {
      std::vector<float> rx(static_cast<std::size_t>(x.cols())), ry(rx.size());
      for (Index r = 0; r < x.rows(); ++r) {
        x.get_row(r, rx.data());
        y.get_row(r, ry.data());
        if (rx != ry) return false;
      }
      return true;
    };
    CHECK(same_rows(t[0], a));
    CHECK(same_rows(t[1], b));
    CHECK(spex_test::compact_bytes(t[1]) == spex_test::compact_bytes(b));
    // The gathers read the rows at ld(): the same bits as over the tables apart.
    const std::vector<Index> ids{8, 0, 3, 3, 5, 1, 7, 2, 6, 4, 8, 1};
    const auto x7 = spex_test::randn<float>(7, 23), alpha = spex_test::randn<float>(ids.size(), 24);
    std::vector<float> dot_side(ids.size()), dot_apart(ids.size()), y_side(5, 0.5f), y_apart(5, 0.5f);
    gather_dot(t[0], ids.data(), ids.size(), x7.data(), dot_side.data());
    gather_dot(a, ids.data(), ids.size(), x7.data(), dot_apart.data());
    CHECK(dot_side == dot_apart);
    gather_axpy(t[1], ids.data(), alpha.data(), ids.size(), y_side.data());
    gather_axpy(b, ids.data(), alpha.data(), ids.size(), y_apart.data());
    CHECK(y_side == y_apart);
    // Writing one table leaves the rows beside it alone.
    t[0].set_rows(0, n, vc.data());
    CHECK_FALSE(same_rows(t[0], a));
    CHECK(same_rows(t[1], b));
    // A copy is a table of its own; copy_side_by_side keeps tables side by side, bit for bit.
    CompactTable c = t[1];
    CHECK(c.ld() == 5);
    CHECK(same_rows(c, b));
    std::vector<CompactTable> again = copy_side_by_side({&a, &b});
    CHECK(again[0].ld() == 12);
    CHECK(spex_test::compact_bytes(again[0]) == spex_test::compact_bytes(a));
    CHECK(spex_test::compact_bytes(again[1]) == spex_test::compact_bytes(b));
    t[1].set_rows(0, n, vc.data());
    CHECK(same_rows(c, b));
    // A view reads its rows contiguous; the table beside it keeps its own.
    auto owner = std::make_shared<CompactTable>(b);
    t[1].adopt_view(s == TableStorage::bf16 ? static_cast<const void*>(owner->bf16()) : owner->i8(),
                    s == TableStorage::int8 ? owner->scales() : nullptr, owner);
    CHECK(t[1].ld() == 5);
    CHECK(same_rows(t[1], b));
    CHECK(t[0].ld() == 12);
    t[0].set_rows(0, n, va.data());
    CHECK(same_rows(t[0], a));
    CHECK_THROWS_WITH(CompactTable::side_by_side(s, n, {}), Catch::Contains("at least one table"));
    CHECK_THROWS_WITH(CompactTable::side_by_side(s, n, {3, 0}), Catch::Contains("columns 0"));
    CompactTable shorter(s, n - 1, 7);
    CHECK_THROWS_WITH(copy_side_by_side({&a, &shorter}), Catch::Contains("one storage and one number of rows"));
  }
  CHECK_THROWS_WITH(CompactTable::side_by_side(TableStorage::native, 2, {2, 2}), Catch::Contains("not native"));
  CompactTable small(TableStorage::int8, 3, 4), other(TableStorage::bf16, 3, 4);
  CHECK_THROWS_WITH(copy_side_by_side({&small, &other}), Catch::Contains("one storage and one number of rows"));
}

TEST_CASE("compact Peer: u and v rows side by side, kept by copies, the same output as tables apart", "[compact]") {
  for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
    for (bool glu : {false, true}) {
      INFO(to_string(s) << (glu ? " GLU" : ""));
      ProductKeyLayerConfig cfg = compact_config();
      cfg.glu = glu;
      Peer<float> native(cfg, 5);
      cfg.storage = s;
      Peer<float> built(cfg, 5);
      Peer<float> converted = native;
      converted.set_storage(s);
      const Index side = cfg.d_in * (glu ? 2 : 1) + built.d_out();
      for (const Peer<float>* p : {&built, &converted}) {
        CHECK(p->experts().compact_down().ld() == side);
        CHECK(p->experts().compact_up().ld() == side);
        if (glu) CHECK(p->experts().compact_down_linear().ld() == side);
      }
      // The up table's rows follow the down table's (and GLU's linear ones) in one allocation.
      const std::size_t es = s == TableStorage::bf16 ? 2 : 1;
      const auto* down = reinterpret_cast<const unsigned char*>(s == TableStorage::bf16 ? static_cast<const void*>(built.experts().compact_down().bf16())
                                                                                       : built.experts().compact_down().i8());
      const auto* up = reinterpret_cast<const unsigned char*>(s == TableStorage::bf16 ? static_cast<const void*>(built.experts().compact_up().bf16())
                                                                                     : built.experts().compact_up().i8());
      CHECK(up == down + es * std::size_t(cfg.d_in * (glu ? 2 : 1)));
      const RowMat<float> x = batch(48, 9);
      Peer<float>::Cache c;
      const RowMat<float> y = infer(built, x, c);
      CHECK(infer(converted, x, c) == y);
      Peer<float> copy = built;
      CHECK(copy.experts().compact_up().ld() == side);
      auto rows_at = [s](const CompactTable& t) { return s == TableStorage::bf16 ? static_cast<const void*>(t.bf16()) : static_cast<const void*>(t.i8()); };
      CHECK(rows_at(copy.experts().compact_up()) != rows_at(built.experts().compact_up()));  // its own allocation
      CHECK(infer(copy, x, c) == y);
      // The same tables apart (copies of their own): the same bits.
      for (auto& [name, t] : copy.compact_tables()) *t = CompactTable(*t);
      CHECK(copy.experts().compact_up().ld() == built.d_out());
      CHECK(infer(copy, x, c) == y);
    }
  }
}

TEST_CASE("native Peer: u, w and v rows side by side, kept by copies, growth and conversion, trained as tables apart", "[compact]") {
  for (bool glu : {false, true}) {
    INFO((glu ? "GLU" : "plain"));
    ProductKeyLayerConfig cfg = compact_config();
    cfg.glu = glu;
    cfg.expert_ids = ExpertIds::shells;
    Peer<float> built(cfg, 5);
    const Index side = cfg.d_in * (glu ? 2 : 1) + built.d_out();
    auto check_layout = [&](const Peer<float>& p) {
      const auto& e = p.experts();
      CHECK(e.down_table().ld() == side);
      CHECK(e.up_table().ld() == side);
      CHECK(e.up().data() == e.down().data() + cfg.d_in * (glu ? 2 : 1));  // expert i's v row follows its u (and w) row
      if (glu) CHECK(e.down_linear().data() == e.down().data() + cfg.d_in);
    };
    check_layout(built);
    const RowMat<float> x = batch(cfg.d_in, 9);
    Peer<float>::Cache c;
    const RowMat<float> y = infer(built, x, c);
    // A copy: its own allocation, side by side, the same values.
    Peer<float> copy = built;
    check_layout(copy);
    CHECK(copy.experts().down().data() != built.experts().down().data());
    CHECK(infer(copy, x, c) == y);
    // Back from compact storage: side by side again.
    Peer<float> round_trip = built;
    round_trip.set_storage(TableStorage::bf16);
    round_trip.set_storage(TableStorage::native);
    check_layout(round_trip);
    // Grown: the old rows kept, the new ones side by side too.
    Peer<float> grown = built;
    grown.grow(cfg.n_keys + 3, 17);
    check_layout(grown);
    CHECK(RowMat<float>(grown.experts().up().topRows(built.experts().n_experts())) == RowMat<float>(built.experts().up()));
    // The same tables apart (copies of their own): the same output and, trained alike with
    // Adam (row-sparse steps at each table's ld), the same parameters bit for bit.
    Peer<float> apart = built;
    for (auto& p : apart.parameters())
      if (p.table) *p.table = Table<float>(*p.table);
    CHECK(apart.experts().up_table().ld() == built.d_out());
    CHECK(infer(apart, x, c) == y);
    Peer<float> together = built;
    for (Peer<float>* layer : {&together, &apart}) {
      auto g = layer->make_grads();
      const ParameterList<float> params = layer->parameters(g);
      Adam<float> opt(params, AdamConfig{1e-2});
      Peer<float>::Cache tc;
      RowMat<float> out(x.rows(), layer->d_out());
      for (int step = 0; step < 2; ++step) {
        layer->forward(x, out, tc);
        zero_grads(params);
        layer->backward(RowMat<float>(out - x), tc, g);
        opt.step();
      }
    }
    const auto pt = together.parameters(), pa = apart.parameters();
    REQUIRE(pt.size() == pa.size());
    for (std::size_t i = 0; i < pt.size(); ++i) {
      INFO(pt[i].name);
      CHECK(RowMat<float>(pt[i].value_map()) == RowMat<float>(pa[i].value_map()));
    }
    CHECK(RowMat<float>(together.experts().up()) != RowMat<float>(built.experts().up()));  // it trained
  }
}

TEST_CASE("set_storage is all-or-nothing: a value the storage cannot hold leaves every table as it was", "[compact]") {
  Peer<float> layer(compact_config(), 3);
  for (auto& p : layer.parameters())
    if (p.name == "experts.up") p.row(2)[1] = 3.397e38f;  // finite; above the midpoint of bfloat16's largest value and infinity
  const RowMat<float> down = layer.experts().down().matrix(), up = layer.experts().up().matrix();
  CHECK_THROWS_WITH(layer.set_storage(TableStorage::bf16), Catch::Contains("experts.up: row 2") && Catch::Contains("column 1"));
  CHECK(layer.storage() == TableStorage::native);
  CHECK(layer.experts().down().matrix() == down);
  CHECK(layer.experts().up().matrix() == up);
  layer.set_storage(TableStorage::int8);  // int8 holds it (scaled)
  CHECK(layer.storage() == TableStorage::int8);
  CHECK(layer.experts().compact_up().ld() == 48 + layer.d_out());
}

TEST_CASE("compact Peer and Pkm: same ids, the outputs of float tables holding the compact values", "[compact]") {
  for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
    for (int kind = 0; kind < 2; ++kind) {
      INFO(to_string(s) << (kind ? " Pkm" : " Peer"));
      const RowMat<float> x = batch(48, 7);
      RowMat<float> y_native, y_compact, y_dequant;
      IndexMat ids_native, ids_compact;
      auto run = [&](auto& native, auto& built_compact) {
        typename std::decay_t<decltype(native)>::Cache c1, c2, c3;
        y_native = infer(native, x, c1);
        ids_native = c1.retrieval.ids;
        // Constructed compact: the native layer's draws, rounded or quantized.
        if constexpr (std::is_same<std::decay_t<decltype(native)>, Peer<float>>::value) {
          check_rows_are_compact_of(built_compact.experts().compact_down(), native.experts().down());
          check_rows_are_compact_of(built_compact.experts().compact_up(), native.experts().up());
        } else {
          check_rows_are_compact_of(built_compact.experts().compact_values(), native.experts().values());
        }
        auto converted = native;
        converted.set_storage(s);
        y_compact = infer(converted, x, c2);
        ids_compact = c2.retrieval.ids;
        CHECK(infer(built_compact, x, c2) == y_compact);
        CHECK(converted.table_bytes() < native.table_bytes() / (s == TableStorage::bf16 ? 1.9 : 3.0));
        // Back to native: float tables holding exactly the compact values compute the same output.
        converted.set_storage(TableStorage::native);
        y_dequant = infer(converted, x, c3);
      };
      if (kind == 0) {
        Peer<float> native(compact_config(), 5), compact(compact_config(s), 5);
        run(native, compact);
      } else {
        Pkm<float> native(compact_config(), 5), compact(compact_config(s), 5);
        run(native, compact);
      }
      CHECK(ids_compact == ids_native);  // retrieval is untouched
      const double scale = y_dequant.norm() / std::sqrt(double(y_dequant.size()));
      CHECK((y_compact - y_dequant).cwiseAbs().maxCoeff() <= 1e-5 * scale);
      CHECK((y_compact - y_native).norm() > 0);
    }
  }
}

TEST_CASE("compact tables on random tables: output error within the documented goals", "[compact]") {
  // Goals (docs/files.md, "Compact expert tables"): bf16 <= 1e-2 and int8 <= 3e-2 of the output norm.
  ProductKeyLayerConfig c = compact_config();
  c.d_in = 128;
  c.n_keys = 64;
  c.heads = 4;
  c.top_k = 8;
  const RowMat<float> x = batch(128, 9, 64);
  for (int kind = 0; kind < 2; ++kind) {
    for (TableStorage s : {TableStorage::bf16, TableStorage::int8}) {
      double err = 0;
      if (kind == 0) {
        Peer<float> a(c, 2);
        Peer<float>::Cache cache;
        const RowMat<float> y = infer(a, x, cache);
        a.set_storage(s);
        err = (infer(a, x, cache) - y).norm() / y.norm();
      } else {
        Pkm<float> a(c, 2);
        Pkm<float>::Cache cache;
        const RowMat<float> y = infer(a, x, cache);
        a.set_storage(s);
        err = (infer(a, x, cache) - y).norm() / y.norm();
      }
      INFO(to_string(s) << (kind ? " Pkm" : " Peer") << ": relative error " << err);
      CHECK(err <= (s == TableStorage::bf16 ? 1e-2 : 3e-2));
      CHECK(err > 1e-5);  // the tables did change
    }
  }
}

TEST_CASE("compact tables are for inference: training and T = double are refused", "[compact]") {
  Peer<float> p(compact_config(TableStorage::int8), 1);
  const RowMat<float> x = batch(48, 3, 4);
  RowMat<float> y(4, 48);
  Peer<float>::Cache c;
  CHECK_THROWS_WITH(p.forward(x, y, c), Catch::Contains("Peer::forward") && Catch::Contains("int8"));
  CHECK_THROWS_WITH(p.make_grads(), Catch::Contains("set_storage(TableStorage::native)"));
  CHECK_THROWS_WITH(p.experts().down(), Catch::Contains("stored as int8"));
  CHECK(p.parameters().size() == Peer<float>(compact_config(), 1).parameters().size() - 2);  // no expert tables
  CHECK(p.compact_tables("b.").size() == 2);
  CHECK(p.compact_tables("b.")[0].first == "b.experts.down");
  // A training pass made before conversion cannot be finished on compact tables.
  Peer<float> q(compact_config(), 1);
  auto g = q.make_grads();
  q.forward(x, y, c);
  q.set_storage(TableStorage::bf16);
  CHECK_THROWS_WITH(q.backward(y, c, g), Catch::Contains("bf16"));
  q.set_storage(TableStorage::native);
  CHECK_NOTHROW(q.forward(x, y, c));
  CHECK_THROWS_WITH(Peer<double>(compact_config(TableStorage::bf16), 1), Catch::Contains("T = float"));
  CHECK_THROWS_WITH(Pkm<double>(compact_config(TableStorage::int8), 1), Catch::Contains("T = float"));
  ProductKeyLayerConfig bad = compact_config();
  bad.storage = TableStorage(7);
  CHECK_THROWS_WITH(Peer<float>(bad, 1), Catch::Contains("storage = 7"));
  CHECK_THROWS_WITH(q.set_storage(TableStorage(7)), Catch::Contains("storage = 7"));
  CHECK(q.storage() == TableStorage::native);
}
