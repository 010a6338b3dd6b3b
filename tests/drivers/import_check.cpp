// Loads a layer tools/spex_import.py wrote (its kind from the file's metadata) and requires spex's
// infer(x) to give the source block's output y (x and y in IO, float32): max |spex - y| / max |y|
// <= 1e-5 (float32 rounding of sums over the experts). Usage: import_check LAYER IO (run by
// tests/moe_import.sh and tests/memory_import.sh).
#include <cmath>
#include <cstdio>
#include <spex/io/io.hpp>
#include <string>

namespace {

spex::RowMat<float> read_matrix(const spex::SafetensorsFile& f, const std::string& name) {
  const spex::TensorInfo& t = f.at(name);
  if (t.dtype != spex::DType::F32 || t.shape.size() != 2) throw spex::Error(f.path() + ": " + name + " is not an F32 matrix");
  spex::RowMat<float> m(t.shape[0], t.shape[1]);
  spex::convert_from_bytes(f.data(t), t.dtype, m.data(), std::size_t(m.size()));
  return m;
}

template <class L>
double error(const std::string& model, const spex::SafetensorsFile& io) {
  const L layer = spex::load_layer<L>(model);
  const spex::RowMat<float> x = read_matrix(io, "x"), y = read_matrix(io, "y");
  spex::RowMat<float> out(x.rows(), layer.d_out());
  layer.infer(x, out);
  return double((out - y).cwiseAbs().maxCoeff() / y.cwiseAbs().maxCoeff());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: import_check LAYER IO\n");
    return 2;
  }
  try {
    const spex::SafetensorsFile io(argv[2]);
    const spex::SafetensorsFile layer(argv[1]);
    const std::string kind = nlohmann::json::parse(layer.metadata().at(spex::kMetadataKey))["layers"][""]["kind"].get<std::string>();
    const double err = kind == "ReMoE" ? error<spex::MoE<float>>(argv[1], io)
                       : kind == "Peer" ? error<spex::Peer<float>>(argv[1], io)
                       : kind == "Pkm"  ? error<spex::Pkm<float>>(argv[1], io)
                                        : error<spex::MoE<float, spex::TopKRouter<float>>>(argv[1], io);
    const bool ok = err <= 1e-5;
    std::printf("%-40s max |spex - source| / max |source| = %.2e  %s\n", argv[1], err, ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("%s FAILED: %s\n", argv[1], e.what());
    return 1;
  }
}
