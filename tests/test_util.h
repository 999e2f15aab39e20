// Helpers shared by the tests: paths to ../shared and tests/data, skipping when absent.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "engine/session.h"
#include "engine/tokenizer.h"
#include "model/model.h"

inline std::string shared_path(const std::string& rel) { return std::string(SPECACHE_SHARED_DIR) + "/" + rel; }
inline std::string testdata_path(const std::string& rel) { return std::string(SPECACHE_TESTDATA_DIR) + "/" + rel; }

// The default model fetched by scripts/setup.sh (SPECACHE_MODEL overrides).
inline std::string default_model_path() {
  if (const char* m = std::getenv("SPECACHE_MODEL")) return m;
  const char* cache = std::getenv("SPECACHE_CACHE");
  std::string dir;
  if (cache) dir = cache;
  else if (const char* xdg = std::getenv("XDG_CACHE_HOME")) dir = std::string(xdg) + "/specache";
  else dir = std::string(std::getenv("HOME") ? std::getenv("HOME") : ".") + "/.cache/specache";
  return dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

#define SKIP_IF_MISSING(path)                                                              \
  do {                                                                                     \
    if (!std::filesystem::exists(path)) GTEST_SKIP() << "missing " << (path)               \
        << " (../shared absent, or run scripts/setup.sh for the default model)";            \
  } while (0)

// Greedy continuation of n tokens through the session's decode path (each token is fed back).
inline std::vector<int32_t> greedy_continuation(spc::Session& s, size_t n) {
  std::vector<int32_t> out;
  while (out.size() < n) {
    const int32_t t = spc::argmax(s.logits().data(), (int)s.logits().size());
    out.push_back(t);
    s.decode(t);
  }
  return out;
}

// The first n_chars characters of War and Peace from "CHAPTER I" on (../shared), tokenized without
// BOS and cut to at most n_tokens. Empty when the book is missing.
inline std::vector<int32_t> war_and_peace_tokens(const spc::Tokenizer& tok, size_t n_chars, size_t n_tokens) {
  std::ifstream in(shared_path("data/gutenberg/pg2600-war-and-peace.txt"));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const size_t start = text.find("CHAPTER I");
  if (start == std::string::npos) return {};
  std::vector<int32_t> ids = tok.encode(text.substr(start, n_chars), false, false);
  ids.resize(std::min(ids.size(), n_tokens));
  return ids;
}

// The setup of the tests that run the real default model on real text: declares `model` (the
// loaded SmolLM2) and `prompt` (war_and_peace_tokens(n_chars, n_tokens), asserted to be nearly
// n_tokens long); skips the calling test when the model or the book is missing.
#define SMOLLM2_WITH_BOOK(model, prompt, n_chars, n_tokens)                                           \
  const std::string model##_path_ = default_model_path();                                            \
  SKIP_IF_MISSING(model##_path_);                                                                     \
  SKIP_IF_MISSING(shared_path("data/gutenberg/pg2600-war-and-peace.txt"));                            \
  auto model = spc::Model::load(model##_path_);                                                       \
  const std::vector<int32_t> prompt =                                                                 \
      war_and_peace_tokens(*spc::Tokenizer::from_gguf(model->gguf()), n_chars, n_tokens);             \
  ASSERT_GE(prompt.size(), (size_t)(n_tokens) * 97 / 100)
