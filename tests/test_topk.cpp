// Exact top-k selection (kv/topk.h) against the nth_element reference, and the in-place top-k
// buffer's scatter reads (RowRef::dst_row) in both slow stores.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

#include "kv/topk.h"

namespace spc {
namespace {

TEST(Topk, MatchesReferenceOnRandomInputsWithTies) {
  std::mt19937 rng(7);
  TopkScratch scratch;
  std::vector<int64_t> got, want;
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = 1 + rng() % 3000;
    std::vector<float> v((size_t)n);
    const int mode = trial % 4;
    for (auto& x : v) {
      if (mode == 0) x = std::uniform_real_distribution<float>(0, 1)(rng);                 // probabilities
      if (mode == 1) x = std::exp(std::uniform_real_distribution<float>(-80, 0)(rng));     // wide range
      if (mode == 2) x = (float)(rng() % 5) * 0.25f;                                       // many ties
      if (mode == 3) x = std::uniform_real_distribution<float>(-3, 3)(rng);                // negative too
    }
    if (mode == 3 && n > 2) v[1] = -0.0f, v[2] = 0.0f;
    for (int64_t k : {(int64_t)0, (int64_t)1, (int64_t)(rng() % (n + 1)), n, n + 5}) {
      topk_indices(v.data(), n, k, got, scratch);
      topk_indices_ref(v.data(), n, k, want);
      ASSERT_EQ(got, want) << "trial " << trial << " n " << n << " k " << k;
    }
  }
}

// Long inputs take the group-maxima path (k up to n/16): attention-like (peaky), flat, ties, a
// length that is not a multiple of 16 (the tail is only filtered), -infinity (masked positions)
// and every group but one empty of large values. The hint it leaves is never above the k-th
// largest value, so the same vector passes its own hinted filter.
TEST(Topk, MatchesReferenceOnLongInputs) {
  std::mt19937 rng(11);
  TopkScratch scratch;
  std::vector<int64_t> got, want;
  for (int64_t n : {(int64_t)2111, (int64_t)8192, (int64_t)40003}) {
    std::vector<float> v((size_t)n);
    for (int mode = 0; mode < 6; ++mode) {
      for (auto& x : v) {
        if (mode == 0) x = std::exp(std::normal_distribution<float>(0, 3)(rng)) * 1e-4f;
        if (mode == 1) x = std::uniform_real_distribution<float>(0, 1)(rng);
        if (mode == 2) x = (float)(rng() % 3);
        if (mode == 3) x = 0.0f;
        if (mode == 4) x = rng() % 4 ? -std::numeric_limits<float>::infinity() : std::normal_distribution<float>()(rng);
        if (mode == 5) x = 1e-3f * std::uniform_real_distribution<float>(0, 1)(rng);
      }
      if (mode == 3) v[n - 1] = 1.0f;  // the only non-zero value sits in the tail
      if (mode == 5)                  // the large values all in one strided group (stride 16*16)
        for (int64_t i = 5; i < n; i += 256) v[(size_t)i] = 1.0f + (float)(i % 7);
      for (int64_t k : {(int64_t)1, (int64_t)7, (int64_t)64, (int64_t)65, (int64_t)130, n / 16}) {
        float hint = -std::numeric_limits<float>::infinity();
        topk_indices(v.data(), n, k, got, scratch, &hint);
        topk_indices_ref(v.data(), n, k, want);
        ASSERT_EQ(got, want) << "n " << n << " mode " << mode << " k " << k;
        float kth = std::numeric_limits<float>::infinity();
        for (int64_t i : want) kth = std::min(kth, v[(size_t)i]);
        EXPECT_LE(hint, kth) << "n " << n << " mode " << mode << " k " << k;
        topk_indices(v.data(), n, k, got, scratch, &hint);
        ASSERT_EQ(got, want) << "hinted: n " << n << " mode " << mode << " k " << k;
      }
    }
  }
}

// A hint carried from call to call (as the KV policies carry one per layer and KV head) never
// changes the result: a sequence of slowly drifting attention-like vectors, then jumps that make
// the hint too high (fewer than k values pass it: fallback) or far too low (everything passes),
// ties at the threshold, and hints that arrive as -infinity.
TEST(Topk, HintedSelectionEqualsReference) {
  std::mt19937 rng(13);
  TopkScratch scratch;
  std::vector<int64_t> got, want;
  for (int64_t n : {(int64_t)300, (int64_t)8192, (int64_t)33000}) {
    std::vector<float> v((size_t)n);
    for (auto& x : v) x = std::exp(std::normal_distribution<float>(0, 2)(rng));
    float hint = -std::numeric_limits<float>::infinity();
    int hinted_hits = 0;
    for (int step = 0; step < 60; ++step) {
      for (auto& x : v) x *= std::exp(std::normal_distribution<float>(0, 0.1f)(rng));  // drift
      if (step % 15 == 7) for (auto& x : v) x *= 1e-3f;  // hint far too high: fallback
      if (step % 15 == 11) for (auto& x : v) x *= 1e3f;  // hint far too low: all pass
      if (step % 20 == 13) for (int64_t i = 0; i < n; i += 3) v[(size_t)i] = hint > 0 ? hint : 1.0f;  // ties at the hint
      for (int64_t k : {(int64_t)64}) {
        const float before = hint;
        topk_indices(v.data(), n, k, got, scratch, &hint);
        topk_indices_ref(v.data(), n, k, want);
        ASSERT_EQ(got, want) << "n " << n << " step " << step << " hint " << before;
        int64_t passing = 0;
        for (float x : v) passing += x >= before;
        hinted_hits += passing >= k;
        ASSERT_FALSE(std::isnan(hint));
      }
    }
    EXPECT_GT(hinted_hits, 40) << "n " << n << ": the hint should usually carry over between similar vectors";
  }
}

// topk_indices_at_least: with a threshold that at least k values reach, the reference's top-k
// (thresholds at every rank around k, ties at the threshold, more than 16k passing); false
// whenever fewer than k values reach it, also when there are fewer than k values at all (a pruned
// read of nothing: a policy once took that for an empty top-k).
TEST(Topk, AtLeastThresholdEqualsReferenceOrRefuses) {
  std::mt19937 rng(29);
  TopkScratch scratch;
  std::vector<int64_t> got, want;
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t n = 1 + rng() % 5000, k = 1 + rng() % 80;
    std::vector<float> v((size_t)n);
    for (auto& x : v) x = std::exp(std::normal_distribution<float>(0, 2)(rng));
    if (trial % 4 == 1) for (int64_t i = 0; i < n; i += 5) v[(size_t)i] = v[0];  // ties
    std::vector<float> sorted = v;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    topk_indices_ref(v.data(), n, k, want);
    for (int64_t rank : {k - 2, k - 1, k, k + 3, 4 * k, 20 * k, n - 1}) {
      if (rank < 0 || rank >= n) continue;
      const float thr = sorted[(size_t)rank];
      int64_t passing = 0;
      for (float x : v) passing += x >= thr;
      float hint = thr;
      got.assign(3, -1);
      const bool ok = topk_indices_at_least(v.data(), n, k, thr, got, scratch, &hint);
      ASSERT_EQ(ok, passing >= k) << "n " << n << " k " << k << " rank " << rank;
      if (ok) {
        ASSERT_EQ(got, want) << "n " << n << " k " << k << " rank " << rank;
        ASSERT_LE(hint, sorted[(size_t)(std::min(k, n) - 1)]);
      } else {
        ASSERT_EQ(hint, thr) << "a refusal leaves the hint alone";
      }
    }
  }
  std::vector<float> v = {3.0f, 1.0f, 2.0f};
  EXPECT_FALSE(topk_indices_at_least(v.data(), 3, 4, 0.0f, got, scratch));  // fewer than k values
  EXPECT_FALSE(topk_indices_at_least(v.data(), 0, 1, 0.0f, got, scratch));  // nothing read
  EXPECT_TRUE(topk_indices_at_least(v.data(), 3, 0, 9.0f, got, scratch));
  EXPECT_TRUE(got.empty());
  EXPECT_TRUE(topk_indices_at_least(v.data(), 3, 2, 2.0f, got, scratch));
  EXPECT_EQ(got, (std::vector<int64_t>{0, 2}));
}

TEST(Topk, AllEqualValuesPreferLowerIndices) {
  std::vector<float> v(100, 0.5f);
  TopkScratch scratch;
  std::vector<int64_t> got;
  topk_indices(v.data(), 100, 3, got, scratch);
  EXPECT_EQ(got, (std::vector<int64_t>{0, 1, 2}));
  topk_indices(v.data(), 0, 3, got, scratch);
  EXPECT_TRUE(got.empty());
}

}  // namespace
}  // namespace spc
