// AVX-512 (F + BW, VNNI when available) packed kernels of the low-bit KV codec; layouts, the
// integer method and its error bound in lowbit.h.
//
// Keys: once per call and row tile (<= 6 rows), the rows' int8 queries (4 per channel quad, one
// dword). Per block, the u8 key scales (one dword per quad) and per row the constant qz; then per
// channel quad and 16-token chunk one 64-bit code word becomes 64 bytes code*sq (lane t, byte k =
// token t, channel 4u+k), shared by the rows, and each row does one vpdpbusd with its query
// dword as an embedded broadcast. 4 chunks x <= 3 rows or 2 chunks x <= 6 rows of accumulators;
// the rows' running maxima stay in registers over a batch of blocks.
//
// Values: per block and row tile, the rows' u8 weights per token (and value group); then per
// token quad and 16-channel chunk one 64-bit code word becomes 64 signed bytes 2*code - 2h
// (lane c, byte k = token 4i+k, channel 16m+c), and each row does one vpdpbusd with its 4
// broadcast weights. Channels are tiled by 32 (<= 2 chunks x 6 rows); the int32 sums go to fp32
// accumulators at the end of each block, held in registers over a batch of blocks.
//
// The per-block operands of up to 8 blocks are prepared before their dot products run.
#include "kv/lowbit.h"

#if defined(SPC_LOWBIT_AVX512)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "ops/vec_math.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/prefetch.h"
#include "util/unroll.h"

