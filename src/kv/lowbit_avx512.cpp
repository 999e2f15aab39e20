// AVX-512 packed kernels of the low-bit KV codec (layouts and the per-case method in lowbit.h).
//
// Keys: 16 tokens per zmm; each 16-bit slice of a plane word is a lane mask. Scores start at
// sum_c q_c z_c per block and add q_c*s_c*code via subset-sum tables + vpermps (1 bit, d % 4 == 0),
// masked adds (other 1-bit d) or codes-as-floats FMAs (2 bits). Query rows are tiled by up to 6
// so (g/16) x 6 <= 24 accumulators stay in registers and every code word is read once per tile.
//
// Values: 16 channels per zmm, at most 64 channels x 6 rows of accumulators per pass over the
// tokens; p_t*s_t and p_t*z_t are formed 16 tokens at a time, the zero-point terms summed per
// value group on the side and added at the end.
#include "kv/lowbit.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "util/error.h"
#include "util/fp16.h"

namespace spc::lowbit_detail {

namespace {

constexpr int kMaxNq = 6;
constexpr int kMaxDim = 256;

// GCC 12 emits a false -Wmaybe-uninitialized (from _mm512_undefined_*) inside _mm512_cvtph_ps and
// _mm512_reduce_add_ps; these full-mask equivalents compile to the same instructions.
inline __m512 cvtph(const void* p) {
  return _mm512_maskz_cvtph_ps((__mmask16)0xFFFF, _mm256_loadu_si256((const __m256i*)p));
}
inline float hsum(__m512 v) {
  const __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}

// acc += v in the lanes selected by m. Zen 4 runs vaddps on its FADD pipes and vfmadd on its FMA
// pipes; alternating the two forms (acc*1 + v is exact, the same rounding as acc + v) spreads the
// masked accumulations over both pipe pairs, nearly doubling throughput.
template <int J>
inline __m512 masked_acc(__m512 acc, __mmask16 m, __m512 v, __m512 ones) {
  if constexpr (J % 2 == 0) {
    (void)ones;
    return _mm512_mask_add_ps(acc, m, acc, v);
  } else {
    return _mm512_mask_fmadd_ps(acc, m, ones, v);
  }
}

template <int N, class F, int... I>
inline void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, i>) for i = 0 .. N-1.
template <int N, class F>
inline void unroll(F&& f) {
  unroll_impl<N>(f, std::make_integer_sequence<int, N>{});
}

// ---- keys ----

inline __mmask16 load_mask(const uint8_t* p) {
  uint16_t m;
  std::memcpy(&m, p, 2);
  return _cvtu32_mask16(m);
}

// table[idx[i]] per lane (full-mask form: see cvtph).
inline __m512 perm16(__m512i idx, const float* table) {
  return _mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, idx, _mm512_load_ps(table));
}

// 16-entry table of the subset sums of a[0..3]: entry i = sum of a[k] over the set bits k of i.
inline __m512 subset_sums4(float a0, float a1, float a2, float a3) {
  __m512 l = _mm512_maskz_mov_ps(0xAAAA, _mm512_set1_ps(a0));
  l = _mm512_mask_add_ps(l, 0xCCCC, l, _mm512_set1_ps(a1));
  l = _mm512_mask_add_ps(l, 0xF0F0, l, _mm512_set1_ps(a2));
  return _mm512_mask_add_ps(l, 0xFF00, l, _mm512_set1_ps(a3));
}

// Lane i = bit i of m0 | bit i of m1 << 1 | bit i of m2 << 2 | bit i of m3 << 3.
inline __m512i nibble_index(__mmask16 m0, __mmask16 m1, __mmask16 m2, __mmask16 m3) {
  __m512i idx = _mm512_maskz_mov_epi32(m0, _mm512_set1_epi32(1));
  idx = _mm512_mask_or_epi32(idx, m1, idx, _mm512_set1_epi32(2));
  idx = _mm512_mask_or_epi32(idx, m2, idx, _mm512_set1_epi32(4));
  return _mm512_mask_or_epi32(idx, m3, idx, _mm512_set1_epi32(8));
}

