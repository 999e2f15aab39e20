#include "kv/topk.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <functional>
#include <limits>
#include <cstring>

#include "ops/vec_math.h"

namespace spc {

namespace {

// Order-preserving map of a (non-NaN) float to uint32: a < b  <=>  key(a) < key(b).
inline uint32_t order_key(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x == 0.0f ? 0.0f : x);  // -0 == +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kBucketBits = 12;
constexpr int kShift = 32 - kBucketBits;

// cand = indices i with v[i] >= thr, ascending. False (cand incomplete) as soon as more than cap
// pass: a threshold that low would make the ranking cost more than the block-maximum path.
bool filter_at_least(const float* v, int64_t n, float thr, std::vector<int64_t>& cand,
                     size_t cap = SIZE_MAX) {
  cand.clear();
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 tv = _mm512_set1_ps(thr);
  for (; i + 16 <= n; i += 16) {
    uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), tv, _CMP_GE_OQ);
    while (m) {
      cand.push_back(i + std::countr_zero(m));
      m &= m - 1;
    }
    if (cand.size() > cap) return false;
  }
#elif defined(__AVX2__)
  const __m256 tv = _mm256_set1_ps(thr);
  for (; i + 8 <= n; i += 8) {
    uint32_t m = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + i), tv, _CMP_GE_OQ));
    while (m) {
      cand.push_back(i + std::countr_zero(m));
      m &= m - 1;
    }
    if (cand.size() > cap) return false;
  }
#endif
  for (; i < n; ++i)
    if (v[i] >= thr) cand.push_back(i);
  return cand.size() <= cap;
}

// out = the k best of cand (at least k of them), by (value descending, index ascending), sorted
// ascending. With hint: *hint becomes the value of rank min(2k, |cand|) among the candidates.
void take_top(const float* v, int64_t k, std::vector<int64_t>& cand, std::vector<int64_t>& out, float* hint) {
  auto better = [&](int64_t a, int64_t c) { return v[a] > v[c] || (v[a] == v[c] && a < c); };
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
  if (hint) {
    const int64_t r = std::min<int64_t>(2 * k, (int64_t)cand.size()) - 1;
    if (r > k - 1) std::nth_element(cand.begin() + k, cand.begin() + r, cand.end(), better);
    *hint = v[cand[r]];
  }
  out.assign(cand.begin(), cand.begin() + k);
  std::sort(out.begin(), out.end());
}

// Candidates by block maxima: the k-th largest of the per-block maxima is a lower bound T of the
// k-th largest value (the top-k blocks hold k distinct values >= T), so every member of the
// top-k is >= T. One vectorized pass computes the maxima, a small nth_element finds T, a second
// pass keeps the values >= T (typically a few times k), and an exact selection among them
// settles the order, ties included. False when the blocks would be too few.
bool topk_by_block_max(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch) {
  const int64_t bs = n >= 128 * k ? 64 : (n >= 32 * k ? 16 : 0);
  if (bs == 0) return false;
  const int64_t nb = n / bs;  // full blocks; a tail shorter than bs is only filtered
  auto& bmax = scratch.fbuf;
  bmax.resize((size_t)nb);
  for (int64_t b = 0; b < nb; ++b) bmax[b] = vec_max(v + b * bs, bs);
  std::nth_element(bmax.begin(), bmax.begin() + (k - 1), bmax.end(), std::greater<float>());
  const float thr = bmax[k - 1];
  filter_at_least(v, n, thr, scratch.cand);
  take_top(v, k, scratch.cand, out, nullptr);
  return true;
}

void topk_unhinted(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch);

}  // namespace

void topk_indices(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch,
                  float* hint) {
  out.clear();
  k = std::clamp<int64_t>(k, 0, n);
  if (k == 0) return;
  if (k == n) {
    for (int64_t i = 0; i < n; ++i) out.push_back(i);
    return;
  }
  if (hint && *hint > -std::numeric_limits<float>::infinity()) {
    // Every member of the top-k is >= the k-th largest value, which is >= *hint when at least k
    // values are: the filtered candidates then hold the whole top-k.
    // (Many values tied at the hint, e.g. probabilities that underflowed to 0, would pass it.)
    const size_t cap = (size_t)std::max<int64_t>(16 * k, 256);
    if (filter_at_least(v, n, *hint, scratch.cand, cap) && (int64_t)scratch.cand.size() >= k) {
      take_top(v, k, scratch.cand, out, hint);
      return;
    }
  }
  topk_unhinted(v, n, k, out, scratch);
  if (hint) {  // the k-th largest value: a threshold the next call can try
    *hint = v[out.front()];
    for (int64_t i : out) *hint = std::min(*hint, v[i]);
  }
}

namespace {

void topk_unhinted(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch) {
  if (topk_by_block_max(v, n, k, out, scratch)) return;
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

}  // namespace

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
