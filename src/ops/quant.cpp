// GCC 12's AVX-512 headers self-initialize _mm512_undefined_*() results, which trips
// -Wuninitialized when the intrinsics inline here; silence that (header-only) false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "ops/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "util/error.h"
#include "util/fp16.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace spc {

bool quant_type_supported(GgmlType t) {
  switch (t) {
    case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16:
    case GgmlType::Q4_0: case GgmlType::Q4_1: case GgmlType::Q5_0: case GgmlType::Q5_1:
    case GgmlType::Q8_0: case GgmlType::Q2_K: case GgmlType::Q3_K: case GgmlType::Q4_K:
    case GgmlType::Q5_K: case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

namespace {

inline float ld_f16(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}
inline void st_f16(uint8_t* p, float f) {
  const fp16_t h = fp32_to_fp16(f);
  std::memcpy(p, &h, 2);
}
inline uint32_t ld_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void put_scales(float* sc8, float* mn2, float s0, float s1, float m0, float m1) {
  for (int i = 0; i < 4; ++i) {
    sc8[i] = s0;
    sc8[4 + i] = s1;
  }
  mn2[0] = m0;
  mn2[1] = m1;
}

// Low nibbles of qs[0..16) then high nibbles -> u[0..32).
inline void unpack_nibbles16(const uint8_t* qs, uint8_t* u) {
#if defined(__AVX2__)
  const __m128i q = _mm_loadu_si128((const __m128i*)qs);
  const __m128i m = _mm_set1_epi8(0x0f);
  _mm_storeu_si128((__m128i*)u, _mm_and_si128(q, m));
  _mm_storeu_si128((__m128i*)(u + 16), _mm_and_si128(_mm_srli_epi16(q, 4), m));
#else
  for (int j = 0; j < 16; ++j) {
    u[j] = qs[j] & 0x0f;
    u[j + 16] = qs[j] >> 4;
  }
#endif
}

// ---- per-block unpackers: (block bytes) -> vpb sub-blocks of 32 ----

void unpack_q4_0(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b);
  unpack_nibbles16(b + 2, u);
  put_scales(sc8, mn2, d, d, 0.f, 0.f);
}

void unpack_q4_1(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b), m = ld_f16(b + 2);
  unpack_nibbles16(b + 4, u);
  put_scales(sc8, mn2, d, d, m, m);
}

inline void unpack_q5(const uint8_t* qhp, const uint8_t* qs, uint8_t* u) {
  const uint32_t qh = ld_u32(qhp);
  unpack_nibbles16(qs, u);
  for (int j = 0; j < 32; ++j) u[j] |= (uint8_t)(((qh >> j) & 1u) << 4);
}

void unpack_q5_0(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b);
  unpack_q5(b + 2, b + 6, u);
  put_scales(sc8, mn2, d, d, 0.f, 0.f);
}

void unpack_q5_1(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b), m = ld_f16(b + 2);
  unpack_q5(b + 4, b + 8, u);
  put_scales(sc8, mn2, d, d, m, m);
}

void unpack_q8_0(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b);
#if defined(__AVX2__)
  const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 2));
  _mm256_storeu_si256((__m256i*)u, _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));
#else
  for (int j = 0; j < 32; ++j) u[j] = (uint8_t)(b[2 + j] ^ 0x80);
#endif
  put_scales(sc8, mn2, d, d, 0.f, 0.f);
}

// Q2_K: scales[16], qs[64], d, dmin. Element e = 128c + 32j + l holds (qs[32c+l] >> 2j) & 3,
// with the scale/min byte scales[e/16] (low nibble scale, high nibble min).
void unpack_q2_k(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const uint8_t* sc = b;
  const uint8_t* qs = b + 16;
  const float d = ld_f16(b + 80), dmin = ld_f16(b + 82);
  for (int v = 0; v < 8; ++v) {
    const int c = v / 4, sh = 2 * (v % 4);
    for (int l = 0; l < 32; ++l) u[v * 32 + l] = (uint8_t)((qs[32 * c + l] >> sh) & 3);
    const uint8_t s0 = sc[2 * v], s1 = sc[2 * v + 1];
    put_scales(sc8 + v * 8, mn2 + v * 2, d * (float)(s0 & 15), d * (float)(s1 & 15),
               -dmin * (float)(s0 >> 4), -dmin * (float)(s1 >> 4));
  }
}