namespace spc::lowbit_detail {

namespace {

constexpr int kMaxNq = 6;
constexpr int kMaxDim = 256;
constexpr int kMaxQuads = kMaxDim / 4;
constexpr int kMaxGroups = 8;  // ceil(256 / 32)
constexpr int kWRow = 256;     // bytes per row of the value weight buffer (>= ngroups * g)

// Forced inlining: GCC keeps an accumulator array in registers only when every access has a
// constant index after inlining; an outlined lambda gets the array through memory.
#define SPC_AI __attribute__((always_inline))
// unroll<N>(f): util/unroll.h.

// GCC 12 emits a false -Wmaybe-uninitialized (from _mm512_undefined_*) inside _mm512_cvtph_ps and
// the reductions; these full-mask forms compile to the same instructions.
constexpr __mmask16 kAll16 = 0xFFFF;
inline __m512 cvtph(const void* p) { return _mm512_maskz_cvtph_ps(kAll16, _mm256_loadu_si256((const __m256i*)p)); }
// The first n (<= 16) fp16 at p, the other lanes 0; reads only n elements.
inline __m512 cvtph_n(const void* p, int n) {
  const __mmask16 m = n >= 16 ? kAll16 : (__mmask16)((1u << n) - 1u);
  return _mm512_maskz_cvtph_ps(kAll16, _mm256_maskz_loadu_epi16(m, p));
}
inline float hsum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(kAll16, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(kAll16, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(kAll16, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(kAll16, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}
// The maximum of the 16 lanes, broadcast to every lane (stays in the vector unit).
inline __m512 bcast_max(__m512 v) {
  v = _mm512_maskz_max_ps(kAll16, v, _mm512_maskz_shuffle_f32x4(kAll16, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_maskz_max_ps(kAll16, v, _mm512_maskz_shuffle_f32x4(kAll16, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_maskz_max_ps(kAll16, v, _mm512_maskz_permute_ps(kAll16, v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_maskz_max_ps(kAll16, v, _mm512_maskz_permute_ps(kAll16, v, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline float hmax(__m512 v) { return _mm512_cvtss_f32(bcast_max(v)); }
inline float hmin(__m512 v) { return -hmax(_mm512_sub_ps(_mm512_setzero_ps(), v)); }

// Four horizontal reductions at once (one shuffle tree instead of four): lanes 4i..4i+3 of the
// result = op over the 16 lanes of v[i]. The prep of a block reduces all its rows together, so
// the rows' chains (max -> division -> quantization -> sum) overlap instead of queueing.
template <int IMM>
inline __m512 shuf128(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_f32x4(kAll16, a, b, IMM);
}
template <class Op>
inline __m512 reduce4(const __m512* v, Op op) {
  constexpr int I0 = _MM_SHUFFLE(1, 0, 1, 0), I1 = _MM_SHUFFLE(3, 2, 3, 2);
  constexpr int I2 = _MM_SHUFFLE(2, 0, 2, 0), I3 = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 x01 = op(shuf128<I0>(v[0], v[1]), shuf128<I1>(v[0], v[1]));  // v0 | v1, 8 lanes each
  const __m512 x23 = op(shuf128<I0>(v[2], v[3]), shuf128<I1>(v[2], v[3]));
  __m512 y = op(shuf128<I2>(x01, x23), shuf128<I3>(x01, x23));  // 128-bit block i: 4 lanes of v[i]
  y = op(y, _mm512_maskz_permute_ps(kAll16, y, _MM_SHUFFLE(1, 0, 3, 2)));
  return op(y, _mm512_maskz_permute_ps(kAll16, y, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline __m512 vmax(__m512 a, __m512 b) { return _mm512_maskz_max_ps(kAll16, a, b); }
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }

// For the rows of a tile (nq <= 8 partial vectors v[]), the per-row maximum M (lane 4i of
// out[i/4]) reduced, and scale = lim/M (0 where M = 0) and step = M/lim: the same IEEE divisions as
// the scalar path, so both quantize to the same integers.
inline void row_scales(const __m512* v, int nq, float lim, float* scale, float* step) {
  for (int r0 = 0; r0 < nq; r0 += 4) {
    __m512 x[4];
    for (int i = 0; i < 4; ++i) x[i] = r0 + i < nq ? v[r0 + i] : _mm512_setzero_ps();
    const __m512 m = reduce4(x, vmax);
    const __m512 l = _mm512_set1_ps(lim);
    const __mmask16 pos = _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ);
    alignas(64) float sc[16], st[16];
    _mm512_store_ps(sc, _mm512_maskz_div_ps(pos, l, m));
    _mm512_store_ps(st, _mm512_maskz_div_ps(kAll16, m, l));
    for (int i = 0; i < 4 && r0 + i < nq; ++i) {
      scale[r0 + i] = sc[4 * i];
      step[r0 + i] = st[4 * i];
    }
  }
}

// The same for NQ rows held in registers (unrolled): scale / step of row i in lanes 4*(i%4)..+3
// of scale[i/4] / step[i/4], without a round trip through memory.
template <int NQ>
SPC_AI inline void row_scales_v(const __m512* v, float lim, __m512* scale, __m512* step) {
  constexpr int NG = (NQ + 3) / 4;
  unroll<NG>([&](auto g4) SPC_AI {
    __m512 x[4];
    unroll<4>([&](auto i) SPC_AI { x[i] = 4 * g4 + i < NQ ? v[(4 * g4 + i) % NQ] : _mm512_setzero_ps(); });
    const __m512 m = reduce4(x, vmax);
    const __m512 l = _mm512_set1_ps(lim);
    scale[g4] = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ), l, m);
    step[g4] = _mm512_maskz_div_ps(kAll16, m, l);
  });
}
// Lane 4*(i%4) of v[i/4] broadcast (the per-row value of row_scales_v / reduce4).
template <int I>
SPC_AI inline __m512 row_lane(const __m512* v) {
  return _mm512_maskz_permutexvar_ps(kAll16, _mm512_set1_epi32(4 * (I % 4)), v[I / 4]);
}

// 4 int32 vectors (values within 0..255) -> 64 bytes: a[0..15], b[0..15], ...
// (the packs work per 128-bit lane; one dword permutation restores the order).
inline __m512i dword_lane_order() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }
inline __m512i pack_u8(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i x = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  return _mm512_maskz_permutexvar_epi32(kAll16, dword_lane_order(), x);
}

// acc + sum over the 4 bytes of each dword lane of u8[i] * s8[i].
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__AVX512VNNI__) && defined(__GNUC__) && !defined(__clang__)
  // GCC 12 does not coalesce the builtin's tied accumulator across the unrolled loop and emits
  // two register copies per vpdpbusd; the tied asm operand keeps each accumulator in place.
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#elif defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u8, s8);
#else
  // Exact emulation (vpmaddubsw would saturate its int16 pair sums: 2*255*127 for the keys):
  // even and odd bytes widened to int16, then vpmaddwd.
  const __m512i lo8 = _mm512_set1_epi16(0x00FF);
  const __m512i u_even = _mm512_and_si512(u8, lo8), u_odd = _mm512_srli_epi16(u8, 8);
  const __m512i s_even = _mm512_srai_epi16(_mm512_slli_epi16(s8, 8), 8), s_odd = _mm512_srai_epi16(s8, 8);
  acc = _mm512_add_epi32(acc, _mm512_madd_epi16(u_even, s_even));
  return _mm512_add_epi32(acc, _mm512_madd_epi16(u_odd, s_odd));
#endif
}
// The same with the signed operand the dword at s8 broadcast to all lanes (keys: the row's int8
// weights of a channel quad), as an embedded {1to16} memory operand: no broadcast instruction.
inline __m512i dpbusd_bcast_s8(__m512i acc, __m512i u8, const uint32_t* s8) {
#if defined(__AVX512VNNI__) && defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*s8));
  return acc;
#else
  return dpbusd(acc, u8, _mm512_set1_epi32((int)*s8));
#endif
}
inline uint64_t load_u64(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
// n <= 8 bytes, little-endian; a byte loop rather than a variable-size memcpy, which GCC emits as
// a call (that would force the accumulators to memory).
inline uint64_t load_bytes(const uint8_t* p, size_t n) {
  uint64_t w = 0;
  for (size_t i = 0; i < n; ++i) w |= (uint64_t)p[i] << (8 * i);
  return w;
}

// Bits r*t+k (t < 16, k < r) of w moved to 4t+k.
inline uint64_t spread_nibbles(uint64_t w, int r) {
  static constexpr uint64_t kNib[4] = {0, 0x1111111111111111ull, 0x3333333333333333ull, 0x7777777777777777ull};
#if defined(__BMI2__)
  return _pdep_u64(w, kNib[r]);
#else
  uint64_t out = 0;
  for (int t = 0; t < 16; ++t) out |= ((w >> (r * t)) & ((1ull << r) - 1)) << (4 * t);
  (void)kNib;
  return out;
#endif
}

// Block prefetches spread over a dot-product loop: while it works on block i of its batch it
// requests bytes [off, off + bytes) of block i of the next batch (base + i*stride), for i < n.
// Requested while the batch was being prepared instead, the next batch's lines went out in one
// burst that the core's fill buffers could not take, and the preparation waited on its own
// prefetch instructions (perf put ~6% of a 32K decode step there).
// The same loop can also carry a caller's lines (lowbit_score_keys_ex's extra): lines
// [x_lo[i], x_lo[i + 1]) of x while it works on block i.
struct BlockPrefetch {
  const uint8_t* base = nullptr;
  size_t stride = 0, off = 0, bytes = 0;
  int n = 0;
  const void* const* x = nullptr;
  const size_t* x_lo = nullptr;
  void operator()(int i) const {
    if (i < n) prefetch_bytes(base + (size_t)i * stride + off, bytes);
    if (x)
      for (size_t k = x_lo[i]; k < x_lo[i + 1]; ++k) prefetch_line(x[k]);
  }
};

// ---- keys ----

// The rows' int8 queries (once per call and row tile).
struct KeyRows {
  alignas(64) uint32_t qq[kMaxNq * kMaxQuads];  // int8x4 per (row, quad), 0 beyond d
  float aq[kMaxNq];                              // qmax/127
};

struct KeyPrep {
  alignas(64) uint32_t sq[kMaxQuads];   // u8 key scales, 4 per quad, 0 beyond d
  alignas(64) uint32_t sq2[kMaxQuads];  // 2*sq (2 bits)
  float A[kMaxNq], qz[kMaxNq];
  const uint8_t* words;  // plane 0's code words [nquads][J]
  size_t plane_bytes;
};

// 64 code bytes code * sq (sq = the quad's 4 u8 key scales, one per byte of each lane; <= 255).
template <int BITS>
inline __m512i key_code_bytes(uint64_t w0, uint64_t w1, __m512i sq, __m512i sq2) {
  __m512i c = _mm512_maskz_mov_epi8(_cvtu64_mask64(w0), sq);
  if constexpr (BITS == 2) c = _mm512_mask_add_epi8(c, _cvtu64_mask64(w1), c, sq2);
  (void)w1;
  (void)sq2;
  return c;
}

// Scores of the nb prepared blocks kp[] for NQ rows, JT chunks (16 tokens each) at a time:
// per block and tile the code words of plane 0's first chunk at kp.words + 8*j0, quads
// J*8 bytes apart (plane 1 at + plane_bytes); sq / sq2: the block's u8 key scales (and doubled)
// as one dword per quad; qq [NQ][kMaxQuads] int8x4 query dwords; A / qz [NQ]. scores: row 0's
// first token of the first block (rows score_stride apart, blocks g tokens apart); rmax
// [NQ][16]: running maxima of the rows' scores (lane-wise), held in registers over the blocks.
// (Kept in memory and reloaded at every tile, right after that tile's score stores, the maxima
// were where perf put over half of this kernel's samples at 8K context.)
// NQ*JT <= 12 accumulators (+ NQ maxima): GCC 12 spills beyond that.
template <int JT, int BITS, int NQ>
void score_blocks(const KeyPrep* kp, int nb, int J, int nquads, int g, const uint32_t* qq, float* scores,
                  size_t score_stride, float* rmax, const BlockPrefetch& pf) {
  __m512 mx[NQ];
  unroll<NQ>([&](auto iq) SPC_AI { mx[iq] = _mm512_load_ps(rmax + 16 * iq); });
  const size_t quad_stride = (size_t)J * 8;
  for (int i = 0; i < nb; ++i) {
    const KeyPrep& p = kp[i];
    pf(i);
    for (int j0 = 0; j0 < J; j0 += JT) {
      __m512i acc[NQ][JT];
      unroll<NQ>([&](auto iq) SPC_AI { unroll<JT>([&](auto j) SPC_AI { acc[iq][j] = _mm512_setzero_si512(); }); });
      const uint8_t* words = p.words + 8 * j0;
      for (int u = 0; u < nquads; ++u, words += quad_stride) {
        // The scaled codes of the JT chunks of the quad (shared by the rows), then per row JT
        // vpdpbusd with its query dword as an embedded broadcast.
        const __m512i s1 = _mm512_set1_epi32((int)p.sq[u]);
        const __m512i s2 = BITS == 2 ? _mm512_set1_epi32((int)p.sq2[u]) : s1;
        __m512i codes[JT];
        unroll<JT>([&](auto j) SPC_AI {
          codes[j] = key_code_bytes<BITS>(load_u64(words + 8 * j),
                                          BITS == 2 ? load_u64(words + p.plane_bytes + 8 * j) : 0, s1, s2);
        });
        unroll<NQ>([&](auto iq) SPC_AI {
          unroll<JT>([&](auto j) SPC_AI { acc[iq][j] = dpbusd_bcast_s8(acc[iq][j], codes[j], qq + iq * kMaxQuads + u); });
        });
      }
      float* st = scores + (size_t)i * g + 16 * j0;
      unroll<NQ>([&](auto iq) SPC_AI {
        const __m512 av = _mm512_set1_ps(p.A[iq]), zv = _mm512_set1_ps(p.qz[iq]);
        unroll<JT>([&](auto j) SPC_AI {
          const __m512 sc = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll16, acc[iq][j]), av, zv);
          _mm512_storeu_ps(st + (size_t)iq * score_stride + 16 * j, sc);
          mx[iq] = vmax(mx[iq], sc);
        });
      });
    }
  }
  unroll<NQ>([&](auto iq) SPC_AI { _mm512_store_ps(rmax + 16 * iq, mx[iq]); });
}

using ScoreFn = void (*)(const KeyPrep*, int, int, int, int, const uint32_t*, float*, size_t, float*,
                        const BlockPrefetch&);

template <int JT, int BITS>
ScoreFn score_fn_q(int nq) {
  switch (nq) {
    case 1: return score_blocks<JT, BITS, 1>;
    case 2: return score_blocks<JT, BITS, 2>;
    case 3: return score_blocks<JT, BITS, 3>;
    case 4: return score_blocks<2, BITS, 4>;
    case 5: return score_blocks<2, BITS, 5>;
    default: return score_blocks<2, BITS, 6>;
  }
}

// Chunks per pass: all 4 of a g = 64 block for up to 3 rows, else 2.
inline int score_chunks_per_pass(int g, int nq) { return g == 64 && nq <= 3 ? 4 : 2; }

ScoreFn pick_score_fn(int g, int bits, int nq) {
  if (score_chunks_per_pass(g, nq) == 4) return bits == 1 ? score_fn_q<4, 1>(nq) : score_fn_q<4, 2>(nq);
  return bits == 1 ? score_fn_q<2, 1>(nq) : score_fn_q<2, 2>(nq);
}

// ---- values ----

// 64 signed bytes 2*code - (2^BITS - 1) from the plane words.
template <int BITS>
inline __m512i value_code_bytes(uint64_t w0, uint64_t w1) {
  if constexpr (BITS == 1) {
    (void)w1;
    return _mm512_mask_blend_epi8(_cvtu64_mask64(w0), _mm512_set1_epi8(-1), _mm512_set1_epi8(1));
  } else {
    const __m512i c = _mm512_mask_blend_epi8(_cvtu64_mask64(w0), _mm512_set1_epi8(-3), _mm512_set1_epi8(-1));
    return _mm512_mask_add_epi8(c, _cvtu64_mask64(w1), c, _mm512_set1_epi8(4));
  }
}

struct ValPrep {
  alignas(64) uint8_t w[kMaxNq * kWRow];  // u8 weights [row][group*g + t]
  float half_b[kMaxNq];                   // b/2 per row
  float pmax[kMaxNq];                     // the block's largest softmax numerator per row (EXP only)
};

// NCH (1 or 2) chunks of 16 channels, inside one value group, of the nb prepared blocks prep[]
// (vb bytes apart) for NQ rows. rec0: block 0's plane 0 record at the tile's first chunk; TAIL:
// the last chunk is the compact tail (tail_bits = 4*(d % 16) code bits). w_off: the group's
// offset in a row of a block's u8 weights (row iq at + iq*kWRow), one dword per token quad. Adds
// half_b * sums of every block to facc ([NQ][kMaxDim], at the tile's first channel), held in
// registers over the blocks (one load and store per batch, not per block).
// NQ*NCH <= 12 int32 accumulators, plus as many fp32 ones.
template <int NCH, int BITS, int NQ, bool TAIL>
void value_tiles(const uint8_t* rec0, size_t vb, const ValPrep* prep, int nb, int w_off, size_t rec_bytes,
                 size_t plane_bytes, int n_quads, int tail_bits, float* facc, const BlockPrefetch& pf) {
  __m512 F[NQ][NCH];
  unroll<NQ>([&](auto iq) SPC_AI {
    unroll<NCH>([&](auto j) SPC_AI { F[iq][j] = _mm512_load_ps(facc + iq * kMaxDim + 16 * j); });
  });
  const uint64_t tail_mask = TAIL ? (1ull << tail_bits) - 1 : ~0ull;
  for (int b = 0; b < nb; ++b) {
    pf(b);
    const uint8_t* rec = rec0 + (size_t)b * vb;
    const uint8_t* w = prep[b].w + w_off;
    __m512i acc[NQ][NCH];
    unroll<NQ>([&](auto iq) SPC_AI { unroll<NCH>([&](auto j) SPC_AI { acc[iq][j] = _mm512_setzero_si512(); }); });
    for (int i = 0; i < n_quads; ++i, rec += rec_bytes) {
      __m512i codes[NCH];
      unroll<NCH>([&](auto j) SPC_AI {
        // The tail field is followed by the next record or the block's scales: reading 8 bytes
        // stays inside the block.
        const uint64_t m = (TAIL && j == NCH - 1) ? tail_mask : ~0ull;
        codes[j] = value_code_bytes<BITS>(load_u64(rec + 8 * j) & m,
                                          BITS == 2 ? load_u64(rec + plane_bytes + 8 * j) & m : 0);
      });
      unroll<NQ>([&](auto iq) SPC_AI {
        const __m512i wv = _mm512_set1_epi32((int)load_u32(w + iq * kWRow + 4 * i));
        unroll<NCH>([&](auto j) SPC_AI { acc[iq][j] = dpbusd(acc[iq][j], wv, codes[j]); });
      });
    }
    unroll<NQ>([&](auto iq) SPC_AI {
      const __m512 hb = _mm512_set1_ps(prep[b].half_b[iq]);
      unroll<NCH>([&](auto j) SPC_AI {
        F[iq][j] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll16, acc[iq][j]), hb, F[iq][j]);
      });
    });
  }
  unroll<NQ>([&](auto iq) SPC_AI {
    unroll<NCH>([&](auto j) SPC_AI { _mm512_store_ps(facc + iq * kMaxDim + 16 * j, F[iq][j]); });
  });
}

using ValuesFn = void (*)(const uint8_t*, size_t, const ValPrep*, int, int, size_t, size_t, int, int, float*,
                         const BlockPrefetch&);

template <int NCH, int BITS, bool TAIL>
ValuesFn values_fn_q(int nq) {
  switch (nq) {
    case 1: return value_tiles<NCH, BITS, 1, TAIL>;
    case 2: return value_tiles<NCH, BITS, 2, TAIL>;
    case 3: return value_tiles<NCH, BITS, 3, TAIL>;
    case 4: return value_tiles<NCH, BITS, 4, TAIL>;
    case 5: return value_tiles<NCH, BITS, 5, TAIL>;
    default: return value_tiles<NCH, BITS, 6, TAIL>;
  }
}

template <int BITS>
ValuesFn values_fn_c(int nch, bool tail, int nq) {
  if (nch == 1) return tail ? values_fn_q<1, BITS, true>(nq) : values_fn_q<1, BITS, false>(nq);
  return tail ? values_fn_q<2, BITS, true>(nq) : values_fn_q<2, BITS, false>(nq);
}

ValuesFn pick_values_fn(int bits, int nch, bool tail, int nq) {
  return bits == 1 ? values_fn_c<1>(nch, tail, nq) : values_fn_c<2>(nch, tail, nq);
}

// ---- per-block preparation (weights quantized per block and row) ----
// The entry points prepare a batch of kBatch blocks back to back, then run their dot products:
// each preparation is one long dependency chain (horizontal max -> division -> quantization ->
// sums) that alone would leave the core idle; consecutive blocks' chains are independent and
// overlap, and the dot products then run at the vpdpbusd throughput.
constexpr int kBatch = 8;
// Blocks are read once per decode step, long after the previous step evicted them (the weights
// stream through every cache level in between), and each chunk task covers only a few dozen:
// too short a stream for the hardware prefetcher, so every block's first loads missed (perf put
// a quarter to a third of each kernel's samples on them). The kernels request the blocks a
// batch ahead: the first batch on entry, then block i + kBatch while the dot products work on
// block i (BlockPrefetch).
inline void prefetch_blocks(const uint8_t* blocks, size_t block_bytes, int b0, int b1) {
  prefetch_bytes(blocks + (size_t)b0 * block_bytes, (size_t)(b1 - b0) * block_bytes);
}

struct KeyCtx {
  int d, g, bits, nv, J, nq4, r, nquads;
  size_t bb, pb;
  float h, lim;
  float dcoef;  // debias/24: qz -= dcoef * sum_c q_c^2 s_c^2 (0: off)
};

inline __mmask16 first_n(int n) { return n >= 16 ? kAll16 : (__mmask16)((1u << n) - 1u); }

// int8 queries qq_c = rne(q_c * 127/qmax), aq = qmax/127 (the scalar path's operations).
void prep_key_rows(const KeyCtx& k, const float* q, size_t q_stride, int nq, KeyRows& kr) {
  for (int iq = 0; iq < nq; ++iq) {
    const float* qr = q + (size_t)iq * q_stride;
    __m512 m = _mm512_setzero_ps();
    for (int v = 0; v < k.nv; ++v)
      m = _mm512_maskz_range_ps(kAll16, m, _mm512_maskz_loadu_ps(first_n(k.d - 16 * v), qr + 16 * v), 0xB);
    const float qmax = hmax(m);
    const __m512 inv = _mm512_set1_ps(qmax > 0.0f ? 127.0f / qmax : 0.0f);
    kr.aq[iq] = qmax / 127.0f;
    uint8_t* dst = (uint8_t*)(kr.qq + iq * kMaxQuads);
    std::memset(dst, 0, 4 * kMaxQuads);
    for (int v = 0; v < k.nv; ++v) {
      const __m512 qv = _mm512_maskz_loadu_ps(first_n(k.d - 16 * v), qr + 16 * v);
      _mm_store_si128((__m128i*)(dst + 16 * v),
                      _mm512_maskz_cvtsepi32_epi8(kAll16, _mm512_maskz_cvtps_epi32(kAll16, _mm512_mul_ps(qv, inv))));
    }
  }
}

// qz[iq] = sum of the 16 lanes of t[iq] for NQ rows, reduced four rows at a time.
template <int NQ>
SPC_AI inline void store_row_sums(const __m512* t, float* qz) {
  constexpr int NG = (NQ + 3) / 4;
  unroll<NG>([&](auto g4) SPC_AI {
    __m512 x[4];
    unroll<4>([&](auto i) SPC_AI { x[i] = 4 * g4 + i < NQ ? t[(4 * g4 + i) % NQ] : _mm512_setzero_ps(); });
    const __m512 red = reduce4(x, vadd);
    unroll<4>([&](auto i) SPC_AI {
      if constexpr (4 * g4 + i < NQ)
        qz[4 * g4 + i] = _mm512_cvtss_f32(_mm512_maskz_permutexvar_ps(kAll16, _mm512_set1_epi32(4 * i), red));
    });
  });
}

// One key block: u8 scales sq_c = rne(s_c * lim/smax), as = smax/lim; per row A = aq*as and
// qz = sum_c q_c*(z_c + h*s_c) - h*A*sum_c qq_c*sq_c (reduced for 4 rows at a time).
// padded: room for bits*nquads*J words, used when d % 4 != 0.
template <int NQ>
void prep_key_block(const KeyCtx& k, const uint8_t* block, const float* q, size_t q_stride, const KeyRows& kr,
                    KeyPrep& kp, uint8_t* padded) {
  const int d = k.d, nv = k.nv;
  const uint8_t* sp = block + (size_t)k.bits * k.pb;
  const uint8_t* zp = sp + 2 * (size_t)d;
  kp.words = block;
  kp.plane_bytes = k.pb;
  if (k.r > 0) {  // d % 4 != 0: copy the planes with the compact tail quad spread to full words
    const size_t full = (size_t)k.nq4 * k.J * 8;
    for (int b = 0; b < k.bits; ++b) {
      uint8_t* dst = padded + (size_t)b * k.nquads * k.J * 8;
      std::memcpy(dst, block + b * k.pb, full);
      for (int j = 0; j < k.J; ++j) {
        const uint64_t wd =
            spread_nibbles(load_bytes(block + b * k.pb + full + (size_t)j * 2 * k.r, 2 * (size_t)k.r), k.r);
        std::memcpy(dst + full + 8 * j, &wd, 8);
      }
    }
    kp.words = padded;
    kp.plane_bytes = (size_t)k.nquads * k.J * 8;
  }
  const __m512 hv = _mm512_set1_ps(k.h);
  alignas(64) float s[kMaxDim], zc[kMaxDim];
  __m512 sm = _mm512_setzero_ps();
  for (int v = 0; v < nv; ++v) {  // lanes beyond d: s = z = 0
    const int n = std::min(16, d - 16 * v);
    const __m512 sv = cvtph_n(sp + 32 * v, n);
    _mm512_store_ps(s + 16 * v, sv);
    _mm512_store_ps(zc + 16 * v, _mm512_fmadd_ps(sv, hv, cvtph_n(zp + 32 * v, n)));
    sm = _mm512_maskz_max_ps(kAll16, sm, sv);
  }
  const float smax = hmax(sm);
  const __m512 invs = _mm512_set1_ps(smax > 0.0f ? k.lim / smax : 0.0f);
  const float as = smax / k.lim;
  // The scales as bytes, built in registers (64 channels per vector, 0 beyond d) and stored
  // once: 16-byte stores read back as one 64-byte load would defeat store forwarding.
  const int n64 = (d + 63) / 64;
  __m512i sqv[kMaxDim / 64];
  for (int v4 = 0; v4 < n64; ++v4) {
    __m512i si[4];
    for (int i = 0; i < 4; ++i) {
      const int v = 4 * v4 + i;
      si[i] = v < nv ? _mm512_maskz_cvtps_epi32(kAll16, _mm512_mul_ps(_mm512_load_ps(s + 16 * v), invs))
                     : _mm512_setzero_si512();
    }
    sqv[v4] = pack_u8(si[0], si[1], si[2], si[3]);
    _mm512_store_si512(kp.sq + 16 * v4, sqv[v4]);
    if (k.bits == 2) _mm512_store_si512(kp.sq2 + 16 * v4, _mm512_add_epi8(sqv[v4], sqv[v4]));  // <= 170
  }
  __m512 t[NQ];
  unroll<NQ>([&](auto iq) SPC_AI {
    const float* qr = q + iq * q_stride;
    __m512 tz = _mm512_setzero_ps();
    for (int v = 0; v < nv; ++v)
      tz = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(first_n(d - 16 * v), qr + 16 * v), _mm512_load_ps(zc + 16 * v), tz);
    if (k.dcoef > 0.0f) {  // debias: - dcoef * sum_c q_c^2 s_c^2
      __m512 tb = _mm512_setzero_ps();
      for (int v = 0; v < nv; ++v) {
        const __m512 qv = _mm512_maskz_loadu_ps(first_n(d - 16 * v), qr + 16 * v), sv = _mm512_load_ps(s + 16 * v);
        tb = _mm512_fmadd_ps(_mm512_mul_ps(qv, qv), _mm512_mul_ps(sv, sv), tb);
      }
      tz = _mm512_fnmadd_ps(tb, _mm512_set1_ps(k.dcoef), tz);
    }
    __m512i isum = _mm512_setzero_si512();
    const uint32_t* qq = kr.qq + iq * kMaxQuads;
    for (int v4 = 0; v4 < n64; ++v4) isum = dpbusd(isum, sqv[v4], _mm512_load_si512(qq + 16 * v4));
    kp.A[iq] = kr.aq[iq] * as;
    t[iq] = _mm512_fnmadd_ps(_mm512_maskz_cvtepi32_ps(kAll16, isum), _mm512_set1_ps(k.h * kp.A[iq]), tz);
  });
  store_row_sums<NQ>(t, kp.qz);
}

// The same for d = 16*NV (NV a multiple of 4, no tail quad), unrolled with everything in registers.
template <int NQ, int NV>
void prep_key_block_fast(const KeyCtx& k, const uint8_t* block, const float* q, size_t q_stride, const KeyRows& kr,
                         KeyPrep& kp, uint8_t*) {
  static_assert(NV % 4 == 0);
  const uint8_t* sp = block + (size_t)k.bits * k.pb;
  const uint8_t* zp = sp + 32 * NV;
  kp.words = block;
  kp.plane_bytes = k.pb;
  const __m512 hv = _mm512_set1_ps(k.h);
  __m512 s[NV], zc[NV];
  __m512 sm = _mm512_setzero_ps();
  unroll<NV>([&](auto v) SPC_AI {
    s[v] = cvtph(sp + 32 * v);
    zc[v] = _mm512_fmadd_ps(s[v], hv, cvtph(zp + 32 * v));
    sm = _mm512_maskz_max_ps(kAll16, sm, s[v]);
  });
  sm = bcast_max(sm);  // smax in every lane
  const __m512 lim = _mm512_set1_ps(k.lim);
  const __m512 invs = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(sm, _mm512_setzero_ps(), _CMP_GT_OQ), lim, sm);
  const float as = _mm512_cvtss_f32(_mm512_maskz_div_ps(kAll16, sm, lim));
  __m512i sqv[NV / 4];
  unroll<NV / 4>([&](auto v4) SPC_AI {
    __m512i si[4];
    unroll<4>([&](auto i) SPC_AI {
      si[i] = _mm512_maskz_cvtps_epi32(kAll16, _mm512_mul_ps(s[4 * v4 + i], invs));
    });
    sqv[v4] = pack_u8(si[0], si[1], si[2], si[3]);
    _mm512_store_si512(kp.sq + 16 * v4, sqv[v4]);
    if (k.bits == 2) _mm512_store_si512(kp.sq2 + 16 * v4, _mm512_add_epi8(sqv[v4], sqv[v4]));  // <= 170
  });
  __m512 t[NQ];
  unroll<NQ>([&](auto iq) SPC_AI {
    const float* qr = q + iq * q_stride;
    __m512 tz = _mm512_setzero_ps();
    unroll<NV>([&](auto v) SPC_AI { tz = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * v), zc[v], tz); });
    if (k.dcoef > 0.0f) {  // debias: - dcoef * sum_c q_c^2 s_c^2
      __m512 tb = _mm512_setzero_ps();
      unroll<NV>([&](auto v) SPC_AI {
        const __m512 qv = _mm512_loadu_ps(qr + 16 * v);
        tb = _mm512_fmadd_ps(_mm512_mul_ps(qv, qv), _mm512_mul_ps(s[v], s[v]), tb);
      });
      tz = _mm512_fnmadd_ps(tb, _mm512_set1_ps(k.dcoef), tz);
    }
    __m512i isum = _mm512_setzero_si512();
    unroll<NV / 4>([&](auto v4) SPC_AI {
      isum = dpbusd(isum, sqv[v4], _mm512_load_si512(kr.qq + iq * kMaxQuads + 16 * v4));
    });
    kp.A[iq] = kr.aq[iq] * as;
    t[iq] = _mm512_fnmadd_ps(_mm512_maskz_cvtepi32_ps(kAll16, isum), _mm512_set1_ps(k.h * kp.A[iq]), tz);
  });
  store_row_sums<NQ>(t, kp.qz);
}

using KeyPrepFn = void (*)(const KeyCtx&, const uint8_t*, const float*, size_t, const KeyRows&, KeyPrep&, uint8_t*);

template <int NV>
KeyPrepFn key_prep_fast(int nq) {
  switch (nq) {
    case 1: return prep_key_block_fast<1, NV>;
    case 2: return prep_key_block_fast<2, NV>;
    case 3: return prep_key_block_fast<3, NV>;
    case 4: return prep_key_block_fast<4, NV>;
    case 5: return prep_key_block_fast<5, NV>;
    default: return prep_key_block_fast<6, NV>;
  }
}

// The unrolled preparation for d = 64 and d = 128, the generic one otherwise.
KeyPrepFn pick_key_prep(int d, int nq) {
  if (d == 64) return key_prep_fast<4>(nq);
  if (d == 128) return key_prep_fast<8>(nq);
  switch (nq) {
    case 1: return prep_key_block<1>;
    case 2: return prep_key_block<2>;
    case 3: return prep_key_block<3>;
    case 4: return prep_key_block<4>;
    case 5: return prep_key_block<5>;
    default: return prep_key_block<6>;
  }
}

struct ValCtx {
  int d, g, bits, gv, ng, J;
  size_t pb;
  float h;
};

// Weights of rows p[0..nq) (p_stride apart, at the block's first token) for one value block, any
// shape; adds the zero terms p*(z + h*s) to zacc ([row][kMaxGroups][16]) and folds p into pmin.
void prep_value_generic(const ValCtx& c, const uint8_t* block, const float* p, size_t p_stride, int nq, ValPrep& vp,
                        float* zacc, __m512& pmin) {
  const int g = c.g, J = c.J, ng = c.ng;
  const uint8_t* sp = block + (size_t)c.bits * c.pb;
  const uint8_t* zp = sp + 2 * (size_t)ng * g;
  const __m512 hv = _mm512_set1_ps(c.h);
  alignas(64) float s[kMaxGroups * 64], zc[kMaxGroups * 64];  // [group][t]
  for (int i = 0; i < ng * J; ++i) {
    const __m512 sv = cvtph(sp + 32 * i);
    _mm512_store_ps(s + 16 * i, sv);
    _mm512_store_ps(zc + 16 * i, _mm512_fmadd_ps(sv, hv, cvtph(zp + 32 * i)));
  }
  __m512 mx[kMaxNq];
  for (int iq = 0; iq < nq; ++iq) {
    const float* pr = p + (size_t)iq * p_stride;
    float* za = zacc + iq * kMaxGroups * 16;
    __m512 m = _mm512_setzero_ps();
    for (int j = 0; j < J; ++j) {
      const __m512 pv = _mm512_loadu_ps(pr + 16 * j);
      pmin = _mm512_maskz_min_ps(kAll16, pmin, pv);
      for (int gi = 0; gi < ng; ++gi) {
        m = _mm512_maskz_max_ps(kAll16, m, _mm512_mul_ps(pv, _mm512_load_ps(s + (gi * J + j) * 16)));
        _mm512_store_ps(za + 16 * gi,
                        _mm512_fmadd_ps(pv, _mm512_load_ps(zc + (gi * J + j) * 16), _mm512_load_ps(za + 16 * gi)));
      }
    }
    mx[iq] = m;
  }
  float inv[kMaxNq], step[kMaxNq];
  row_scales(mx, nq, 255.0f, inv, step);
  for (int iq = 0; iq < nq; ++iq) {
    vp.half_b[iq] = 0.5f * step[iq];
    const float* pr = p + (size_t)iq * p_stride;
    const __m512 iv = _mm512_set1_ps(inv[iq]);
    for (int j = 0; j < J; ++j) {
      const __m512 pv = _mm512_loadu_ps(pr + 16 * j);
      for (int gi = 0; gi < ng; ++gi) {
        const __m512 u = _mm512_mul_ps(pv, _mm512_load_ps(s + (gi * J + j) * 16));
        const __m512i ui = _mm512_maskz_cvtps_epi32(kAll16, _mm512_mul_ps(u, iv));
        _mm_store_si128((__m128i*)(vp.w + iq * kWRow + gi * g + 16 * j), _mm512_maskz_cvtusepi32_epi8(kAll16, ui));
      }
    }
  }
}

// The same for one value group per token (ngroups == 1), g = 16*J and NQ rows, unrolled with
// everything in registers. EXP: p holds the rows' scores; the weights are the softmax numerators
// p_t = exp_fast(p_t - m[iq]), written back over the scores, and added lane-wise to lsum[iq]
// (pmin is not needed: exp >= 0).
template <int NQ, int J, bool EXP>
void prep_value_fast_t(const ValCtx& c, const uint8_t* block, float* p, size_t p_stride, ValPrep& vp, float* zacc,
                       __m512& pmin, const float* m, __m512* lsum) {
  const uint8_t* sp = block + (size_t)c.bits * c.pb;
  const uint8_t* zp = sp + 2 * (size_t)c.g;
  const __m512 hv = _mm512_set1_ps(c.h);
  __m512 s[J], zc[J];
  unroll<J>([&](auto j) SPC_AI {
    s[j] = cvtph(sp + 32 * j);
    zc[j] = _mm512_fmadd_ps(s[j], hv, cvtph(zp + 32 * j));
  });
  __m512 mx[NQ];
  __m512 bm[NQ];  // EXP: lane-wise maxima of the numerators
  __m512 pm = pmin;
  unroll<NQ>([&](auto iq) SPC_AI {
    float* pr = p + iq * p_stride;
    float* za = zacc + iq * kMaxGroups * 16;
    __m512 um = _mm512_setzero_ps(), z = _mm512_load_ps(za);
    bm[iq] = _mm512_setzero_ps();
    unroll<J>([&](auto j) SPC_AI {
      __m512 pv = _mm512_loadu_ps(pr + 16 * j);
      if constexpr (EXP) {
        pv = exp_fast16(_mm512_sub_ps(pv, _mm512_set1_ps(m[iq])));
        _mm512_storeu_ps(pr + 16 * j, pv);
        lsum[iq] = _mm512_add_ps(lsum[iq], pv);
        bm[iq] = vmax(bm[iq], pv);
      } else {
        pm = _mm512_maskz_min_ps(kAll16, pm, pv);
      }
      um = _mm512_maskz_max_ps(kAll16, um, _mm512_mul_ps(pv, s[j]));
      z = _mm512_fmadd_ps(pv, zc[j], z);
    });
    _mm512_store_ps(za, z);
    mx[iq] = um;
  });
  pmin = pm;
  if constexpr (EXP) {  // the rows' block maxima, reduced four rows at a time
    constexpr int NG = (NQ + 3) / 4;
    unroll<NG>([&](auto g4) SPC_AI {
      __m512 x[4];
      unroll<4>([&](auto i) SPC_AI { x[i] = 4 * g4 + i < NQ ? bm[(4 * g4 + i) % NQ] : _mm512_setzero_ps(); });
      alignas(64) float red[16];
      _mm512_store_ps(red, reduce4(x, vmax));
      unroll<4>([&](auto i) SPC_AI {
        if constexpr (4 * g4 + i < NQ) vp.pmax[4 * g4 + i] = red[4 * i];
      });
    });
  }
  constexpr int NG = (NQ + 3) / 4;
  __m512 inv[NG], step[NG];
  row_scales_v<NQ>(mx, 255.0f, inv, step);
  unroll<NQ>([&](auto iq) SPC_AI {
    const float* pr = p + iq * p_stride;
    const __m512 iv = row_lane<iq>(inv);
    vp.half_b[iq] = 0.5f * _mm512_cvtss_f32(row_lane<iq>(step));
    __m512i ui[J];
    unroll<J>([&](auto j) SPC_AI {
      ui[j] = _mm512_maskz_cvtps_epi32(kAll16, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(pr + 16 * j), s[j]), iv));
    });
    uint8_t* w = vp.w + iq * kWRow;
    if constexpr (J == 4) {
      _mm512_store_si512(w, pack_u8(ui[0], ui[1], ui[2], ui[3]));
    } else {
      unroll<J>([&](auto j) SPC_AI {
        _mm_store_si128((__m128i*)(w + 16 * j), _mm512_maskz_cvtusepi32_epi8(kAll16, ui[j]));
      });
    }
  });
}

using ValPrepFn = void (*)(const ValCtx&, const uint8_t*, float*, size_t, ValPrep&, float*, __m512&, const float*,
                           __m512*);

template <int J, bool EXP>
ValPrepFn value_prep_q(int nq) {
  switch (nq) {
    case 1: return prep_value_fast_t<1, J, EXP>;
    case 2: return prep_value_fast_t<2, J, EXP>;
    case 3: return prep_value_fast_t<3, J, EXP>;
    case 4: return prep_value_fast_t<4, J, EXP>;
    case 5: return prep_value_fast_t<5, J, EXP>;
    default: return prep_value_fast_t<6, J, EXP>;
  }
}

// The fast preparation for one value group per token; nullptr otherwise (generic path).
ValPrepFn pick_value_prep(int ng, int g, int nq, bool exp) {
  if (ng != 1) return nullptr;
  if (exp) return g == 64 ? value_prep_q<4, true>(nq) : value_prep_q<2, true>(nq);
  return g == 64 ? value_prep_q<4, false>(nq) : value_prep_q<2, false>(nq);
}

}  // namespace

