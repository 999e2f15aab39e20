#include "kv/topk.h"

#include <algorithm>
#include <bit>
#include <cstring>

namespace spc {

namespace {

// Order-preserving map of a (non-NaN) float to uint32: a < b  <=>  key(a) < key(b).
inline uint32_t order_key(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x == 0.0f ? 0.0f : x);  // -0 == +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kBucketBits = 12;
constexpr int kShift = 32 - kBucketBits;

}  // namespace

void topk_indices(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch) {
  out.clear();
  k = std::clamp<int64_t>(k, 0, n);
  if (k == 0) return;
  if (k == n) {
    for (int64_t i = 0; i < n; ++i) out.push_back(i);
    return;
  }
  uint32_t hist[1u << kBucketBits];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) ++hist[order_key(v[i]) >> kShift];
  // Boundary bucket: the k-th largest value falls in it.
  int64_t above = 0;
  uint32_t b = (1u << kBucketBits) - 1;
  for (;; --b) {
    if (above + hist[b] >= k) break;
    above += hist[b];
  }
  auto& cand = scratch.cand;
  cand.clear();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t kb = order_key(v[i]) >> kShift;
    if (kb > b)
      out.push_back(i);
    else if (kb == b)
      cand.push_back(i);
  }
  const int64_t need = k - above;
  if (need < (int64_t)cand.size())
    std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(),
                     [&](int64_t a, int64_t c) { return v[a] > v[c] || (v[a] == v[c] && a < c); });
  out.insert(out.end(), cand.begin(), cand.begin() + need);
  std::sort(out.begin(), out.end());
}

void topk_indices_ref(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out) {
  out.clear();
  k = std::clamp<int64_t>(k, 0, n);
  if (k == 0) return;
  std::vector<int64_t> idx((size_t)n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(),
                   [&](int64_t a, int64_t c) { return v[a] > v[c] || (v[a] == v[c] && a < c); });
  out.assign(idx.begin(), idx.begin() + k);
  std::sort(out.begin(), out.end());
}

}  // namespace spc