// Q3_K 6-bit scale i (0..15), unsigned (0..63); the stored value is this minus 32.
inline int q3k_scale(const uint8_t* s, int i) {
  const int lo = i < 8 ? (s[i] & 15) : (s[i - 8] >> 4);
  const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
  return lo | (hi << 4);
}

// Q3_K: hmask[32], qs[64], scales[12], d. Element e = 128c + 32j + l (sub-block v = 4c + j):
// low bits (qs[32c+l] >> 2j) & 3, high bit (hmask[l] >> v) & 1, value q - 4.
void unpack_q3_k(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const uint8_t* hm = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = ld_f16(b + 108);
  for (int v = 0; v < 8; ++v) {
    const int c = v / 4, sh = 2 * (v % 4);
    for (int l = 0; l < 32; ++l)
      u[v * 32 + l] = (uint8_t)(((qs[32 * c + l] >> sh) & 3) | (((hm[l] >> v) & 1) << 2));
    put_scales(sc8 + v * 8, mn2 + v * 2, d * (float)(q3k_scale(sc, 2 * v) - 32),
               d * (float)(q3k_scale(sc, 2 * v + 1) - 32), 0.f, 0.f);
  }
}

// Q4_K / Q5_K packed 6-bit (scale, min) pair j of 8.
inline void k4_scale_min(const uint8_t* q, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: d, dmin, scales[12], qs[128]. Sub-block v: nibble (v odd: high) of qs[32*(v/2) + l].
void unpack_q4_k(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b), dmin = ld_f16(b + 2);
  const uint8_t* scs = b + 4;
  const uint8_t* qs = b + 16;
  for (int p = 0; p < 4; ++p)
    for (int l = 0; l < 32; ++l) {
      u[64 * p + l] = qs[32 * p + l] & 15;
      u[64 * p + 32 + l] = qs[32 * p + l] >> 4;
    }
  for (int v = 0; v < 8; ++v) {
    int sc, mn;
    k4_scale_min(scs, v, &sc, &mn);
    put_scales(sc8 + v * 8, mn2 + v * 2, d * (float)sc, d * (float)sc, -dmin * (float)mn,
               -dmin * (float)mn);
  }
}

// Q5_K: d, dmin, scales[12], qh[32], qs[128]. As Q4_K plus high bit (qh[l] >> v) & 1.
void unpack_q5_k(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const float d = ld_f16(b), dmin = ld_f16(b + 2);
  const uint8_t* scs = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int v = 0; v < 8; ++v) {
    const uint8_t* q = qs + 32 * (v / 2);
    const int sh = (v & 1) ? 4 : 0;
    for (int l = 0; l < 32; ++l)
      u[v * 32 + l] = (uint8_t)(((q[l] >> sh) & 15) | (((qh[l] >> v) & 1) << 4));
    int sc, mn;
    k4_scale_min(scs, v, &sc, &mn);
    put_scales(sc8 + v * 8, mn2 + v * 2, d * (float)sc, d * (float)sc, -dmin * (float)mn,
               -dmin * (float)mn);
  }
}

// Q6_K: ql[128], qh[64], scales[16] (int8), d. Element e = 128c + 32k + l (sub-block v = 4c+k):
// low nibble of ql[64c + l + 32(k&1)] (high nibble when k >= 2), high 2 bits (qh[32c+l] >> 2k) & 3,
// value q - 32, scale scales[e/16].
void unpack_q6_k(const uint8_t* b, uint8_t* u, float* sc8, float* mn2) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = (const int8_t*)(b + 192);
  const float d = ld_f16(b + 208);
  for (int v = 0; v < 8; ++v) {
    const int c = v / 4, k = v % 4;
    const uint8_t* lo = ql + 64 * c + 32 * (k & 1);
    const uint8_t* hi = qh + 32 * c;
    const int nsh = k >= 2 ? 4 : 0;
    for (int l = 0; l < 32; ++l)
      u[v * 32 + l] = (uint8_t)(((lo[l] >> nsh) & 15) | (((hi[l] >> (2 * k)) & 3) << 4));
    put_scales(sc8 + v * 8, mn2 + v * 2, d * (float)sc[2 * v], d * (float)sc[2 * v + 1], 0.f, 0.f);
  }
}

