#include "ops/attention.h"
#include "ops/vec_math.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "util/error.h"
#include "util/prefetch.h"
#include "util/threadpool.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace spc {

float exp_approx(float x) {
  // Below -87 (and -inf, a left-out position): exactly 0, as exp_approx8 gives (a select, not a
  // branch, so loops over it still vectorize).
  const bool under = x < -87.0f;
  x = under ? -87.0f : (x > 88.0f ? 88.0f : x);
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
  return under ? 0.0f : p * std::bit_cast<float>(e);
}

float dot_f32_f16(const float* q, const fp16_t* k, int d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < d; c += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(k + c))), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif defined(SPC_VEC_AVX2)
  if (d % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), cvtph8(k + c), acc);
    return hsum8(acc);
  }
#endif
  float s = 0;
  for (int c = 0; c < d; ++c) s += q[c] * fp16_to_fp32(k[c]);
  return s;
}

void dot_f32_f16_rows(const float* q, int n_q, int64_t q_stride, const fp16_t* k, int d, float* out,
                      int64_t out_stride) {
#if defined(__AVX512F__)
  if (d == 64) {
    const __m512 k0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)k));
    const __m512 k1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(k + 16)));
    const __m512 k2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(k + 32)));
    const __m512 k3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(k + 48)));
    for (int i = 0; i < n_q; ++i) {
      const float* qi = q + i * q_stride;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qi), k0);
      __m512 b = _mm512_mul_ps(_mm512_loadu_ps(qi + 16), k1);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 32), k2, a);
      b = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 48), k3, b);
      out[i * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
    return;
  }
#elif defined(SPC_VEC_AVX2)
  if (d == 64) {
    __m256 kv[8];
    for (int u = 0; u < 8; ++u) kv[u] = cvtph8(k + 8 * u);
    for (int i = 0; i < n_q; ++i) {
      const float* qi = q + i * q_stride;
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qi), kv[0]);
      __m256 b = _mm256_mul_ps(_mm256_loadu_ps(qi + 8), kv[1]);
      for (int u = 2; u < 8; u += 2) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(qi + 8 * u), kv[u], a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(qi + 8 * u + 8), kv[u + 1], b);
      }
      out[i * out_stride] = hsum8(_mm256_add_ps(a, b));
    }
    return;
  }
#endif
  float kf[512];
  if (d <= 512) {
    for (int c = 0; c < d; ++c) kf[c] = fp16_to_fp32(k[c]);
    for (int i = 0; i < n_q; ++i) {
      const float* qi = q + i * q_stride;
      float s = 0;
      for (int c = 0; c < d; ++c) s += qi[c] * kf[c];
      out[i * out_stride] = s;
    }
    return;
  }
  for (int i = 0; i < n_q; ++i) out[i * out_stride] = dot_f32_f16(q + i * q_stride, k, d);
}

