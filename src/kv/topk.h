// Exact top-k selection over float scores, used by the KV policies to pick the 16-bit pairs of
// the next step. For n >= max(1024, 16k): the maxima of >= 4k strided groups give a lower
// bound of the k-th largest value and a vectorized filter keeps the few candidates above it.
// Otherwise a radix histogram on the
// order-preserving bit pattern of each value finds the bucket holding the k-th largest. Either
// way only a small candidate set is sorted (partially): O(n) with small constants, no
// allocation in steady state (the scratch is reused).
#pragma once
#include <cstdint>
#include <vector>

namespace spc {

struct TopkScratch {
  std::vector<int64_t> cand;
  std::vector<float> fbuf;
  std::vector<uint64_t> keys;
};

// Replaces out with the indices of the k largest values of v[0, n) — ordered by (value
// descending, index ascending), so ties go to the lower index — sorted ascending. k is clamped
// to [0, n]. Values must not be NaN; n < 2^32.
//
// hint (optional, in/out): a threshold guessed from an earlier, similar call (the KV policies
// select from one step's attention of a layer and KV head, and the next step's attention is
// much like it). When at least k values are >= *hint, one vectorized filter pass yields every
// member of the top-k and only those candidates are ranked; otherwise the call falls back to
// the unhinted path (also when more than 16k values pass it). Either way the result is the same
// exact top-k; the hint only saves time.
// On return *hint is a little below the k-th largest value: the 4k-th largest among the
// candidates ranked, or the smallest of them, or (radix path) the k-th largest itself. Start
// with -infinity.
void topk_indices(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out, TopkScratch& scratch,
                  float* hint = nullptr);

// The same top-k as topk_indices when at least k values of v[0, n) are >= thr: every member of the
// top-k is then >= thr, so one filter pass finds the candidates (all of v is ranked the unhinted
// way if more than 16k pass). False, with out unspecified and *hint unchanged, when fewer than k
// values are >= thr. *hint as topk_indices' on success. For callers that know a threshold for this
// very vector (the KV policies' pruned selection reads only values that may reach one).
bool topk_indices_at_least(const float* v, int64_t n, int64_t k, float thr, std::vector<int64_t>& out,
                           TopkScratch& scratch, float* hint = nullptr);

// Reference: the same result with std::nth_element (tests).
void topk_indices_ref(const float* v, int64_t n, int64_t k, std::vector<int64_t>& out);

}  // namespace spc
