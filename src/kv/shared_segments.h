// The segment chains of a shared prompt prefix (KvPolicy::share_prefix): a cache that reads
// positions (or blocks) [0, n) from other caches' memory keeps a list of segments, segment i
// covering [segs[i-1].end, segs[i].end) in one memory, in order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace spc {

// The chain of a cache sharing [0, n) of `base`: base's own chain cut at n, then base_own (base's
// own memory, its end set to n here) where that chain falls short of n. `into` starts empty.
// Seg: any segment type with an int64_t `end`.
template <class Seg>
void share_segments(std::vector<Seg>& into, const std::vector<Seg>& base_chain, Seg base_own, int64_t n) {
  auto covered = [&] { return into.empty() ? int64_t(0) : into.back().end; };
  for (const Seg& s : base_chain) {
    if (covered() >= n) break;
    into.push_back(s);
    into.back().end = std::min(s.end, n);
  }
  if (covered() < n) {
    base_own.end = n;
    into.push_back(base_own);
  }
}

}  // namespace spc
