// Loads the layers tools/export_reference.py saved from PyTorch and requires spex's infer(x) to
// equal PyTorch's eval-mode output y (float64, |difference| <= 1e-10 relative to max |y|); for
// Peer, Pkm and TopK MoE also the training forward, the input and parameter gradients of
// sum(y * dy) (+ aux_loss), and for TopK MoE the aux loss and the expert bias update, each to 1e-10.
// Usage: torch_interop DIR (run by tests/torch_interop.sh, which exports DIR first).
#include <cmath>
#include <cstdio>
#include <spex/io/io.hpp>
#include <string>
#include <type_traits>

namespace {

spex::RowMat<double> read_matrix(const spex::SafetensorsFile& f, const std::string& name) {
  const spex::TensorInfo& t = f.at(name);
  if (t.dtype != spex::DType::F64 || t.shape.size() != 2) throw spex::Error(f.path() + ": " + name + " is not an F64 matrix");
  spex::RowMat<double> m(t.shape[0], t.shape[1]);
  spex::convert_from_bytes(f.data(t), t.dtype, m.data(), std::size_t(m.size()));
  return m;
}

/// max |got - want| / max(max |want|, floor). The floor serves gradients that are zero in exact
/// arithmetic (a query bias under training BatchNorm, which removes every constant shift): both
/// sides are then rounding noise of ~1e-16, and 1e-10 of a 1e-4 floor is still an absolute 1e-14.
double relative(const spex::RowMat<double>& got, const spex::RowMat<double>& want, double floor = 1e-300) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) return 1e300;
  return (got - want).cwiseAbs().maxCoeff() / std::max(floor, want.cwiseAbs().maxCoeff());
}

template <class L>
double max_error(const std::string& model, const spex::SafetensorsFile& io) {
  const L layer = spex::load_layer<L>(model);
  const spex::RowMat<double> x = read_matrix(io, "x"), y = read_matrix(io, "y");
  spex::RowMat<double> out(x.rows(), layer.d_out());
  layer.infer(x, out);
  return relative(out, y);
}

/// The largest relative error over the training forward, dx, every parameter gradient, the aux
/// loss and the bias update; `what` names the worst.
template <class L>
double training_error(const std::string& model, const spex::SafetensorsFile& io, std::string& what) {
  L layer = spex::load_layer<L>(model);
  const spex::RowMat<double> x = read_matrix(io, "x"), dy = read_matrix(io, "dy");
  typename L::Cache cache;
  auto grads = layer.make_grads();
  spex::RowMat<double> y(x.rows(), layer.d_out()), dx(x.rows(), layer.d_in());
  layer.forward(x, y, cache);
  layer.backward(dy, dx, cache, grads);
  double worst = -1;
  auto note = [&](double err, const std::string& name) {
    if (err > worst) worst = err, what = name;
  };
  note(relative(y, read_matrix(io, "y_train")), "y_train");
  note(relative(dx, read_matrix(io, "dx")), "dx");
  constexpr bool kMoE = !std::is_same<typename L::Config, spex::ProductKeyLayerConfig>::value;
  if constexpr (kMoE) {
    spex::RowMat<double> aux(1, 1);
    aux(0, 0) = layer.aux_loss(cache);
    note(relative(aux, read_matrix(io, "aux")), "aux");
  }
  int n_grads = 0;
  for (const auto& p : layer.parameters(grads)) {
    if (!p.trainable()) continue;
    const spex::RowMat<double> grad = p.sparse_grad ? p.sparse_grad->to_dense() : spex::RowMat<double>(p.grad_map());
    note(relative(grad, read_matrix(io, "grad." + p.name), 1e-4), "grad." + p.name);
    ++n_grads;
  }
  int torch_grads = 0;
  for (const auto& t : io.tensors()) torch_grads += t.name.rfind("grad.", 0) == 0;
  if (n_grads != torch_grads) note(1e300, "the number of parameter gradients");
  if constexpr (kMoE) {
    if (io.find("load")) {
      const spex::Vec<double> load = layer.expert_load(cache);
      note(relative(load, read_matrix(io, "load")), "load");
      layer.update_expert_bias(load, read_matrix(io, "bias_rate")(0, 0));
      note(relative(layer.router().expert_bias(), read_matrix(io, "bias_next")), "bias after update_expert_bias");
    }
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: torch_interop DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  const char* cases[] = {"peer", "peer_per_head_sigmoid_relu", "peer_no_norm_silu", "pkm", "peer_rmsnorm_per_head_tables",
                         "peer_glu_rmsnorm", "peer_glu_per_head_tables", "pkm_rmsnorm_per_head_tables", "pkm_memory_plus", "pkm_layernorm_halves",
                         "peer_silu_output", "pkm_sigmoid_gate", "remoe_swiglu", "topk_gelu",
                         "topk_renormalized", "topk_softmax_over_k", "topk_deepseek_v3", "topk_qwen2_moe", "topk_sigmoid_groups"};
  int failures = 0;
  for (const char* c : cases) {
    const std::string model = dir + "/" + c + ".safetensors";
    try {
      const spex::SafetensorsFile io(dir + "/" + c + ".io.safetensors");
      const std::string kind = io.metadata().at("kind");
      double err = -1;
      if (kind == "Peer") err = max_error<spex::Peer<double>>(model, io);
      else if (kind == "Pkm") err = max_error<spex::Pkm<double>>(model, io);
      else if (kind == "ReMoE") err = max_error<spex::MoE<double, spex::ReluRouter<double>>>(model, io);
      else if (kind == "TopKMoE") err = max_error<spex::MoE<double, spex::TopKRouter<double>>>(model, io);
      const bool ok = err >= 0 && err <= 1e-10;
      failures += !ok;
      std::printf("%-28s %-8s max |spex - torch| / max |torch| = %.2e  %s\n", c, kind.c_str(), err, ok ? "ok" : "FAILED");
      if (io.find("y_train")) {
        std::string what;
        const double terr = kind == "Peer"  ? training_error<spex::Peer<double>>(model, io, what)
                            : kind == "Pkm" ? training_error<spex::Pkm<double>>(model, io, what)
                                            : training_error<spex::MoE<double, spex::TopKRouter<double>>>(model, io, what);
        const bool tok = terr >= 0 && terr <= 1e-10;
        failures += !tok;
        std::printf("%-28s training: forward and gradients (MoE: aux loss, bias update): worst %s %.2e  %s\n", c, what.c_str(), terr,
                    tok ? "ok" : "FAILED");
      }
    } catch (const std::exception& e) {
      ++failures;
      std::printf("%-28s FAILED: %s\n", c, e.what());
    }
  }
  return failures == 0 ? 0 : 1;
}
