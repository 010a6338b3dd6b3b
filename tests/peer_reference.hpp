#pragma once
// A slow, plain reference of PEER and PKM for the tests: it scores all N = n^2 full keys of
// every head explicitly (no product-key shortcut), sorts them, and sums the experts one by
// one. It reads the layer's parameters and shares none of its code paths.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <spex/layers/peer.hpp>
#include <spex/layers/pkm.hpp>

namespace spex_test {

using spex::Index;

struct ReferenceOutput {
  spex::RowMat<double> y;
  spex::IndexMat ids;      // B x h*k
  spex::RowMat<double> gates;
};

inline double ref_act(spex::kernels::Activation a, double x) {
  switch (a) {
    case spex::kernels::Activation::relu: return x > 0 ? x : 0;
    case spex::kernels::Activation::gelu_erf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case spex::kernels::Activation::gelu_tanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case spex::kernels::Activation::silu: return x / (1 + std::exp(-x));
    case spex::kernels::Activation::sigmoid: return 1 / (1 + std::exp(-x));
    case spex::kernels::Activation::identity: return x;
  }
  return x;
}

/// Queries after projection and norm, as the reference computes them.
template <class Layer>
spex::RowMat<double> reference_queries(const Layer& layer, const spex::RowMat<double>& x, bool training) {
  const auto& r = layer.retrieval();
  const auto& cfg = r.config();
  const Index b = x.rows(), f = cfg.heads * cfg.d_key;
  spex::RowMat<double> q(b, f);
  for (Index t = 0; t < b; ++t)
    for (Index o = 0; o < f; ++o) {
      double s = r.query().has_bias() ? double(r.query().bias()(o)) : 0.0;
      for (Index i = 0; i < x.cols(); ++i) s += double(r.query().weight()(o, i)) * x(t, i);
      q(t, o) = s;
    }
  const auto& nm = r.norm();
  const double eps = cfg.norm_eps;
  if (cfg.norm == spex::NormKind::batch) {
    for (Index o = 0; o < f; ++o) {
      double mean = 0, var = 0;
      if (training) {
        for (Index t = 0; t < b; ++t) mean += q(t, o);
        mean /= b;
        for (Index t = 0; t < b; ++t) var += (q(t, o) - mean) * (q(t, o) - mean);
        var /= b;
      } else {
        mean = nm.running_mean()(o);
        var = nm.running_var()(o);
      }
      for (Index t = 0; t < b; ++t) q(t, o) = nm.weight()(o) * (q(t, o) - mean) / std::sqrt(var + eps) + nm.bias()(o);
    }
  } else if (cfg.norm == spex::NormKind::layer) {
    const Index g = cfg.norm_per_half ? cfg.d_key / 2 : cfg.d_key;  // features per LayerNorm group
    for (Index t = 0; t < b; ++t)
      for (Index h = 0; h < f / g; ++h) {
        double mean = 0, var = 0;
        for (Index j = 0; j < g; ++j) mean += q(t, h * g + j);
        mean /= g;
        for (Index j = 0; j < g; ++j) var += std::pow(q(t, h * g + j) - mean, 2);
        var /= g;
        for (Index j = 0; j < g; ++j) {
          const Index o = h * g + j;
          q(t, o) = nm.weight()(o) * (q(t, o) - mean) / std::sqrt(var + eps) + nm.bias()(o);
        }
      }
  }
  return q;
}

/// Retrieval by scoring all N full keys: ids and gates per token, head by head.
template <class Layer>
void reference_retrieval(const Layer& layer, const spex::RowMat<double>& q, spex::IndexMat& ids,
                         spex::RowMat<double>& gates) {
  const auto& r = layer.retrieval();
  const auto& cfg = r.config();
  const Index b = q.rows(), n = cfg.n_keys, big_n = n * n, k = cfg.top_k, half = cfg.d_key / 2;
  ids.resize(b, cfg.heads * k);
  gates.resize(b, cfg.heads * k);
  std::vector<double> score(big_n);
  std::vector<Index> order(big_n);
  for (Index t = 0; t < b; ++t)
    for (Index h = 0; h < cfg.heads; ++h) {
      const auto& c1 = r.keys(h).sub_keys(0);
      const auto& c2 = r.keys(h).sub_keys(1);
      for (Index e = 0; e < big_n; ++e) {
        double s = 0;  // q_head . [c1[e / n]; c2[e % n]], one long dot as exhaustive search does
        for (Index j = 0; j < half; ++j) s += q(t, h * cfg.d_key + j) * double(c1(e / n, j));
        for (Index j = 0; j < half; ++j) s += q(t, h * cfg.d_key + half + j) * double(c2(e % n, j));
        score[e] = s;
      }
      std::iota(order.begin(), order.end(), Index(0));
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index c) { return score[a] > score[c]; });
      double mx = score[order[0]], z = 0;
      for (Index j = 0; j < k; ++j) z += std::exp(score[order[j]] - mx);
      for (Index j = 0; j < k; ++j) {
        const double s = score[order[j]];
        ids(t, h * k + j) = order[j];
        double g = 0;
        switch (cfg.score) {
          case spex::ScoreFn::softmax: g = std::exp(s - mx) / z; break;
          case spex::ScoreFn::sigmoid: g = 1 / (1 + std::exp(-s)); break;
          case spex::ScoreFn::relu: g = s > 0 ? s : 0; break;
        }
        gates(t, h * k + j) = g;
      }
    }
}

