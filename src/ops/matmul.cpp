// GCC 12's AVX-512 headers self-initialize _mm512_undefined_*() results, which trips
// -Wuninitialized when the intrinsics inline here; silence that (header-only) false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "ops/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops/quant.h"
#include "util/error.h"
#include "util/fp16.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SPC_MM_VNNI 1
#endif

namespace spc {
namespace {

constexpr int kTileR = 4;  // weight rows per tile
constexpr int kTileT = 4;  // tokens per tile

// ---------------------------------------------------------------------------------------------
// Activations quantized to int8 in blocks of 32: q[i], d[block] (value = d*q), and per 16-value
// half the scaled sum s16[2*block + h] = d * sum(q over the half); s32[block] = both halves.

void quantize_act_row(const float* x, int64_t n, int8_t* q, float* d, float* s16, float* s32) {
  const int64_t nb = n / 32;
  for (int64_t b = 0; b < nb; ++b, x += 32, q += 32) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float db = amax / 127.f;
    const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(i1));
    d[b] = db;
    s16[2 * b] = db * (float)_mm512_reduce_add_epi32(i0);
    s16[2 * b + 1] = db * (float)_mm512_reduce_add_epi32(i1);
    s32[b] = s16[2 * b] + s16[2 * b + 1];
#else
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float db = amax / 127.f;
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    int sum[2] = {0, 0};
    for (int i = 0; i < 32; ++i) {
      int v = (int)std::nearbyint(x[i] * id);
      v = std::min(127, std::max(-127, v));
      q[i] = (int8_t)v;
      sum[i / 16] += v;
    }
    d[b] = db;
    s16[2 * b] = db * (float)sum[0];
    s16[2 * b + 1] = db * (float)sum[1];
    s32[b] = s16[2 * b] + s16[2 * b + 1];
#endif
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

// ---------------------------------------------------------------------------------------------
// Integer kernel over unpacked weights: R rows x T tokens, out[r*kTileT + t] =
//   sum_v sum_i sc(r,v,i) * u(r,v,i) * xd(t,v) * xq(t,v,i).
// Weight row r: u at wu + r*nvb*32, scales at wsc + r*nvb*8. Token t: xq + t*n_in, xd + t*nvb.

#if defined(SPC_MM_VNNI)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

template <int R, int T>
void qkernel(const uint8_t* wu, const float* wsc, int64_t nvb, const int8_t* xq, const float* xd,
             int64_t n_in, float* out) {
#if defined(SPC_MM_VNNI)
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t v = 0; v < nvb; ++v) {
    __m256i W[R];
    __m256 S[R];
    for (int r = 0; r < R; ++r) {
      W[r] = _mm256_loadu_si256((const __m256i*)(wu + (r * nvb + v) * 32));
      S[r] = _mm256_loadu_ps(wsc + (r * nvb + v) * 8);
    }
    for (int t = 0; t < T; ++t) {
      const __m256i X = _mm256_loadu_si256((const __m256i*)(xq + t * n_in + v * 32));
      const __m256 D = _mm256_set1_ps(xd[t * nvb + v]);
      for (int r = 0; r < R; ++r) {
        const __m256i P = _mm256_dpbusd_epi32(zero, W[r], X);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), _mm256_mul_ps(S[r], D), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = hsum256(acc[r][t]);
#else
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float s = 0.f;
      for (int64_t v = 0; v < nvb; ++v) {
        const uint8_t* w = wu + (r * nvb + v) * 32;
        const int8_t* x = xq + t * n_in + v * 32;
        int h0 = 0, h1 = 0;
        for (int i = 0; i < 16; ++i) h0 += (int)w[i] * x[i];
        for (int i = 16; i < 32; ++i) h1 += (int)w[i] * x[i];
        const float* sc = wsc + (r * nvb + v) * 8;
        s += xd[t * nvb + v] * (sc[0] * (float)h0 + sc[4] * (float)h1);
      }
      out[r * kTileT + t] = s;
    }
#endif
}

using QKernelFn = void (*)(const uint8_t*, const float*, int64_t, const int8_t*, const float*, int64_t, float*);

template <int R>
constexpr QKernelFn qk_for_t(int t) {
  return t == 1 ? qkernel<R, 1> : t == 2 ? qkernel<R, 2> : t == 3 ? qkernel<R, 3> : qkernel<R, 4>;
}
QKernelFn qkernel_for(int r, int t) {
  switch (r) {
    case 1: return qk_for_t<1>(t);
    case 2: return qk_for_t<2>(t);
    case 3: return qk_for_t<3>(t);
    default: return qk_for_t<4>(t);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused kernels for the 32-element block types at small token counts (decode): codes are
// expanded in registers straight from the weight blocks, no unpacked copy.
// Block value = d * (code - kOff) (+ m for kMin types); the constant part is gathered per row
// into mrow (m, or d) and applied after the loop as coef * dot(mrow, s32).

#if defined(SPC_MM_VNNI)
// Software prefetch distance ahead of the weight stream (decode is memory-bound).
#ifndef SPC_PREFETCH_TILES
#define SPC_PREFETCH_TILES 2
#endif
constexpr int64_t kPrefetchTiles = SPC_PREFETCH_TILES;
inline float ld_h(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128((const __m128i*)qs);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f));
}
inline __m256i high_bits(const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  return _mm256_maskz_mov_epi8((__mmask32)h, _mm256_set1_epi8(0x10));
}
struct FQ4_0 {
  static constexpr size_t kBytes = 18;
  static constexpr bool kMin = false;
  static constexpr float kOff = 8.f;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 2); }
  static float m(const uint8_t*) { return 0.f; }
};
struct FQ4_1 {
  static constexpr size_t kBytes = 20;
  static constexpr bool kMin = true;
  static constexpr float kOff = 0.f;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 4); }
  static float m(const uint8_t* b) { return ld_h(b + 2); }
};
struct FQ5_0 {
  static constexpr size_t kBytes = 22;
  static constexpr bool kMin = false;
  static constexpr float kOff = 16.f;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 6), high_bits(b + 2)); }
  static float m(const uint8_t*) { return 0.f; }
};
struct FQ5_1 {
  static constexpr size_t kBytes = 24;
  static constexpr bool kMin = true;
  static constexpr float kOff = 0.f;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 8), high_bits(b + 4)); }
  static float m(const uint8_t* b) { return ld_h(b + 2); }
};
struct FQ8_0 {
  static constexpr size_t kBytes = 34;
  static constexpr bool kMin = false;
  static constexpr float kOff = 128.f;
  static __m256i codes(const uint8_t* b) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(b + 2)), _mm256_set1_epi8((char)0x80));
  }
  static float m(const uint8_t*) { return 0.f; }
};

