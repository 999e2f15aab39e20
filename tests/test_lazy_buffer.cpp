// LazyBuffer: zeroed, lazily charged anonymous memory; the huge-page variant starts on a 2 MiB
// boundary and asks Linux for transparent huge pages.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "util/env.h"
#include "util/lazy_buffer.h"

using namespace spc;

namespace {

constexpr size_t kMiB = size_t(1) << 20;

bool all_zero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != 0) return false;
  return true;
}

// AnonHugePages (kB) of the mapping that contains p, from /proc/self/smaps; -1 if not found.
long anon_huge_kb(const void* p) {
  std::ifstream f("/proc/self/smaps");
  std::string line;
  bool in = false;
  const uintptr_t a = (uintptr_t)p;
  while (std::getline(f, line)) {
    unsigned long lo, hi;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find('-')) {
      in = a >= lo && a < hi;
      continue;
    }
    long kb;
    if (in && std::sscanf(line.c_str(), "AnonHugePages: %ld kB", &kb) == 1) return kb;
  }
  return -1;
}

}  // namespace

TEST(LazyBuffer, ZeroedWritableAndMovable) {
  LazyBuffer b(3 * kMiB + 17);
  ASSERT_NE(b.data(), nullptr);
  EXPECT_EQ(b.size(), 3 * kMiB + 17);
  EXPECT_FALSE(b.huge_pages_requested());
  EXPECT_TRUE(all_zero(b.data(), b.size()));
  b.data()[0] = 1;
  b.data()[b.size() - 1] = 2;
  uint8_t* p = b.data();
  LazyBuffer c(std::move(b));
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_EQ(b.size(), 0u);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.data()[c.size() - 1], 2);
  LazyBuffer d;
  d = std::move(c);
  EXPECT_EQ(d.data(), p);
  EXPECT_EQ(d.data()[0], 1);
  LazyBuffer empty(0);
  EXPECT_EQ(empty.data(), nullptr);
}

TEST(LazyBuffer, HugePagesStartOnATwoMiBBoundary) {
  const size_t n = 6 * kMiB + 123;
  LazyBuffer b(n, LazyBuffer::huge);
  ASSERT_NE(b.data(), nullptr);
  EXPECT_EQ(b.size(), n);
  if (env_flag("SPECACHE_NO_HUGEPAGES")) {
    EXPECT_FALSE(b.huge_pages_requested());
    GTEST_SKIP() << "SPECACHE_NO_HUGEPAGES is set: no huge-page request";
  }
  EXPECT_EQ((uintptr_t)b.data() % (2 * kMiB), 0u);
  EXPECT_TRUE(all_zero(b.data(), n));
  std::memset(b.data(), 0x5a, n);  // every byte of the buffer is ours to write
  EXPECT_EQ(b.data()[n - 1], 0x5a);
  // Whether Linux grants the pages depends on the host (THP mode, free 2 MiB frames): reported.
  const long kb = anon_huge_kb(b.data());
  RecordProperty("huge_pages_requested", b.huge_pages_requested() ? "yes" : "no");
  RecordProperty("anon_huge_kb", std::to_string(kb));
  std::printf("huge pages requested: %s; AnonHugePages of the mapping: %ld kB\n",
              b.huge_pages_requested() ? "yes" : "no", kb);
  LazyBuffer moved(std::move(b));
  EXPECT_EQ(moved.data()[0], 0x5a);
}
