// Small vector helpers for softmax pieces over float arrays (AVX-512 with a portable fallback).
// Inline so the decode loops that call them per chunk pay no call per element.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// 8-lane helpers wherever the build has AVX2 + FMA + F16C (AVX-512 builds too: the AVX2 low-bit
// kernels and the 256-bit matmul kernels use them there); SPC_VEC_AVX2 selects them as the main
// path of the helpers below where the build lacks AVX-512.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SPC_VEC_HAVE_AVX2 1
#if !defined(__AVX512F__)
#define SPC_VEC_AVX2 1
#endif
#endif

#include "ops/attention.h"

namespace spc {

#if defined(__AVX512F__)
// exp(x) on 16 lanes: the range reduction and polynomial of exp_approx (max relative error
// ~2e-7 where exp_approx is exact to that). x is clamped to [-110, 88]; below ~-104 the result
// underflows to exactly 0 (scalef), so -inf (masked) scores need no separate zeroing.
// (Full-mask maskz forms: the same instructions, without GCC 12's false -Wuninitialized from the
// plain intrinsics' _mm512_undefined_ps where this is inlined into unrolled kernels.)
inline __m512 exp_approx16(__m512 x) {
  constexpr __mmask16 all = 0xFFFF;
  x = _mm512_maskz_min_ps(all, _mm512_maskz_max_ps(all, x, _mm512_set1_ps(-110.0f)), _mm512_set1_ps(88.0f));
  const __m512 n =
      _mm512_maskz_roundscale_ps(all, _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                 _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(all, p, n);
}
#endif

#if defined(SPC_VEC_HAVE_AVX2)
// exp(x) on 8 lanes: exp_approx's range reduction and polynomial; x below -87 (and -inf, NaN-free
// masked scores) gives exactly 0, like exp_approx16's underflow.
inline __m256 exp_approx8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmin8(__m256 v) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  s = _mm_min_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 cvtph8(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#endif

// sum of a[i] * b[i] for i < n (lane-parallel partial sums: not in index order).
inline float vec_dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(SPC_VEC_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

// max over x[0..n); -inf for n == 0.
inline float vec_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 mv = _mm512_set1_ps(m);
    for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
    m = _mm512_reduce_max_ps(mv);
  }
#elif defined(SPC_VEC_AVX2)
  if (n >= 8) {
    __m256 mv = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    m = hmax8(mv);
  }
#endif
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum of (double)x[i]^2 over x[0..n): every product exact in double, the sum in double over
// independent accumulators (4 x 8 lanes with AVX-512, 4 x 4 with AVX2) instead of one serial
// chain, whose add latency made a 576-wide row cost ~0.6 us (rmsnorm, twice per layer and row
// on the decode step's serial path).
inline double vec_sumsq_f64(const float* x, int64_t n) {
  int64_t i = 0;
  double ss = 0;
#if defined(__AVX512F__)
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= n; i += 32) {
    const __m512d x0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), x1 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8)),
                  x2 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 16)), x3 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 24));
    a0 = _mm512_fmadd_pd(x0, x0, a0);
    a1 = _mm512_fmadd_pd(x1, x1, a1);
    a2 = _mm512_fmadd_pd(x2, x2, a2);
    a3 = _mm512_fmadd_pd(x3, x3, a3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m512d x0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
    a0 = _mm512_fmadd_pd(x0, x0, a0);
  }
  // (Reduced by hand: GCC 12 warns about _mm512_reduce_add_pd's undefined upper-half operand.)
  const __m512d a = _mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3));
  const __m256d q = _mm256_add_pd(_mm512_maskz_extractf64x4_pd(0xF, a, 0), _mm512_maskz_extractf64x4_pd(0xF, a, 1));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
  ss = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#elif defined(SPC_VEC_AVX2)
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 16 <= n; i += 16) {
    const __m256d x0 = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), x1 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)),
                  x2 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 8)), x3 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 12));
    a0 = _mm256_fmadd_pd(x0, x0, a0);
    a1 = _mm256_fmadd_pd(x1, x1, a1);
    a2 = _mm256_fmadd_pd(x2, x2, a2);
    a3 = _mm256_fmadd_pd(x3, x3, a3);
  }
  const __m256d a = _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  ss = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
  for (; i < n; ++i) ss += (double)x[i] * x[i];
  return ss;
}