// Codes of 16 lanes as floats from the two bit-plane masks: lo + 2*hi (2 ops, shared by all rows).
inline __m512 codes2(__mmask16 lo, __mmask16 hi) {
  const __m512 c = _mm512_maskz_mov_ps(lo, _mm512_set1_ps(1.0f));
  return _mm512_mask_add_ps(c, hi, c, _mm512_set1_ps(2.0f));
}

// qs: [NQ][d] (q_c * s_c), qz: [NQ]. Scores for the block's g = 16*CH tokens.
// 1 bit: masked accumulation of q_c*s_c (6 ops per channel and 16 tokens at NQ = 6).
// 2 bits: codes as floats once per channel and 16 tokens, then one FMA per row (2 + NQ ops instead
// of 2*NQ masked adds).
template <int CH, int BITS, int NQ>
void score_block(int d, const uint8_t* block, const float* qs, const float* qz, float* scores,
                 size_t score_stride) {
  __m512 acc[NQ][CH];
  for (int iq = 0; iq < NQ; ++iq) {
    const __m512 z = _mm512_set1_ps(qz[iq]);
    for (int j = 0; j < CH; ++j) acc[iq][j] = z;
  }
  constexpr size_t W = CH * 2;  // bytes per plane word
  const __m512 ones = _mm512_set1_ps(1.0f);
  const uint8_t* p0 = block;
  const uint8_t* p1 = block + (size_t)d * W;  // plane 1 (2 bits only)
  for (int c = 0; c < d; ++c) {
    if constexpr (BITS == 1) {
      __mmask16 m[CH];
      for (int j = 0; j < CH; ++j) m[j] = load_mask(p0 + c * W + 2 * j);
      for (int iq = 0; iq < NQ; ++iq) {
        const __m512 v = _mm512_set1_ps(qs[iq * d + c]);
        unroll<CH>([&](auto J) { acc[iq][J] = masked_acc<J>(acc[iq][J], m[J], v, ones); });
      }
    } else {
      __m512 cf[CH];
      for (int j = 0; j < CH; ++j) cf[j] = codes2(load_mask(p0 + c * W + 2 * j), load_mask(p1 + c * W + 2 * j));
      for (int iq = 0; iq < NQ; ++iq) {
        const __m512 v = _mm512_set1_ps(qs[iq * d + c]);
        for (int j = 0; j < CH; ++j) acc[iq][j] = _mm512_fmadd_ps(v, cf[j], acc[iq][j]);
      }
    }
  }
  for (int iq = 0; iq < NQ; ++iq)
    for (int j = 0; j < CH; ++j) _mm512_storeu_ps(scores + (size_t)iq * score_stride + 16 * j, acc[iq][j]);
}

// 1 bit, d % 4 == 0: per quad of channels and row, a 16-entry table of the subset sums of
// q_c*s_c (built once per block: 4 ops); per quad and 16 tokens, the 4 code masks form a 4-bit
// index (4 ops shared by all rows) and each row does one vpermps + one add. 2 + 4/NQ ops per
// 4 channels instead of 4 masked adds.
template <int CH, int NQ>
void score_block_lut1(int d, const uint8_t* block, const float* qs, const float* qz, float* scores,
                      size_t score_stride) {
  alignas(64) float lut[kMaxDim / 4][NQ][16];
  const int nquad = d / 4;
  for (int u = 0; u < nquad; ++u)
    for (int iq = 0; iq < NQ; ++iq) {
      const float* a = qs + iq * d + 4 * u;
      _mm512_store_ps(lut[u][iq], subset_sums4(a[0], a[1], a[2], a[3]));
    }
  __m512 acc[NQ][CH];
  for (int iq = 0; iq < NQ; ++iq) {
    const __m512 z = _mm512_set1_ps(qz[iq]);
    for (int j = 0; j < CH; ++j) acc[iq][j] = z;
  }
  constexpr size_t W = CH * 2;
  for (int u = 0; u < nquad; ++u) {
    const uint8_t* w = block + (size_t)(4 * u) * W;
    for (int j = 0; j < CH; ++j) {
      const __m512i idx = nibble_index(load_mask(w + 2 * j), load_mask(w + W + 2 * j), load_mask(w + 2 * W + 2 * j),
                                       load_mask(w + 3 * W + 2 * j));
      for (int iq = 0; iq < NQ; ++iq)
        acc[iq][j] = _mm512_add_ps(acc[iq][j], perm16(idx, lut[u][iq]));
    }
  }
  for (int iq = 0; iq < NQ; ++iq)
    for (int j = 0; j < CH; ++j) _mm512_storeu_ps(scores + (size_t)iq * score_stride + 16 * j, acc[iq][j]);
}

