#include "kv/topk.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <functional>
#include <limits>
#include <cstring>

#include "ops/vec_math.h"
#include "util/error.h"

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
// pass: a threshold that low would make the ranking cost more than the group-maximum path.
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

// Rank key of position i < 2^32: the order key of v[i] above the complement of i, so that keys in
// descending order are positions by (value descending, index ascending). Selecting over keys
// compares integers held in place; an index comparator loads two values per comparison.
inline uint64_t rank_key(const float* v, int64_t i) {
  return ((uint64_t)order_key(v[i]) << 32) | (uint32_t)~(uint32_t)i;
}
inline int64_t rank_index(uint64_t key) { return (int64_t)(uint32_t)~(uint32_t)key; }

// The hint a selection leaves for the next call: the value of rank 4k among its candidates (or
// their smallest). The slack below the k-th value lets the next, slightly different vector still
// pass k values through the hinted filter (rank 2k failed on a fifth of the decode steps'
// selections at 8K context; 4k on a tenth).
constexpr int64_t kHintRank = 4;

// out = the k best of cand (at least k of them, ascending), by (value descending, index
// ascending), sorted ascending: the k-th best rank key is found on a copy, then one pass over
// cand keeps the positions at or above it, already in order (no sort). With hint: *hint becomes
// the value of rank min(kHintRank*k, |cand|) among the candidates.
void take_top(const float* v, int64_t k, const std::vector<int64_t>& cand, std::vector<uint64_t>& keys,
              std::vector<int64_t>& out, float* hint) {
  const int64_t nc = (int64_t)cand.size();
  keys.resize((size_t)nc);
  for (int64_t j = 0; j < nc; ++j) keys[j] = rank_key(v, cand[j]);
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
  const uint64_t kth = keys[k - 1];
  if (hint) {
    const int64_t r = std::min<int64_t>(kHintRank * k, nc) - 1;
    if (r == nc - 1) {  // the smallest candidate (the usual case: a good hint passes fewer than 4k)
      *hint = v[rank_index(*std::min_element(keys.begin() + (k - 1), keys.end()))];
    } else {  // r > k - 1: keys past k - 1 are all below it
      std::nth_element(keys.begin() + k, keys.begin() + r, keys.end(), std::greater<uint64_t>());
      *hint = v[rank_index(keys[r])];
    }
  }
  out.clear();
  for (int64_t c : cand)  // rank keys are distinct: exactly k pass
    if (rank_key(v, c) >= kth) out.push_back(c);
}

// Candidates by group maxima: the k-th largest of the maxima of any k or more disjoint groups is
// a lower bound T of the k-th largest value (k groups hold k distinct values >= T), so every
// member of the top-k is >= T. One pass forms the groups: entry 16*a + l of the maxima holds the
// largest of v[16*(j*na + a) + l] over j (strided groups: one vertical max per 16 values, no
// horizontal reduction). A small nth_element finds T, a second pass keeps the values >= T, and an
// exact selection among them settles the order, ties included. With >= 4k groups T sits close to
// the k-th value: on the decode steps' attention probabilities at 8K context ~70 candidates
// passed, where contiguous blocks of 64 (2k of them) let thousands through. False when the groups
// would hold fewer than 4 values each (no cheaper than the values themselves).
bool topk_by_group_max(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch,
                       float* hint) {
  int64_t na = 16;
  while (16 * na < 4 * k) na *= 2;
  if (n < 4 * 16 * na) return false;
  auto& gmax = scratch.fbuf;
  gmax.assign((size_t)(16 * na), -std::numeric_limits<float>::infinity());
  float* g = gmax.data();
  const int64_t nv = n / 16;  // a tail shorter than 16 is only filtered
  for (int64_t i = 0; i < nv; ++i) {
    float* a = g + 16 * (i & (na - 1));
    const float* x = v + 16 * i;
#if defined(__AVX512F__)
    _mm512_storeu_ps(a, _mm512_max_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(x)));
#elif defined(__AVX2__)
    _mm256_storeu_ps(a, _mm256_max_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(x)));
    _mm256_storeu_ps(a + 8, _mm256_max_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(x + 8)));
#else
    for (int l = 0; l < 16; ++l) a[l] = std::max(a[l], x[l]);
#endif
  }
  std::nth_element(gmax.begin(), gmax.begin() + (k - 1), gmax.end(), std::greater<float>());
  filter_at_least(v, n, gmax[k - 1], scratch.cand);
  take_top(v, k, scratch.cand, scratch.keys, out, hint);
  return true;
}

void topk_unhinted(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch,
                   float* hint);

// Above this many candidates a filter gives up on ranking them one by one (the unhinted path).
inline size_t candidate_cap(int64_t k) { return (size_t)std::max<int64_t>(16 * k, 256); }

}  // namespace

void topk_indices(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch,
                  float* hint) {
  out.clear();
  k = std::clamp<int64_t>(k, 0, n);
  if (k == 0) return;
  SPC_CHECK(n <= (int64_t)UINT32_MAX, "top-k over %lld positions: at most 2^32 - 1 supported", (long long)n);
  if (k == n) {
    for (int64_t i = 0; i < n; ++i) out.push_back(i);
    return;
  }
  if (hint && *hint > -std::numeric_limits<float>::infinity()) {
    // Every member of the top-k is >= the k-th largest value, which is >= *hint when at least k
    // values are: the filtered candidates then hold the whole top-k.
    // (Many values tied at the hint, e.g. probabilities that underflowed to 0, would pass it.)
    if (filter_at_least(v, n, *hint, scratch.cand, candidate_cap(k)) && (int64_t)scratch.cand.size() >= k) {
      take_top(v, k, scratch.cand, scratch.keys, out, hint);
      return;
    }
  }
  topk_unhinted(v, n, k, out, scratch, hint);
}

bool topk_indices_at_least(const float* v, int64_t n, int64_t k, float thr, std::vector<int64_t>& out,
                           TopkScratch& scratch, float* hint) {
  out.clear();
  if (k <= 0) return true;
  if (k > n) return false;  // fewer than k values at all
  SPC_CHECK(n <= (int64_t)UINT32_MAX, "top-k over %lld positions: at most 2^32 - 1 supported", (long long)n);
  if (!filter_at_least(v, n, thr, scratch.cand, candidate_cap(k))) {  // more than 16k >= k pass
    topk_unhinted(v, n, k, out, scratch, hint);
    return true;
  }
  if ((int64_t)scratch.cand.size() < k) return false;
  take_top(v, k, scratch.cand, scratch.keys, out, hint);
  return true;
}

namespace {

void topk_unhinted(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch,
                   float* hint) {
  if (topk_by_group_max(v, n, k, out, scratch, hint)) return;
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
  if (hint) {  // the k-th largest value: a threshold the next call can try
    *hint = v[out.front()];
    for (int64_t i : out) *hint = std::min(*hint, v[i]);
  }
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