// The index of the first largest element of x[0..n), NaNs ignored: the index a scan returns that
// starts at 0 and moves to every later element greater than the best so far (so 0 for n <= 1,
// and 0 when x[0] is NaN). Two vector passes (the maximum, then its first position) instead of
// that scan's dependent compare per element: greedy decoding takes it over the whole vocabulary
// once or twice per step (SmolLM2: 49152 logits in 2.9 instead of 52 us on a Xeon).
inline int64_t vec_argmax(const float* x, int64_t n) {
  if (n <= 1 || std::isnan(x[0])) return 0;
  float m = x[0];
  int64_t i = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    // max(v, acc) returns acc where v is NaN (the second operand), so NaNs never enter.
    __m512 a0 = _mm512_set1_ps(m), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 64 <= n; i += 64) {
      a0 = _mm512_max_ps(_mm512_loadu_ps(x + i), a0);
      a1 = _mm512_max_ps(_mm512_loadu_ps(x + i + 16), a1);
      a2 = _mm512_max_ps(_mm512_loadu_ps(x + i + 32), a2);
      a3 = _mm512_max_ps(_mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_max_ps(_mm512_loadu_ps(x + i), a0);
    m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
  }
#elif defined(SPC_VEC_AVX2)
  if (n >= 8) {
    __m256 a0 = _mm256_set1_ps(m), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
      a0 = _mm256_max_ps(_mm256_loadu_ps(x + i), a0);
      a1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), a1);
      a2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), a2);
      a3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_max_ps(_mm256_loadu_ps(x + i), a0);
    m = hmax8(_mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)));
  }
#endif
  for (; i < n; ++i)
    if (x[i] > m) m = x[i];
  // The first element equal to m (+0 and -0 compare equal, as they do in the scan).
  i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), mv, _CMP_EQ_OQ);
    if (eq) return i + __builtin_ctz((unsigned)eq);
  }
#elif defined(SPC_VEC_AVX2)
  const __m256 mv = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) {
    const int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
    if (eq) return i + __builtin_ctz((unsigned)eq);
  }
#endif
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // not reached: m is one of the elements
}

// ---- exp_fast: the softmax numerators of the low-bit attention ----
// exp(x) = 2^n * 2^f with t = x*log2(e), n = t rounded to nearest (ties to even),
// f = fma(x, log2(e), -n) in [-0.5, 0.5] and 2^f from a degree-4 polynomial (fitted for relative
// error): relative error < 4e-6 against exp for -87 <= x <= 0 (the polynomial's 2.7e-6 plus
// log2(e) rounded to float; VecMath.ExpFast* in tests/test_attention_decode.cpp), about half the
// work of exp_approx's. x < -87 (and -inf, a left-out position) gives exactly 0; x must
// not exceed 88. The numerators it serves are quantized to 8 bits right after (lowbit.h), where
// exp_approx's ~2e-7 buys nothing. The scalar, AVX2 and AVX-512 forms do the same IEEE operations
// (explicit fmas; scaling by 2^n is exact), so they agree bit for bit.
constexpr float kExpFastC0 = 0.9999992847442627f, kExpFastC1 = 0.6931217908859253f, kExpFastC2 = 0.240247443318367f,
                kExpFastC3 = 0.05591786280274391f, kExpFastC4 = 0.009570102207362652f;
