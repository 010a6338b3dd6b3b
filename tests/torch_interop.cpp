// Loads the layers tools/export_reference.py saved from PyTorch and requires spex's infer(x) to
// equal PyTorch's eval-mode output y (float64, |difference| <= 1e-10 relative to max |y|).
// Usage: torch_interop DIR (run by tests/torch_interop.sh, which exports DIR first).
#include <cmath>
#include <cstdio>
#include <spex/io/io.hpp>
#include <string>

namespace {

spex::RowMat<double> read_matrix(const spex::SafetensorsFile& f, const std::string& name) {
  const spex::TensorInfo& t = f.at(name);
  if (t.dtype != spex::DType::F64 || t.shape.size() != 2) throw spex::Error(f.path() + ": " + name + " is not an F64 matrix");
  spex::RowMat<double> m(t.shape[0], t.shape[1]);
  spex::convert_from_bytes(f.data(t), t.dtype, m.data(), std::size_t(m.size()));
  return m;
}

template <class L>
double max_error(const std::string& model, const spex::SafetensorsFile& io) {
  const L layer = spex::load_layer<L>(model);
  const spex::RowMat<double> x = read_matrix(io, "x"), y = read_matrix(io, "y");
  spex::RowMat<double> out(x.rows(), layer.d_out());
  layer.infer(x, out);
  return (out - y).cwiseAbs().maxCoeff() / std::max(1e-300, y.cwiseAbs().maxCoeff());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: torch_interop DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  const char* cases[] = {"peer", "peer_per_head_sigmoid_relu", "peer_no_norm_silu", "pkm", "remoe_swiglu", "topk_gelu",
                         "topk_renormalized", "topk_softmax_over_k"};
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
    } catch (const std::exception& e) {
      ++failures;
      std::printf("%-28s FAILED: %s\n", c, e.what());
    }
  }
  return failures == 0 ? 0 : 1;
}