/// The layer's input as its query network and experts see it: x, or with input_rmsnorm
/// x / ||x|| * sqrt(d) * (1 + gamma).
template <class Layer>
spex::RowMat<double> reference_input(const Layer& layer, const spex::RowMat<double>& x) {
  if (!layer.config().input_rmsnorm) return x;
  spex::RowMat<double> out(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    double ss = 0;
    for (Index i = 0; i < x.cols(); ++i) ss += x(t, i) * x(t, i);
    const double s = std::sqrt(double(x.cols())) / std::max(std::sqrt(ss), 1e-12);
    for (Index i = 0; i < x.cols(); ++i) out(t, i) = x(t, i) * s * (1 + double(layer.input_norm().gamma()(i)));
  }
  return out;
}

/// The table row of pick j of a token: its id, or with per-head tables id * heads + head.
template <class Layer>
Index reference_row(const Layer& layer, Index id, Index j) {
  const auto& c = layer.config();
  return c.per_head_tables ? id * c.heads + j / c.top_k : id;
}

/// Queries, then retrieval over all keys; y left for the experts.
template <class Layer>
ReferenceOutput reference_retrieve(const Layer& layer, const spex::RowMat<double>& x, bool training) {
  ReferenceOutput out;
  reference_retrieval(layer, reference_queries(layer, reference_input(layer, x), training), out.ids, out.gates);
  return out;
}

template <class T, class Arch>
ReferenceOutput reference_forward(const spex::Peer<T, Arch>& layer, const spex::RowMat<double>& x_in, bool training) {
  ReferenceOutput out = reference_retrieve(layer, x_in, training);
  const spex::RowMat<double> x = reference_input(layer, x_in);
  const auto& ex = layer.experts();
  out.y = spex::RowMat<double>::Zero(x.rows(), ex.d_out());
  for (Index t = 0; t < x.rows(); ++t)
    for (Index j = 0; j < out.ids.cols(); ++j) {
      const Index e = reference_row(layer, out.ids(t, j), j);
      double a = 0, lin = 1;
      for (Index i = 0; i < ex.d_in(); ++i) a += double(ex.down()(e, i)) * x(t, i);
      if (ex.glu()) {
        lin = 0;
        for (Index i = 0; i < ex.d_in(); ++i) lin += double(ex.down_linear()(e, i)) * x(t, i);
      }
      const double c = out.gates(t, j) * ref_act(ex.activation(), a) * lin;
      for (Index o = 0; o < ex.d_out(); ++o) out.y(t, o) += c * double(ex.up()(e, o));
    }
  return out;
}

template <class T, class Arch>
ReferenceOutput reference_forward(const spex::Pkm<T, Arch>& layer, const spex::RowMat<double>& x, bool training) {
  ReferenceOutput out = reference_retrieve(layer, x, training);
  const auto& ex = layer.experts();
  out.y = spex::RowMat<double>::Zero(x.rows(), ex.d_out());
  for (Index t = 0; t < x.rows(); ++t)
    for (Index j = 0; j < out.ids.cols(); ++j)
      for (Index o = 0; o < ex.d_out(); ++o) out.y(t, o) += out.gates(t, j) * double(ex.values()(reference_row(layer, out.ids(t, j), j), o));
  return out;
}

}  // namespace spex_test