#if defined(__AVX512F__)
namespace {
// The 16-lane sum of v[j] in lane j of the result, for 16 vectors: the additions of
// _mm512_reduce_add_ps (GCC: upper 256 + lower 256 bits, then 128-bit halves, then elements
// (0 + 2, 1 + 3), then those two), level by level across all 16, so each lane is bit for bit
// that reduction of its vector. v: pairs (v[2p], v[2p+1]) already through level 1 (x[p], below).
inline __m512 reduce16_from_pairs(const __m512* x) {
  constexpr __mmask16 all = 0xFFFF;
  __m512 y[4];
  for (int p = 0; p < 4; ++p) {  // level 2: 128-bit halves -> [v0 | v1 | v2 | v3], 4 lanes each
    const __m512 a = x[2 * p], b = x[2 * p + 1];
    y[p] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_maskz_shuffle_f32x4(all, a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  __m512 z[2];
  for (int p = 0; p < 2; ++p) {  // level 3: elements 0 + 2 and 1 + 3 of each 128-bit lane
    const __m512d a = _mm512_castps_pd(y[2 * p]), b = _mm512_castps_pd(y[2 * p + 1]);
    z[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Level 4: lane 4k + m holds vector k + 4m; one permutation restores the order.
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}
// Level 1 for two vectors: [a lanes i + (i+8), i < 8 | b likewise].
inline __m512 reduce_pair(__m512 a, __m512 b) {
  constexpr __mmask16 all = 0xFFFF;
  return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_maskz_shuffle_f32x4(all, a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
}  // namespace
#endif

void dot_f32_f16_many(const float* q, int n_q, int64_t q_stride, const fp16_t* const* rows, const fp16_t* k,
                      int64_t k_stride, int64_t n_k, int d, float* out, int64_t out_stride) {
  auto key = [&](int64_t j) { return rows ? rows[j] : k + j * k_stride; };
#if defined(__AVX512F__)
  if (d == 64) {
    alignas(64) float kf[16][64];
    for (int64_t j0 = 0; j0 < n_k; j0 += 16) {
      const int nt = (int)std::min<int64_t>(16, n_k - j0);
      for (int j = 0; j < nt; ++j) {
        const fp16_t* kj = key(j0 + j);
        for (int c = 0; c < 4; ++c)
          _mm512_store_ps(kf[j] + 16 * c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(kj + 16 * c))));
      }
      for (int j = nt; j < 16; ++j) std::memset(kf[j], 0, sizeof(kf[j]));
      for (int i = 0; i < n_q; ++i) {
        const float* qi = q + i * q_stride;
        const __m512 q0 = _mm512_loadu_ps(qi), q1 = _mm512_loadu_ps(qi + 16), q2 = _mm512_loadu_ps(qi + 32),
                     q3 = _mm512_loadu_ps(qi + 48);
        // The products of dot_f32_f16_rows, same order: (q0 k0 + q2 k2) + (q1 k1 + q3 k3).
        auto prod = [&](int j) {
          const __m512 a = _mm512_fmadd_ps(q2, _mm512_load_ps(kf[j] + 32), _mm512_mul_ps(q0, _mm512_load_ps(kf[j])));
          const __m512 b =
              _mm512_fmadd_ps(q3, _mm512_load_ps(kf[j] + 48), _mm512_mul_ps(q1, _mm512_load_ps(kf[j] + 16)));
          return _mm512_add_ps(a, b);
        };
        __m512 x[8];
        for (int p = 0; p < 8; ++p) x[p] = reduce_pair(prod(2 * p), prod(2 * p + 1));
        _mm512_mask_storeu_ps(out + i * out_stride + j0, (__mmask16)((1u << nt) - 1u), reduce16_from_pairs(x));
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n_k; ++j) dot_f32_f16_rows(q, n_q, q_stride, key(j), d, out + j, out_stride);
}

void axpy_f16(float p, const fp16_t* v, float* o, int d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int c = 0; c < d; c += 16)
      _mm512_storeu_ps(o + c, _mm512_fmadd_ps(pv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(v + c))), _mm512_loadu_ps(o + c)));
    return;
  }
#elif defined(SPC_VEC_AVX2)
  if (d % 8 == 0) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int c = 0; c < d; c += 8) _mm256_storeu_ps(o + c, _mm256_fmadd_ps(pv, cvtph8(v + c), _mm256_loadu_ps(o + c)));
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

namespace {

// The streaming decode kernels read each block's keys and values once, and a block's pages are
// too few for the hardware prefetcher, which stops at every 4 KiB page, to run ahead: while
// scoring key tile t of a block they request tile t of the next block (starting at position
// nxt, nb_next > 0 positions) and the value rows of the same positions. On 2 cores of a Xeon
// (AVX-512, 25-27 GB/s probed), `full`'s attention over all 30 layers of SmolLM2 took 18-25% less
// time per decode step at 8K positions and 6-12% less at 32K (kernel benchmark
// BM_PolicyStep/full, switched pairs), and `full` decoded 11-18% faster at 8K end to end.
// Into L2 only (prefetcht2), so the next block does not evict the current block's scores and
// values from L1: 2-9% less at 8K than prefetcht0 in five switched pairs, within 1.5% at 32K.
inline void prefetch_next_block(const fp16_t* kt, const fp16_t* v, int d, int64_t nxt, int t, int64_t nb_next) {
  const int64_t p = (int64_t)t * kKeyTile;
  if (p >= nb_next) return;
  prefetch_bytes_l2(kt + key_tile_offset(nxt + p, d), (size_t)kKeyTile * d * sizeof(fp16_t));
  prefetch_bytes_l2(v + (nxt + p) * d, (size_t)std::min<int64_t>(kKeyTile, nb_next - p) * d * sizeof(fp16_t));
}

#if defined(__AVX512F__)
// Keys per block of the streaming decode kernel: scores of a block (NQ x kDecBlock floats) and
// its values (kDecBlock x head_dim fp16) stay in L1 between the passes.
constexpr int kDecBlock = 128;

// Value pass over one block for G channel vectors (16 channels each) starting at channel c0:
// NQ x G accumulators live in registers for the whole block (loaded from o and rescaled by
// alpha once per block, stored once). Rows [j0, j1) of the block; a block in two memories is two
// calls, the second without the rescale (the accumulators pass through o unchanged).
template <int NQ, int G, bool kRescale = true>
inline void decode_values(const fp16_t* v, int d, int c0, int j0, int j1, const float* p, const float* alpha, float* o) {
  __m512 acc[NQ][G];
  for (int i = 0; i < NQ; ++i)
    for (int g = 0; g < G; ++g)
      acc[i][g] = kRescale ? _mm512_mul_ps(_mm512_loadu_ps(o + i * d + c0 + 16 * g), _mm512_set1_ps(alpha[i]))
                           : _mm512_loadu_ps(o + i * d + c0 + 16 * g);
  for (int j = j0; j < j1; ++j) {
    const fp16_t* vj = v + (int64_t)j * d + c0;
    __m512 V[G];
    for (int g = 0; g < G; ++g) V[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(vj + 16 * g)));
    for (int i = 0; i < NQ; ++i) {
      const __m512 pj = _mm512_set1_ps(p[i * kDecBlock + j]);
      for (int g = 0; g < G; ++g) acc[i][g] = _mm512_fmadd_ps(pj, V[g], acc[i][g]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(o + i * d + c0 + 16 * g, acc[i][g]);
}

// Streaming decode attention for head_dim % 16 == 0: one pass over the keys and values of
// [k0, k1), block by block with an online softmax (per block: scores in registers per key tile,
// block max, rescale of the running state, exp, then the value pass). No heap, no scratch.
// kTwo: positions from split on are read from (kt2, v2) (F16Mem), in the same blocks and order.
template <int NQ, bool kTwo>
void decode_f16_stream(const float* q, int d, const fp16_t* kt, const fp16_t* v, const fp16_t* kt2, const fp16_t* v2,
                       int64_t split, int64_t k0, int64_t k1, const int64_t* limit, AttnPartial* part, float* o) {
  const float scale = 1.0f / std::sqrt((float)d);
  alignas(64) float qs[NQ * 256];
  alignas(64) float sc[NQ * kDecBlock];
  float m[NQ], l[NQ], alpha[NQ];
  for (int i = 0; i < NQ; ++i) {
    for (int c = 0; c < d; ++c) qs[i * d + c] = q[i * d + c] * scale;
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0;
  }
  std::memset(o, 0, sizeof(float) * NQ * d);
  // Channel vectors per value pass: as many as the registers hold with NQ rows of accumulators.
  constexpr int G = NQ <= 6 ? 4 : 2;
  for (int64_t b0 = k0; b0 < k1; b0 += kDecBlock) {
    const int nb = (int)std::min<int64_t>(kDecBlock, k1 - b0);
    const int ntile = (nb + kKeyTile - 1) / kKeyTile;
    // Scores of the block: one 16-key tile at a time, d FMAs per query.
    const int64_t nb_next = std::min<int64_t>(kDecBlock, k1 - (b0 + kDecBlock));
    const bool next_hi = kTwo && b0 + kDecBlock >= split;
    for (int t = 0; t < ntile; ++t) {
      const int64_t tp = b0 + t * kKeyTile;
      const fp16_t* tile = (kTwo && tp >= split ? kt2 : kt) + key_tile_offset(tp, d);
      prefetch_next_block(next_hi ? kt2 : kt, next_hi ? v2 : v, d, b0 + kDecBlock, t, nb_next);
      __m512 acc[NQ];
      for (int i = 0; i < NQ; ++i) acc[i] = _mm512_setzero_ps();
      for (int c = 0; c < d; ++c) {
        const __m512 kc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(tile + c * kKeyTile)));
        for (int i = 0; i < NQ; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qs[i * d + c]), kc, acc[i]);
      }
      for (int i = 0; i < NQ; ++i) _mm512_store_ps(sc + i * kDecBlock + t * kKeyTile, acc[i]);
    }
    // Online softmax per query, with its causal limit (positions >= limit get weight 0).
    for (int i = 0; i < NQ; ++i) {
      float* si = sc + i * kDecBlock;
      const int ni = (int)std::max<int64_t>(0, std::min<int64_t>(nb, limit[i] - b0));
      if (ni == 0) {
        alpha[i] = 1.0f;
        std::memset(si, 0, sizeof(float) * ntile * kKeyTile);
        continue;
      }
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int j = 0; j < ni; j += 16) {
        const __mmask16 k = ni - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (ni - j)) - 1);
        mx = _mm512_mask_max_ps(mx, k, mx, _mm512_load_ps(si + j));
      }
      const float mnew = std::max(m[i], _mm512_reduce_max_ps(mx));
      alpha[i] = m[i] == -std::numeric_limits<float>::infinity() ? 0.0f : exp_approx(m[i] - mnew);
      const __m512 mv = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < ntile * kKeyTile; j += 16) {
        const int left = ni - j;
        const __mmask16 k = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
        const __m512 pj = _mm512_maskz_mov_ps(k, exp_approx16(_mm512_sub_ps(_mm512_load_ps(si + j), mv)));
        _mm512_store_ps(si + j, pj);
        sum = _mm512_add_ps(sum, pj);
      }
      l[i] = l[i] * alpha[i] + _mm512_reduce_add_ps(sum);
      m[i] = mnew;
    }
    // Weighted values of the block.
    // Rows [0, js) from v, the rest (kTwo: from split on) from v2, without a second rescale.
    const int js = kTwo ? (int)std::clamp<int64_t>(split - b0, 0, nb) : nb;
    const fp16_t* vb = v + b0 * d;
    const fp16_t* vb2 = kTwo ? v2 + b0 * d : nullptr;
    int c0 = 0;
    for (; c0 + 16 * G <= d; c0 += 16 * G) {
      decode_values<NQ, G>(vb, d, c0, 0, js, sc, alpha, o);
      if constexpr (kTwo) decode_values<NQ, G, false>(vb2, d, c0, js, nb, sc, alpha, o);
    }
    for (; c0 < d; c0 += 16) {
      decode_values<NQ, 1>(vb, d, c0, 0, js, sc, alpha, o);
      if constexpr (kTwo) decode_values<NQ, 1, false>(vb2, d, c0, js, nb, sc, alpha, o);
    }
  }
  for (int i = 0; i < NQ; ++i) part[i] = {m[i], l[i]};
}