using ScoreFn = void (*)(int, const uint8_t*, const float*, const float*, float*, size_t);

template <int CH, int BITS>
ScoreFn score_fn(int nq) {
  switch (nq) {
    case 1: return score_block<CH, BITS, 1>;
    case 2: return score_block<CH, BITS, 2>;
    case 3: return score_block<CH, BITS, 3>;
    case 4: return score_block<CH, BITS, 4>;
    case 5: return score_block<CH, BITS, 5>;
    default: return score_block<CH, BITS, 6>;
  }
}

template <int CH>
ScoreFn lut1_fn(int nq) {
  switch (nq) {
    case 1: return score_block_lut1<CH, 1>;
    case 2: return score_block_lut1<CH, 2>;
    case 3: return score_block_lut1<CH, 3>;
    case 4: return score_block_lut1<CH, 4>;
    case 5: return score_block_lut1<CH, 5>;
    default: return score_block_lut1<CH, 6>;
  }
}

ScoreFn pick_score_fn(int d, int g, int bits, int nq) {
  if (bits == 1 && d % 4 == 0) return g == 64 ? lut1_fn<4>(nq) : lut1_fn<2>(nq);
  if (g == 64) return bits == 1 ? score_fn<4, 1>(nq) : score_fn<4, 2>(nq);
  return bits == 1 ? score_fn<2, 1>(nq) : score_fn<2, 2>(nq);
}

// ---- values ----

