#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/sampler.h"
#include "engine/session.h"
#include "kv/kv_policy.h"
#include "model/model.h"
#include "test_util.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

std::string stories_path() { return shared_path("models/stories260K/stories260K.gguf"); }

}  // namespace

TEST(Model, Stories260KGreedyMatchesPublishedText) {
  SKIP_IF_MISSING(stories_path());
  auto m = Model::load(stories_path());
  ThreadPool pool(2);
  KvConfig kc;
  Session s(*m, make_kv_policy(kc, m->kv_geometry(512)), pool);
  s.prefill({1});
  const auto toks = greedy_continuation(s, 40);
  auto vocab = m->gguf().get_string_array("tokenizer.ggml.tokens");
  std::string text;
  for (int32_t t : toks) {
    const std::string_view p = vocab[t];
    for (size_t i = 0; i < p.size(); ++i) {
      if (p.compare(i, 3, "\xe2\x96\x81") == 0) {
        text += ' ';
        i += 2;
      } else {
        text += p[i];
      }
    }
  }
  const std::string expected = " Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";
  EXPECT_EQ(text.substr(0, expected.size()), expected) << text;
}