using UnpackFn = void (*)(const uint8_t*, uint8_t*, float*, float*);

struct UnpackInfo {
  UnpackFn fn;
  int vpb;      // 32-element sub-blocks per block
  size_t bytes; // bytes per block
  int offset;
};

UnpackInfo unpack_info(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: return {unpack_q4_0, 1, 18, 8};
    case GgmlType::Q4_1: return {unpack_q4_1, 1, 20, 0};
    case GgmlType::Q5_0: return {unpack_q5_0, 1, 22, 16};
    case GgmlType::Q5_1: return {unpack_q5_1, 1, 24, 0};
    case GgmlType::Q8_0: return {unpack_q8_0, 1, 34, 128};
    case GgmlType::Q2_K: return {unpack_q2_k, 8, 84, 0};
    case GgmlType::Q3_K: return {unpack_q3_k, 8, 110, 4};
    case GgmlType::Q4_K: return {unpack_q4_k, 8, 144, 0};
    case GgmlType::Q5_K: return {unpack_q5_k, 8, 176, 0};
    case GgmlType::Q6_K: return {unpack_q6_k, 8, 210, 32};
    default: return {nullptr, 0, 0, 0};
  }
}

// ---- quantizers ----

// fp16 value >= v (v >= 0): super-block scales rounded up keep every sub-block scale in range.
inline float fp16_ceil(float v) {
  fp16_t h = fp32_to_fp16(v);
  if (fp16_to_fp32(h) < v && h < 0x7bff) ++h;
  return fp16_to_fp32(h);
}

inline int iround(float x) { return (int)std::nearbyint(x); }
inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Value of largest magnitude, with its sign.
inline float signed_absmax(const float* x, int n) {
  float m = 0.f, a = 0.f;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > a) a = std::fabs(x[i]), m = x[i];
  return m;
}

inline void minmax(const float* x, int n, float* mn, float* mx) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  *mn = lo;
  *mx = hi;
}

// Symmetric nbits quantizer over 32 values: q in [0, 2^nbits), value = d * (q - 2^(nbits-1)).
void quant_sym32(const float* x, int nbits, float* d_out, uint8_t* q) {
  const int half = 1 << (nbits - 1);
  const float m = signed_absmax(x, 32);
  const float d = m / (float)-half;
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < 32; ++i) q[i] = (uint8_t)clampi(iround(x[i] * id) + half, 0, 2 * half - 1);
  *d_out = d;
}

// Asymmetric: value = d * q + m, q in [0, 2^nbits).
void quant_asym32(const float* x, int nbits, float* d_out, float* m_out, uint8_t* q) {
  const int qmax = (1 << nbits) - 1;
  float mn, mx;
  minmax(x, 32, &mn, &mx);
  // Round the stored parameters first so the codes are chosen against what is decoded.
  const float m = fp16_to_fp32(fp32_to_fp16(mn));
  const float d = fp16_to_fp32(fp32_to_fp16((mx - mn) / (float)qmax));
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < 32; ++i) q[i] = (uint8_t)clampi(iround((x[i] - m) * id), 0, qmax);
  *d_out = d;
  *m_out = m;
}