template <class Ty, int R, int T>
void fused_kernel(const uint8_t* w, size_t rs, int64_t nb, const int8_t* xq, const float* xd, const float* /*xs16*/,
                  const float* xs32, int64_t n_in, float* mrow, float* out) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i W[R];
    __m256 DW[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + b * Ty::kBytes;
#if SPC_PREFETCH_TILES > 0
      _mm_prefetch((const char*)(blk + kPrefetchTiles * R * rs), _MM_HINT_T0);
#endif
      W[r] = Ty::codes(blk);
      const float d = ld_h(blk);
      DW[r] = _mm256_set1_ps(d);
      mrow[r * nb + b] = Ty::kMin ? Ty::m(blk) : d;
    }
    for (int t = 0; t < T; ++t) {
      const __m256i X = _mm256_loadu_si256((const __m256i*)(xq + t * n_in + b * 32));
      const __m256 D = _mm256_set1_ps(xd[t * nb + b]);
      for (int r = 0; r < R; ++r) {
        const __m256i P = _mm256_dpbusd_epi32(zero, W[r], X);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), _mm256_mul_ps(DW[r], D), acc[r][t]);
      }
    }
  }
  const float coef = Ty::kMin ? 1.f : -Ty::kOff;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[r * kTileT + t] = hsum256(acc[r][t]) + coef * dot_f32(mrow + r * nb, xs32 + t * nb, nb);
}

using FusedFn = void (*)(const uint8_t*, size_t, int64_t, const int8_t*, const float*, const float*,
                         const float*, int64_t, float*, float*);

