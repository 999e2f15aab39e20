// GCC 12's AVX-512 headers self-initialize _mm512_undefined_*() results, which trips
// -Wuninitialized when the intrinsics inline here; silence that (header-only) false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// AVX-512 (or AVX2) fused kernels with fp32 activations for the 32-element block types (decode): each
// weight block is widened to fp32 in registers (codes -> int32 -> float, times the scale, plus
// the min) and FMA'd with the activations as given. No activation rounding, no unpacked copy.
#include <cstdint>
#include <cstring>

#include "ops/matmul_kernels.h"
#include "util/fp16.h"

namespace spc::mmk {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Software prefetch distance ahead of the weight stream, in row tiles (decode is memory-bound).
constexpr int64_t kPrefetchTiles = 4;

inline __m512 bcast_h(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return _mm512_set1_ps(fp16_to_fp32(h));
}
// 16 bytes of packed nibbles: low nibbles are elements 0..15, high nibbles 16..31.
inline void nib_i32(const uint8_t* qs, __m512i& lo, __m512i& hi) {
  const __m128i q = _mm_loadu_si128((const __m128i*)qs);
  const __m128i m = _mm_set1_epi8(0x0f);
  lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, m));
  hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m));
}
// Fifth bits of Q5 codes (bit j of qh -> element j), added as 16.
inline void q5_i32(const uint8_t* qh, const uint8_t* qs, __m512i& lo, __m512i& hi) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  nib_i32(qs, lo, hi);
  const __m512i s = _mm512_set1_epi32(16);
  lo = _mm512_mask_add_epi32(lo, (__mmask16)(h & 0xffffu), lo, s);
  hi = _mm512_mask_add_epi32(hi, (__mmask16)(h >> 16), hi, s);
}

// The 16 code bytes broadcast to the four 128-bit lanes, then lane k shifted right by
// 8*(k/4) (+4 for the high nibbles): the low 4 bits of lane k are the code of element
// 4*(k%4) + k/4 (+16). No shuffles; the activations are permuted to match (f32q_permute_x).
inline __m512i nib_perm(const uint8_t* qs, bool high) {
  const __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)qs));
  const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  return _mm512_srlv_epi32(z, high ? _mm512_add_epi32(sh, _mm512_set1_epi32(4)) : sh);
}
// 4-bit codes through a per-block table of the 16 possible values (d*k + m, or d*(k-8)):
// vpermps picks by the low 4 bits of each 32-bit lane, so no masking and no int->float
// conversion per element. dm: lanes (d, m) repeated.
template <int kOff, bool kMin>
inline void lut4(const uint8_t* dmp, const uint8_t* qs, __m512& w0, __m512& w1) {
  __m512 tbl;
  const __m512 iota = _mm512_setr_ps(0 - kOff, 1 - kOff, 2 - kOff, 3 - kOff, 4 - kOff, 5 - kOff, 6 - kOff, 7 - kOff,
                                     8 - kOff, 9 - kOff, 10 - kOff, 11 - kOff, 12 - kOff, 13 - kOff, 14 - kOff, 15 - kOff);
  if (kMin) {
    uint32_t dm;
    std::memcpy(&dm, dmp, 4);
    const __m512 v = _mm512_cvtph_ps(_mm256_set1_epi32((int)dm));
    tbl = _mm512_fmadd_ps(_mm512_permute_ps(v, 0x00), iota, _mm512_permute_ps(v, 0x55));
  } else {
    tbl = _mm512_mul_ps(bcast_h(dmp), iota);
  }
  w0 = _mm512_permutexvar_ps(nib_perm(qs, false), tbl);
  w1 = _mm512_permutexvar_ps(nib_perm(qs, true), tbl);
}

