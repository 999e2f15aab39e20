// GCC 12's AVX-512 headers self-initialize _mm512_undefined_*() results, which trips
// -Wuninitialized when the intrinsics inline here; silence that (header-only) false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "ops/matmul.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops/matmul_kernels.h"
#include "ops/quant.h"
#include "util/error.h"
#include "util/fp16.h"

namespace spc {
namespace {

using namespace mmk;

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
#elif defined(SPC_MM_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float db = amax / 127.f;
    const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i iv[4];
    for (int j = 0; j < 4; ++j) iv[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));
    // Saturating packs interleave the 128-bit lanes; the dword permute restores element order.
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i h0 = _mm256_add_epi32(iv[0], iv[1]), h1 = _mm256_add_epi32(iv[2], iv[3]);
    // Horizontal sums of both halves at once: lanes 0..3 of hs from h0, 4..7 from h1.
    __m256i hs = _mm256_hadd_epi32(h0, h1);  // per 128-bit lane: h0 pairs, h1 pairs
    hs = _mm256_hadd_epi32(hs, hs);           // lane: [h0 a, h1 a, h0 a, h1 a] quads
    const __m128i hq = _mm_add_epi32(_mm256_castsi256_si128(hs), _mm256_extracti128_si256(hs, 1));
    d[b] = db;
    s16[2 * b] = db * (float)_mm_extract_epi32(hq, 0);
    s16[2 * b + 1] = db * (float)_mm_extract_epi32(hq, 1);
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


// ---------------------------------------------------------------------------------------------
// Integer kernel over unpacked weights: R rows x T tokens, out[r*kTileT + t] =
//   sum_v sum_i sc(r,v,i) * u(r,v,i) * xd(t,v) * xq(t,v,i).
// Weight row r: u at wu + r*nvb*32, scales at wsc + r*nvb*8. Token t: xq + t*n_in, xd + t*nvb.


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
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = hsum8(acc[r][t]);
#elif defined(SPC_MM_AVX2)
  // Codes up to 255 (Q8_0's unpacked form) would saturate vpmaddubsw's int16 pair sums, so the
  // bytes are widened to int16 and multiplied with vpmaddwd: per 16-value half, 8 int32 lanes,
  // folded by hadd into the (half 0: lanes 0,1,4,5; half 1: lanes 2,3,6,7) layout whose scales
  // are picked from sc8 by a dword permute.
  const __m256i sel = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t v = 0; v < nvb; ++v) {
    __m256i W0[R], W1[R];
    __m256 S[R];
    for (int r = 0; r < R; ++r) {
      const __m256i u = _mm256_loadu_si256((const __m256i*)(wu + (r * nvb + v) * 32));
      W0[r] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u));
      W1[r] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1));
      S[r] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(wsc + (r * nvb + v) * 8), sel);
    }
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + t * n_in + v * 32));
      const __m256i X0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv));
      const __m256i X1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1));
      const __m256 D = _mm256_set1_ps(xd[t * nvb + v]);
      for (int r = 0; r < R; ++r) {
        const __m256i P = _mm256_hadd_epi32(_mm256_madd_epi16(W0[r], X0), _mm256_madd_epi16(W1[r], X1));
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), _mm256_mul_ps(S[r], D), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = hsum8(acc[r][t]);
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


// Tokens per outer chunk of the unpacked (prefill) path (activations of a chunk stay in L2).
constexpr int64_t kTokenChunk = 64;
// Up to this many tokens the fused kernels are used; beyond, weights are unpacked once per
// row block and reused by all tokens.
constexpr int64_t kFusedMaxTokens = 8;
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

// out[r*kTileT + t] = dot(row r of w (row stride n elements), x + t*n). kPrefetch: the rows
// stream from memory (decode); fetch the tiles ahead into L2.
template <class L, int R, int T, bool kPrefetch>
void fkernel_t(const void* wv, const float* x, int64_t n, float* out) {
  const typename L::T* w = (const typename L::T*)wv;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 W[R];
    for (int r = 0; r < R; ++r) {
      if (kPrefetch) _mm_prefetch((const char*)(w + (r + 4 * R) * n + i), _MM_HINT_T1);
      W[r] = L::load(w + r * n + i);
    }
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
  fkernel_t<LdF32, R, T, false>(w, x, n, out);
}