void pack_nibbles(const uint8_t* q, uint8_t* qs) {
  for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

void quantize_block_q4_0(const float* x, uint8_t* b) {
  float d;
  uint8_t q[32];
  quant_sym32(x, 4, &d, q);
  st_f16(b, d);
  pack_nibbles(q, b + 2);
}
void quantize_block_q4_1(const float* x, uint8_t* b) {
  float d, m;
  uint8_t q[32];
  quant_asym32(x, 4, &d, &m, q);
  st_f16(b, d);
  st_f16(b + 2, m);
  pack_nibbles(q, b + 4);
}
void pack_q5(const uint8_t* q, uint8_t* qhp, uint8_t* qs) {
  uint32_t qh = 0;
  for (int j = 0; j < 32; ++j) qh |= (uint32_t)((q[j] >> 4) & 1) << j;
  std::memcpy(qhp, &qh, 4);
  pack_nibbles(q, qs);
}
void quantize_block_q5_0(const float* x, uint8_t* b) {
  float d;
  uint8_t q[32];
  quant_sym32(x, 5, &d, q);
  st_f16(b, d);
  pack_q5(q, b + 2, b + 6);
}
void quantize_block_q5_1(const float* x, uint8_t* b) {
  float d, m;
  uint8_t q[32];
  quant_asym32(x, 5, &d, &m, q);
  st_f16(b, d);
  st_f16(b + 2, m);
  pack_q5(q, b + 4, b + 8);
}
void quantize_block_q8_0(const float* x, uint8_t* b) {
  float a = 0.f;
  for (int i = 0; i < 32; ++i) a = std::max(a, std::fabs(x[i]));
  const float d = a / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  st_f16(b, d);
  for (int i = 0; i < 32; ++i) b[2 + i] = (uint8_t)(int8_t)clampi(iround(x[i] * id), -127, 127);
}

// K-quant helper: per-sub-block asymmetric quantization with quantized (scale, min) pairs.
// ns sub-blocks of len values; scales/mins quantized to [0, smax]; codes in [0, qmax].
// value = d*sc*q - dmin*mn. Writes sc[], mn[], q[], d, dmin.
void kquant_asym(const float* x, int ns, int len, int qmax, int smax, float* d_out, float* dmin_out,
                 int* sc, int* mn, uint8_t* q) {
  float scale[16], minv[16], max_scale = 0.f, max_min = 0.f;
  for (int s = 0; s < ns; ++s) {
    float lo, hi;
    minmax(x + s * len, len, &lo, &hi);
    lo = std::min(lo, 0.f);  // mins are subtracted: only non-positive offsets are representable
    scale[s] = (hi - lo) / (float)qmax;
    minv[s] = -lo;
    max_scale = std::max(max_scale, scale[s]);
    max_min = std::max(max_min, minv[s]);
  }
  const float d = fp16_ceil(max_scale / (float)smax);
  const float dmin = fp16_ceil(max_min / (float)smax);
  for (int s = 0; s < ns; ++s) {
    sc[s] = d != 0.f ? clampi(iround(scale[s] / d), 0, smax) : 0;
    mn[s] = dmin != 0.f ? clampi(iround(minv[s] / dmin), 0, smax) : 0;
    const float ds = d * (float)sc[s], ms = dmin * (float)mn[s];
    const float id = ds != 0.f ? 1.f / ds : 0.f;
    for (int i = 0; i < len; ++i)
      q[s * len + i] = (uint8_t)clampi(iround((x[s * len + i] + ms) * id), 0, qmax);
  }
  *d_out = d;
  *dmin_out = dmin;
}

// K-quant helper: symmetric, 16 sub-blocks of 16, signed scales in [-smax, smax], codes
// q in [0, 2*half) with value d*sc*(q - half).
void kquant_sym(const float* x, int half, int smax, float* d_out, int* sc, uint8_t* q) {
  float scale[16], amax = 0.f;
  for (int s = 0; s < 16; ++s) {
    scale[s] = signed_absmax(x + 16 * s, 16) / (float)-half;
    amax = std::max(amax, std::fabs(scale[s]));
  }
  const float d = fp16_ceil(amax / (float)smax);
  for (int s = 0; s < 16; ++s) {
    sc[s] = d != 0.f ? clampi(iround(scale[s] / d), -smax, smax) : 0;
    const float ds = d * (float)sc[s];
    const float id = ds != 0.f ? 1.f / ds : 0.f;
    for (int i = 0; i < 16; ++i)
      q[16 * s + i] = (uint8_t)clampi(iround(x[16 * s + i] * id) + half, 0, 2 * half - 1);
  }
  *d_out = d;
}

void quantize_block_q2_k(const float* x, uint8_t* b) {
  float d, dmin;
  int sc[16], mn[16];
  uint8_t q[256];
  kquant_asym(x, 16, 16, 3, 15, &d, &dmin, sc, mn, q);
  for (int s = 0; s < 16; ++s) b[s] = (uint8_t)(sc[s] | (mn[s] << 4));
  uint8_t* qs = b + 16;
  std::memset(qs, 0, 64);
  for (int e = 0; e < 256; ++e) {
    const int c = e / 128, j = (e % 128) / 32, l = e % 32;
    qs[32 * c + l] |= (uint8_t)(q[e] << (2 * j));
  }
  st_f16(b + 80, d);
  st_f16(b + 82, dmin);
}

void quantize_block_q3_k(const float* x, uint8_t* b) {
  float d;
  int sc[16];
  uint8_t q[256];
  kquant_sym(x, 4, 31, &d, sc, q);
  uint8_t* hm = b;
  uint8_t* qs = b + 32;
  uint8_t* s = b + 96;
  std::memset(b, 0, 108);
  for (int e = 0; e < 256; ++e) {
    const int c = e / 128, j = (e % 128) / 32, l = e % 32, v = e / 32;
    qs[32 * c + l] |= (uint8_t)((q[e] & 3) << (2 * j));
    hm[l] |= (uint8_t)(((q[e] >> 2) & 1) << v);
  }
  for (int i = 0; i < 16; ++i) {
    const int us = sc[i] + 32;
    if (i < 8) s[i] |= (uint8_t)(us & 15);
    else s[i - 8] |= (uint8_t)((us & 15) << 4);
    s[8 + (i % 4)] |= (uint8_t)(((us >> 4) & 3) << (2 * (i / 4)));
  }
  st_f16(b + 108, d);
}

void pack_k4_scales(const int* sc, const int* mn, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
}

void quantize_block_q4_k(const float* x, uint8_t* b) {
  float d, dmin;
  int sc[8], mn[8];
  uint8_t q[256];
  kquant_asym(x, 8, 32, 15, 63, &d, &dmin, sc, mn, q);
  st_f16(b, d);
  st_f16(b + 2, dmin);
  pack_k4_scales(sc, mn, b + 4);
  uint8_t* qs = b + 16;
  for (int p = 0; p < 4; ++p)
    for (int l = 0; l < 32; ++l) qs[32 * p + l] = (uint8_t)(q[64 * p + l] | (q[64 * p + 32 + l] << 4));
}

void quantize_block_q5_k(const float* x, uint8_t* b) {
  float d, dmin;
  int sc[8], mn[8];
  uint8_t q[256];
  kquant_asym(x, 8, 32, 31, 63, &d, &dmin, sc, mn, q);
  st_f16(b, d);
  st_f16(b + 2, dmin);
  pack_k4_scales(sc, mn, b + 4);
  uint8_t* qh = b + 16;
  uint8_t* qs = b + 48;
  std::memset(qh, 0, 32);
  for (int p = 0; p < 4; ++p)
    for (int l = 0; l < 32; ++l)
      qs[32 * p + l] = (uint8_t)((q[64 * p + l] & 15) | ((q[64 * p + 32 + l] & 15) << 4));
  for (int e = 0; e < 256; ++e) qh[e % 32] |= (uint8_t)(((q[e] >> 4) & 1) << (e / 32));
}

void quantize_block_q6_k(const float* x, uint8_t* b) {
  float d;
  int sc[16];
  uint8_t q[256];
  kquant_sym(x, 32, 127, &d, sc, q);
  uint8_t* ql = b;
  uint8_t* qh = b + 128;
  std::memset(b, 0, 192);
  for (int e = 0; e < 256; ++e) {
    const int c = e / 128, k = (e % 128) / 32, l = e % 32;
    uint8_t& lo = ql[64 * c + 32 * (k & 1) + l];
    lo |= (uint8_t)((q[e] & 15) << (k >= 2 ? 4 : 0));
    qh[32 * c + l] |= (uint8_t)(((q[e] >> 4) & 3) << (2 * k));
  }
  for (int i = 0; i < 16; ++i) b[192 + i] = (uint8_t)(int8_t)sc[i];
  st_f16(b + 208, d);
}

}  // namespace

