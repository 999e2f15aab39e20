// GCC 12's AVX-512 headers self-initialize _mm512_undefined_*() results, which trips
// -Wuninitialized when the intrinsics inline here; silence that (header-only) false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// AVX-512 fused kernels with fp32 activations for the 32-element block types (decode): each
// weight block is widened to fp32 in registers (codes -> int32 -> float, times the scale, plus
// the min) and FMA'd with the activations as given. No activation rounding, no unpacked copy.
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

// decode(b, w0, w1): the block's 32 values as fp32 (elements 0..15, 16..31).
struct DQ4_0 {
  static constexpr size_t kBytes = 18;
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) {
    const __m512 d = bcast_h(b);
    __m512i lo, hi;
    nib_i32(b + 2, lo, hi);
    const __m512i o = _mm512_set1_epi32(8);
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, o)));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, o)));
  }
};
struct DQ4_1 {
  static constexpr size_t kBytes = 20;
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) {
    const __m512 d = bcast_h(b), m = bcast_h(b + 2);
    __m512i lo, hi;
    nib_i32(b + 4, lo, hi);
    w0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m);
    w1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m);
  }
};
struct DQ5_0 {
  static constexpr size_t kBytes = 22;
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) {
    const __m512 d = bcast_h(b);
    __m512i lo, hi;
    q5_i32(b + 2, b + 6, lo, hi);
    const __m512i o = _mm512_set1_epi32(16);
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, o)));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, o)));
  }
};
struct DQ5_1 {
  static constexpr size_t kBytes = 24;
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) {
    const __m512 d = bcast_h(b), m = bcast_h(b + 2);
    __m512i lo, hi;
    q5_i32(b + 4, b + 8, lo, hi);
    w0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m);
    w1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m);
  }
};
struct DQ8_0 {
  static constexpr size_t kBytes = 34;
  static void decode(const uint8_t* b, __m512& w0, __m512& w1) {
    const __m512 d = bcast_h(b);
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2)))));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18)))));
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

template <class Ty, int R>
F32QFn f32q_for_t(int t) {
  return t == 1   ? f32q_kernel<Ty, R, 1>
         : t == 2 ? f32q_kernel<Ty, R, 2>
         : t == 3 ? f32q_kernel<Ty, R, 3>
                  : f32q_kernel<Ty, R, 4>;
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
#else
  (void)type, (void)r, (void)t;
  return nullptr;
#endif
}

}  // namespace spc::mmk