// Per block type, one of:
//  kFactor = false: decode(b, w0, w1), the block's 32 values as fp32 (in nib_perm order, x
//    permuted to match), FMA'd with x directly (f32q_kernel);
//  kFactor = true: codes(b, c0, c1), the codes (minus the offset) as fp32 in element order;
//    the fp16 scale d at b[0..2) and, for kMin types, the min at b[2..4) (f32q_kernel_fs).
struct DQ4_0 {
  static constexpr size_t kBytes = 18;
  static constexpr bool kMin = false;
  static constexpr bool kFactor = false;  // per-block value table (lut4)
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) { lut4<8, false>(b, b + 2, w0, w1); }
};
struct DQ4_1 {
  static constexpr size_t kBytes = 20;
  static constexpr bool kMin = true;
  static constexpr bool kFactor = false;  // per-block value table (lut4)
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) { lut4<0, true>(b, b + 4, w0, w1); }
};
struct DQ5_0 {
  static constexpr bool kFactor = true;
  static constexpr size_t kBytes = 22;
  static constexpr bool kMin = false;
  static void codes(const uint8_t* b, __m512& c0, __m512& c1) {
    __m512i lo, hi;
    q5_i32(b + 2, b + 6, lo, hi);
    const __m512i o = _mm512_set1_epi32(16);
    c0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, o));
    c1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, o));
  }
};
struct DQ5_1 {
  static constexpr bool kFactor = true;
  static constexpr size_t kBytes = 24;
  static constexpr bool kMin = true;
  static void codes(const uint8_t* b, __m512& c0, __m512& c1) {
    __m512i lo, hi;
    q5_i32(b + 4, b + 8, lo, hi);
    c0 = _mm512_cvtepi32_ps(lo);
    c1 = _mm512_cvtepi32_ps(hi);
  }
};
struct DQ8_0 {
  static constexpr bool kFactor = true;
  static constexpr size_t kBytes = 34;
  static constexpr bool kMin = false;
  static void codes(const uint8_t* b, __m512& c0, __m512& c1) {
    c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2))));
    c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18))));
  }
};