template <class Ty, int R>
FusedFn fused_for_t(int t) {
  return t == 1 ? fused_kernel<Ty, R, 1>
                : t == 2 ? fused_kernel<Ty, R, 2> : t == 3 ? fused_kernel<Ty, R, 3> : fused_kernel<Ty, R, 4>;
}
template <class Ty>
FusedFn fused_for_rt(int r, int t) {
  switch (r) {
    case 1: return fused_for_t<Ty, 1>(t);
    case 2: return fused_for_t<Ty, 2>(t);
    case 3: return fused_for_t<Ty, 3>(t);
    default: return fused_for_t<Ty, 4>(t);
  }
}
// K types: a 256-element super-block is decoded per row into 8 sub-blocks of codes, a scale per
// 16 values and a constant term per 16 values (mins, and the code offset times the scale).
struct KDec {
  __m256i codes[8];
  float sc[16];
  float mn[16];
};
inline void k4_sm(const uint8_t* q, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}
inline __m256i bit_to(__m256i bits, int v, char val) {
  return _mm256_maskz_mov_epi8(_mm256_test_epi8_mask(bits, _mm256_set1_epi8((char)(1 << v))), _mm256_set1_epi8(val));
}
struct FQ2_K {
  static constexpr size_t kBytes = 84;
  static void decode(const uint8_t* b, KDec& k) {
    const float d = ld_h(b + 80), dmin = ld_h(b + 82);
    for (int i = 0; i < 16; ++i) {
      k.sc[i] = d * (float)(b[i] & 15);
      k.mn[i] = -dmin * (float)(b[i] >> 4);
    }
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int c = 0; c < 2; ++c) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * c));
      k.codes[4 * c + 0] = _mm256_and_si256(q, m3);
      k.codes[4 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 2), m3);
      k.codes[4 * c + 2] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m3);
      k.codes[4 * c + 3] = _mm256_and_si256(_mm256_srli_epi16(q, 6), m3);
    }
  }
};
struct FQ3_K {
  static constexpr size_t kBytes = 110;
  static void decode(const uint8_t* b, KDec& k) {
    const float d = ld_h(b + 108);
    const uint8_t* s = b + 96;
    for (int i = 0; i < 16; ++i) {
      const int lo = i < 8 ? (s[i] & 15) : (s[i - 8] >> 4);
      const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
      k.sc[i] = d * (float)((lo | (hi << 4)) - 32);
      k.mn[i] = -4.f * k.sc[i];
    }
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i hm = _mm256_loadu_si256((const __m256i*)b);
    for (int c = 0; c < 2; ++c) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 32 + 32 * c));
      for (int j = 0; j < 4; ++j)
        k.codes[4 * c + j] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m3), bit_to(hm, 4 * c + j, 4));
    }
  }
};
struct FQ4_K {
  static constexpr size_t kBytes = 144;
  static void decode(const uint8_t* b, KDec& k) {
    const float d = ld_h(b), dmin = ld_h(b + 2);
    for (int v = 0; v < 8; ++v) {
      int sc, mn;
      k4_sm(b + 4, v, &sc, &mn);
      k.sc[2 * v] = k.sc[2 * v + 1] = d * (float)sc;
      k.mn[2 * v] = k.mn[2 * v + 1] = -dmin * (float)mn;
    }
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int p = 0; p < 4; ++p) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * p));
      k.codes[2 * p] = _mm256_and_si256(q, m4);
      k.codes[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
  }
};
struct FQ5_K {
  static constexpr size_t kBytes = 176;
  static void decode(const uint8_t* b, KDec& k) {
    const float d = ld_h(b), dmin = ld_h(b + 2);
    for (int v = 0; v < 8; ++v) {
      int sc, mn;
      k4_sm(b + 4, v, &sc, &mn);
      k.sc[2 * v] = k.sc[2 * v + 1] = d * (float)sc;
      k.mn[2 * v] = k.mn[2 * v + 1] = -dmin * (float)mn;
    }
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16));
    for (int p = 0; p < 4; ++p) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 48 + 32 * p));
      k.codes[2 * p] = _mm256_or_si256(_mm256_and_si256(q, m4), bit_to(qh, 2 * p, 16));
      k.codes[2 * p + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), bit_to(qh, 2 * p + 1, 16));
    }
  }
};
struct FQ6_K {
  static constexpr size_t kBytes = 210;
  static void decode(const uint8_t* b, KDec& k) {
    const float d = ld_h(b + 208);
    const int8_t* sc = (const int8_t*)(b + 192);
    for (int i = 0; i < 16; ++i) {
      k.sc[i] = d * (float)sc[i];
      k.mn[i] = -32.f * k.sc[i];
    }
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int c = 0; c < 2; ++c) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * c));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * c + 32));
      const __m256i h = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * c));
      k.codes[4 * c + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x03)), 4));
      k.codes[4 * c + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x0c)), 2));
      k.codes[4 * c + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
      k.codes[4 * c + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                           _mm256_and_si256(_mm256_srli_epi16(h, 2), _mm256_set1_epi8(0x30)));
    }
  }
};