void score_keys_avx512(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride, float debias, float* row_max,
                       const void* const* extra, size_t n_extra) {
  spec.validate();
  KeyCtx k;
  k.d = spec.head_dim;
  k.g = spec.group;
  k.bits = spec.bits;
  k.nv = (k.d + 15) / 16;
  k.J = k.g / 16;
  k.nq4 = k.d / 4;
  k.r = k.d % 4;
  k.nquads = (k.d + 3) / 4;
  k.bb = spec.key_block_bytes();
  k.pb = spec.key_plane_bytes();
  k.h = 0.5f * (float)((1 << k.bits) - 1);
  k.lim = key_scale_levels(k.bits);
  k.dcoef = debias / 24.0f;
  KeyRows rows;
  KeyPrep prep[kBatch];
  alignas(64) uint8_t padded[2 * kMaxQuads * 4 * 8];  // d % 4 != 0: one block at a time
  for (int q0 = 0; q0 < n_q; q0 += kMaxNq) {
    const int nq = std::min(kMaxNq, n_q - q0);
    const float* qt = q + (size_t)q0 * q_stride;
    prep_key_rows(k, qt, q_stride, nq, rows);
    const ScoreFn fn = pick_score_fn(k.g, k.bits, nq);
    const KeyPrepFn pfn = pick_key_prep(k.d, nq);
    const int batch = k.r == 0 ? kBatch : 1;
    alignas(64) float rmax[kMaxNq * 16];
    std::fill(rmax, rmax + kMaxNq * 16, -std::numeric_limits<float>::infinity());
    if (q0 == 0) prefetch_blocks(blocks, k.bb, 0, std::min(kBatch, n_blocks));
    float* st = scores + (size_t)q0 * score_stride;
    for (int b0 = 0; b0 < n_blocks; b0 += batch) {
      const int nb = std::min(batch, n_blocks - b0);
      for (int i = 0; i < nb; ++i) pfn(k, blocks + (size_t)(b0 + i) * k.bb, qt, q_stride, rows, prep[i], padded);
      BlockPrefetch pf;  // (nothing past the last block, nor for a second tile of rows)
      if (q0 == 0 && b0 + kBatch < n_blocks)
        pf = {blocks + (size_t)(b0 + kBatch) * k.bb, k.bb, 0, k.bb, std::min(nb, n_blocks - (b0 + kBatch))};
      // The caller's extra lines, spread evenly over the blocks of the first tile of rows.
      size_t x_lo[kBatch + 1];
      if (q0 == 0 && n_extra > 0) {
        for (int i = 0; i <= nb; ++i) x_lo[i] = n_extra * (size_t)(b0 + i) / (size_t)n_blocks;
        pf.x = extra;
        pf.x_lo = x_lo;
      }
      fn(prep, nb, k.J, k.nquads, k.g, rows.qq, st + (size_t)b0 * k.g, score_stride, rmax, pf);
    }
    if (row_max)
      for (int iq = 0; iq < nq; ++iq) row_max[q0 + iq] = hmax(_mm512_load_ps(rmax + 16 * iq));
  }
}

