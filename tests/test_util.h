// Helpers shared by the tests: paths to ../shared and tests/data, skipping when absent.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "engine/session.h"

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
