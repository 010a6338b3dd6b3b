// Compact expert tables for inference (spex::io for the files): a trained float layer's tables
// stored as bf16 or int8 (one scale per row), saved as stored and served memory-mapped, or a
// float file quantized while it loads. Retrieval is unchanged, so are the retrieved experts.
#include <cstdio>
#include <cstdlib>
#include <string>

#include <spex/io/io.hpp>
#include <spex/spex.hpp>

int main() {
  spex::Peer<float>::Config cfg;
  cfg.d_in = 64;
  cfg.n_keys = 32;
  cfg.heads = 4;
  cfg.top_k = 8;
  cfg.d_key = 32;
  const spex::Peer<float> trained(cfg, 1);  // stands for a layer trained with float tables
  spex::RowMat<float> x = spex::RowMat<float>::Random(16, 64), y(16, 64), yc(16, 64);
  trained.infer(x, y);

  spex::Peer<float> served = trained;
  served.set_storage(spex::TableStorage::bf16);  // 2 bytes per value instead of 4; inference only
  served.infer(x, yc);
  std::printf("bf16: tables %zu -> %zu bytes, output error %.1e\n", trained.table_bytes(), served.table_bytes(),
              (yc - y).norm() / y.norm());

  const std::string dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
  spex::save_layer(dir + "/peer-bf16.safetensors", served);  // BF16 tensors; "storage": "bf16" in the config
  spex::LoadOptions mapped;
  mapped.map = true;  // the bf16 rows are read in place from the page cache
  const auto from_disk = spex::load_layer<spex::Peer<float>>(dir + "/peer-bf16.safetensors", "", mapped);
  spex::RowMat<float> y2(16, 64);
  from_disk.infer(x, y2);
  std::printf("mapped bf16 file == bf16 layer: %s\n", y2 == yc ? "yes" : "no");
  if (y2 != yc) return 1;
  // In memory an expert's u and v rows lie side by side (one run of bytes per pick), float and
  // compact alike: row r of a table starts ld() values after row r - 1. A mapped file keeps its
  // layout, one table after the other.
  std::printf("u and v rows side by side: ld %ld (float), %ld (bf16) = d_in + d_out; mapped: ld %ld = d_out\n",
              long(trained.experts().up_table().ld()), long(served.experts().compact_up().ld()),
              long(from_disk.experts().compact_up().ld()));

  spex::save_layer(dir + "/peer-f32.safetensors", trained);
  spex::LoadOptions quantize;
  quantize.storage = spex::TableStorage::int8;  // quantized row by row while loading a float file
  const auto small = spex::load_layer<spex::Peer<float>>(dir + "/peer-f32.safetensors", "", quantize);
  small.infer(x, y2);
  std::printf("int8: %zu bytes, output error %.1e\n", small.table_bytes(), (y2 - y).norm() / y.norm());

  try {  // compact tables cannot be trained: set_storage(TableStorage::native) first
    spex::Peer<float>::Cache cache;
    served.forward(x, y2, cache);
  } catch (const spex::Error& e) {
    std::printf("training refused: %s\n", e.what());
  }
  std::remove((dir + "/peer-bf16.safetensors").c_str());
  std::remove((dir + "/peer-f32.safetensors").c_str());
  return 0;
}