// Channels [16*ch0, 16*(ch0+NCH)) of the n_q = NQ rows. The tile (<= 64 channels, starting at a
// multiple of 64) lies in one value group, or (SPLIT: gv == 32, NCH > 2) chunks 0-1 are in its first
// group and chunks 2-3 in the next.
template <int NCH, int BITS, int NQ, bool SPLIT>
void accumulate_tile(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, size_t p_stride,
                     float* out, size_t out_stride, int ch0) {
  constexpr int NG = SPLIT ? 2 : 1;  // groups touched by the tile
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  const size_t pb = spec.value_plane_bytes(), tb = spec.value_token_bytes();
  const int c0 = 16 * ch0;
  const int g_first = c0 / gv;
  SPC_ASSERT((c0 + 16 * NCH - 1) / gv - g_first == NG - 1);
  auto grp = [](int j) { return SPLIT ? j / 2 : 0; };

  __m512 acc[NQ][NCH];
  for (int iq = 0; iq < NQ; ++iq)
    for (int j = 0; j < NCH; ++j) acc[iq][j] = _mm512_loadu_ps(out + (size_t)iq * out_stride + c0 + 16 * j);
  alignas(64) float zacc[NQ][NG][16];
  for (int iq = 0; iq < NQ; ++iq)
    for (int gi = 0; gi < NG; ++gi) _mm512_store_ps(zacc[iq][gi], _mm512_setzero_ps());
  alignas(64) float ps[NQ][NG][16];  // p*s per (row, group, token in batch)
  alignas(64) fp16_t sh[NG][16], zh[NG][16];
  const __m512 ones = _mm512_set1_ps(1.0f);

  const uint8_t* sbase = values + (size_t)BITS * pb + 2 * (size_t)g_first;
  const uint8_t* zbase = sbase + 2 * (size_t)ng;
  const size_t code_off = (size_t)c0 / 8;

  for (int t0 = 0; t0 < n_tok; t0 += 16) {
    const int cnt = std::min(16, n_tok - t0);
    const __mmask16 tm = (__mmask16)((1u << cnt) - 1u);
    if (cnt < 16) {
      std::memset(sh, 0, sizeof sh);
      std::memset(zh, 0, sizeof zh);
    }
    for (int i = 0; i < cnt; ++i) {
      const size_t off = (size_t)(t0 + i) * tb;
      for (int gi = 0; gi < NG; ++gi) {
        std::memcpy(&sh[gi][i], sbase + off + 2 * gi, 2);
        std::memcpy(&zh[gi][i], zbase + off + 2 * gi, 2);
      }
    }
    for (int gi = 0; gi < NG; ++gi) {
      const __m512 sv = cvtph(sh[gi]), zv = cvtph(zh[gi]);
      for (int iq = 0; iq < NQ; ++iq) {
        const __m512 pv = _mm512_maskz_loadu_ps(tm, p + (size_t)iq * p_stride + t0);
        _mm512_store_ps(ps[iq][gi], _mm512_mul_ps(pv, sv));
        _mm512_store_ps(zacc[iq][gi], _mm512_fmadd_ps(pv, zv, _mm512_load_ps(zacc[iq][gi])));
      }
    }
    const uint8_t* tok = values + (size_t)t0 * tb + code_off;
    int i = 0;
    if constexpr (BITS == 1) {
      // 4 tokens at a time: per row and group a table of the subset sums of the 4 tokens' p*s,
      // per chunk a 4-bit index from the 4 tokens' code masks, then one vpermps + add per row.
      for (; i + 4 <= cnt; i += 4, tok += 4 * tb) {
        alignas(64) float lut[NQ][NG][16];
        for (int iq = 0; iq < NQ; ++iq)
          for (int gi = 0; gi < NG; ++gi) {
            const float* a = &ps[iq][gi][i];
            _mm512_store_ps(lut[iq][gi], subset_sums4(a[0], a[1], a[2], a[3]));
          }
        for (int j = 0; j < NCH; ++j) {
          const __m512i idx = nibble_index(load_mask(tok + 2 * j), load_mask(tok + tb + 2 * j),
                                           load_mask(tok + 2 * tb + 2 * j), load_mask(tok + 3 * tb + 2 * j));
          for (int iq = 0; iq < NQ; ++iq) acc[iq][j] = _mm512_add_ps(acc[iq][j], perm16(idx, lut[iq][grp(j)]));
        }
      }
    }
    for (; i < cnt; ++i, tok += tb) {
      if constexpr (BITS == 1) {
        __mmask16 m[NCH];
        for (int j = 0; j < NCH; ++j) m[j] = load_mask(tok + 2 * j);
        for (int iq = 0; iq < NQ; ++iq) {
          __m512 v[NG];
          for (int gi = 0; gi < NG; ++gi) v[gi] = _mm512_set1_ps(ps[iq][gi][i]);
          unroll<NCH>([&](auto J) { acc[iq][J] = masked_acc<J>(acc[iq][J], m[J], v[grp(J)], ones); });
        }
      } else {
        __m512 cf[NCH];
        for (int j = 0; j < NCH; ++j) cf[j] = codes2(load_mask(tok + 2 * j), load_mask(tok + pb + 2 * j));
        for (int iq = 0; iq < NQ; ++iq) {
          __m512 v[NG];
          for (int gi = 0; gi < NG; ++gi) v[gi] = _mm512_set1_ps(ps[iq][gi][i]);
          for (int j = 0; j < NCH; ++j) acc[iq][j] = _mm512_fmadd_ps(v[grp(j)], cf[j], acc[iq][j]);
        }
      }
    }
  }
  for (int iq = 0; iq < NQ; ++iq) {
    float zs[NG];
    for (int gi = 0; gi < NG; ++gi) zs[gi] = hsum(_mm512_load_ps(zacc[iq][gi]));
    for (int j = 0; j < NCH; ++j)
      _mm512_storeu_ps(out + (size_t)iq * out_stride + c0 + 16 * j,
                       _mm512_add_ps(acc[iq][j], _mm512_set1_ps(zs[grp(j)])));
  }
}

using AccFn = void (*)(const LowBitSpec&, const uint8_t*, int, const float*, size_t, float*, size_t, int);