template <class Ty, int R, int T>
void fused_k_kernel(const uint8_t* w, size_t rs, int64_t nvb, const int8_t* xq, const float* xd, const float* xs16,
                    const float* /*xs32*/, int64_t n_in, float* mrow, float* out) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  const int64_t nsb = nvb / 8;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    KDec kd[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + sb * Ty::kBytes;
#if SPC_PREFETCH_TILES > 0
      for (size_t o = 0; o < Ty::kBytes; o += 64) _mm_prefetch((const char*)(blk + kPrefetchTiles * R * rs + o), _MM_HINT_T0);
#endif
      Ty::decode(blk, kd[r]);
      std::memcpy(mrow + r * 2 * nvb + sb * 16, kd[r].mn, sizeof(kd[r].mn));
    }
    for (int v = 0; v < 8; ++v) {
      const int64_t vb = sb * 8 + v;
      __m256 S[R];
      for (int r = 0; r < R; ++r) S[r] = _mm256_set_m128(_mm_set1_ps(kd[r].sc[2 * v + 1]), _mm_set1_ps(kd[r].sc[2 * v]));
      for (int t = 0; t < T; ++t) {
        const __m256i X = _mm256_loadu_si256((const __m256i*)(xq + t * n_in + vb * 32));
        const __m256 D = _mm256_set1_ps(xd[t * nvb + vb]);
        for (int r = 0; r < R; ++r) {
          const __m256i P = _mm256_dpbusd_epi32(zero, kd[r].codes[v], X);
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), _mm256_mul_ps(S[r], D), acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[r * kTileT + t] = hsum256(acc[r][t]) + dot_f32(mrow + r * 2 * nvb, xs16 + t * 2 * nvb, 2 * nvb);
}

template <class Ty, int R>
FusedFn fused_k_for_t(int t) {
  return t == 1 ? fused_k_kernel<Ty, R, 1>
                : t == 2 ? fused_k_kernel<Ty, R, 2> : t == 3 ? fused_k_kernel<Ty, R, 3> : fused_k_kernel<Ty, R, 4>;
}
template <class Ty>
FusedFn fused_k_for_rt(int r, int t) {
  switch (r) {
    case 1: return fused_k_for_t<Ty, 1>(t);
    case 2: return fused_k_for_t<Ty, 2>(t);
    case 3: return fused_k_for_t<Ty, 3>(t);
    default: return fused_k_for_t<Ty, 4>(t);
  }
}

// nullptr when the type has no fused kernel.
FusedFn fused_for(GgmlType type, int r, int t) {
  switch (type) {
    case GgmlType::Q4_0: return fused_for_rt<FQ4_0>(r, t);
    case GgmlType::Q4_1: return fused_for_rt<FQ4_1>(r, t);
    case GgmlType::Q5_0: return fused_for_rt<FQ5_0>(r, t);
    case GgmlType::Q5_1: return fused_for_rt<FQ5_1>(r, t);
    case GgmlType::Q8_0: return fused_for_rt<FQ8_0>(r, t);
    case GgmlType::Q2_K: return fused_k_for_rt<FQ2_K>(r, t);
    case GgmlType::Q3_K: return fused_k_for_rt<FQ3_K>(r, t);
    case GgmlType::Q4_K: return fused_k_for_rt<FQ4_K>(r, t);
    case GgmlType::Q5_K: return fused_k_for_rt<FQ5_K>(r, t);
    case GgmlType::Q6_K: return fused_k_for_rt<FQ6_K>(r, t);
    default: return nullptr;
  }
}
// Unpacked copies (codes, per-half scales, per-half constant terms with the offset folded in)
// for the prefill path, built with the same SIMD decoders.
template <class Ty>
void unpack_simd32(const uint8_t* row, int64_t nb, uint8_t* u, float* sc8, float* m2) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * Ty::kBytes;
    _mm256_storeu_si256((__m256i*)(u + b * 32), Ty::codes(blk));
    const float d = ld_h(blk);
    _mm256_storeu_ps(sc8 + b * 8, _mm256_set1_ps(d));
    m2[2 * b] = m2[2 * b + 1] = Ty::kMin ? Ty::m(blk) : -Ty::kOff * d;
  }
}
template <class Ty>
void unpack_simd_k(const uint8_t* row, int64_t nb, uint8_t* u, float* sc8, float* m2) {
  KDec k;
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    Ty::decode(row + sb * Ty::kBytes, k);
    for (int v = 0; v < 8; ++v) {
      const int64_t vb = sb * 8 + v;
      _mm256_storeu_si256((__m256i*)(u + vb * 32), k.codes[v]);
      _mm256_storeu_ps(sc8 + vb * 8, _mm256_set_m128(_mm_set1_ps(k.sc[2 * v + 1]), _mm_set1_ps(k.sc[2 * v])));
    }
    std::memcpy(m2 + sb * 16, k.mn, sizeof(k.mn));
  }
}
using UnpackFn = void (*)(const uint8_t*, int64_t, uint8_t*, float*, float*);
UnpackFn unpack_fast_for(GgmlType type) {
  switch (type) {
    case GgmlType::Q4_0: return unpack_simd32<FQ4_0>;
    case GgmlType::Q4_1: return unpack_simd32<FQ4_1>;
    case GgmlType::Q5_0: return unpack_simd32<FQ5_0>;
    case GgmlType::Q5_1: return unpack_simd32<FQ5_1>;
    case GgmlType::Q8_0: return unpack_simd32<FQ8_0>;
    case GgmlType::Q2_K: return unpack_simd_k<FQ2_K>;
    case GgmlType::Q3_K: return unpack_simd_k<FQ3_K>;
    case GgmlType::Q4_K: return unpack_simd_k<FQ4_K>;
    case GgmlType::Q5_K: return unpack_simd_k<FQ5_K>;
    case GgmlType::Q6_K: return unpack_simd_k<FQ6_K>;
    default: return nullptr;
  }
}
#else
using FusedFn = void (*)(const uint8_t*, size_t, int64_t, const int8_t*, const float*, const float*,
                         const float*, int64_t, float*, float*);
