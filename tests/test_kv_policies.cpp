// Invariants of the KV policies on a real model (stories260K: fast, exact F32 weights):
// SpeCache with k and R covering everything equals full; k = 0 equals kivi; copy delays never
// change results; every policy runs its own decode path.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/sampler.h"
#include "engine/session.h"
#include "model/model.h"
#include "test_util.h"
#include "util/error.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

struct Fixture {
  std::unique_ptr<Model> model;
  std::vector<int32_t> prompt, cont;  // prompt and full's greedy continuation
};

const Fixture* stories() {
  static Fixture* f = [] {
    auto* fx = new Fixture();
    const std::string path = shared_path("models/stories260K/stories260K.gguf");
    if (!std::filesystem::exists(path)) return fx;
    fx->model = Model::load(path);
    ThreadPool pool(2);
    KvConfig kc;
    Session s(*fx->model, make_kv_policy(kc, fx->model->kv_geometry(512)), pool);
    s.prefill({1});
    std::vector<int32_t> all = {1};
    const auto cont = greedy_continuation(s, 360);  // a 300-token "document" and 60 tokens to score
    all.insert(all.end(), cont.begin(), cont.end());
    fx->prompt.assign(all.begin(), all.begin() + 300);
    fx->cont.assign(all.begin() + 300, all.end());
    return fx;
  }();
  return f;
}

// Teacher-forced logits along `cont` after prefilling `prompt`: [n][n_vocab].
std::vector<float> teacher_forced(const Fixture& fx, const KvConfig& kc, KvStats* stats = nullptr) {
  ThreadPool pool(2);
  Session s(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
  s.prefill(fx.prompt);
  std::vector<float> out;
  for (int32_t t : fx.cont) {
    out.insert(out.end(), s.logits().begin(), s.logits().end());
    s.decode(t);
  }
  if (stats) *stats = s.kv().stats();
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}

KvConfig policy(const std::string& name, int bits = 1, int topk = 64, int window = 64, int group = 32) {
  KvConfig kc;
  kc.policy = name;
  kc.bits = bits;
  kc.topk = topk;
  kc.window = window;
  kc.group = group;
  return kc;
}

#define NEED_STORIES() \
  if (!stories()->model) GTEST_SKIP() << "missing ../shared/models/stories260K/stories260K.gguf"

}  // namespace

TEST(KvPolicy, SpecacheWithTopkCoveringEverythingEqualsFull) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  // Small window, many key blocks: every quantized position is fetched in 16-bit.
  for (int bits : {1, 2}) {
    const auto spec = teacher_forced(*stories(), policy("specache", bits, /*topk=*/512, /*window=*/8));
    EXPECT_LT(max_abs_diff(full, spec), 2e-3) << bits << "-bit";
  }
}

TEST(KvPolicy, SpecacheWithWindowCoveringEverythingEqualsFull) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  const auto spec = teacher_forced(*stories(), policy("specache", 1, /*topk=*/0, /*window=*/512));
  EXPECT_LT(max_abs_diff(full, spec), 2e-3);
}

TEST(KvPolicy, SpecacheWithZeroTopkEqualsKivi) {
  NEED_STORIES();
  for (int bits : {1, 2}) {
    const auto kivi = teacher_forced(*stories(), policy("kivi", bits, 0, 16));
    const auto spec = teacher_forced(*stories(), policy("specache", bits, 0, 16));
    EXPECT_LT(max_abs_diff(kivi, spec), 1e-4) << bits << "-bit";
  }
}

TEST(KvPolicy, CopyDelaysNeverChangeResults) {
  NEED_STORIES();
  for (const char* name : {"specache", "specache-exact"}) {
    KvConfig a = policy(name, 1, 16, 16);
    KvConfig b = a;
    b.inject_delay_us = 300;
    b.inject_seed = 42;
    EXPECT_EQ(teacher_forced(*stories(), a), teacher_forced(*stories(), b)) << name;
  }
}

TEST(KvPolicy, LowBitPoliciesDifferFromFullAndStayClose) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  KvStats st;
  for (const char* name : {"kivi", "specache", "specache-exact", "topk-oracle"}) {
    const auto got = teacher_forced(*stories(), policy(name, 1, 16, 16), &st);
    const double d = max_abs_diff(full, got);
    EXPECT_GT(d, 0.0) << name << " should run its own (low-bit) decode path";
    EXPECT_LT(d, 8.0) << name;
    EXPECT_EQ(st.policy, name);
    EXPECT_GT(st.fast_bytes, 0u);
  }
}