// Kernels reading F16/BF16 weight rows directly (small token counts).
using FDirectFn = void (*)(const void*, const float*, int64_t, float*);
template <class L, int R>
FDirectFn fdirect_for_t(int t) {
  return t == 1   ? fkernel_t<L, R, 1, true>
         : t == 2 ? fkernel_t<L, R, 2, true>
         : t == 3 ? fkernel_t<L, R, 3, true>
                  : fkernel_t<L, R, 4, true>;
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
#elif defined(SPC_MM_AVX2)
// AVX2 + FMA + F16C loaders of 8 weights as fp32; load_tail reads k < 8 (zero-padded).
struct LdF32 {
  using T = float;
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
};
struct LdF16 {
  using T = uint16_t;
  static __m256 load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
};
struct LdBF16 {
  using T = uint16_t;
  static __m256 load(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
};
template <class E>
inline const E* pad8(const E* p, int64_t k, E* buf) {
  std::memset(buf, 0, 8 * sizeof(E));
  std::memcpy(buf, p, (size_t)k * sizeof(E));
  return buf;
}

// out[r*kTileT + t] = dot(row r of w (row stride n elements), x + t*n). kPrefetch: the rows
// stream from memory (decode); fetch the rows ahead into L2.
template <class L, int R, int T, bool kPrefetch>
void fkernel_rows(const typename L::T* w, const float* x, int64_t n, float* out) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 W[R];
    for (int r = 0; r < R; ++r) {
      if (kPrefetch) _mm_prefetch((const char*)(w + (r + 16) * n + i), _MM_HINT_T1);
      W[r] = L::load(w + r * n + i);
    }
    for (int t = 0; t < T; ++t) {
      const __m256 X = _mm256_loadu_ps(x + t * n + i);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(W[r], X, acc[r][t]);
    }
  }
  if (i < n) {
    const int64_t k = n - i;
    __m256 W[R];
    for (int r = 0; r < R; ++r) {
      typename L::T wb[8];
      W[r] = L::load(pad8(w + r * n + i, k, wb));
    }
    for (int t = 0; t < T; ++t) {
      float xb[8];
      const __m256 X = _mm256_loadu_ps(pad8(x + t * n + i, k, xb));
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(W[r], X, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = hsum8(acc[r][t]);
}
// The tile in passes of at most 8 accumulators (16 ymm registers): rows split, tokens not.
template <class L, int R, int T, bool kPrefetch>
void fkernel_t(const void* wv, const float* x, int64_t n, float* out) {
  const typename L::T* w = (const typename L::T*)wv;
  constexpr int kRs = T <= 2 ? 4 : 2;
  if constexpr (R <= kRs) {
    fkernel_rows<L, R, T, kPrefetch>(w, x, n, out);
  } else {
    fkernel_rows<L, kRs, T, kPrefetch>(w, x, n, out);
    fkernel_t<L, R - kRs, T, kPrefetch>(w + kRs * n, x, n, out + kRs * kTileT);
  }
}
template <int R, int T>
void fkernel(const float* w, const float* x, int64_t n, float* out) {
  fkernel_t<LdF32, R, T, false>(w, x, n, out);
}

// Kernels reading F16/BF16 weight rows directly (small token counts).
using FDirectFn = void (*)(const void*, const float*, int64_t, float*);
template <class L, int R>
FDirectFn fdirect_for_t(int t) {
  return t == 1   ? fkernel_t<L, R, 1, true>
         : t == 2 ? fkernel_t<L, R, 2, true>
         : t == 3 ? fkernel_t<L, R, 3, true>
                  : fkernel_t<L, R, 4, true>;
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
    for (int t = 0; t < T; ++t) out[r * kTileT + t] = vec_dot(w + r * n, x + t * n, n);
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
  std::vector<uint8_t> u, row;
  std::vector<float> sc8, mn2, f;
};

// Per-thread scratch for unpacked weight tiles (each pool thread has its own).
Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// Row r of w in its GGUF layout: in w.data, or rebuilt from the interleaved copy into buf
// (whose source pages the model may have released: see WeightView::i8x8).
const uint8_t* row_bytes(const WeightView& w, int64_t r, std::vector<uint8_t>& buf) {
  const size_t rs = row_size(w.type, w.n_in);
  if (w.i8x8 == nullptr) return (const uint8_t*)w.data + (size_t)r * rs;
  if (buf.size() < rs) buf.resize(rs);
  i8x8_unpack_row(w, r, buf.data());
  return buf.data();
}

// Per-call activation buffers, owned by the calling thread.
struct ActBuf {
  std::vector<int8_t> q;
  std::vector<float> d, s16, s32, xp;
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

// Activation data of a fused fp32-activation decode matmul (calling thread's buffers): block
// sums of x, and x permuted for the kernel where its type wants that.
struct F32qAct {
  const float* xk;
  const float* xsp;
};

F32qAct f32q_prepare(GgmlType type, const float* x, int64_t n_tok, int64_t n) {
  const int64_t nb = n / 32;
  ActBuf& act = thread_act();
  if (act.s32.size() < (size_t)(n_tok * nb)) act.s32.resize((size_t)(n_tok * nb));
  float* xsp = act.s32.data();
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int i = 0; i < 32; ++i) s += x[t * n + b * 32 + i];
      xsp[t * nb + b] = s;
    }
  const float* xk = x;
  if (f32q_permuted(type)) {
    if (act.xp.size() < (size_t)(n_tok * n)) act.xp.resize((size_t)(n_tok * n));
    f32q_permute_x(x, n_tok * n, act.xp.data());
    xk = act.xp.data();
  }
  return {xk, xsp};
}

// Decode output tiles [tb, te) (kTileR rows each) of y [n_tok][n_out]: kernel(r0, R, t0, T, out)
// fills out[r * kTileT + t] for rows r0.. and tokens t0.., which land in y.
template <class Kernel>
void decode_tiles(int64_t n_out, int64_t n_tok, float* y, int64_t tb, int64_t te, Kernel&& kernel) {
  float out[kTileR * kTileT];
  for (int64_t tile = tb; tile < te; ++tile) {
    const int64_t r0 = tile * kTileR;
    const int R = (int)std::min<int64_t>(kTileR, n_out - r0);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTileT) {
      const int T = (int)std::min<int64_t>(kTileT, n_tok - t0);
      kernel(r0, R, t0, T, out);
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) y[(t0 + t) * n_out + r0 + r] = out[r * kTileT + t];
    }
  }
}