namespace detail {

int unpack_offset(GgmlType t) { return unpack_info(t).offset; }

void unpack_row(GgmlType t, const void* src, int64_t n, uint8_t* u, float* sc8, float* mn2) {
  const UnpackInfo info = unpack_info(t);
  SPC_ASSERT(info.fn != nullptr);
  const int64_t bs = 32 * info.vpb;
  SPC_ASSERT(n % bs == 0);
  const uint8_t* p = (const uint8_t*)src;
  for (int64_t b = 0; b < n / bs; ++b) {
    info.fn(p, u, sc8, mn2);
    p += info.bytes;
    u += bs;
    sc8 += 8 * info.vpb;
    mn2 += 2 * info.vpb;
  }
}

}  // namespace detail

namespace {
#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512 dequantization of the 32-element block types: value = fma(d, code - offset, m) with
// m = 0 for the symmetric types, exactly the generic path's arithmetic (bit-identical results).
template <size_t kBytes, int kQs, int kQh, bool kMin, int kOff, bool kQ8>
void dequant_blocks(const uint8_t* p, float* dst, int64_t nb) {
  const __m128i m4 = _mm_set1_epi8(0x0f);
  const __m512i off = _mm512_set1_epi32(kOff), b5 = _mm512_set1_epi32(16);
  for (int64_t b = 0; b < nb; ++b, p += kBytes, dst += 32) {
    const __m512 d = _mm512_set1_ps(ld_f16(p));
    const __m512 m = kMin ? _mm512_set1_ps(ld_f16(p + 2)) : _mm512_setzero_ps();
    __m512i lo, hi;
    if (kQ8) {
      lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + kQs)));
      hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + kQs + 16)));
    } else {
      const __m128i q = _mm_loadu_si128((const __m128i*)(p + kQs));
      lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, m4));
      hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4));
      if (kQh >= 0) {
        const uint32_t h = ld_u32(p + kQh);
        lo = _mm512_mask_add_epi32(lo, (__mmask16)(h & 0xffffu), lo, b5);
        hi = _mm512_mask_add_epi32(hi, (__mmask16)(h >> 16), hi, b5);
      }
      if (kOff != 0) {
        lo = _mm512_sub_epi32(lo, off);
        hi = _mm512_sub_epi32(hi, off);
      }
    }
    _mm512_storeu_ps(dst, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m));
    _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 version of the above: 8 values per step, the same arithmetic (bit-identical results).
