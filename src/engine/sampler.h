// Token sampling: greedy, or temperature with top-k, top-p and min-p filters, seeded.
// The same seed and the same logits give the same tokens on every platform (mt19937_64 and
// our own uniform conversion; no std:: distributions, whose output is implementation-defined).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace spc {

struct SamplerConfig {
  float temp = 0.0f;   // <= 0: greedy (argmax)
  int top_k = 40;      // <= 0: off
  float top_p = 0.95f; // >= 1: off
  float min_p = 0.05f; // <= 0: off
  uint64_t seed = 0;
};

// The index of the first largest logit (vec_argmax: NaNs ignored, ties to the lowest index).
int32_t argmax(const float* logits, int n);

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& cfg);
  int32_t sample(const float* logits, int n_vocab);

 private:
  SamplerConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

}  // namespace spc
