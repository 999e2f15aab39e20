#include "util/cpu_features.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "util/env.h"

namespace spc {

namespace {

// CPUID.(7,0).EDX bit 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8.
bool probe_amx(unsigned feature_bit) {
#if defined(__x86_64__) && defined(__linux__)
  if (env_flag("SPECACHE_NO_AMX")) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> feature_bit) & 1u) || !((d >> 24) & 1u)) return false;
  // Linux >= 5.16: the tile data state (XFEATURE 18) is off until the process asks for it; an
  // older kernel (or one without AMX support) refuses, and the instructions would fault. Asked
  // once for both kinds.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  (void)feature_bit;
  return false;
#endif
}

}  // namespace

bool cpu_amx_bf16_usable() {
  static const bool usable = probe_amx(22);
  return usable;
}

bool cpu_amx_int8_usable() {
  static const bool usable = probe_amx(25);
  return usable;
}

}  // namespace spc
