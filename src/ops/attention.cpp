#include "ops/attention.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "util/error.h"
#include "util/threadpool.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace spc {

float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = ((int32_t)n + 127) << 23;
  return p * std::bit_cast<float>(e);
}

float dot_f32_f16(const float* q, const fp16_t* k, int d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < d; c += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(k + c))), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0;
  for (int c = 0; c < d; ++c) s += q[c] * fp16_to_fp32(k[c]);
  return s;
}

void axpy_f16(float p, const fp16_t* v, float* o, int d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int c = 0; c < d; c += 16)
      _mm512_storeu_ps(o + c, _mm512_fmadd_ps(pv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(v + c))), _mm512_loadu_ps(o + c)));
    return;
  }
#endif
  for (int c = 0; c < d; ++c) o[c] += p * fp16_to_fp32(v[c]);
}

void attn_merge(AttnPartial& dst, float* dst_o, const AttnPartial& src, const float* src_o, int d) {
  if (src.l == 0) return;
  if (dst.l == 0) {
    dst = src;
    std::memcpy(dst_o, src_o, sizeof(float) * d);
    return;
  }
  const float m = std::max(dst.m, src.m);
  const float a = std::exp(dst.m - m), b = std::exp(src.m - m);
  for (int c = 0; c < d; ++c) dst_o[c] = dst_o[c] * a + src_o[c] * b;
  dst.l = dst.l * a + src.l * b;
  dst.m = m;
}

void attention_decode_f16(const float* q, int n_q, int d, const fp16_t* kt, const fp16_t* v, int64_t k0, int64_t k1,
                          const int64_t* limit, AttnPartial* part, float* o, float* scratch) {
  SPC_ASSERT(k0 % kKeyTile == 0 && d <= 256);
  const float scale = 1.0f / std::sqrt((float)d);
  const int64_t n = k1 - k0;
  const int64_t n_pad = (n + kKeyTile - 1) / kKeyTile * kKeyTile;
  float* sc = scratch;  // [n_q][n_pad]
  alignas(64) float qs[8 * 256];
  SPC_ASSERT(n_q <= 8);
  for (int i = 0; i < n_q; ++i)
    for (int c = 0; c < d; ++c) qs[i * d + c] = q[i * d + c] * scale;
  // Scores, one tile of 16 positions at a time.
  for (int64_t t0 = 0; t0 < n_pad; t0 += kKeyTile) {
    const fp16_t* tile = kt + key_tile_offset(k0 + t0, d);
#if defined(__AVX512F__)
    __m512 acc[8];
    for (int i = 0; i < n_q; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < d; ++c) {
      const __m512 kc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(tile + c * kKeyTile)));
      for (int i = 0; i < n_q; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qs[i * d + c]), kc, acc[i]);
    }
    for (int i = 0; i < n_q; ++i) _mm512_storeu_ps(sc + i * n_pad + t0, acc[i]);
#else
    for (int i = 0; i < n_q; ++i) {
      float acc[kKeyTile] = {};
      for (int c = 0; c < d; ++c)
        for (int j = 0; j < kKeyTile; ++j) acc[j] += qs[i * d + c] * fp16_to_fp32(tile[c * kKeyTile + j]);
      std::memcpy(sc + i * n_pad + t0, acc, sizeof(acc));
    }
#endif
  }
  // Softmax pieces per query with its causal limit.
  for (int i = 0; i < n_q; ++i) {
    float* si = sc + i * n_pad;
    const int64_t ni = std::max<int64_t>(0, std::min(n, limit[i] - k0));
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < ni; ++j) mx = std::max(mx, si[j]);
    float sum = 0;
    for (int64_t j = 0; j < ni; ++j) {
      si[j] = exp_approx(si[j] - mx);
      sum += si[j];
    }
    for (int64_t j = ni; j < n_pad; ++j) si[j] = 0;
    part[i] = {mx, sum};
    std::memset(o + i * d, 0, sizeof(float) * d);
  }
  // Weighted sum of values.
  for (int64_t j = 0; j < n; ++j) {
    const fp16_t* vj = v + (k0 + j) * d;
#if defined(__AVX512F__)
    if (d % 16 == 0) {
      for (int c0 = 0; c0 < d; c0 += 16) {
        const __m512 vc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(vj + c0)));
        for (int i = 0; i < n_q; ++i) {
          float* oi = o + i * d + c0;
          _mm512_storeu_ps(oi, _mm512_fmadd_ps(_mm512_set1_ps(sc[i * n_pad + j]), vc, _mm512_loadu_ps(oi)));
        }
      }
      continue;
    }
#endif
    for (int c = 0; c < d; ++c) {
      const float vc = fp16_to_fp32(vj[c]);
      for (int i = 0; i < n_q; ++i) o[i * d + c] += sc[i * n_pad + j] * vc;
    }
  }
}

}  // namespace spc
