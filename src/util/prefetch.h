// Software prefetch of a byte range, one request per 64-byte cache line, into every cache level:
// for data read once per decode step in pieces too short (a few packed blocks) or too scattered
// (gathered rows) for the hardware prefetcher to predict.
//
// On x86 the request is an asm volatile prefetcht0, not __builtin_prefetch: GCC 12 treats the
// builtin as free of side effects and, inside some loops (the request of a conditional range
// per iteration, as in the streaming decode attention, and in HostStore::read_rows), deleted the
// whole prefetch loop at -O1 and above; the binary then had no prefetch instruction there.
#pragma once
#include <cstddef>

namespace spc {

inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" ::"m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// The same into the outer levels only (prefetcht2: on Intel the line stops in L2), for data
// requested a whole block ahead of a kernel that keeps its current block in L1.
inline void prefetch_line_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht2 %0" ::"m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}

inline void prefetch_bytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t off = 0; off < bytes; off += 64) prefetch_line(c + off);
}

inline void prefetch_bytes_l2(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t off = 0; off < bytes; off += 64) prefetch_line_l2(c + off);
}

}  // namespace spc
