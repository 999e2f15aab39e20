// GCC 12's AVX-512 headers self-initialize _mm512_undefined_*() results, which trips
// -Wuninitialized when the intrinsics inline here; silence that (header-only) false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// AVX-512 VNNI (or AVX2) kernels: codes expanded in registers straight from the weight blocks.
#include <cstring>

#include "ops/matmul_kernels.h"
#include "util/fp16.h"

namespace spc::mmk {
namespace {

// ---------------------------------------------------------------------------------------------
// Fused kernels for the 32-element block types at small token counts (decode): codes are
// expanded in registers straight from the weight blocks, no unpacked copy.
// Block value = d * (code - kOff) (+ m for kMin types); the constant part is gathered per row
// into mrow (m, or d) and applied after the loop as coef * dot(mrow, s32).

#if defined(SPC_MM_VNNI)
// Software prefetch distance ahead of the weight stream (decode is memory-bound).
constexpr int64_t kPrefetchTiles = 4;
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
      _mm_prefetch((const char*)(blk + kPrefetchTiles * R * rs), _MM_HINT_T1);
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
      out[r * kTileT + t] = hsum8(acc[r][t]) + coef * vec_dot(mrow + r * nb, xs32 + t * nb, nb);
}


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
// For kUniform types (one scale and min per 32 values) sc[v] and mn[v], v < 8, are per
// sub-block; otherwise sc[i] and mn[i] are per 16 values.
struct KDec {
  __m256i codes[8];
  float sc[16];
  float mn[16];
};
// Q4_K / Q5_K: the eight 6-bit (scale, min) pairs of the 12 packed bytes, times d and -dmin.
inline void k4_scales(const uint8_t* q, float d, float dmin, float* sc, float* mn) {
  uint32_t w[3];
  std::memcpy(w, q, 12);
  const uint32_t s_lo = w[0] & 0x3f3f3f3fu, m_lo = w[1] & 0x3f3f3f3fu;
  const uint32_t s_hi = (w[2] & 0x0f0f0f0fu) | (((w[0] >> 6) & 0x03030303u) << 4);
  const uint32_t m_hi = ((w[2] >> 4) & 0x0f0f0f0fu) | (((w[1] >> 6) & 0x03030303u) << 4);
  const __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)s_hi, (int)s_lo)));
  const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo)));
  _mm256_storeu_ps(sc, _mm256_mul_ps(s, _mm256_set1_ps(d)));
  _mm256_storeu_ps(mn, _mm256_mul_ps(m, _mm256_set1_ps(-dmin)));
}
inline __m256i bit_to(__m256i bits, int v, char val) {
  return _mm256_maskz_mov_epi8(_mm256_test_epi8_mask(bits, _mm256_set1_epi8((char)(1 << v))), _mm256_set1_epi8(val));
}
struct FQ2_K {
  static constexpr bool kUniform = false;  // one scale per 32 values
  static constexpr size_t kBytes = 84;
  static void decode(const uint8_t* b, KDec& k) {
    const __m128i sb = _mm_loadu_si128((const __m128i*)b);
    const __m128i lo = _mm_and_si128(sb, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(sb, 4), _mm_set1_epi8(15));
    _mm512_storeu_ps(k.sc, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_set1_ps(ld_h(b + 80))));
    _mm512_storeu_ps(k.mn, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_set1_ps(-ld_h(b + 82))));
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
  static constexpr bool kUniform = false;  // one scale per 32 values
  static constexpr size_t kBytes = 110;
  static void decode(const uint8_t* b, KDec& k) {
    // Scale i: low 4 bits from s[i] (i < 8) or s[i-8] >> 4; high 2 bits (s[8 + i%4] >> 2*(i/4)) & 3.
    const uint8_t* s = b + 96;
    const __m128i l8 = _mm_loadl_epi64((const __m128i*)s);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(l8, _mm_set1_epi8(15)),
                                          _mm_and_si128(_mm_srli_epi16(l8, 4), _mm_set1_epi8(15)));
    uint32_t h;
    std::memcpy(&h, s + 8, 4);
    const __m128i hb = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)h), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    const __m512i sc6 = _mm512_cvtepu8_epi32(_mm_or_si128(lo, _mm_slli_epi16(hb, 4)));
    const __m512 scf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sc6, _mm512_set1_epi32(32))), _mm512_set1_ps(ld_h(b + 108)));
    _mm512_storeu_ps(k.sc, scf);
    _mm512_storeu_ps(k.mn, _mm512_mul_ps(scf, _mm512_set1_ps(-4.f)));
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
  static constexpr bool kUniform = true;  // one scale per 32 values
  static constexpr size_t kBytes = 144;
  static void decode(const uint8_t* b, KDec& k) {
    k4_scales(b + 4, ld_h(b), ld_h(b + 2), k.sc, k.mn);
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int p = 0; p < 4; ++p) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * p));
      k.codes[2 * p] = _mm256_and_si256(q, m4);
      k.codes[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
  }
};
struct FQ5_K {
  static constexpr bool kUniform = true;  // one scale per 32 values
  static constexpr size_t kBytes = 176;
  static void decode(const uint8_t* b, KDec& k) {
    k4_scales(b + 4, ld_h(b), ld_h(b + 2), k.sc, k.mn);
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
  static constexpr bool kUniform = false;  // one scale per 32 values
  static constexpr size_t kBytes = 210;
  static void decode(const uint8_t* b, KDec& k) {
    const __m512 scf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192)))),
                                     _mm512_set1_ps(ld_h(b + 208)));
    _mm512_storeu_ps(k.sc, scf);
    _mm512_storeu_ps(k.mn, _mm512_mul_ps(scf, _mm512_set1_ps(-32.f)));
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
                    const float* xs32, int64_t n_in, float* mrow, float* out) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  const int64_t nsb = nvb / 8;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    KDec kd[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + sb * Ty::kBytes;
      for (size_t o = 0; o < Ty::kBytes; o += 64) _mm_prefetch((const char*)(blk + kPrefetchTiles * R * rs + o), _MM_HINT_T1);
      Ty::decode(blk, kd[r]);
      if (Ty::kUniform) std::memcpy(mrow + r * nvb + sb * 8, kd[r].mn, 8 * sizeof(float));
      else std::memcpy(mrow + r * 2 * nvb + sb * 16, kd[r].mn, 16 * sizeof(float));
    }
    for (int v = 0; v < 8; ++v) {
      const int64_t vb = sb * 8 + v;
      __m256 S[R];
      for (int r = 0; r < R; ++r)
        S[r] = Ty::kUniform ? _mm256_set1_ps(kd[r].sc[v])
                            : _mm256_set_m128(_mm_set1_ps(kd[r].sc[2 * v + 1]), _mm_set1_ps(kd[r].sc[2 * v]));
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
      out[r * kTileT + t] = hsum8(acc[r][t]) + (Ty::kUniform ? vec_dot(mrow + r * nvb, xs32 + t * nvb, nvb)
                                                                 : vec_dot(mrow + r * 2 * nvb, xs16 + t * 2 * nvb, 2 * nvb));
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
FusedFn fused_impl(GgmlType type, int r, int t) {
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
      if (Ty::kUniform) {
        _mm256_storeu_ps(sc8 + vb * 8, _mm256_set1_ps(k.sc[v]));
        m2[2 * vb] = m2[2 * vb + 1] = k.mn[v];
      } else {
        _mm256_storeu_ps(sc8 + vb * 8, _mm256_set_m128(_mm_set1_ps(k.sc[2 * v + 1]), _mm_set1_ps(k.sc[2 * v])));
        m2[2 * vb] = k.mn[2 * v];
        m2[2 * vb + 1] = k.mn[2 * v + 1];
      }
    }
  }
}
UnpackFn unpack_impl(GgmlType type) {
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
#elif defined(SPC_MM_AVX2)
// AVX2 fused int8 kernels for the 32-element block types: u8 codes times s8 activations with
// vpmaddubsw (pairs of products summed to int16: codes <= 31 times |x| <= 127 stay far below
// the int16 saturation) and vpmaddwd against ones (int32 per 4 bytes, the VNNI lane layout).
// Q8_0 codes are signed: |w| times sign(x, w) (|w| <= 128, pair sums <= 32512).
constexpr int64_t kPrefetchRows = 16;  // software prefetch distance ahead of the weight stream
inline float ld_h(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128((const __m128i*)qs);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f));
}
// Byte j = 16 where bit j of the 32-bit qh is set.
inline __m256i high_bits(const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                                       3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32,
                                       64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)h), sel), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(0x10));
}
// kSigned: codes are s8 values (no offset); otherwise u8 codes, value d * (code - kOff) (+ m).
struct AQ4_0 {
  static constexpr size_t kBytes = 18;
  static constexpr bool kMin = false, kSigned = false;
  static constexpr float kOff = 8.f;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 2); }
  static float m(const uint8_t*) { return 0.f; }
};
struct AQ4_1 {
  static constexpr size_t kBytes = 20;
  static constexpr bool kMin = true, kSigned = false;
  static constexpr float kOff = 0.f;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 4); }
  static float m(const uint8_t* b) { return ld_h(b + 2); }
};
struct AQ5_0 {
  static constexpr size_t kBytes = 22;
  static constexpr bool kMin = false, kSigned = false;
  static constexpr float kOff = 16.f;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 6), high_bits(b + 2)); }
  static float m(const uint8_t*) { return 0.f; }
};
struct AQ5_1 {
  static constexpr size_t kBytes = 24;
  static constexpr bool kMin = true, kSigned = false;
  static constexpr float kOff = 0.f;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 8), high_bits(b + 4)); }
  static float m(const uint8_t* b) { return ld_h(b + 2); }
};
struct AQ8_0 {
  static constexpr size_t kBytes = 34;
  static constexpr bool kMin = false, kSigned = true;
  static constexpr float kOff = 0.f;
  static __m256i codes(const uint8_t* b) { return _mm256_loadu_si256((const __m256i*)(b + 2)); }
  static float m(const uint8_t*) { return 0.f; }
};