template <size_t kBytes, int kQs, int kQh, bool kMin, int kOff, bool kQ8>
void dequant_blocks(const uint8_t* p, float* dst, int64_t nb) {
  const __m128i m4 = _mm_set1_epi8(0x0f);
  const __m256i off = _mm256_set1_epi32(kOff), b5 = _mm256_set1_epi32(16);
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t b = 0; b < nb; ++b, p += kBytes, dst += 32) {
    const __m256 d = _mm256_set1_ps(ld_f16(p));
    const __m256 m = kMin ? _mm256_set1_ps(ld_f16(p + 2)) : _mm256_setzero_ps();
    __m128i bytes[2];  // elements 0..15 and 16..31 as bytes
    if (kQ8) {
      bytes[0] = _mm_loadu_si128((const __m128i*)(p + kQs));
      bytes[1] = _mm_loadu_si128((const __m128i*)(p + kQs + 16));
    } else {
      const __m128i q = _mm_loadu_si128((const __m128i*)(p + kQs));
      bytes[0] = _mm_and_si128(q, m4);
      bytes[1] = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
    }
    const uint32_t h = kQh >= 0 ? ld_u32(p + kQh) : 0;
    for (int k = 0; k < 4; ++k) {
      const __m128i b8 = k % 2 ? _mm_srli_si128(bytes[k / 2], 8) : bytes[k / 2];
      __m256i v = kQ8 ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
      if (kQh >= 0) {
        const __m256i hb = _mm256_and_si256(_mm256_set1_epi32((int32_t)((h >> (8 * k)) & 0xffu)), bit);
        v = _mm256_add_epi32(v, _mm256_and_si256(_mm256_cmpeq_epi32(hb, bit), b5));
      }
      if (kOff != 0) v = _mm256_sub_epi32(v, off);
      _mm256_storeu_ps(dst + 8 * k, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(v), m));
    }
  }
}
#define SPC_DEQUANT_FAST 1
#endif
#if defined(SPC_DEQUANT_FAST) || (defined(__AVX512F__) && defined(__AVX512BW__))
bool dequantize_row_fast(GgmlType t, const uint8_t* p, float* dst, int64_t n) {
  switch (t) {
    case GgmlType::Q4_0: dequant_blocks<18, 2, -1, false, 8, false>(p, dst, n / 32); return true;
    case GgmlType::Q4_1: dequant_blocks<20, 4, -1, true, 0, false>(p, dst, n / 32); return true;
    case GgmlType::Q5_0: dequant_blocks<22, 6, 2, false, 16, false>(p, dst, n / 32); return true;
    case GgmlType::Q5_1: dequant_blocks<24, 8, 4, true, 0, false>(p, dst, n / 32); return true;
    case GgmlType::Q8_0: dequant_blocks<34, 2, -1, false, 0, true>(p, dst, n / 32); return true;
    default: return false;
  }
}
#endif
}  // namespace