FusedFn fused_for(GgmlType, int, int) { return nullptr; }
using UnpackFn = void (*)(const uint8_t*, int64_t, uint8_t*, float*, float*);
UnpackFn unpack_fast_for(GgmlType) { return nullptr; }
#endif

// Tokens per outer chunk of the fused path (activations of a chunk stay in L2).
#ifndef SPC_TOKEN_CHUNK
#define SPC_TOKEN_CHUNK 64
#endif
constexpr int64_t kTokenChunk = SPC_TOKEN_CHUNK;
// Up to this many tokens the fused kernels are used; beyond, weights are unpacked once per
// row block and reused by all tokens.
#ifndef SPC_FUSED_MAX
#define SPC_FUSED_MAX 8
#endif
constexpr int64_t kFusedMaxTokens = SPC_FUSED_MAX;
constexpr int kRowBlock = 16;  // rows unpacked together on the prefill path

// ---------------------------------------------------------------------------------------------
// fp32 kernel: out[r*kTileT + t] = dot(w + r*n, x + t*n).

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Loaders of 16 weights as fp32 from a row of the given element type (masked tail variant).
struct LdF32 {
  using T = float;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load_tail(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct LdF16 {
  using T = uint16_t;
  static __m512 load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static __m512 load_tail(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
struct LdBF16 {
  using T = uint16_t;
  static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static __m512 load(const uint16_t* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
  static __m512 load_tail(const uint16_t* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};

// out[r*kTileT + t] = dot(row r of w (row stride n elements), x + t*n).
template <class L, int R, int T>
void fkernel_t(const void* wv, const float* x, int64_t n, float* out) {
  const typename L::T* w = (const typename L::T*)wv;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 W[R];
    for (int r = 0; r < R; ++r) W[r] = L::load(w + r * n + i);
    for (int t = 0; t < T; ++t) {
      const __m512 X = _mm512_loadu_ps(x + t * n + i);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(W[r], X, acc[r][t]);
    }
  }
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    __m512 W[R];
    for (int r = 0; r < R; ++r) W[r] = L::load_tail(w + r * n + i, m);
    for (int t = 0; t < T; ++t) {
      const __m512 X = _mm512_maskz_loadu_ps(m, x + t * n + i);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(W[r], X, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = _mm512_reduce_add_ps(acc[r][t]);
}
template <int R, int T>
void fkernel(const float* w, const float* x, int64_t n, float* out) {
  fkernel_t<LdF32, R, T>(w, x, n, out);
}

// Kernels reading F16/BF16 weight rows directly (small token counts).
using FDirectFn = void (*)(const void*, const float*, int64_t, float*);
template <class L, int R>
FDirectFn fdirect_for_t(int t) {
  return t == 1 ? fkernel_t<L, R, 1> : t == 2 ? fkernel_t<L, R, 2> : t == 3 ? fkernel_t<L, R, 3> : fkernel_t<L, R, 4>;
}
template <class L>
FDirectFn fdirect_for_rt(int r, int t) {
  switch (r) {
    case 1: return fdirect_for_t<L, 1>(t);
    case 2: return fdirect_for_t<L, 2>(t);
    case 3: return fdirect_for_t<L, 3>(t);
    default: return fdirect_for_t<L, 4>(t);
  }
}
FDirectFn fdirect_for(GgmlType type, int r, int t) {
  switch (type) {
    case GgmlType::F32: return fdirect_for_rt<LdF32>(r, t);
    case GgmlType::F16: return fdirect_for_rt<LdF16>(r, t);
    case GgmlType::BF16: return fdirect_for_rt<LdBF16>(r, t);
    default: return nullptr;
  }
}
#else
template <int R, int T>
void fkernel(const float* w, const float* x, int64_t n, float* out) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = dot_f32(w + r * n, x + t * n, n);
}
using FDirectFn = void (*)(const void*, const float*, int64_t, float*);
FDirectFn fdirect_for(GgmlType, int, int) { return nullptr; }
#endif

using FKernelFn = void (*)(const float*, const float*, int64_t, float*);

template <int R>
constexpr FKernelFn fk_for_t(int t) {
  return t == 1 ? fkernel<R, 1> : t == 2 ? fkernel<R, 2> : t == 3 ? fkernel<R, 3> : fkernel<R, 4>;
}
FKernelFn fkernel_for(int r, int t) {
  switch (r) {
    case 1: return fk_for_t<1>(t);
    case 2: return fk_for_t<2>(t);
    case 3: return fk_for_t<3>(t);
    default: return fk_for_t<4>(t);
  }
}

// ---------------------------------------------------------------------------------------------

struct Scratch {
  std::vector<uint8_t> u;
  std::vector<float> sc8, mn2, f;
};

// Per-thread scratch for unpacked weight tiles (each pool thread has its own).
Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// Per-call activation buffers, owned by the calling thread.
struct ActBuf {
  std::vector<int8_t> q;
  std::vector<float> d, s16, s32;
};
ActBuf& thread_act() {
  thread_local ActBuf a;
  return a;
}

bool is_float_type(GgmlType t) { return t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16; }

void validate(const WeightView& w) {
  SPC_CHECK(quant_type_supported(w.type), "matmul: unsupported weight type %s", type_name(w.type));
  SPC_CHECK(w.n_in > 0 && w.n_out >= 0, "matmul: bad shape %lld x %lld", (long long)w.n_out, (long long)w.n_in);
  SPC_CHECK(w.n_in % type_traits(w.type).block_size == 0,
            "matmul: row length %lld is not a multiple of the %s block (%lld)", (long long)w.n_in,
            type_name(w.type), (long long)type_traits(w.type).block_size);
}

void matmul_float(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool) {
  const int64_t n = w.n_in, n_out = w.n_out;
  const size_t rs = row_size(w.type, n);
  if (n_tok <= kFusedMaxTokens && fdirect_for(w.type, 1, 1) != nullptr) {
    // Decode: weights read (and widened) straight from the matrix.
    const int64_t n_tiles = (n_out + kTileR - 1) / kTileR;
    pool.parallel_for(n_tiles, [&](int64_t tb, int64_t te, int) {
      float out[kTileR * kTileT];
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t r0 = tile * kTileR;
        const int R = (int)std::min<int64_t>(kTileR, n_out - r0);
        for (int64_t t0 = 0; t0 < n_tok; t0 += kTileT) {
          const int T = (int)std::min<int64_t>(kTileT, n_tok - t0);
          fdirect_for(w.type, R, T)((const uint8_t*)w.data + r0 * rs, x + t0 * n, n, out);
          for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + r0 + r] = out[r * kTileT + t];
        }
      }
    });
    return;
  }
  // Prefill: blocks of kRowBlock rows (widened to fp32 once) x chunks of tokens (kept in L2).
  constexpr int64_t kChunk = 32;
  const int64_t n_blocks = (n_out + kRowBlock - 1) / kRowBlock;
  pool.parallel_for(n_blocks, [&](int64_t bb, int64_t be, int) {
    Scratch& s = thread_scratch();
    if (w.type != GgmlType::F32 && s.f.size() < (size_t)(kRowBlock * n)) s.f.resize((size_t)(kRowBlock * n));
    float out[kTileR * kTileT];
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t rb0 = blk * kRowBlock;
      const int RB = (int)std::min<int64_t>(kRowBlock, n_out - rb0);
      const float* wf;
      if (w.type == GgmlType::F32) {
        wf = (const float*)((const uint8_t*)w.data + rb0 * rs);
      } else {
        for (int r = 0; r < RB; ++r)
          dequantize_row(w.type, (const uint8_t*)w.data + (rb0 + r) * rs, s.f.data() + r * n, n);
        wf = s.f.data();
      }
      for (int64_t c0 = 0; c0 < n_tok; c0 += kChunk) {
        const int64_t c1 = std::min<int64_t>(n_tok, c0 + kChunk);
        for (int rt = 0; rt < RB; rt += kTileR) {
          const int R = std::min(kTileR, RB - rt);
          for (int64_t t0 = c0; t0 < c1; t0 += kTileT) {
            const int T = (int)std::min<int64_t>(kTileT, c1 - t0);
            fkernel_for(R, T)(wf + rt * n, x + t0 * n, n, out);
            for (int r = 0; r < R; ++r)
              for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + rb0 + rt + r] = out[r * kTileT + t];
          }
        }
      }
    }
  });
}

void matmul_quant(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool) {
  const int64_t n = w.n_in, n_out = w.n_out, nvb = n / 32;
  const size_t rs = row_size(w.type, n);
  const float off = (float)detail::unpack_offset(w.type);

  ActBuf& act = thread_act();
  act.q.resize((size_t)(n_tok * n));
  act.d.resize((size_t)(n_tok * nvb));
  act.s16.resize((size_t)(n_tok * nvb * 2));
  act.s32.resize((size_t)(n_tok * nvb));
  int8_t* xq = act.q.data();
  float* xd = act.d.data();
  float* xs = act.s16.data();
  float* xs32 = act.s32.data();
  auto quant_tokens = [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) quantize_act_row(x + t * n, n, xq + t * n, xd + t * nvb, xs + t * nvb * 2, xs32 + t * nvb);
  };
  if (n_tok * n >= 16384) pool.parallel_for(n_tok, quant_tokens);
  else quant_tokens(0, n_tok, 0);

  const int64_t n_tiles = (n_out + kTileR - 1) / kTileR;
  if (n_tok <= kFusedMaxTokens && fused_for(w.type, 1, 1) != nullptr) {
    // Token chunks outermost keep a chunk's activations in L2 while the thread's rows stream by;
    // each 4-row tile is then reused (from L1) by every 4-token tile of the chunk.
    pool.parallel_for(n_tiles, [&](int64_t tb, int64_t te, int) {
      Scratch& s = thread_scratch();
      if (s.mn2.size() < (size_t)(kTileR * nvb * 2)) s.mn2.resize((size_t)(kTileR * nvb * 2));
      float out[kTileR * kTileT];
      for (int64_t c0 = 0; c0 < n_tok; c0 += kTokenChunk) {
        const int64_t c1 = std::min<int64_t>(n_tok, c0 + kTokenChunk);
        for (int64_t tile = tb; tile < te; ++tile) {
          const int64_t r0 = tile * kTileR;
          const int R = (int)std::min<int64_t>(kTileR, n_out - r0);
          for (int64_t t0 = c0; t0 < c1; t0 += kTileT) {
            const int T = (int)std::min<int64_t>(kTileT, c1 - t0);
            fused_for(w.type, R, T)((const uint8_t*)w.data + r0 * rs, rs, nvb, xq + t0 * n, xd + t0 * nvb,
                                    xs + t0 * nvb * 2, xs32 + t0 * nvb, n, s.mn2.data(), out);
            for (int r = 0; r < R; ++r)
              for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + r0 + r] = out[r * kTileT + t];
          }
        }
      }
    });
    return;
  }
  const UnpackFn fast = unpack_fast_for(w.type);
  const int64_t n_blocks = (n_out + kRowBlock - 1) / kRowBlock;
  pool.parallel_for(n_blocks, [&](int64_t bb, int64_t be, int) {
    Scratch& s = thread_scratch();
    if (s.u.size() < (size_t)(kRowBlock * n)) s.u.resize((size_t)(kRowBlock * n));
    if (s.sc8.size() < (size_t)(kRowBlock * nvb * 8)) s.sc8.resize((size_t)(kRowBlock * nvb * 8));
    if (s.mn2.size() < (size_t)(kRowBlock * nvb * 2)) s.mn2.resize((size_t)(kRowBlock * nvb * 2));
    uint8_t* u = s.u.data();
    float* sc8 = s.sc8.data();
    float* mt = s.mn2.data();
    float out[kTileR * kTileT];
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t rb0 = blk * kRowBlock;
      const int RB = (int)std::min<int64_t>(kRowBlock, n_out - rb0);
      for (int r = 0; r < RB; ++r) {
        const uint8_t* row = (const uint8_t*)w.data + (rb0 + r) * rs;
        float* m = mt + r * nvb * 2;
        const float* sc = sc8 + r * nvb * 8;
        if (fast) {
          fast(row, nvb, u + r * nvb * 32, sc8 + r * nvb * 8, m);
        } else {
          detail::unpack_row(w.type, row, n, u + r * nvb * 32, sc8 + r * nvb * 8, m);
          // Fold the code offset into the per-half constant term.
          if (off != 0.f)
            for (int64_t g = 0; g < 2 * nvb; ++g) m[g] -= off * sc[g * 4];
        }
      }
      for (int64_t c0 = 0; c0 < n_tok; c0 += kTokenChunk) {
        const int64_t c1 = std::min<int64_t>(n_tok, c0 + kTokenChunk);
        for (int rt = 0; rt < RB; rt += kTileR) {
          const int R = std::min(kTileR, RB - rt);
          for (int64_t t0 = c0; t0 < c1; t0 += kTileT) {
            const int T = (int)std::min<int64_t>(kTileT, c1 - t0);
            qkernel_for(R, T)(u + rt * nvb * 32, sc8 + rt * nvb * 8, nvb, xq + t0 * n, xd + t0 * nvb, n, out);
            for (int r = 0; r < R; ++r)
              for (int t = 0; t < T; ++t)
                y[(t0 + t) * n_out + rb0 + rt + r] =
                    out[r * kTileT + t] + dot_f32(mt + (rt + r) * nvb * 2, xs + (t0 + t) * nvb * 2, 2 * nvb);
          }
        }
      }
    }
  });
}

}  // namespace

void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool) {
  validate(w);
  SPC_CHECK(n_tok >= 0, "matmul: negative token count %lld", (long long)n_tok);
  if (n_tok == 0 || w.n_out == 0) return;
  if (is_float_type(w.type)) matmul_float(w, x, n_tok, y, pool);
  else matmul_quant(w, x, n_tok, y, pool);
}

void dequantize_rows(const WeightView& w, int64_t row0, int64_t n_rows, float* dst) {
  validate(w);
  SPC_CHECK(row0 >= 0 && n_rows >= 0 && row0 + n_rows <= w.n_out, "dequantize_rows: rows [%lld, %lld) outside [0, %lld)",
            (long long)row0, (long long)(row0 + n_rows), (long long)w.n_out);
  const size_t rs = row_size(w.type, w.n_in);
  for (int64_t r = 0; r < n_rows; ++r)
    dequantize_row(w.type, (const uint8_t*)w.data + (row0 + r) * rs, dst + r * w.n_in, w.n_in);
}

}  // namespace spc
