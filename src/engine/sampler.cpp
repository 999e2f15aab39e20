#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "ops/vec_math.h"
#include "util/error.h"

namespace spc {

int32_t argmax(const float* logits, int n) { return (int32_t)vec_argmax(logits, n); }

Sampler::Sampler(const SamplerConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {
  SPC_CHECK(std::isfinite(cfg.temp), "temperature must be finite");
  SPC_CHECK(cfg.top_p > 0, "top-p must be > 0, got %g", cfg.top_p);
  SPC_CHECK(cfg.min_p < 1, "min-p must be < 1, got %g", cfg.min_p);
}

int32_t Sampler::sample(const float* logits, int n) {
  if (cfg_.temp <= 0) return argmax(logits, n);
  cand_.resize(n);
  for (int i = 0; i < n; ++i) cand_[i] = {logits[i], i};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t k = (size_t)n;
  if (cfg_.top_k > 0 && cfg_.top_k < n) {
    k = (size_t)cfg_.top_k;
    std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), by_logit);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  cand_.resize(k);
  // Softmax with temperature over the kept candidates (sorted descending).
  const float mx = cand_[0].first;
  double sum = 0;
  for (auto& c : cand_) {
    c.first = (float)std::exp((c.first - mx) / cfg_.temp);
    sum += c.first;
  }
  for (auto& c : cand_) c.first = (float)(c.first / sum);
  if (cfg_.top_p < 1) {  // smallest prefix whose mass reaches top_p
    double cum = 0;
    size_t keep = 0;
    while (keep < cand_.size()) {
      cum += cand_[keep++].first;
      if (cum >= cfg_.top_p) break;
    }
    cand_.resize(keep);
  }
  if (cfg_.min_p > 0) {  // drop tokens below min_p x the top probability
    const float thr = cfg_.min_p * cand_[0].first;
    size_t keep = 1;
    while (keep < cand_.size() && cand_[keep].first >= thr) ++keep;
    cand_.resize(keep);
  }
  double total = 0;
  for (const auto& c : cand_) total += c.first;
  const double u = (double)(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cum = 0;
  for (const auto& c : cand_) {
    cum += c.first;
    if (u < cum) return c.second;
  }
  return cand_.back().second;
}

}  // namespace spc
