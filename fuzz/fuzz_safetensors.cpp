// libFuzzer target for the safetensors header parser and the loaders: any byte string must
// either load or throw spex::Error, never crash, leak, read out of bounds or throw anything
// else (AddressSanitizer and UndefinedBehaviorSanitizer watch). Build and run: scripts/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <spex/io/io.hpp>
#include <vector>

#include "fuzz_util.hpp"

namespace {

using ReMoEf = spex::MoE<float, spex::ReluRouter<float>>;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto bytes = std::make_shared<const std::vector<unsigned char>>(data, data + size);
  std::unique_ptr<spex::SafetensorsFile> file;
  try {
    file = std::make_unique<spex::SafetensorsFile>(spex::SafetensorsFile::from_memory(bytes, "fuzz"));
  } catch (const spex::Error&) {
    return 0;
  }
  // A valid file: read every floating tensor, and try every way of loading it.
  for (const auto& t : file->tensors())
    if (spex::is_float_dtype(t.dtype) && t.elements() <= (1u << 16)) {
      std::vector<double> v(t.elements());
      spex::convert_from_bytes(file->data(t), t.dtype, v.data(), v.size());
    }
  fuzz_util::spex_error_or_success([&] { spex::SpexMetadata::parse(file->metadata(), "fuzz"); });
  spex::LoadOptions lenient;
  lenient.strict = false;
  lenient.map = true;
  fuzz_util::spex_error_or_success([&] { spex::load_layer<spex::Peer<float>>(*file, "", lenient); });
  fuzz_util::spex_error_or_success([&] { spex::load_layer<spex::Pkm<double>>(*file); });
  fuzz_util::spex_error_or_success([&] { spex::load_layer<ReMoEf>(*file); });
  fuzz_util::spex_error_or_success([&] {
    spex::Peer<float> peer(fuzz_util::small_pk_config(), 1);
    spex::SafetensorsLoader ld(*file);
    ld.layer(peer, "", lenient);
    ld.commit();
    spex::RowMat<float> x = spex::RowMat<float>::Ones(2, 4), y(2, 4);
    peer.infer(x, y);
  });
  return 0;
}
