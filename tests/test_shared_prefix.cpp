// Shared prompt prefix (KvPolicy::share_prefix, Session::prefill_from(..., share = true)): several
// sessions after one document read its cache from the first session's memory instead of a copy,
// and decode exactly as a copy would.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_policy.h"
#include "test_util.h"
#include "util/error.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

KvConfig config(const std::string& policy, int bits, const std::string& store = "host") {
  KvConfig c;
  c.policy = policy;
  if (bits > 0) c.bits = bits;
  c.topk = 16;
  c.window = 16;
  c.store = store;
  if (store == "file") {
    c.dir = ::testing::TempDir() + "/shared_prefix_file_store";
    std::filesystem::create_directories(c.dir);
  }
  return resolve_kv_config(c);
}

std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

struct Decoded {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;
};

Decoded greedy(Session& s, int gen) {
  Decoded d;
  const int nv = s.model().config().n_vocab;
  for (int t = 0; t < gen; ++t) {
    d.tokens.push_back(argmax(s.logits().data(), nv));
    s.decode(d.tokens.back());
    d.logits.push_back(s.logits());
  }
  return d;
}

}  // namespace

// For each policy that shares: a first session holds a document and one question; a second takes
// the document's first half over shared, a third as a copy, and both prefill the rest and another
// question. The shared one holds a part of the copy's KV memory and gets the copy's logits, bit for
// bit, through the prompt and every decode step, also after the first session is gone; so does a
// fourth session that shares the second one's whole sequence (a chain: its blocks live in the first
// and the second session's memory, and its attention passes straddle both ends).
TEST(SharedPrefix, SharedDocumentDecodesLikeACopyBitForBit) {
  SMOLLM2_WITH_BOOK(model, book, 6000, 1400);
  model->set_int8_decode(model->int8_decode_supported());
  ThreadPool pool(2);
  const int gen = 8;
  const int64_t half = 500;
  const std::vector<int32_t> doc(book.begin(), book.begin() + 1000);
  const std::vector<int32_t> rest(book.begin() + half, book.begin() + 1000);
  const std::vector<int32_t> q1(book.begin() + 1000, book.begin() + 1040);
  const std::vector<int32_t> q2(book.begin() + 1200, book.begin() + 1233);
  const int64_t n_ctx = 1300;
  const std::vector<KvConfig> cfgs = {config("full", 0), config("specache", 1), config("specache-exact", 2, "file"),
                                      config("topk-oracle", 1)};
  for (const KvConfig& cfg : cfgs) {
    SCOPED_TRACE(cfg.policy + ":" + std::to_string(cfg.bits) + " " + cfg.store);
    auto make = [&] { return std::make_unique<Session>(*model, make_kv_policy(cfg, model->kv_geometry(n_ctx)), pool); };
    auto a = make(), shared = make(), copy = make(), chain = make();
    a->prefill(cat(doc, q1));
    shared->prefill_from(*a, half, /*share=*/true);
    copy->prefill_from(*a, half, /*share=*/false);
    const KvStats s0 = shared->kv().stats(), c0 = copy->kv().stats();
    EXPECT_EQ(shared->n_past(), half);
    EXPECT_EQ(shared->sequence(), copy->sequence());
    EXPECT_EQ(c0.shared_bytes, 0u);
    EXPECT_GT(s0.shared_bytes, 0u);
    EXPECT_EQ(s0.fast_bytes + s0.shared_bytes, c0.fast_bytes);
    if (c0.slow_bytes > 0) {
      EXPECT_LT(s0.slow_bytes * 4, c0.slow_bytes);
    }

    shared->prefill(cat(rest, q2));
    copy->prefill(cat(rest, q2));
    ASSERT_EQ(shared->logits(), copy->logits());
    chain->prefill_from(*shared, -1, /*share=*/true);
    const KvStats ch = chain->kv().stats(), s1 = shared->kv().stats();
    EXPECT_GT(ch.shared_bytes, s1.shared_bytes);  // the first session's blocks, and the second's own
    a.reset();  // the shared views keep the first session's cache alive

    const Decoded dc = greedy(*copy, gen), ds = greedy(*shared, gen), dch = greedy(*chain, gen);
    EXPECT_EQ(ds.tokens, dc.tokens);
    EXPECT_EQ(dch.tokens, dc.tokens);
    for (int t = 0; t < gen; ++t) {
      ASSERT_EQ(ds.logits[t], dc.logits[t]) << "step " << t;
      ASSERT_EQ(dch.logits[t], dc.logits[t]) << "step " << t;
    }
    std::printf("[ %s:%d %s: %llu fast bytes shared + %llu own, against a copy's %llu ]\n", cfg.policy.c_str(),
                cfg.bits, cfg.store.c_str(), (unsigned long long)s1.shared_bytes, (unsigned long long)s1.fast_bytes,
                (unsigned long long)copy->kv().stats().fast_bytes);
  }
}

// Nothing is shared where the stored data would differ (another policy, bit width or store kind)
// or where a policy keeps no 16-bit copy; prefill_from then copies, as without share.
TEST(SharedPrefix, OnlyTheSamePolicyAndStorageShare) {
  const std::string path = shared_path("models/stories260K/stories260K.gguf");
  SKIP_IF_MISSING(path);
  auto model = Model::load(path);
  ThreadPool pool(1);
  std::vector<int32_t> prompt = {1};
  for (int j = 0; j < 300; ++j) prompt.push_back((int32_t)(2 + (37 * j) % 500));
  auto session = [&](const KvConfig& c) {
    return std::make_unique<Session>(*model, make_kv_policy(c, model->kv_geometry(400)), pool);
  };
  auto s1 = session(config("specache", 1));
  s1->prefill(prompt);
  for (const KvConfig& c : {config("specache", 2), config("full", 0), config("specache", 1, "file"), config("kivi", 1),
                            config("streaming", 0)}) {
    SCOPED_TRACE(c.policy + ":" + std::to_string(c.bits) + " " + c.store);
    auto s = session(c);
    EXPECT_EQ(s->kv().share_prefix(s1->kv(), 200), 0);
    EXPECT_EQ(s->n_past(), 0);
  }
  // The same low-bit format and storage share the blocks a prefill of n would quantize: g = 64
  // with a window of 16 leaves 2 of 200 positions' blocks (128 positions) out of the window.
  auto s2 = session(config("specache-exact", 1));
  EXPECT_EQ(s2->kv().share_prefix(s1->kv(), 200), 128);
  EXPECT_EQ(s2->n_past(), 128);
  EXPECT_THROW(s2->kv().share_prefix(s1->kv(), 200), Error);  // not empty any more
  auto s3 = session(config("specache", 1));
  EXPECT_THROW(s3->kv().share_prefix(s1->kv(), 1000), Error);  // more than it holds
  EXPECT_EQ(s3->kv().share_prefix(s1->kv(), 40), 0);           // no whole block outside the window
  // full shares whole key tiles of 16 positions.
  auto f1 = session(config("full", 0));
  f1->prefill(prompt);
  auto f2 = session(config("full", 0));
  EXPECT_EQ(f2->kv().share_prefix(f1->kv(), 250), 240);
  EXPECT_EQ(f2->kv().stats().fast_bytes, 0u);
  EXPECT_EQ(f2->kv().stats().shared_bytes * 301, f1->kv().stats().fast_bytes * 240);
}