// R rows (row stride rs bytes, nb blocks of 32) x T tokens (stride n_in floats).
template <class Ty, int R, int T>
void f32q_kernel(const uint8_t* w, size_t rs, int64_t nb, const float* x, int64_t n_in, float* out) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 W0[R], W1[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + b * Ty::kBytes;
      _mm_prefetch((const char*)(blk + kPrefetchTiles * R * rs), _MM_HINT_T1);
      Ty::decode(blk, W0[r], W1[r]);
    }
    for (int t = 0; t < T; ++t) {
      const __m512 X0 = _mm512_loadu_ps(x + t * n_in + b * 32);
      const __m512 X1 = _mm512_loadu_ps(x + t * n_in + b * 32 + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm512_fmadd_ps(W0[r], X0, acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(W1[r], X1, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = _mm512_reduce_add_ps(acc[r][t]);
}

// Scale factored out of the block (fewer operations per row): out = sum_b d_b * (codes_b . x_b)
// + sum_b m_b * sum(x_b). xs: per-token block sums of x (stride nb); mrow: scratch, R*nb floats.
template <class Ty, int R, int T>
void f32q_kernel_fs(const uint8_t* w, size_t rs, int64_t nb, const float* x, int64_t n_in, const float* xs,
                    float* mrow, float* out) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 C0[R], C1[R], D[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + b * Ty::kBytes;
      _mm_prefetch((const char*)(blk + kPrefetchTiles * R * rs), _MM_HINT_T1);
      Ty::codes(blk, C0[r], C1[r]);
      D[r] = bcast_h(blk);
      if (Ty::kMin) {
        fp16_t h;
        std::memcpy(&h, blk + 2, 2);
        mrow[r * nb + b] = fp16_to_fp32(h);
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512 X0 = _mm512_loadu_ps(x + t * n_in + b * 32);
      const __m512 X1 = _mm512_loadu_ps(x + t * n_in + b * 32 + 16);
      for (int r = 0; r < R; ++r)
        acc[r][t] = _mm512_fmadd_ps(D[r], _mm512_fmadd_ps(C1[r], X1, _mm512_mul_ps(C0[r], X0)), acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[r * kTileT + t] = _mm512_reduce_add_ps(acc[r][t]) + (Ty::kMin ? vec_dot(mrow + r * nb, xs + t * nb, nb) : 0.f);
}
template <class Ty, int R, int T>
void f32q_entry(const uint8_t* w, size_t rs, int64_t nb, const float* x, int64_t n_in, const float* xs, float* mrow,
                float* out) {
  if constexpr (Ty::kFactor) f32q_kernel_fs<Ty, R, T>(w, rs, nb, x, n_in, xs, mrow, out);
  else
    f32q_kernel<Ty, R, T>(w, rs, nb, x, n_in, out);
}

template <class Ty, int R>
F32QFn f32q_for_t(int t) {
  return t == 1   ? f32q_entry<Ty, R, 1>
         : t == 2 ? f32q_entry<Ty, R, 2>
         : t == 3 ? f32q_entry<Ty, R, 3>
                  : f32q_entry<Ty, R, 4>;
}
template <class Ty>
F32QFn f32q_for_rt(int r, int t) {
  switch (r) {
    case 1: return f32q_for_t<Ty, 1>(t);
    case 2: return f32q_for_t<Ty, 2>(t);
    case 3: return f32q_for_t<Ty, 3>(t);
    default: return f32q_for_t<Ty, 4>(t);
  }
}
#elif defined(SPC_MM_AVX2)
// AVX2 + FMA + F16C: each block's codes widened to fp32 (8 per register, element order, x as
// given), out = sum_b d_b * (codes_b . x_b) + sum_b c_b * sum(x_b), where c_b is the block's min
// (kMin types) or -offset * d_b (the code offset folded out of the inner loop).
constexpr int64_t kPrefetchRows = 16;  // software prefetch distance ahead of the weight stream

inline float ld_h(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}
inline __m256i ld8_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
// 16 bytes of packed nibbles (low: elements 0..15, high: 16..31) as int32 codes, element order.
inline void nib_i32(const uint8_t* qs, __m256i c[4]) {
  const __m256i m = _mm256_set1_epi32(0x0f);
  const __m256i a = ld8_u8(qs), b = ld8_u8(qs + 8);
  c[0] = _mm256_and_si256(a, m);
  c[1] = _mm256_and_si256(b, m);
  c[2] = _mm256_srli_epi32(a, 4);
  c[3] = _mm256_srli_epi32(b, 4);
}
// Q5: bit j of qh is the fifth bit (16) of element j.
inline void q5_i32(const uint8_t* qh, const uint8_t* qs, __m256i c[4]) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  nib_i32(qs, c);
  const __m256i hv = _mm256_set1_epi32((int)h);
  const __m256i sh = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i s16 = _mm256_set1_epi32(16);
  for (int j = 0; j < 4; ++j) {
    const __m256i bit = _mm256_srlv_epi32(hv, _mm256_add_epi32(sh, _mm256_set1_epi32(8 * j)));
    c[j] = _mm256_or_si256(c[j], _mm256_and_si256(_mm256_slli_epi32(bit, 4), s16));
  }
}
inline void to_ps(const __m256i c[4], __m256 f[4]) {
  for (int j = 0; j < 4; ++j) f[j] = _mm256_cvtepi32_ps(c[j]);
}

// codes(b, c): the block's 32 codes as fp32; d at b[0..2); kConst: a per-block constant term
// (the min at b[2..4) for kMin types, else -kOff * d).
struct AQ4_0 {
  static constexpr size_t kBytes = 18;
  static constexpr bool kMin = false, kConst = true;
  static constexpr float kOff = 8.f;
  static void codes(const uint8_t* b, __m256 f[4]) {
    __m256i c[4];
    nib_i32(b + 2, c);
    to_ps(c, f);
  }
};
struct AQ4_1 {
  static constexpr size_t kBytes = 20;
  static constexpr bool kMin = true, kConst = true;
  static constexpr float kOff = 0.f;
  static void codes(const uint8_t* b, __m256 f[4]) {
    __m256i c[4];
    nib_i32(b + 4, c);
    to_ps(c, f);
  }
};
struct AQ5_0 {
  static constexpr size_t kBytes = 22;
  static constexpr bool kMin = false, kConst = true;
  static constexpr float kOff = 16.f;
  static void codes(const uint8_t* b, __m256 f[4]) {
    __m256i c[4];
    q5_i32(b + 2, b + 6, c);
    to_ps(c, f);
  }
};
struct AQ5_1 {
  static constexpr size_t kBytes = 24;
  static constexpr bool kMin = true, kConst = true;
  static constexpr float kOff = 0.f;
  static void codes(const uint8_t* b, __m256 f[4]) {
    __m256i c[4];
    q5_i32(b + 4, b + 8, c);
    to_ps(c, f);
  }
};
struct AQ8_0 {
  static constexpr size_t kBytes = 34;
  static constexpr bool kMin = false, kConst = false;
  static constexpr float kOff = 0.f;
  static void codes(const uint8_t* b, __m256 f[4]) {
    for (int j = 0; j < 4; ++j)
      f[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(b + 2 + 8 * j))));
  }
};

// R rows x T tokens; each row's codes are widened once per block and used by all T tokens
// (x read from L1 as memory operands, so only the R*T accumulators stay in registers).
template <class Ty, int R, int T>
void f32q_rows(const uint8_t* w, size_t rs, int64_t nb, const float* x, int64_t n_in, const float* xs, float* mrow,
               float* out) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    // A prefetch every kPfStep blocks (<= 64 bytes apart, so no line of the row ahead is
    // skipped) instead of one per (smaller) block.
    constexpr int64_t kPfStep = 64 / Ty::kBytes;
    const bool pf = b % kPfStep == 0;
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + b * Ty::kBytes;
      if (pf) _mm_prefetch((const char*)(blk + kPrefetchRows * rs), _MM_HINT_T1);
      __m256 C[4];
      Ty::codes(blk, C);
      __m256 D;
      if constexpr (Ty::kMin) {
        // d and m (adjacent fp16) in one load and conversion.
        uint32_t dm;
        std::memcpy(&dm, blk, 4);
        const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
        D = _mm256_broadcastss_ps(dmf);
        mrow[r * nb + b] = _mm_cvtss_f32(_mm_movehdup_ps(dmf));
      } else {
        const float d = ld_h(blk);
        if (Ty::kConst) mrow[r * nb + b] = -Ty::kOff * d;
        D = _mm256_set1_ps(d);
      }
      for (int t = 0; t < T; ++t) {
        const float* xb = x + t * n_in + b * 32;
        __m256 p = _mm256_mul_ps(C[0], _mm256_loadu_ps(xb));
        p = _mm256_fmadd_ps(C[1], _mm256_loadu_ps(xb + 8), p);
        p = _mm256_fmadd_ps(C[2], _mm256_loadu_ps(xb + 16), p);
        p = _mm256_fmadd_ps(C[3], _mm256_loadu_ps(xb + 24), p);
        acc[r][t] = _mm256_fmadd_ps(D, p, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[r * kTileT + t] = hsum8(acc[r][t]) + (Ty::kConst ? vec_dot(mrow + r * nb, xs + t * nb, nb) : 0.f);
}
// The tile in passes of at most 4 accumulators (16 ymm registers): rows split, tokens not, so
// each weight block is still widened only once.
template <class Ty, int R, int T>
void f32q_entry(const uint8_t* w, size_t rs, int64_t nb, const float* x, int64_t n_in, const float* xs, float* mrow,
                float* out) {
  constexpr int kRs = T == 1 ? 4 : T == 2 ? 2 : 1;
  if constexpr (R <= kRs) {
    f32q_rows<Ty, R, T>(w, rs, nb, x, n_in, xs, mrow, out);
  } else {
    f32q_rows<Ty, kRs, T>(w, rs, nb, x, n_in, xs, mrow, out);
    f32q_entry<Ty, R - kRs, T>(w + kRs * rs, rs, nb, x, n_in, xs, mrow + kRs * nb, out + kRs * kTileT);
  }
}

template <class Ty, int R>
F32QFn f32q_for_t(int t) {
  return t == 1   ? f32q_entry<Ty, R, 1>
         : t == 2 ? f32q_entry<Ty, R, 2>
         : t == 3 ? f32q_entry<Ty, R, 3>
                  : f32q_entry<Ty, R, 4>;
}
template <class Ty>
F32QFn f32q_for_rt(int r, int t) {
  switch (r) {
    case 1: return f32q_for_t<Ty, 1>(t);
    case 2: return f32q_for_t<Ty, 2>(t);
    case 3: return f32q_for_t<Ty, 3>(t);
    default: return f32q_for_t<Ty, 4>(t);
  }
}
#endif

}  // namespace

bool f32q_permuted(GgmlType type) {
#if defined(SPC_MM_AVX2)
  (void)type;
  return false;  // the AVX2 kernels read x in element order
#else
  return type == GgmlType::Q4_0 || type == GgmlType::Q4_1;
#endif
}

void f32q_permute_x(const float* x, int64_t n, float* xp) {
  for (int64_t h = 0; h < n; h += 16, x += 16, xp += 16)
    for (int k = 0; k < 16; ++k) xp[k] = x[4 * (k % 4) + k / 4];
}

F32QFn f32q_for(GgmlType type, int r, int t) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  switch (type) {
    case GgmlType::Q4_0: return f32q_for_rt<DQ4_0>(r, t);
    case GgmlType::Q4_1: return f32q_for_rt<DQ4_1>(r, t);
    case GgmlType::Q5_0: return f32q_for_rt<DQ5_0>(r, t);
    case GgmlType::Q5_1: return f32q_for_rt<DQ5_1>(r, t);
    case GgmlType::Q8_0: return f32q_for_rt<DQ8_0>(r, t);
    default: return nullptr;
  }
#elif defined(SPC_MM_AVX2)
  switch (type) {
    case GgmlType::Q4_0: return f32q_for_rt<AQ4_0>(r, t);
    case GgmlType::Q4_1: return f32q_for_rt<AQ4_1>(r, t);
    case GgmlType::Q5_0: return f32q_for_rt<AQ5_0>(r, t);
    case GgmlType::Q5_1: return f32q_for_rt<AQ5_1>(r, t);
    case GgmlType::Q8_0: return f32q_for_rt<AQ8_0>(r, t);
    default: return nullptr;
  }
#else
  (void)type, (void)r, (void)t;
  return nullptr;
#endif
}

}  // namespace spc::mmk
