// spex-inspect FILE: what a safetensors file holds. Lists its tensors (name, dtype, shape,
// bytes), its metadata, and the spex layers it describes (kind, config, the tensors under each
// prefix). The file is validated as a load would validate it; a malformed file exits with 1
// and the loader's message, naming the tensor and the problem. Every string from the file is
// printed through spex::printable: a crafted name cannot drive the terminal.
#include <cstdio>
#include <spex/io/io.hpp>
#include <string>

namespace {

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", b, units[u]);
  return buf;
}

std::string shorten(const std::string& s, std::size_t n = 160) { return s.size() <= n ? s : s.substr(0, n) + "..."; }

void print(const spex::SafetensorsFile& f) {
  const auto& ts = f.tensors();
  std::printf("%s: %s, header %llu bytes, %zu tensors, %s of data\n", f.path().c_str(), human_bytes(double(f.file_bytes())).c_str(),
              (unsigned long long)f.view().header_bytes(), ts.size(), human_bytes(double(f.view().data_bytes())).c_str());
  using spex::printable;
  std::size_t w = 4;
  for (const auto& t : ts) w = std::max(w, printable(t.name).size());
  std::printf("\n%-*s  %-7s  %-22s  %14s\n", int(w), "name", "dtype", "shape", "bytes");
  for (const auto& t : ts)
    std::printf("%-*s  %-7s  %-22s  %14llu\n", int(w), printable(t.name).c_str(), spex::to_string(t.dtype),
                spex::shape_string(t.shape).c_str(), (unsigned long long)t.bytes());

  std::printf("\nmetadata: %zu entries\n", f.metadata().size());
  for (const auto& kv : f.metadata())
    if (kv.first != spex::kMetadataKey)
      std::printf("  %s = %s\n", printable(kv.first).c_str(), printable(shorten(kv.second)).c_str());

  const spex::SpexMetadata meta = spex::SpexMetadata::parse(f.metadata(), f.path());
  if (meta.layers.empty()) {
    std::printf("\nlayers: none recorded (a plain safetensors file: load it with a ParameterList)\n");
    return;
  }
  std::printf("\nlayers (spex format %d.%d):\n", meta.major, meta.minor);
  for (const auto& kv : meta.layers.items()) {
    const auto& e = kv.value();
    std::size_t n = 0;
    std::uint64_t bytes = 0;
    for (const auto& t : ts)
      if (t.name.compare(0, kv.key().size(), kv.key()) == 0) {
        ++n;
        bytes += t.bytes();
      }
    std::printf("  '%s': %s, %s, %zu tensors (%s)\n", printable(kv.key()).c_str(),
                printable(spex::detail::string_field(e, "kind", "?")).c_str(), printable(spex::detail::string_field(e, "dtype", "?")).c_str(),
                n, human_bytes(double(bytes)).c_str());
    if (e.contains("config") && e["config"].is_object()) {
      std::string line = "    ";
      for (const auto& c : e["config"].items()) {
        const std::string item = printable(c.key() + "=" + (c.value().is_string() ? c.value().get<std::string>() : c.value().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
        if (line.size() + item.size() > 100) {
          std::printf("%s\n", line.c_str());
          line = "    ";
        }
        line += item + " ";
      }
      std::printf("%s\n", line.c_str());
    }
    if (e.contains("state")) std::printf("    state: %s\n", printable(e["state"].dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)).c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) == "--help") {
    std::fprintf(stderr, "usage: spex-inspect FILE.safetensors\n");
    return 2;
  }
  try {
    print(spex::SafetensorsFile(argv[1]));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "spex-inspect: %s\n", e.what());
    return 1;
  }
  return 0;
}
