#include "tier/rss.h"

#include <cstdio>
#include <cstring>

#include "util/error.h"

namespace spc {

namespace {
size_t status_kib(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  SPC_CHECK(f != nullptr, "cannot open /proc/self/status to read %s", key);
  char line[256];
  const size_t klen = std::strlen(key);
  size_t kib = 0;
  bool found = false;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, klen) == 0 && line[klen] == ':') {
      unsigned long long v = 0;
      if (std::sscanf(line + klen + 1, "%llu", &v) == 1) {
        kib = (size_t)v;
        found = true;
      }
      break;
    }
  }
  std::fclose(f);
  SPC_CHECK(found, "/proc/self/status has no %s line", key);
  return kib * 1024;
}
}  // namespace

size_t current_rss_bytes() { return status_kib("VmRSS"); }
size_t peak_rss_bytes() { return status_kib("VmHWM"); }

}  // namespace spc