using DecodeStreamFn = void (*)(const float*, int, const fp16_t*, const fp16_t*, const fp16_t*, const fp16_t*, int64_t,
                                int64_t, int64_t, const int64_t*, AttnPartial*, float*);
template <bool kTwo>
constexpr DecodeStreamFn kDecodeStream[8] = {decode_f16_stream<1, kTwo>, decode_f16_stream<2, kTwo>,
                                             decode_f16_stream<3, kTwo>, decode_f16_stream<4, kTwo>,
                                             decode_f16_stream<5, kTwo>, decode_f16_stream<6, kTwo>,
                                             decode_f16_stream<7, kTwo>, decode_f16_stream<8, kTwo>};
#endif

#if defined(SPC_VEC_AVX2)
// AVX2 version of the streaming decode kernel above (same blocks and online softmax, 8 lanes).
constexpr int kDecBlock = 128;

template <int NQ, int G, bool kRescale = true>
inline void decode_values8(const fp16_t* v, int d, int c0, int j0, int j1, const float* p, const float* alpha, float* o) {
  __m256 acc[NQ][G];
  for (int i = 0; i < NQ; ++i)
    for (int g = 0; g < G; ++g)
      acc[i][g] = kRescale ? _mm256_mul_ps(_mm256_loadu_ps(o + i * d + c0 + 8 * g), _mm256_set1_ps(alpha[i]))
                           : _mm256_loadu_ps(o + i * d + c0 + 8 * g);
  for (int j = j0; j < j1; ++j) {
    const fp16_t* vj = v + (int64_t)j * d + c0;
    if constexpr (NQ < G) {
      // Weights first (NQ + 1 + NQ*G registers: 16 for NQ = 3, G = 4); converting all G value
      // vectors first would need G + 1 + NQ*G = 17 and spill an accumulator through the stack,
      // a store-forwarding round trip on every position.
      __m256 P[NQ];
      for (int i = 0; i < NQ; ++i) P[i] = _mm256_set1_ps(p[i * kDecBlock + j]);
      for (int g = 0; g < G; ++g) {
        const __m256 V = cvtph8(vj + 8 * g);
        for (int i = 0; i < NQ; ++i) acc[i][g] = _mm256_fmadd_ps(P[i], V, acc[i][g]);
      }
    } else {
      __m256 V[G];
      for (int g = 0; g < G; ++g) V[g] = cvtph8(vj + 8 * g);
      for (int i = 0; i < NQ; ++i) {
        const __m256 pj = _mm256_set1_ps(p[i * kDecBlock + j]);
        for (int g = 0; g < G; ++g) acc[i][g] = _mm256_fmadd_ps(pj, V[g], acc[i][g]);
      }
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(o + i * d + c0 + 8 * g, acc[i][g]);
}

template <int NQ, bool kTwo>
void decode_f16_stream(const float* q, int d, const fp16_t* kt, const fp16_t* v, const fp16_t* kt2, const fp16_t* v2,
                       int64_t split, int64_t k0, int64_t k1, const int64_t* limit, AttnPartial* part, float* o) {
  static_assert(kKeyTile == 16, "two 8-key halves per key tile");
  const float scale = 1.0f / std::sqrt((float)d);
  alignas(32) float qs[NQ * 256];
  alignas(32) float sc[NQ * kDecBlock];
  float m[NQ], l[NQ], alpha[NQ];
  for (int i = 0; i < NQ; ++i) {
    for (int c = 0; c < d; ++c) qs[i * d + c] = q[i * d + c] * scale;
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0;
  }
  std::memset(o, 0, sizeof(float) * NQ * d);
  constexpr int H = NQ <= 6 ? 2 : 1;  // 8-key halves of a tile per pass over the channels
  constexpr int G = NQ <= 3 ? 4 : NQ <= 6 ? 2 : 1;
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b0 = k0; b0 < k1; b0 += kDecBlock) {
    const int nb = (int)std::min<int64_t>(kDecBlock, k1 - b0);
    const int ntile = (nb + kKeyTile - 1) / kKeyTile;
    const int64_t nb_next = std::min<int64_t>(kDecBlock, k1 - (b0 + kDecBlock));
    const bool next_hi = kTwo && b0 + kDecBlock >= split;
    for (int t = 0; t < ntile; ++t) {
      const int64_t tp = b0 + t * kKeyTile;
      const fp16_t* tile = (kTwo && tp >= split ? kt2 : kt) + key_tile_offset(tp, d);
      prefetch_next_block(next_hi ? kt2 : kt, next_hi ? v2 : v, d, b0 + kDecBlock, t, nb_next);
      for (int h0 = 0; h0 < 2; h0 += H) {
        __m256 acc[NQ][H];
        for (int i = 0; i < NQ; ++i)
          for (int h = 0; h < H; ++h) acc[i][h] = _mm256_setzero_ps();
        for (int c = 0; c < d; ++c) {
          __m256 kc[H];
          for (int h = 0; h < H; ++h) kc[h] = cvtph8(tile + c * kKeyTile + 8 * (h0 + h));
          for (int i = 0; i < NQ; ++i) {
            const __m256 qc = _mm256_set1_ps(qs[i * d + c]);
            for (int h = 0; h < H; ++h) acc[i][h] = _mm256_fmadd_ps(qc, kc[h], acc[i][h]);
          }
        }
        for (int i = 0; i < NQ; ++i)
          for (int h = 0; h < H; ++h) _mm256_store_ps(sc + i * kDecBlock + t * kKeyTile + 8 * (h0 + h), acc[i][h]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      float* si = sc + i * kDecBlock;
      const int ni = (int)std::max<int64_t>(0, std::min<int64_t>(nb, limit[i] - b0));
      if (ni == 0) {
        alpha[i] = 1.0f;
        std::memset(si, 0, sizeof(float) * ntile * kKeyTile);
        continue;
      }
      float bmax = -std::numeric_limits<float>::infinity();
      int j = 0;
      if (ni >= 8) {
        __m256 mx = _mm256_set1_ps(bmax);
        for (; j + 8 <= ni; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(si + j));
        bmax = hmax8(mx);
      }
      for (; j < ni; ++j) bmax = std::max(bmax, si[j]);
      const float mnew = std::max(m[i], bmax);
      alpha[i] = m[i] == -std::numeric_limits<float>::infinity() ? 0.0f : exp_approx(m[i] - mnew);
      const __m256 mv = _mm256_set1_ps(mnew);
      const __m256i niv = _mm256_set1_epi32(ni);
      __m256 sum = _mm256_setzero_ps();
      for (int jj = 0; jj < ntile * kKeyTile; jj += 8) {
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(niv, _mm256_add_epi32(iota, _mm256_set1_epi32(jj))));
        const __m256 pj = _mm256_and_ps(keep, exp_approx8(_mm256_sub_ps(_mm256_load_ps(si + jj), mv)));
        _mm256_store_ps(si + jj, pj);
        sum = _mm256_add_ps(sum, pj);
      }
      l[i] = l[i] * alpha[i] + hsum8(sum);
      m[i] = mnew;
    }
    // Rows [0, js) from v, the rest (kTwo: from split on) from v2, without a second rescale.
    const int js = kTwo ? (int)std::clamp<int64_t>(split - b0, 0, nb) : nb;
    const fp16_t* vb = v + b0 * d;
    const fp16_t* vb2 = kTwo ? v2 + b0 * d : nullptr;
    int c0 = 0;
    for (; c0 + 8 * G <= d; c0 += 8 * G) {
      decode_values8<NQ, G>(vb, d, c0, 0, js, sc, alpha, o);
      if constexpr (kTwo) decode_values8<NQ, G, false>(vb2, d, c0, js, nb, sc, alpha, o);
    }
    for (; c0 < d; c0 += 8) {
      decode_values8<NQ, 1>(vb, d, c0, 0, js, sc, alpha, o);
      if constexpr (kTwo) decode_values8<NQ, 1, false>(vb2, d, c0, js, nb, sc, alpha, o);
    }
  }
  for (int i = 0; i < NQ; ++i) part[i] = {m[i], l[i]};
}

using DecodeStreamFn = void (*)(const float*, int, const fp16_t*, const fp16_t*, const fp16_t*, const fp16_t*, int64_t,
                                int64_t, int64_t, const int64_t*, AttnPartial*, float*);
template <bool kTwo>
constexpr DecodeStreamFn kDecodeStream[8] = {decode_f16_stream<1, kTwo>, decode_f16_stream<2, kTwo>,
                                             decode_f16_stream<3, kTwo>, decode_f16_stream<4, kTwo>,
                                             decode_f16_stream<5, kTwo>, decode_f16_stream<6, kTwo>,
                                             decode_f16_stream<7, kTwo>, decode_f16_stream<8, kTwo>};
#endif

}  // namespace

bool attention_decode_f16_streams(int head_dim) {
#if defined(__AVX512F__)
  return head_dim % 16 == 0 && head_dim <= 256;
#elif defined(SPC_VEC_AVX2)
  return head_dim % 8 == 0 && head_dim <= 256;
#else
  (void)head_dim;
  return false;
#endif
}

void attention_decode_f16(const float* q, int n_q, int d, const fp16_t* kt, const fp16_t* v, int64_t k0, int64_t k1,
                          const int64_t* limit, AttnPartial* part, float* o, float* scratch) {
  attention_decode_f16(q, n_q, d, F16Mem{kt, v, kt, v, INT64_MAX}, k0, k1, limit, part, o, scratch);
}

void attention_decode_f16(const float* q, int n_q, int d, const F16Mem& mem_in, int64_t k0, int64_t k1,
                          const int64_t* limit, AttnPartial* part, float* o, float* scratch) {
  SPC_ASSERT(k0 % kKeyTile == 0 && (mem_in.split == INT64_MAX || mem_in.split % kKeyTile == 0) && d <= 256 &&
             n_q >= 1 && n_q <= 8);
  // Positions in one memory: the one-memory kernels.
  F16Mem mem = mem_in;
  if (mem.split <= k0) mem = F16Mem{mem.kt2, mem.v2, mem.kt2, mem.v2, INT64_MAX};
  if (mem.split >= k1) mem.split = INT64_MAX;
#if defined(__AVX512F__) || defined(SPC_VEC_AVX2)
  if (attention_decode_f16_streams(d)) {
    const bool two = mem.split != INT64_MAX;
    (two ? kDecodeStream<true> : kDecodeStream<false>)[n_q - 1](q, d, mem.kt, mem.v, mem.kt2, mem.v2, mem.split, k0,
                                                                  k1, limit, part, o);
    return;
  }
#endif
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
    const fp16_t* tile = mem.keys_at(k0 + t0) + key_tile_offset(k0 + t0, d);
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
    const fp16_t* vj = mem.values_at(k0 + j) + (k0 + j) * d;
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
