// Process memory as the kernel counts it (/proc/self/status), for checking that the slow tier
// does not live in the process's resident memory.
#pragma once
#include <cstddef>

namespace spc {
size_t current_rss_bytes();  // VmRSS
size_t peak_rss_bytes();     // VmHWM
}  // namespace spc
