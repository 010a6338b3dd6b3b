// Load time and memory of a big PEER model file, mapped vs copied, and save speed; one mode per
// process so that peak RSS is the mode's own (scripts/bench_io.sh runs them and dd beside).
//   io_load save PATH [n_keys d [repeats [CMD]]]   builds PEER(n_keys^2 experts, d) and saves it
//                                   (fsync'd) `repeats` times, running the shell command CMD (a dd
//                                   of the same size) before each save: the two alternate
//   io_load load PATH map|copy [native|bf16|int8]
//                                   loads it (expert tables stored as given: quantized on load
//                                   from a float file), then runs one batch of 256 tokens through infer
//   io_load build n_keys d native|bf16|int8 [PATH]
//                                   builds PEER with its tables stored so (compact ones block by
//                                   block), runs one batch through infer, and saves it to PATH if given
// Prints seconds and RSS (VmRSS now, VmHWM peak, from /proc/self/status) at each stage.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <spex/io/io.hpp>
#include <spex/spex.hpp>
#include <string>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double status_mib(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.compare(0, std::strlen(key), key) == 0) return std::stod(line.substr(std::strlen(key) + 1)) / 1024.0;
  return -1;
}

void report(const char* stage, double seconds) {
  std::printf("%-28s %8.3f s   RSS %8.1f MiB   peak %8.1f MiB\n", stage, seconds, status_mib("VmRSS:"), status_mib("VmHWM:"));
}

spex::TableStorage storage_named(const std::string& s) {
  if (s == "bf16") return spex::TableStorage::bf16;
  if (s == "int8") return spex::TableStorage::int8;
  if (s != "native") std::fprintf(stderr, "storage '%s' is not native, bf16 or int8; using native\n", s.c_str());
  return spex::TableStorage::native;
}

void run_batch(const spex::Peer<float>& peer) {
  spex::RowMat<float> x(256, peer.d_in()), y(256, peer.d_out());
  spex::Rng rng(3);
  spex::fill_normal(x, 1.0, rng);
  spex::Peer<float>::Cache c;
  double t = now();
  peer.infer(x, y, c);
  report("first infer, 256 tokens", now() - t);
  t = now();
  peer.infer(x, y, c);
  report("second infer, 256 tokens", now() - t);
}

spex::Peer<float>::Config config(long n_keys, long d) {
  spex::Peer<float>::Config c;
  c.d_in = d;
  c.n_keys = n_keys;  // defaults: h = 8, k = 16, d_key = 128, BatchNorm
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: io_load save PATH [n_keys d] | io_load load PATH map|copy [storage] | io_load build n_keys d storage [PATH]\n");
    return 2;
  }
  const std::string mode = argv[1], path = argv[2];
  if (mode == "build") {
    auto c = config(std::atol(argv[2]), argc > 3 ? std::atol(argv[3]) : 512);
    c.storage = storage_named(argc > 4 ? argv[4] : "native");
    std::printf("io_load build n_keys %s, d %ld, tables %s, on %s\n", argv[2], long(c.d_in), spex::to_string(c.storage),
                spex::simd_arch_name());
    const double t = now();
    const spex::Peer<float> peer(c, 1);
    report("built (random init)", now() - t);
    std::printf("  expert tables: %.1f MiB\n", double(peer.table_bytes()) / (1 << 20));
    run_batch(peer);
    if (argc > 5) {
      const double s = now();
      spex::save_layer(argv[5], peer);
      report("saved", now() - s);
    }
    return 0;
  }
  std::printf("io_load %s %s on %s (%s)\n", mode.c_str(), argc > 3 ? argv[3] : "", spex::simd_arch_name(),
              path.c_str());
  report("start", 0);
  if (mode == "save") {
    const long n = argc > 3 ? std::atol(argv[3]) : 1024, d = argc > 4 ? std::atol(argv[4]) : 512;
    double t = now();
    const spex::Peer<float> peer(config(n, d), 1);
    report("built (random init)", now() - t);
    std::uint64_t bytes = 0;
    for (const auto& p : peer.parameters()) bytes += std::uint64_t(p.size()) * sizeof(float);
    const int repeats = argc > 5 ? std::atoi(argv[5]) : 1;
    for (int i = 0; i < repeats; ++i) {
      if (argc > 6) {
        t = now();
        if (std::system(argv[6]) != 0) return 1;
        std::printf("%-28s %8.3f s = %.0f MB/s\n", "comparison command", now() - t, bytes / 1e6 / (now() - t));
      }
      t = now();
      spex::save_layer(path, peer);
      const double s = now() - t;
      report("saved (fsync)", s);
      std::printf("save: %.0f MB in %.2f s = %.0f MB/s\n", bytes / 1e6, s, bytes / 1e6 / s);
    }
    return 0;
  }
  spex::LoadOptions opt;
  opt.map = argc > 3 && std::string(argv[3]) == "map";
  if (argc > 4) opt.storage = storage_named(argv[4]);
  double t = now();
  spex::LoadReport r;
  const auto peer = spex::load_layer<spex::Peer<float>>(path, "", opt, &r);
  report(opt.map ? "load_layer (mapped)" : "load_layer (copied)", now() - t);
  std::printf("  %zu tensors mapped, %zu copied; expert tables %s, %.1f MiB\n", r.mapped.size(), r.copied.size(),
              spex::to_string(peer.storage()), double(peer.table_bytes()) / (1 << 20));
  run_batch(peer);
  return 0;
}