template <class Ty, int R, int T>
void fused_rows(const uint8_t* w, size_t rs, int64_t nb, const int8_t* xq, const float* xd, const float* xs32,
                int64_t n_in, float* mrow, float* out) {
  constexpr bool kConst = Ty::kMin || Ty::kOff != 0.f;
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rs + b * Ty::kBytes;
      _mm_prefetch((const char*)(blk + kPrefetchRows * rs), _MM_HINT_T1);
      const __m256i W = Ty::codes(blk);
      const __m256i WU = Ty::kSigned ? _mm256_sign_epi8(W, W) : W;
      const float d = ld_h(blk);
      const __m256 DW = _mm256_set1_ps(d);
      if (kConst) mrow[r * nb + b] = Ty::kMin ? Ty::m(blk) : d;
      for (int t = 0; t < T; ++t) {
        __m256i X = _mm256_loadu_si256((const __m256i*)(xq + t * n_in + b * 32));
        if (Ty::kSigned) X = _mm256_sign_epi8(X, W);
        const __m256i P = _mm256_madd_epi16(_mm256_maddubs_epi16(WU, X), ones);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), _mm256_mul_ps(DW, _mm256_set1_ps(xd[t * nb + b])), acc[r][t]);
      }
    }
  }
  const float coef = Ty::kMin ? 1.f : -Ty::kOff;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      out[r * kTileT + t] = hsum8(acc[r][t]) + (kConst ? coef * vec_dot(mrow + r * nb, xs32 + t * nb, nb) : 0.f);
}
// The tile in passes of at most 4 accumulators (rows split, so each block is decoded once).
template <class Ty, int R, int T>
void fused_kernel(const uint8_t* w, size_t rs, int64_t nb, const int8_t* xq, const float* xd, const float* xs16,
                  const float* xs32, int64_t n_in, float* mrow, float* out) {
  constexpr int kRs = T == 1 ? 4 : T == 2 ? 2 : 1;
  if constexpr (R <= kRs) {
    fused_rows<Ty, R, T>(w, rs, nb, xq, xd, xs32, n_in, mrow, out);
  } else {
    fused_rows<Ty, kRs, T>(w, rs, nb, xq, xd, xs32, n_in, mrow, out);
    fused_kernel<Ty, R - kRs, T>(w + kRs * rs, rs, nb, xq, xd, xs16, xs32, n_in, mrow + kRs * nb, out + kRs * kTileT);
  }
}
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
// nullptr for the K types (their int8 path unpacks rows and uses the generic kernel).
FusedFn fused_impl(GgmlType type, int r, int t) {
  switch (type) {
    case GgmlType::Q4_0: return fused_for_rt<AQ4_0>(r, t);
    case GgmlType::Q4_1: return fused_for_rt<AQ4_1>(r, t);
    case GgmlType::Q5_0: return fused_for_rt<AQ5_0>(r, t);
    case GgmlType::Q5_1: return fused_for_rt<AQ5_1>(r, t);
    case GgmlType::Q8_0: return fused_for_rt<AQ8_0>(r, t);
    default: return nullptr;
  }
}
UnpackFn unpack_impl(GgmlType) { return nullptr; }
#else
FusedFn fused_impl(GgmlType, int, int) { return nullptr; }
UnpackFn unpack_impl(GgmlType) { return nullptr; }
#endif

}  // namespace

FusedFn fused_for(GgmlType type, int r, int t) { return fused_impl(type, r, t); }
UnpackFn unpack_fast_for(GgmlType type) { return unpack_impl(type); }

}  // namespace spc::mmk