constexpr float kExpFastLog2e = 1.44269504088896341f;
inline float exp_fast(float x) {
  if (!(x >= -87.0f)) return 0.0f;
  const float n = std::nearbyint(x * kExpFastLog2e);
  const float f = std::fma(x, kExpFastLog2e, -n);
  float p = std::fma(kExpFastC4, f, kExpFastC3);
  p = std::fma(p, f, kExpFastC2);
  p = std::fma(p, f, kExpFastC1);
  p = std::fma(p, f, kExpFastC0);
  return std::ldexp(p, (int)n);
}
#if defined(__AVX512F__)
inline __m512 exp_fast16(__m512 x) {
  constexpr __mmask16 all = 0xFFFF;
  const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 l2e = _mm512_set1_ps(kExpFastLog2e);
  const __m512 n = _mm512_maskz_roundscale_ps(all, _mm512_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fmsub_ps(x, l2e, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpFastC4), f, _mm512_set1_ps(kExpFastC3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpFastC2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpFastC1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpFastC0));
  return _mm512_maskz_scalef_ps(ok, p, n);  // (lanes below -87, -inf among them, computed NaN: dropped)
}
#endif
#if defined(SPC_VEC_HAVE_AVX2)
inline __m256 exp_fast8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_NGE_UQ);
  x = _mm256_max_ps(x, lo);  // (-inf -> -87: no NaN; those lanes are zeroed below)
  const __m256 l2e = _mm256_set1_ps(kExpFastLog2e);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_fmsub_ps(x, l2e, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpFastC4), f, _mm256_set1_ps(kExpFastC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpFastC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpFastC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpFastC0));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

namespace vec_detail {
// exp_approx (kFast false) or exp_fast (true), per lane count.
template <bool kFast>
inline float exp1(float x) {
  if constexpr (kFast) return exp_fast(x);
  else return exp_approx(x);
}
#if defined(__AVX512F__)
template <bool kFast>
inline __m512 exp16(__m512 x) {
  if constexpr (kFast) return exp_fast16(x);
  else return exp_approx16(x);
}
#endif
#if defined(SPC_VEC_HAVE_AVX2)
template <bool kFast>
inline __m256 exp8(__m256 x) {
  if constexpr (kFast) return exp_fast8(x);
  else return exp_approx8(x);
}
#endif

template <bool kFast>
inline float exp_shift_sum(float* x, int64_t n, float m) {
  float s = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16<kFast>(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
    const __m512 e = exp16<kFast>(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    i = n;
  }
  s = _mm512_reduce_add_ps(acc);
#elif defined(SPC_VEC_AVX2)
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8<kFast>(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  s = hsum8(acc);
#endif
  for (; i < n; ++i) s += (x[i] = exp1<kFast>(x[i] - m));
  return s;
}
}  // namespace vec_detail

// x[i] <- exp(x[i] - m) for i < n; returns the sum of the new values.
inline float vec_exp_shift_sum(float* x, int64_t n, float m) { return vec_detail::exp_shift_sum<false>(x, n, m); }
// The same with exp_fast: what the low-bit value sums weight their tokens with.
inline float vec_exp_fast_shift_sum(float* x, int64_t n, float m) { return vec_detail::exp_shift_sum<true>(x, n, m); }

// g[i] <- silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] for i < n (the FFN's gate), with
// exp_approx's accuracy (it ran serially with std::exp between two parallel matmuls). Every element
// takes the same path wherever it sits (the tail through the vector code too), so a row's result
// does not depend on how many rows are processed together.
#if defined(__AVX512F__)
inline __m512 silu_mul16(__m512 x, __m512 u) {
  const __m512 e = exp_approx16(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}
#elif defined(SPC_VEC_AVX2)
inline __m256 silu_mul8(__m256 x, __m256 u) {
  const __m256 e = exp_approx8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}
#endif
inline void vec_silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(g + i, silu_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(g + i, k, silu_mul16(_mm512_maskz_loadu_ps(k, g + i), _mm512_maskz_loadu_ps(k, u + i)));
  }
#elif defined(SPC_VEC_AVX2)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(g + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {
    alignas(32) float gt[8] = {}, ut[8] = {};
    std::copy(g + i, g + n, gt);
    std::copy(u + i, u + n, ut);
    _mm256_store_ps(gt, silu_mul8(_mm256_load_ps(gt), _mm256_load_ps(ut)));
    std::copy(gt, gt + (n - i), g + i);
  }
#else
  for (; i < n; ++i) g[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
#endif
}

// y[i] = x[i] for fp16 x, i < n.
inline void vec_from_f16(const fp16_t* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + i))));
#elif defined(SPC_VEC_AVX2)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, cvtph8(x + i));
#endif
  for (; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}

