// Exact top-k selection (kv/topk.h) against the nth_element reference, and the in-place top-k
// buffer's scatter reads (RowRef::dst_row) in both slow stores.
#include <gtest/gtest.h>

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

// Long inputs with small k take the block-maxima path: attention-like (peaky), flat, ties and a
// length that is not a multiple of the block.
TEST(Topk, MatchesReferenceOnLongInputs) {
  std::mt19937 rng(11);
  TopkScratch scratch;
  std::vector<int64_t> got, want;
  for (int64_t n : {(int64_t)2111, (int64_t)8192, (int64_t)40003}) {
    std::vector<float> v((size_t)n);
    for (int mode = 0; mode < 4; ++mode) {
      for (auto& x : v) {
        if (mode == 0) x = std::exp(std::normal_distribution<float>(0, 3)(rng)) * 1e-4f;
        if (mode == 1) x = std::uniform_real_distribution<float>(0, 1)(rng);
        if (mode == 2) x = (float)(rng() % 3);
        if (mode == 3) x = 0.0f;
      }
      if (mode == 3) v[n - 1] = 1.0f;  // the only non-zero value sits in the tail
      for (int64_t k : {(int64_t)1, (int64_t)7, (int64_t)64, (int64_t)65}) {
        topk_indices(v.data(), n, k, got, scratch);
        topk_indices_ref(v.data(), n, k, want);
        ASSERT_EQ(got, want) << "n " << n << " mode " << mode << " k " << k;
      }
    }
  }
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
