// Documentation cannot drift from the API: every C++ block in README.md and docs/*.md is one of
// the programs in examples/snippets/ (dist/: under mpirun), verbatim, and those are compiled and
// run by this suite (tests/CMakeLists.txt, snippet_*). Every page the code and the pages point
// to exists: "docs/<page>.md" in sources, and relative links in the pages.
#include <regex>
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

std::vector<std::filesystem::path> pages(const std::filesystem::path& root) {
  std::vector<std::filesystem::path> out{root / "README.md"};
  for (const auto& f : std::filesystem::directory_iterator(root / "docs"))
    if (f.path().extension() == ".md") out.push_back(f.path());
  return out;
}

TEST_CASE("every C++ block of the README and docs/ is a compiled snippet, verbatim", "[docs]") {
  const std::filesystem::path root(SPEX_SOURCE_DIR);
  std::set<std::string> snippets;
  for (const auto& f : std::filesystem::recursive_directory_iterator(root / "examples" / "snippets"))
    if (f.path().extension() == ".cpp") snippets.insert(read(f.path()));
  REQUIRE(snippets.size() >= 4);
  std::set<std::string> shown;
  for (const auto& page : pages(root)) {
    const auto blocks = cpp_blocks(read(page));
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      CAPTURE(page.filename().string(), i, blocks[i].substr(0, 200));
      CHECK(snippets.count(blocks[i]) == 1);
      shown.insert(blocks[i]);
    }
  }
  CHECK(cpp_blocks(read(root / "README.md")).size() >= 1);
  CHECK(shown.size() == snippets.size());  // every usage program is on some page
}

TEST_CASE("every documentation page the sources and the pages point to exists", "[docs]") {
  const std::filesystem::path root(SPEX_SOURCE_DIR);
  const std::regex cited(R"(docs/([A-Za-z0-9_]+\.md))");
  std::size_t citations = 0;
  for (const char* dir : {"include", "examples", "tools", "bench", "tests", "scripts"})
    for (const auto& f : std::filesystem::recursive_directory_iterator(root / dir)) {
      const auto ext = f.path().extension();
      if (!f.is_regular_file() || (ext != ".hpp" && ext != ".cpp" && ext != ".py" && ext != ".sh")) continue;
      const std::string text = read(f.path());
      for (std::sregex_iterator m(text.begin(), text.end(), cited), end; m != end; ++m, ++citations) {
        CAPTURE(f.path().string(), (*m)[0].str());
        CHECK(std::filesystem::exists(root / "docs" / (*m)[1].str()));
      }
    }
  CHECK(citations >= 10);
  const std::regex link(R"(\]\(([^)#:]+)(#[^)]*)?\))");  // [text](relative/path): not http:, not #anchor
  for (const auto& page : pages(root)) {
    const std::string text = read(page);
    for (std::sregex_iterator m(text.begin(), text.end(), link), end; m != end; ++m) {
      CAPTURE(page.filename().string(), (*m)[0].str());
      CHECK(std::filesystem::exists(page.parent_path() / (*m)[1].str()));
    }
  }
}
