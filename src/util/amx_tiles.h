// AMX tile instructions for the kernels that use them (x86-64 only; callers check
// cpu_amx_bf16_usable / cpu_amx_int8_usable at run time). Written as asm, so no compiler AMX
// flags are needed, with memory clobbers on the loads and stores: the compiler must not move
// the kernels' vector stores to a buffer across the tile loads that read it, nor vector loads
// across the tile stores that write it.
#pragma once
#if defined(__x86_64__)
#include <cstdint>

namespace spc::amx {

struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  // Tile t: rows x bytes per row (<= 16 x 64).
  Config& tile(int t, int n_rows, int bytes) {
    rows[t] = (uint8_t)n_rows;
    colsb[t] = (uint16_t)bytes;
    return *this;
  }
};

// Scoped tile configuration, released on destruction (the tiles go back to their initial state,
// so the thread carries no tile data between kernels).
class Scope {
 public:
  explicit Scope(const Config& c) { asm volatile("ldtilecfg %0" ::"m"(c)); }
  ~Scope() { asm volatile("tilerelease" ::: "memory"); }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
};

template <int T>
inline void load(const void* p, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "n"(T) : "memory");
}
template <int T>
inline void store(void* p, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "n"(T) : "memory");
}
template <int T>
inline void zero() {
  asm volatile("tilezero %%tmm%c0" ::"n"(T));
}
// tmm C += tmm A x tmm B: bf16 pairs, fp32 sums.
template <int C, int A, int B>
inline void dp_bf16() {
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
}
// tmm C += tmm A (signed bytes) x tmm B (unsigned bytes): quads, int32 sums.
template <int C, int A, int B>
inline void dp_su8() {
  asm volatile("tdpbsud %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
}

}  // namespace spc::amx
#endif
