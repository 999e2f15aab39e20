// Run-time CPU features the build cannot know: a binary built for AVX-512 BF16 may run on a CPU
// with or without AMX, and AMX needs the kernel's permission besides the CPUID bits.
#pragma once

namespace spc {

// True when this process may run AMX-BF16 tile instructions: x86-64 Linux, CPUID reports
// AMX-TILE and AMX-BF16, and the kernel granted the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM, asked once per process; the permission covers every thread). The
// environment variable SPECACHE_NO_AMX=1 turns it off (for comparisons).
bool cpu_amx_bf16_usable();
// The same for AMX-INT8 (tdpbsud and relatives).
bool cpu_amx_int8_usable();

}  // namespace spc
