// Monotonic wall clock for timings (steady_clock): milliseconds or seconds since an arbitrary epoch.
#pragma once
#include <chrono>

namespace spc {

inline double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace spc
