// Software prefetch of a byte range, one request per 64-byte cache line, into every cache level:
// for data read once per decode step in pieces too short (a few packed blocks) or too scattered
// (gathered rows) for the hardware prefetcher to predict.
#pragma once
#include <cstddef>

namespace spc {

inline void prefetch_bytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

}  // namespace spc