template <int NCH, int BITS, bool SPLIT>
AccFn acc_fn_q(int nq) {
  switch (nq) {
    case 1: return accumulate_tile<NCH, BITS, 1, SPLIT>;
    case 2: return accumulate_tile<NCH, BITS, 2, SPLIT>;
    case 3: return accumulate_tile<NCH, BITS, 3, SPLIT>;
    case 4: return accumulate_tile<NCH, BITS, 4, SPLIT>;
    case 5: return accumulate_tile<NCH, BITS, 5, SPLIT>;
    default: return accumulate_tile<NCH, BITS, 6, SPLIT>;
  }
}

template <int BITS>
AccFn acc_fn(int nch, bool split, int nq) {
  switch (nch) {
    case 1: return acc_fn_q<1, BITS, false>(nq);
    case 2: return acc_fn_q<2, BITS, false>(nq);
    case 3: return split ? acc_fn_q<3, BITS, true>(nq) : acc_fn_q<3, BITS, false>(nq);
    default: return split ? acc_fn_q<4, BITS, true>(nq) : acc_fn_q<4, BITS, false>(nq);
  }
}

}  // namespace

void score_keys_avx512(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits;
  const size_t bb = spec.key_block_bytes(), W = spec.key_word_bytes();
  alignas(64) float qs[kMaxNq * kMaxDim];
  alignas(64) float s[kMaxDim], z[kMaxDim];
  float qz[kMaxNq];
  for (int blk = 0; blk < n_blocks; ++blk) {
    const uint8_t* block = blocks + (size_t)blk * bb;
    const uint8_t* sp = block + (size_t)bits * d * W;
    const uint8_t* zp = sp + 2 * (size_t)d;
    int c = 0;
    for (; c + 16 <= d; c += 16) {
      _mm512_store_ps(s + c, cvtph(sp + 2 * c));
      _mm512_store_ps(z + c, cvtph(zp + 2 * c));
    }
    for (; c < d; ++c) {
      fp16_t hs, hz;
      std::memcpy(&hs, sp + 2 * c, 2);
      std::memcpy(&hz, zp + 2 * c, 2);
      s[c] = fp16_to_fp32(hs);
      z[c] = fp16_to_fp32(hz);
    }
    for (int q0 = 0; q0 < n_q; q0 += kMaxNq) {
      const int nq = std::min(kMaxNq, n_q - q0);
      for (int iq = 0; iq < nq; ++iq) {
        const float* qr = q + (size_t)(q0 + iq) * q_stride;
        float* qs0 = qs + (size_t)iq * d;
        __m512 zsum = _mm512_setzero_ps();
        int cc = 0;
        for (; cc + 16 <= d; cc += 16) {
          const __m512 qv = _mm512_loadu_ps(qr + cc);
          const __m512 a = _mm512_mul_ps(qv, _mm512_load_ps(s + cc));
          _mm512_storeu_ps(qs0 + cc, a);
          zsum = _mm512_fmadd_ps(qv, _mm512_load_ps(z + cc), zsum);
        }
        float zs = hsum(zsum);
        for (; cc < d; ++cc) {
          qs0[cc] = qr[cc] * s[cc];
          zs += qr[cc] * z[cc];
        }
        qz[iq] = zs;
      }
      pick_score_fn(d, g, bits, nq)(d, block, qs, qz, scores + (size_t)q0 * score_stride + (size_t)blk * g,
                                 score_stride);
    }
  }
}

void accumulate_values_avx512(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride) {
  spec.validate();
  SPC_ASSERT(spec.head_dim % 16 == 0);
  const int nchunks = spec.head_dim / 16;
  for (int ch0 = 0; ch0 < nchunks; ch0 += 4) {
    const int nch = std::min(4, nchunks - ch0);
    for (int q0 = 0; q0 < n_q; q0 += kMaxNq) {
      const int nq = std::min(kMaxNq, n_q - q0);
      const bool split = spec.value_group() == 32 && nch > 2;
      const AccFn fn = spec.bits == 1 ? acc_fn<1>(nch, split, nq) : acc_fn<2>(nch, split, nq);
      fn(spec, values, n_tok, p + (size_t)q0 * p_stride, p_stride, out + (size_t)q0 * out_stride, out_stride, ch0);
    }
  }
}

}  // namespace spc::lowbit_detail

#endif  // __AVX512F__