namespace {

// accumulate_values_avx512 (m == nullptr) and softmax_values_avx512 (p holds scores; m, l).
void values_impl(const LowBitSpec& spec, BlockMem values, int n_blocks, float* p, int n_q, size_t p_stride,
                 float* out, size_t out_stride, const float* m, float* l, float* block_max, size_t bm_stride) {
  spec.validate();
  ValCtx c;
  c.d = spec.head_dim;
  c.g = spec.group;
  c.bits = spec.bits;
  c.gv = spec.value_group();
  c.ng = spec.value_ngroups();
  c.J = c.g / 16;
  c.pb = spec.value_plane_bytes();
  c.h = 0.5f * (float)((1 << c.bits) - 1);
  const int d = c.d, g = c.g, gv = c.gv, ng = c.ng;
  const int n_quads = g / 4, r = d % 16, nchunks = (d + 15) / 16;
  const size_t R = spec.value_record_bytes(), vb = spec.value_block_bytes();
  ValPrep prep[kBatch];
  alignas(64) float facc[kMaxNq * kMaxDim];
  alignas(64) float zacc[kMaxNq * kMaxGroups * 16];

  for (int q0 = 0; q0 < n_q; q0 += kMaxNq) {
    const int nq = std::min(kMaxNq, n_q - q0);
    float* pt = p + (size_t)q0 * p_stride;
    std::fill(facc, facc + nq * kMaxDim, 0.0f);
    std::fill(zacc, zacc + nq * kMaxGroups * 16, 0.0f);
    __m512 pmin = _mm512_setzero_ps();
    __m512 lsum[kMaxNq];
    for (int iq = 0; iq < nq; ++iq) lsum[iq] = _mm512_setzero_ps();
    const bool fused = m != nullptr;
    const ValPrepFn fast = pick_value_prep(ng, g, nq, fused);
    SPC_ASSERT(!block_max || (fused && fast));  // the block maxima come from the fused preparation
    // Batches of kBatch blocks, one cut short where the blocks' memory changes (BlockMem): the
    // accumulators go through facc, zacc and lsum in block order either way.
    auto batch_len = [&](int b) {
      const int n = std::min(kBatch, n_blocks - b);
      return b < values.split ? (int)std::min<int64_t>(n, values.split - b) : n;
    };
    if (q0 == 0) prefetch_blocks(values.base(0), vb, 0, batch_len(0));
    for (int b0 = 0, nb = 0; b0 < n_blocks; b0 += nb) {
      nb = batch_len(b0);
      const uint8_t* mem = values.base(b0);
      for (int i = 0; i < nb; ++i) {
        const uint8_t* block = mem + (size_t)(b0 + i) * vb;
        float* pb0 = pt + (size_t)(b0 + i) * g;
        if (fast) fast(c, block, pb0, p_stride, prep[i], zacc, pmin, m ? m + q0 : nullptr, lsum);
        else prep_value_generic(c, block, pb0, p_stride, nq, prep[i], zacc, pmin);
      }
      if (block_max)
        for (int iq = 0; iq < nq; ++iq)
          for (int i = 0; i < nb; ++i) block_max[(size_t)(q0 + iq) * bm_stride + b0 + i] = prep[i].pmax[iq];
      // Tiles of 32 channels (32-aligned): always inside one value group (gv is 32, 64 or d < g).
      // Each tile's pass requests its share of the next batch's blocks (whole lines).
      const int n_tiles = (nchunks + 1) / 2;
      const int nx = b0 + nb;  // the next batch
      const bool ahead = q0 == 0 && nx < n_blocks;
      for (int ch0 = 0; ch0 < nchunks; ch0 += 2) {
        const int nch = std::min(2, nchunks - ch0), tile = ch0 / 2;
        const bool tail = r > 0 && ch0 + nch == nchunks;
        const size_t lines = (vb + 63) / 64, l0 = lines * tile / n_tiles, l1 = lines * (tile + 1) / n_tiles;
        BlockPrefetch pf;
        if (ahead) pf = {values.block(nx, vb), vb, 64 * l0, 64 * (l1 - l0), std::min(nb, batch_len(nx))};
        pick_values_fn(c.bits, nch, tail, nq)(mem + (size_t)b0 * vb + 8 * (size_t)ch0, vb, prep, nb,
                                              (16 * ch0) / gv * g, R, c.pb, n_quads, 4 * r, facc + 16 * ch0, pf);
      }
    }
    SPC_CHECK(!(hmin(pmin) < 0.0f), "low-bit values: weights must be >= 0, got %g", (double)hmin(pmin));
    if (fused)
      for (int iq = 0; iq < nq; ++iq) l[q0 + iq] = hsum(lsum[iq]);
    for (int iq = 0; iq < nq; ++iq) {
      float zs[kMaxGroups];
      for (int gi = 0; gi < ng; ++gi) zs[gi] = hsum(_mm512_load_ps(zacc + (iq * kMaxGroups + gi) * 16));
      float* o = out + (size_t)(q0 + iq) * out_stride;
      for (int mc = 0; mc < nchunks; ++mc) {  // a 16-channel chunk lies in one value group
        const int n = std::min(16, d - 16 * mc);
        const __mmask16 mk = n >= 16 ? kAll16 : (__mmask16)((1u << n) - 1u);
        const __m512 f =
            _mm512_add_ps(_mm512_load_ps(facc + iq * kMaxDim + 16 * mc), _mm512_set1_ps(zs[16 * mc / gv]));
        _mm512_mask_storeu_ps(o + 16 * mc, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o + 16 * mc), f));
      }
    }
  }
}

}  // namespace

void accumulate_values_avx512(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride) {
  // (p is only read when m is null.)
  values_impl(spec, values, n_blocks, const_cast<float*>(p), n_q, p_stride, out, out_stride, nullptr, nullptr, nullptr,
              0);
}

void softmax_values_avx512(const LowBitSpec& spec, BlockMem values, int n_blocks, float* s, int n_q,
                           size_t s_stride, const float* m, float* l, float* out, size_t out_stride, float* block_max,
                           size_t bm_stride) {
  SPC_ASSERT(spec.value_ngroups() == 1);  // the exponentials live in the fast weight preparation
  values_impl(spec, values, n_blocks, s, n_q, s_stride, out, out_stride, m, l, block_max, bm_stride);
}

}  // namespace spc::lowbit_detail

#endif  // SPC_LOWBIT_AVX512