// y[i] += a * x[i] for i < n.
inline void vec_axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 av = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#elif defined(SPC_VEC_AVX2)
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

// y[c] += w[0] * x[0][c] + w[1] * x[1][c] + ... + w[n-1] * x[n-1][c] for c < d (rows x[j] at
// x + j*d): the same fused multiply-adds, in the same order, as n calls of vec_axpy (bit for bit),
// with the sums kept in registers across the rows (AVX-512, 64 channels at a time) instead of a
// store and reload of y per row.
inline void vec_axpy_rows(const float* w, const float* x, int64_t n, int d, float* y) {
  int c0 = 0;
#if defined(__AVX512F__)
  for (; c0 + 64 <= d; c0 += 64) {
    __m512 a0 = _mm512_loadu_ps(y + c0), a1 = _mm512_loadu_ps(y + c0 + 16), a2 = _mm512_loadu_ps(y + c0 + 32),
           a3 = _mm512_loadu_ps(y + c0 + 48);
    for (int64_t j = 0; j < n; ++j) {
      const __m512 wv = _mm512_set1_ps(w[j]);
      const float* xr = x + j * d + c0;
      a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr), a0);
      a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16), a1);
      a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 32), a2);
      a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 48), a3);
    }
    _mm512_storeu_ps(y + c0, a0);
    _mm512_storeu_ps(y + c0 + 16, a1);
    _mm512_storeu_ps(y + c0 + 32, a2);
    _mm512_storeu_ps(y + c0 + 48, a3);
  }
#endif
  if (c0 < d)
    for (int64_t j = 0; j < n; ++j) vec_axpy(w[j], x + j * d + c0, y + c0, d - c0);
}

// For n_y output rows i: y[i*y_stride + c] += (float)(sum_j (double)w[i*w_stride + j] * x[j][c])
// for c < d (rows x[j] at x + j*d): each sum in double, in row order, from 0. AVX-512: 32 channels
// of up to 6 output rows at a time in registers, each row of x converted to double once for all
// of them (the conversion, 2 uops per 8 values, cost twice the products when it was repeated per
// output row).
namespace vec_detail {
#if defined(__AVX512F__)
template <int NY>
inline void axpy_rows_f64_tile(const float* w, int64_t w_stride, const float* x, int64_t n, int d, int c0, float* y,
                               int64_t y_stride) {
  __m512d a[NY][4];
  for (int i = 0; i < NY; ++i)
    for (int u = 0; u < 4; ++u) a[i][u] = _mm512_setzero_pd();
  for (int64_t j = 0; j < n; ++j) {
    const float* xr = x + j * d + c0;
    const __m512d x0 = _mm512_cvtps_pd(_mm256_loadu_ps(xr)), x1 = _mm512_cvtps_pd(_mm256_loadu_ps(xr + 8)),
                  x2 = _mm512_cvtps_pd(_mm256_loadu_ps(xr + 16)), x3 = _mm512_cvtps_pd(_mm256_loadu_ps(xr + 24));
    for (int i = 0; i < NY; ++i) {
      const __m512d wv = _mm512_set1_pd((double)w[i * w_stride + j]);
      a[i][0] = _mm512_fmadd_pd(wv, x0, a[i][0]);
      a[i][1] = _mm512_fmadd_pd(wv, x1, a[i][1]);
      a[i][2] = _mm512_fmadd_pd(wv, x2, a[i][2]);
      a[i][3] = _mm512_fmadd_pd(wv, x3, a[i][3]);
    }
  }
  for (int i = 0; i < NY; ++i)
    for (int u = 0; u < 4; ++u) {
      float* yc = y + i * y_stride + c0 + 8 * u;
      _mm256_storeu_ps(yc, _mm256_add_ps(_mm256_loadu_ps(yc), _mm512_cvtpd_ps(a[i][u])));
    }
}
#endif
}  // namespace vec_detail