// Output tiles [tb, te) of a fused decode matmul (blocks widened to fp32 inside the kernel).
void f32q_tiles(const WeightView& w, const F32qAct& a, int64_t n_tok, float* y, int64_t tb, int64_t te) {
  const int64_t n = w.n_in, nb = n / 32;
  const size_t rs = row_size(w.type, n);
  Scratch& s = thread_scratch();
  if (s.mn2.size() < (size_t)(kTileR * nb)) s.mn2.resize((size_t)(kTileR * nb));
  decode_tiles(w.n_out, n_tok, y, tb, te, [&](int64_t r0, int R, int64_t t0, int T, float* out) {
    f32q_for(w.type, R, T)((const uint8_t*)w.data + r0 * rs, rs, nb, a.xk + t0 * n, n, a.xsp + t0 * nb, s.mn2.data(), out);
  });
}

// fp32 activations as given, any weight type. Decode: fused kernels reading the weight rows
// directly (F32/F16/BF16 and the 32-element block types). Otherwise (prefill, K-quants): blocks
// of rows are dequantized into thread-local fp32 scratch once and reused by all tokens.
void matmul_float(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool) {
  const int64_t n = w.n_in, n_out = w.n_out;
  const size_t rs = row_size(w.type, n);
  // The fused kernels read w.data; with an interleaved copy (whose source pages the model
  // released) every token count takes the row-block path, which reads the copy.
  const bool fused = n_tok <= kFusedMaxTokens && w.i8x8 == nullptr;
  if (fused && f32q_for(w.type, 1, 1) != nullptr) {
    // Decode, 32-element block types: blocks widened to fp32 in registers inside the kernel.
    const F32qAct a = f32q_prepare(w.type, x, n_tok, n);
    const int64_t n_tiles = (n_out + kTileR - 1) / kTileR;
    pool.parallel_for(n_tiles, [&](int64_t tb, int64_t te, int) { f32q_tiles(w, a, n_tok, y, tb, te); });
    return;
  }
  if (fused && fdirect_for(w.type, 1, 1) != nullptr) {
    // Decode: weights read (and widened) straight from the matrix.
    const int64_t n_tiles = (n_out + kTileR - 1) / kTileR;
    pool.parallel_for(n_tiles, [&](int64_t tb, int64_t te, int) {
      decode_tiles(n_out, n_tok, y, tb, te, [&](int64_t r0, int R, int64_t t0, int T, float* out) {
        fdirect_for(w.type, R, T)((const uint8_t*)w.data + r0 * rs, x + t0 * n, n, out);
      });
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
        for (int r = 0; r < RB; ++r) dequantize_row(w.type, row_bytes(w, rb0 + r, s.row), s.f.data() + r * n, n);
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

// Activations of an int8 matmul (calling thread's buffers, see quantize_act_row).
struct QAct {
  const int8_t* xq;
  const float* xd;
  const float* xs16;
  const float* xs32;
};

QAct quant_prepare(const float* x, int64_t n_tok, int64_t n, ThreadPool& pool) {
  const int64_t nvb = n / 32;
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
  return {xq, xd, xs, xs32};
}

// Output tiles [tb, te) of a fused int8 decode matmul (codes expanded in registers).
void quant_tiles(const WeightView& w, const QAct& a, int64_t n_tok, float* y, int64_t tb, int64_t te) {
  const int64_t n = w.n_in, nvb = n / 32;
  const size_t rs = row_size(w.type, n);
  Scratch& s = thread_scratch();
  if (s.mn2.size() < (size_t)(kTileR * nvb * 2)) s.mn2.resize((size_t)(kTileR * nvb * 2));
  decode_tiles(w.n_out, n_tok, y, tb, te, [&](int64_t r0, int R, int64_t t0, int T, float* out) {
    fused_for(w.type, R, T)((const uint8_t*)w.data + r0 * rs, rs, nvb, a.xq + t0 * n, a.xd + t0 * nvb, a.xs16 + t0 * nvb * 2,
                            a.xs32 + t0 * nvb, n, s.mn2.data(), out);
  });
}

std::atomic<bool> g_matmul_amx{true};  // set_matmul_amx

// Token counts from which the AMX pair kernel beats passes of kTileT-token vpdpbusd tiles over
// L1-resident blocks. A batched decode step's FFN on SmolLM2 (2 Xeon cores, ms per step, AMX
// against vpdpbusd): 5 rows 6.3 / 3.3, 8 rows 7.6 / 4.6, 16 rows 8.8 / 8.2, 32 rows 12.7 / 14.4;
// all of a step's matmuls (q/k/v, output projection, FFN, logits; two runs each): 17 rows 17.1,
// 22.7 / 15.3, 15.1; 24 rows 21.1, 21.7 / 20.7, 20.5; 28 rows 23.0, 21.8 / 23.9, 22.9; 32 rows
// 22.6, 28.9 / 25.9, 25.2.
constexpr int64_t kAmxMinTokens = 25;

// The AMX kernel for pairs of 8-row groups of an int8 matmul over the interleaved copy, where it
// runs: prefill sizes (kAmxMinTokens or more), switched on, and a CPU with AMX-INT8; else nullptr.
mmk::I8x8PairFn i8x8_pair_amx(const WeightView& w, int64_t n_tok) {
  return n_tok >= kAmxMinTokens && g_matmul_amx.load(std::memory_order_relaxed) ? mmk::i8x8_pair_amx_for(w.type)
                                                                                 : nullptr;
}

// Bytes of interleaved records in one block of 8-row groups of a many-token (prefill) int8
// matmul: every token tile passes over the block while it stays in L1 (the activations stay in
// L2). On SmolLM2's shapes at 256 tokens blocks of 16 KB and none measured the same (~450
// GOPS on 2 Zen 4 cores, the matrices' thread shares fit in L2); on matrices whose share does
// not, the weights would otherwise stream from memory once per tile.
constexpr size_t kI8x8BlockBytes = 16384;

// Groups [gb, ge) (8 rows each) of an int8 matmul over the row-interleaved copy w.i8x8. Up to
// kTileT tokens (decode): one pass over the groups. More (prefill): blocks of groups, each
// passed over by every token tile before the next is read.
void i8x8_groups(const WeightView& w, const QAct& a, int64_t n_tok, float* y, int64_t gb, int64_t ge) {
  const int64_t n = w.n_in, nvb = n / 32;
  const size_t rec = mmk::i8x8_record_bytes(w.type);
  // Prefill on a CPU with AMX-INT8: pairs of groups on tiles (bit for bit the same sums); an
  // odd last group of the range goes the vpdpbusd way below.
  if (const mmk::I8x8PairFn pair = i8x8_pair_amx(w, n_tok)) {
    for (; gb + 1 < ge; gb += 2)
      pair(w.i8x8 + (size_t)gb * nvb * rec, w.i8x8 + (size_t)(gb + 1) * nvb * rec, nvb, a.xq, a.xd, a.xs32, n, n_tok,
           y + 8 * gb, w.n_out);
    if (gb == ge) return;
  }
  const int64_t per_block =
      n_tok <= kTileT ? ge - gb : std::max<int64_t>(1, (int64_t)(kI8x8BlockBytes / ((size_t)nvb * rec)));
  for (int64_t g0 = gb; g0 < ge; g0 += per_block) {
    const int64_t g1 = std::min(ge, g0 + per_block);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTileT) {
      const int T = (int)std::min<int64_t>(kTileT, n_tok - t0);
      const mmk::I8x8Fn fn = mmk::i8x8_for(w.type, T);
      int64_t g = g0;
      if (const mmk::I8x8PairFn pair = mmk::i8x8_pair_for(w.type))  // two groups per pass where it can
        for (; g + 1 < g1; g += 2)
          pair(w.i8x8 + (size_t)g * nvb * rec, w.i8x8 + (size_t)(g + 1) * nvb * rec, nvb, a.xq + t0 * n,
               a.xd + t0 * nvb, a.xs32 + t0 * nvb, n, T, y + t0 * w.n_out + 8 * g, w.n_out);
      for (; g < g1; ++g)
        fn(w.i8x8 + (size_t)g * nvb * rec, nvb, a.xq + t0 * n, a.xd + t0 * nvb, a.xs32 + t0 * nvb, n,
           y + t0 * w.n_out + 8 * g, w.n_out);
    }
  }
}

// Groups per unit of work of an int8 matmul over the interleaved copy: pairs where i8x8_groups
// runs them two at a time (AMX tiles, or 512-bit vpdpbusd), so that no thread's share leaves an
// odd group to the one-group kernel.
int64_t i8x8_unit_groups(const WeightView& w, int64_t n_tok) {
  return i8x8_pair_amx(w, n_tok) || mmk::i8x8_pair_for(w.type) ? 2 : 1;
}

// w.i8x8 is only ever set from i8x8_repack, which requires the kernel. Any token count: the
// interleaved kernels are also the fastest int8 prefill path (8 rows per vpdpbusd).
bool use_i8x8(const WeightView& w) { return w.i8x8 != nullptr; }

void matmul_quant(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool) {
  const int64_t n = w.n_in, n_out = w.n_out, nvb = n / 32;
  const float off = (float)detail::unpack_offset(w.type);

  const QAct a = quant_prepare(x, n_tok, n, pool);
  const int8_t* xq = a.xq;
  const float* xd = a.xd;
  const float* xs = a.xs16;

  if (use_i8x8(w)) {
    // Over the row-interleaved copy: 8 rows per dot product (prefill sizes on AMX: pairs of groups).
    const int64_t ng = w.n_out / 8, per = i8x8_unit_groups(w, n_tok);
    pool.parallel_for((ng + per - 1) / per, [&](int64_t ub, int64_t ue, int) {
      i8x8_groups(w, a, n_tok, y, ub * per, std::min(ng, ue * per));
    });
    return;
  }
  if (n_tok <= kFusedMaxTokens && fused_for(w.type, 1, 1) != nullptr) {
    // Decode: each thread's 4-row tiles stream by once; the few tokens' activations stay in L1.
    const int64_t n_tiles = (n_out + kTileR - 1) / kTileR;
    pool.parallel_for(n_tiles, [&](int64_t tb, int64_t te, int) { quant_tiles(w, a, n_tok, y, tb, te); });
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
        const uint8_t* row = row_bytes(w, rb0 + r, s.row);
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
                    out[r * kTileT + t] + vec_dot(mt + (rt + r) * nvb * 2, xs + (t0 + t) * nvb * 2, 2 * nvb);
          }
        }
      }
    }
  });
}

}  // namespace