TEST(KvPolicy, SpecacheReportsTierStatistics) {
  NEED_STORIES();
  KvStats st;
  KvConfig kc = policy("specache", 1, 16, 16);
  kc.diagnostics = true;
  teacher_forced(*stories(), kc, &st);
  EXPECT_GT(st.slow_bytes, 0u);
  EXPECT_GT(st.fetched_bytes_per_step, 0.0);
  EXPECT_GE(st.prefetch_reuse_rate, 0.0);
  EXPECT_LE(st.prefetch_reuse_rate, 1.0);
  EXPECT_GT(st.spec_recall, 0.0);
  EXPECT_LE(st.spec_recall, 1.0);
  EXPECT_EQ(st.spec_recall_per_layer.size(), 5u);
  EXPECT_GT(st.exact_mass_served, 0.0);
  EXPECT_LE(st.exact_mass_served, 1.0 + 1e-9);
}

TEST(KvPolicy, StreamingWithWindowCoveringEverythingEqualsFull) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  KvConfig kc = policy("streaming", 1, 0, 512);
  kc.sinks = 4;
  EXPECT_LT(max_abs_diff(full, teacher_forced(*stories(), kc)), 2e-3);
  kc.window = 32;
  EXPECT_GT(max_abs_diff(full, teacher_forced(*stories(), kc)), 0.0);
}

TEST(KvPolicy, PrefillHandOverMatchesOwnPrefill) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  KvConfig kc = policy("specache", 2, 16, 16);
  Session a(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
  a.prefill(fx.prompt);
  Session full(*fx.model, make_kv_policy(policy("full"), fx.model->kv_geometry(512)), pool);
  full.prefill(fx.prompt);
  Session b(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
  b.prefill_from(full);
  for (int i = 0; i < 20; ++i) {
    ASSERT_EQ(a.logits(), b.logits()) << "step " << i;
    a.decode(fx.cont[i]);
    b.decode(fx.cont[i]);
  }
}

TEST(KvPolicy, RejectsBadConfigurations) {
  KvGeometry g{2, 4, 2, 16, 128};
  EXPECT_THROW(make_kv_policy(policy("nonsense"), g), Error);
  EXPECT_THROW(make_kv_policy(policy("specache", 3), g), Error);
  EXPECT_THROW(make_kv_policy(policy("kivi", 1, 64, 64, 48), g), Error);
  KvConfig f = policy("specache");
  f.store = "file";
  EXPECT_THROW(make_kv_policy(f, g), Error);
}

// The same invariants on the default model (head_dim 64: the AVX-512 paths of the low-bit and
// 16-bit kernels), with a 240-token real-text prompt.
TEST(KvPolicy, SmolLM2SpecacheCoveringEverythingEqualsFullAndZeroTopkEqualsKivi) {
  const std::string path = default_model_path();
  SKIP_IF_MISSING(path);
  Fixture fx;
  fx.model = Model::load(path);
  ThreadPool pool(2);
  {
    KvConfig kc;
    Session s(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
    std::vector<int32_t> all = {1};
    s.prefill(all);
    const auto cont = greedy_continuation(s, 264);
    all.insert(all.end(), cont.begin(), cont.end());
    fx.prompt.assign(all.begin(), all.begin() + 240);
    fx.cont.assign(all.begin() + 240, all.end());
  }
  // 30 layers and logits of magnitude ~20: float reordering alone moves logits by a few 1e-3.
  const auto full = teacher_forced(fx, policy("full"));
  EXPECT_LT(max_abs_diff(full, teacher_forced(fx, policy("specache", 1, 512, 8, 32))), 1e-2);
  EXPECT_LT(max_abs_diff(full, teacher_forced(fx, policy("specache", 2, 0, 512, 64))), 1e-2);
  const auto kivi = teacher_forced(fx, policy("kivi", 1, 0, 8, 32));
  EXPECT_GT(max_abs_diff(full, kivi), 0.1);
  EXPECT_LT(max_abs_diff(kivi, teacher_forced(fx, policy("specache", 1, 0, 8, 32))), 1e-4);
}