inline void vec_axpy_rows_f64(const float* w, int64_t w_stride, int n_y, const float* x, int64_t n, int d, float* y,
                              int64_t y_stride) {
  int c0 = 0;
#if defined(__AVX512F__)
  for (; c0 + 32 <= d; c0 += 32)
    for (int i0 = 0; i0 < n_y; i0 += 6) {
      const float* wi = w + i0 * w_stride;
      float* yi = y + i0 * y_stride;
      switch (std::min(6, n_y - i0)) {
        case 1: vec_detail::axpy_rows_f64_tile<1>(wi, w_stride, x, n, d, c0, yi, y_stride); break;
        case 2: vec_detail::axpy_rows_f64_tile<2>(wi, w_stride, x, n, d, c0, yi, y_stride); break;
        case 3: vec_detail::axpy_rows_f64_tile<3>(wi, w_stride, x, n, d, c0, yi, y_stride); break;
        case 4: vec_detail::axpy_rows_f64_tile<4>(wi, w_stride, x, n, d, c0, yi, y_stride); break;
        case 5: vec_detail::axpy_rows_f64_tile<5>(wi, w_stride, x, n, d, c0, yi, y_stride); break;
        default: vec_detail::axpy_rows_f64_tile<6>(wi, w_stride, x, n, d, c0, yi, y_stride); break;
      }
    }
#endif
  for (int i = 0; i < n_y; ++i)
    for (int c = c0; c < d; ++c) {
      double a = 0;
      for (int64_t j = 0; j < n; ++j) a = std::fma((double)w[i * w_stride + j], (double)x[j * d + c], a);
      y[i * y_stride + c] += (float)a;
    }
}

// y[i] = (accumulate ? y[i] : 0) + a[0] * x[0][i] + a[1] * x[1][i] + ... for i < n: one pass over y
// instead of a memset and nx axpys, in the same order of fused multiply-adds (so the result is the
// one the axpys would give, bit for bit).
inline void vec_wsum(const float* const* x, const float* a, int nx, float* y, int64_t n, bool accumulate) {
  constexpr int kMax = 4;  // streams per pass
  for (int r0 = 0; r0 < nx || (r0 == 0 && !accumulate); r0 += kMax) {
    const int nr = nx - r0 < kMax ? nx - r0 : kMax;
    const bool add = accumulate || r0 > 0;
    const float* const* xr = x + r0;
    const float* ar = a + r0;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 av[kMax];
    for (int r = 0; r < nr; ++r) av[r] = _mm512_set1_ps(ar[r]);
    for (; i + 16 <= n; i += 16) {
      __m512 acc = add ? _mm512_loadu_ps(y + i) : _mm512_setzero_ps();
      for (int r = 0; r < nr; ++r) acc = _mm512_fmadd_ps(av[r], _mm512_loadu_ps(xr[r] + i), acc);
      _mm512_storeu_ps(y + i, acc);
    }
#elif defined(SPC_VEC_AVX2)
    __m256 av[kMax];
    for (int r = 0; r < nr; ++r) av[r] = _mm256_set1_ps(ar[r]);
    for (; i + 8 <= n; i += 8) {
      __m256 acc = add ? _mm256_loadu_ps(y + i) : _mm256_setzero_ps();
      for (int r = 0; r < nr; ++r) acc = _mm256_fmadd_ps(av[r], _mm256_loadu_ps(xr[r] + i), acc);
      _mm256_storeu_ps(y + i, acc);
    }
#endif
    for (; i < n; ++i) {
      float acc = add ? y[i] : 0.0f;
      for (int r = 0; r < nr; ++r) acc = std::fma(ar[r], xr[r][i], acc);
      y[i] = acc;
    }
    if (nx == 0) break;
  }
}

}  // namespace spc