void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n) {
  SPC_CHECK(quant_type_supported(t), "dequantize_row: unsupported type %s", type_name(t));
  SPC_CHECK(n % type_traits(t).block_size == 0, "dequantize_row: %lld values is not a multiple of the %s block",
            (long long)n, type_name(t));
  if (t == GgmlType::F32) {
    std::memcpy(dst, src, (size_t)n * 4);
    return;
  }
  if (t == GgmlType::F16) {
    const uint16_t* s = (const uint16_t*)src;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
#endif
    for (; i < n; ++i) dst[i] = fp16_to_fp32(s[i]);
    return;
  }
  if (t == GgmlType::BF16) {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(s[i]);
    return;
  }
#if defined(SPC_DEQUANT_FAST) || (defined(__AVX512F__) && defined(__AVX512BW__))
  if (dequantize_row_fast(t, (const uint8_t*)src, dst, n)) return;
#endif
  const UnpackInfo info = unpack_info(t);
  const int bs = 32 * info.vpb;
  const float off = (float)info.offset;
  const uint8_t* p = (const uint8_t*)src;
  alignas(64) uint8_t u[256];
  alignas(64) float sc8[64], mn2[16];
  for (int64_t b = 0; b < n / bs; ++b, p += info.bytes, dst += bs) {
    info.fn(p, u, sc8, mn2);
    for (int v = 0; v < info.vpb; ++v)
      for (int i = 0; i < 32; ++i) {
        const int h = i / 16;
        dst[v * 32 + i] = sc8[v * 8 + h * 4] * ((float)u[v * 32 + i] - off) + mn2[v * 2 + h];
      }
  }
}

void quantize_row(GgmlType t, const float* src, void* dst, int64_t n) {
  SPC_CHECK(quant_type_supported(t), "quantize_row: unsupported type %s", type_name(t));
  const TypeTraits& tr = type_traits(t);
  SPC_CHECK(n % tr.block_size == 0, "quantize_row: %lld values is not a multiple of the %s block",
            (long long)n, tr.name);
  if (t == GgmlType::F32) {
    std::memcpy(dst, src, (size_t)n * 4);
    return;
  }
  if (t == GgmlType::F16 || t == GgmlType::BF16) {
    uint16_t* d = (uint16_t*)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = t == GgmlType::F16 ? fp32_to_fp16(src[i]) : fp32_to_bf16(src[i]);
    return;
  }
  void (*fn)(const float*, uint8_t*) = nullptr;
  switch (t) {
    case GgmlType::Q4_0: fn = quantize_block_q4_0; break;
    case GgmlType::Q4_1: fn = quantize_block_q4_1; break;
    case GgmlType::Q5_0: fn = quantize_block_q5_0; break;
    case GgmlType::Q5_1: fn = quantize_block_q5_1; break;
    case GgmlType::Q8_0: fn = quantize_block_q8_0; break;
    case GgmlType::Q2_K: fn = quantize_block_q2_k; break;
    case GgmlType::Q3_K: fn = quantize_block_q3_k; break;
    case GgmlType::Q4_K: fn = quantize_block_q4_k; break;
    case GgmlType::Q5_K: fn = quantize_block_q5_k; break;
    case GgmlType::Q6_K: fn = quantize_block_q6_k; break;
    default: SPC_ASSERT(false);
  }
  uint8_t* out = (uint8_t*)dst;
  for (int64_t b = 0; b < n / tr.block_size; ++b) fn(src + b * tr.block_size, out + b * tr.type_size);
}

}  // namespace spc
