// Machine and build description, peak-RSS reset, and the memory read-bandwidth probe.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>

#include "bench/bench.h"
#include "build_info.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace spc::bench {

BuildInfo build_info() {
  return BuildInfo{SPECACHE_GIT_COMMIT, SPECACHE_BUILD_TYPE, SPECACHE_COMPILER, SPECACHE_CXX_FLAGS};
}

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    size_t b = colon + 1;
    while (b < line.size() && line[b] == ' ') ++b;
    return line.substr(b);
  }
  return "";
}

bool reset_peak_rss() {
  // "5" resets VmHWM to the current RSS (Linux >= 4.0).
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

namespace {

// Sum of [p, p+n) with independent accumulators so the loop is load-bound, not add-latency-bound
// (the compiler vectorizes it at -O3).
uint64_t sum_words(const uint64_t* __restrict p, size_t n) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 += p[i + 0];
    a1 += p[i + 1];
    a2 += p[i + 2];
    a3 += p[i + 3];
    a4 += p[i + 4];
    a5 += p[i + 5];
    a6 += p[i + 6];
    a7 += p[i + 7];
  }
  for (; i < n; ++i) a0 += p[i];
  return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

}  // namespace

BandwidthResult probe_read_bandwidth(size_t bytes, int threads, int passes) {
  SPC_CHECK(threads >= 1 && passes >= 1, "bandwidth probe: threads and passes must be >= 1");
  SPC_CHECK(bytes >= 4096, "bandwidth probe: buffer of %zu bytes is too small", bytes);
  const size_t n = bytes / sizeof(uint64_t) / 8 * 8;
  const size_t alloc = (n * sizeof(uint64_t) + 4095) / 4096 * 4096;
  std::unique_ptr<uint64_t, FreeDeleter> buf((uint64_t*)std::aligned_alloc(4096, alloc));
  SPC_CHECK(buf != nullptr, "bandwidth probe: cannot allocate %zu bytes", alloc);
  uint64_t* p = buf.get();
  ThreadPool pool(threads);
  // First touch by the thread that will read the part (pages land near it).
  pool.parallel_for((int64_t)n, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) p[i] = (uint64_t)i * 0x9E3779B97F4A7C15ull;
  });
  std::vector<uint64_t> partial((size_t)threads * 8, 0);  // one cache line per thread
  volatile uint64_t sink = 0;
  std::vector<double> rates;
  for (int pass = -1; pass < passes; ++pass) {  // pass -1: warm-up
    const double t0 = now_s();
    pool.parallel_for((int64_t)n, [&](int64_t b, int64_t e, int ti) {
      partial[(size_t)ti * 8] = sum_words(p + b, (size_t)(e - b));
    });
    const double dt = now_s() - t0;
    uint64_t total = 0;
    for (int t = 0; t < threads; ++t) total += partial[(size_t)t * 8];
    sink = sink + total;
    if (pass >= 0 && dt > 0) rates.push_back((double)n * sizeof(uint64_t) / dt / 1e9);
  }
  (void)sink;
  BandwidthResult r;
  r.threads = threads;
  r.buffer_bytes = n * sizeof(uint64_t);
  r.passes = passes;
  const Spread s = summarize(rates);
  r.best_gb_per_s = s.max;
  r.median_gb_per_s = s.median;
  return r;
}

}  // namespace spc::bench
