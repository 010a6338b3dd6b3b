// Documentation cannot drift from the API: every C++ block in README.md is one of the
// programs in examples/snippets/ (dist/: under mpirun), verbatim, and those are compiled and run by this suite
// (tests/CMakeLists.txt, snippet_*).
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

namespace {

std::string read(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// The contents of the ```cpp blocks of a Markdown text.
std::vector<std::string> cpp_blocks(const std::string& md) {
  std::vector<std::string> blocks;
  const std::string open = "```cpp\n", close = "```\n";
  for (std::size_t at = md.find(open); at != std::string::npos; at = md.find(open, at)) {
    const std::size_t begin = at + open.size(), end = md.find(close, begin);
    REQUIRE(end != std::string::npos);
    blocks.push_back(md.substr(begin, end - begin));
    at = end + close.size();
  }
  return blocks;
}

}  // namespace

TEST_CASE("every C++ block of the README is a compiled snippet, verbatim", "[docs]") {
  const std::filesystem::path root(SPEX_SOURCE_DIR);
  std::set<std::string> snippets;
  for (const auto& f : std::filesystem::recursive_directory_iterator(root / "examples" / "snippets"))
    if (f.path().extension() == ".cpp") snippets.insert(read(f.path()));
  REQUIRE(snippets.size() >= 4);
  const auto blocks = cpp_blocks(read(root / "README.md"));
  CHECK(blocks.size() >= 3);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    CAPTURE(i, blocks[i].substr(0, 200));
    CHECK(snippets.count(blocks[i]) == 1);
  }
}