void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool, bool int8_activations) {
  validate(w);
  SPC_CHECK(n_tok >= 0, "matmul: negative token count %lld", (long long)n_tok);
  if (n_tok == 0 || w.n_out == 0) return;
  if (is_float_type(w.type) || !int8_activations) matmul_float(w, x, n_tok, y, pool);
  else matmul_quant(w, x, n_tok, y, pool);
}

void matmul_many(const WeightView* ws, float* const* ys, int n_w, const float* x, int64_t n_tok, ThreadPool& pool,
                 bool int8_activations) {
  SPC_CHECK(n_tok >= 0, "matmul: negative token count %lld", (long long)n_tok);
  bool fuse = n_w > 1 && n_tok > 0 && n_tok <= kFusedMaxTokens;
  bool i8x8 = int8_activations;  // every matrix has an interleaved copy (8-row groups)
  for (int i = 0; i < n_w; ++i) i8x8 = i8x8 && use_i8x8(ws[i]);
  for (int i = 0; i < n_w; ++i) {
    validate(ws[i]);
    fuse = fuse && ws[i].n_in == ws[0].n_in &&
           (i8x8 || (int8_activations ? !is_float_type(ws[i].type) && fused_for(ws[i].type, 1, 1) != nullptr
                                      : ws[i].i8x8 == nullptr && f32q_for(ws[i].type, 1, 1) != nullptr &&
                                            f32q_permuted(ws[i].type) == f32q_permuted(ws[0].type)));
  }
  if (!fuse) {
    for (int i = 0; i < n_w; ++i) matmul(ws[i], x, n_tok, ys[i], pool, int8_activations);
    return;
  }
  // One dispatch over the output units of all matrices (fewer pool hand-offs per token): 8-row
  // groups of the interleaved copies, else 4-row tiles.
  std::vector<int64_t> first(n_w + 1, 0);  // first unit of each matrix in the joint range
  std::vector<int64_t> per(n_w, 1);         // 8-row groups per unit (i8x8_unit_groups)
  for (int i = 0; i < n_w; ++i) {
    if (i8x8) per[i] = i8x8_unit_groups(ws[i], n_tok);
    first[i + 1] = first[i] + (i8x8 ? (ws[i].n_out / 8 + per[i] - 1) / per[i] : (ws[i].n_out + kTileR - 1) / kTileR);
  }
  auto run = [&](auto&& units) {
    pool.parallel_for(first[n_w], [&](int64_t ub, int64_t ue, int) {
      for (int i = 0; i < n_w; ++i) {
        const int64_t b = std::max(ub, first[i]), e = std::min(ue, first[i + 1]);
        if (b < e) units(i, b - first[i], e - first[i]);
      }
    });
  };
  if (i8x8) {
    const QAct a = quant_prepare(x, n_tok, ws[0].n_in, pool);
    run([&](int i, int64_t b, int64_t e) {
      i8x8_groups(ws[i], a, n_tok, ys[i], b * per[i], std::min(ws[i].n_out / 8, e * per[i]));
    });
  } else if (int8_activations) {
    const QAct a = quant_prepare(x, n_tok, ws[0].n_in, pool);
    run([&](int i, int64_t b, int64_t e) { quant_tiles(ws[i], a, n_tok, ys[i], b, e); });
  } else {
    const F32qAct a = f32q_prepare(ws[0].type, x, n_tok, ws[0].n_in);
    run([&](int i, int64_t b, int64_t e) { f32q_tiles(ws[i], a, n_tok, ys[i], b, e); });
  }
}

void set_matmul_amx(bool on) { g_matmul_amx.store(on, std::memory_order_relaxed); }

bool matmul_amx_active() {
  return g_matmul_amx.load(std::memory_order_relaxed) && mmk::i8x8_pair_amx_for(GgmlType::Q4_1) != nullptr;
}

bool has_int8_decode_kernel(GgmlType t) {
  return !is_float_type(t) && quant_type_supported(t) && (mmk::i8x8_for(t, 1) != nullptr || fused_for(t, 1, 1) != nullptr);
}

void dequantize_rows(const WeightView& w, int64_t row0, int64_t n_rows, float* dst) {
  validate(w);
  SPC_CHECK(row0 >= 0 && n_rows >= 0 && row0 + n_rows <= w.n_out, "dequantize_rows: rows [%lld, %lld) outside [0, %lld)",
            (long long)row0, (long long)(row0 + n_rows), (long long)w.n_out);
  Scratch& s = thread_scratch();
  for (int64_t r = 0; r < n_rows; ++r) dequantize_row(w.type, row_bytes(w, row0 + r, s.row), dst + r * w.n_in, w.n_in);
}

}  // namespace spc
