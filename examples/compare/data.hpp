#pragma once
// The two tasks of compare_layers: next-character prediction on English text, and
// associative recall of seeded (key -> value) facts. Both give (context window -> next symbol)
// examples over a small vocabulary.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <spex/core/random.hpp>

namespace compare {

struct Dataset {
  std::string name;
  int vocab = 0;
  int context = 0;
  std::vector<int> train_x, val_x;  // examples x context symbols, row after row
  std::vector<int> train_y, val_y;
  std::size_t n_train() const { return train_y.size(); }
  std::size_t n_val() const { return val_y.size(); }
};

/// The license texts every Debian system has: compare_layers' and remoe_stability's default text.
inline std::vector<std::string> default_texts() {
  std::vector<std::string> paths;
  for (const char* f : {"Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2", "GPL-3",
                        "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0"}) {
    const std::string p = std::string("/usr/share/common-licenses/") + f;
    if (std::filesystem::exists(p)) paths.push_back(p);
  }
  if (paths.empty()) throw std::runtime_error("no text in /usr/share/common-licenses: pass --text FILE");
  return paths;
}

/// Validation takes every tenth block of this many bytes of the text.
constexpr std::size_t kValidationBlock = 2048;

/// Text from `paths`, bytes mapped to a dense vocabulary, every position an example (the
/// previous `context` bytes -> this byte); every tenth block of 2 KiB is validation, so that
/// validation comes from every file (a split at 90% put only the last license texts there,
/// whose vocabulary and style differ: validation loss then measured the shift, not the fit).
inline Dataset char_lm(const std::vector<std::string>& paths, int context) {
  std::string text;
  for (const auto& p : paths) {
    std::ifstream in(p, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read text file " + p);
    std::ostringstream ss;
    ss << in.rdbuf();
    text += ss.str();
  }
  if (text.size() < std::size_t(10 * context + 100)) throw std::runtime_error("the text is too short");
  int map[256];
  for (int& m : map) m = -1;
  Dataset d;
  d.name = "char-lm";
  d.context = context;
  for (unsigned char c : text)
    if (map[c] < 0) map[c] = d.vocab++;
  for (std::size_t i = context; i < text.size(); ++i) {
    const bool val = (i / kValidationBlock) % 10 == 9;
    auto& xs = val ? d.val_x : d.train_x;
    auto& ys = val ? d.val_y : d.train_y;
    for (int j = context; j > 0; --j) xs.push_back(map[static_cast<unsigned char>(text[i - j])]);
    ys.push_back(map[static_cast<unsigned char>(text[i])]);
  }
  return d;
}

/// `facts` distinct keys of `key_len` letters, each with a random value letter; the context is
/// the key followed by ':', the target its value. Recall is memorization: validation is the
/// same facts, evaluated in eval mode, so its loss measures how many facts the model holds.
inline Dataset recall(int facts, int key_len, std::uint64_t seed) {
  Dataset d;
  d.name = "recall";
  d.vocab = 27;  // a-z and ':'
  d.context = key_len + 1;
  spex::Rng rng(seed);
  std::vector<char> used(std::size_t(1) << (5 * key_len), 0);
  while (int(d.train_y.size()) < facts) {
    std::size_t code = 0;
    std::vector<int> key(key_len);
    for (int j = 0; j < key_len; ++j) {
      key[j] = int(rng.below(26));
      code = code * 32 + std::size_t(key[j]);
    }
    if (used[code]) continue;
    used[code] = 1;
    for (int k : key) d.train_x.push_back(k);
    d.train_x.push_back(26);
    d.train_y.push_back(int(rng.below(26)));
  }
  d.val_x = d.train_x;
  d.val_y = d.train_y;
  return d;
}

}  // namespace compare
