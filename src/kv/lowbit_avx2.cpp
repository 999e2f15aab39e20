// AVX2 (+ FMA, F16C) packed kernels of the low-bit KV codec, for machines without AVX-512; layouts,
// the integer method and its error bound in lowbit.h. The same quantized operands as the scalar
// and AVX-512 paths (the same float operations, rne rounding) and exact integer dot products, so
// all paths agree to fp32 rounding.
//
// Without vpdpbusd the 8-bit products go through vpmaddubsw (u8 x s8 -> saturating int16 pair
// sums) with int16 accumulators, so every operand is chosen to keep the sums far from 32767:
//
// Keys: per block and row the int16 products w_c = qq_c*sq_c (|w| <= 127*255) are split into two
//   signed bytes, w = 256*hi + lo (hi = (w + 128) >> 8 in [-127, 127], lo in [-128, 127]); the
//   unsigned operand is the plain code (0 .. 3). Per channel quad and 8 tokens one 32-bit half of
//   a code word becomes 32 code bytes (dword lane t = token t, byte k = channel 4u+k; shared by
//   the rows) and each row does vpmaddubsw with its broadcast lo and hi dwords into two int16
//   accumulators. Pair sums are <= 2*3*128 = 768 (2 bits; 256 for 1 bit), so up to 42 (127)
//   quads accumulate before a vpmaddwd widens them: sum = madd(lo, 1) + madd(hi, 256).
// Values: the u8 weights uq (per row, 4 tokens per dword, broadcast) times the plain codes
//   0 .. 3 as signed bytes (lane c = channel, byte k = token 4i+k); pair sums <= 2*255*3 = 1530,
//   so a block's <= 16 token quads accumulate in int16. The centred sum of lowbit.h follows as
//   sum_t uq_t*(2*code - maxc) = 2*S - maxc*U, U = sum_t uq_t of the block, row and value group.
//
// A code half expands with one broadcast, vpshufb (byte i <- byte i/8), an and with the bit of
// the byte and a min with 1 (2 bits: the two planes, b0 + 2*b1).
//
// With AVX-VNNI (Intel cores since Alder Lake; -mavxvnni or -march=native there) the same
// integers come from the VEX-encoded 256-bit vpdpbusd, as in the AVX-512 kernels: keys take the
// code bytes as code * sq (a compare and an and per half, shared by the rows) against each row's
// int8 query dword, values the u8 weights against the plain codes, both into int32 accumulators
// (no split operands, no widening): the score kernel runs ~1.75x faster.
#include "kv/lowbit.h"

#if defined(SPC_LOWBIT_AVX2)
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

#define SPC_AI __attribute__((always_inline))
// unroll<N>(f): util/unroll.h.

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
// n <= 8 bytes, little-endian.
inline uint64_t load_bytes(const uint8_t* p, size_t n) {
  uint64_t w = 0;
  for (size_t i = 0; i < n; ++i) w |= (uint64_t)p[i] << (8 * i);
  return w;
}

// Bits r*t+k (t < 16, k < r) of w moved to 4t+k.
inline uint64_t spread_nibbles(uint64_t w, int r) {
  uint64_t out = 0;
  for (int t = 0; t < 16; ++t) out |= ((w >> (r * t)) & ((1ull << r) - 1)) << (4 * t);
  return out;
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(x);
}

// n (<= 8) fp16 at p as floats, the other lanes 0; reads only n elements.
inline __m256 load_f16(const uint8_t* p, int n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  alignas(16) uint16_t tmp[8] = {};
  if (n > 0) std::memcpy(tmp, p, 2 * (size_t)n);
  return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tmp));
}

// 4 int32 vectors (values within 0..255) -> 32 bytes a[0..7], b[0..7], c[0..7], d[0..7].
inline __m256i pack_u8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i x = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  return _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
// 2 int32 vectors -> 16 int16 a[0..7], b[0..7].
inline __m256i pack_i16(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
}
// 2 int16 vectors (values within -128..127) -> 32 bytes a[0..15], b[0..15].
inline __m256i pack_i8(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), _MM_SHUFFLE(3, 1, 2, 0));
}

// The 32 bits of one code half as 32 bytes 0/1 (byte i = bit i).
SPC_AI inline __m256i expand_bits(const uint8_t* p) {
  const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                       3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
  const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32((int)load_u32(p)), idx);
  return _mm256_min_epu8(_mm256_and_si256(x, bit), _mm256_set1_epi8(1));
}
SPC_AI inline __m256i expand_bits_masked(const uint8_t* p, uint32_t mask) {
  const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                       3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
  const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(load_u32(p) & mask)), idx);
  return _mm256_min_epu8(_mm256_and_si256(x, bit), _mm256_set1_epi8(1));
}
// The codes 0 .. 2^BITS - 1 of a half (plane 0 at p, plane 1 at p + plane_bytes).
template <int BITS, bool MASK = false>
SPC_AI inline __m256i code_bytes(const uint8_t* p, size_t plane_bytes, uint32_t mask = ~0u) {
  const auto ex = [&](const uint8_t* a) SPC_AI { return MASK ? expand_bits_masked(a, mask) : expand_bits(a); };
  if constexpr (BITS == 1) {
    (void)plane_bytes;
    return ex(p);
  } else {
    const __m256i b1 = ex(p + plane_bytes);
    return _mm256_add_epi8(ex(p), _mm256_add_epi8(b1, b1));
  }
}

// acc[r] += vpmaddubsw(u8, s8) for r < TR, with the dword at w broadcast as the u8 operand
// (W_UNSIGNED: values, the codes signed) or the s8 operand (keys, the codes unsigned). In one asm
// block: GCC 12 otherwise hoists all the rows' broadcasts to the top of the loop and spills the
// accumulators; here each broadcast lives only inside its block.
template <int TR, bool W_UNSIGNED>
SPC_AI inline void bcast_maddubs_acc(__m256i* acc, const __m256i* code, const uint32_t* w) {
#if defined(__GNUC__)
  // AT&T operand order: vpmaddubsw s8, u8, dst.
  __m256i wv, t;
  if constexpr (TR == 1) {
    if constexpr (W_UNSIGNED)
      asm("vpbroadcastd %2, %1\n\tvpmaddubsw %3, %1, %1\n\tvpaddw %1, %0, %0"
          : "+x"(acc[0]), "=&x"(wv)
          : "m"(*w), "x"(code[0]));
    else
      asm("vpbroadcastd %2, %1\n\tvpmaddubsw %1, %3, %1\n\tvpaddw %1, %0, %0"
          : "+x"(acc[0]), "=&x"(wv)
          : "m"(*w), "x"(code[0]));
    (void)t;
  } else {
    static_assert(TR == 2);
    if constexpr (W_UNSIGNED)
      asm("vpbroadcastd %4, %2\n\tvpmaddubsw %5, %2, %3\n\tvpaddw %3, %0, %0\n\t"
          "vpmaddubsw %6, %2, %3\n\tvpaddw %3, %1, %1"
          : "+x"(acc[0]), "+x"(acc[1]), "=&x"(wv), "=&x"(t)
          : "m"(*w), "x"(code[0]), "x"(code[1]));
    else
      asm("vpbroadcastd %4, %2\n\tvpmaddubsw %2, %5, %3\n\tvpaddw %3, %0, %0\n\t"
          "vpmaddubsw %2, %6, %3\n\tvpaddw %3, %1, %1"
          : "+x"(acc[0]), "+x"(acc[1]), "=&x"(wv), "=&x"(t)
          : "m"(*w), "x"(code[0]), "x"(code[1]));
  }
#else
  const __m256i wv = _mm256_set1_epi32((int)*w);
  for (int r = 0; r < TR; ++r)
    acc[r] = _mm256_add_epi16(acc[r], W_UNSIGNED ? _mm256_maddubs_epi16(wv, code[r]) : _mm256_maddubs_epi16(code[r], wv));
#endif
}

// The block kPrefetchBlocks ahead into L1 (bytes bytes from p): its scales are read first and a
// cold block otherwise stalls prep on them.
constexpr int kPrefetchBlocks = 2;

// ---- keys ----

struct KeyCtx {
  int d, g, bits, J, nq4, r, nquads, d16;  // d16: d rounded up to 16
  size_t bb, pb;
  float h, lim;
  float dcoef;  // debias/24: the debias term dcoef * sum_c q_c^2 s_c^2 comes off qz (0: none)
};

// The rows' int16 queries (once per call and row tile).
struct KeyRows {
  alignas(32) int16_t qq[kMaxNq][kMaxDim];  // rne(q * 127/qmax), 0 beyond d
  alignas(32) float q[kMaxNq][kMaxDim];     // the rows, 0 beyond d
  float aq[kMaxNq];                          // qmax/127
#if defined(__AVXVNNI__)
  alignas(32) uint32_t qq8[kMaxNq][kMaxQuads];  // qq as int8x4 per quad (the vpdpbusd form)
#endif
};

struct KeyPrep {
#if defined(__AVXVNNI__)
  alignas(32) uint32_t sq[kMaxQuads];   // u8 key scales, 4 per quad (the vpdpbusd form), 0 beyond d
  alignas(32) uint32_t sq2[kMaxQuads];  // 2*sq (2 bits)
#else
  alignas(32) uint32_t lo[kMaxNq][kMaxQuads];  // int8x4 per (row, quad): w = qq*sq = 256*hi + lo
  alignas(32) uint32_t hi[kMaxNq][kMaxQuads];
#endif
  float A[kMaxNq], qz[kMaxNq];
  const uint8_t* words;  // plane 0's code words [nquads][J]
  size_t plane_bytes;
};

void prep_key_rows(const KeyCtx& k, const float* q, size_t q_stride, int nq, KeyRows& kr) {
  const int d = k.d;
  for (int iq = 0; iq < nq; ++iq) {
    const float* qr = q + (size_t)iq * q_stride;
    float* qp = kr.q[iq];
    std::memcpy(qp, qr, sizeof(float) * (size_t)d);
    std::fill(qp + d, qp + k.d16, 0.0f);
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 m = _mm256_setzero_ps();
    for (int c = 0; c < k.d16; c += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_load_ps(qp + c), absm));
    const float qmax = hmax8(m);
    const __m256 inv = _mm256_set1_ps(qmax > 0.0f ? 127.0f / qmax : 0.0f);
    kr.aq[iq] = qmax / 127.0f;
    for (int c = 0; c < k.d16; c += 16) {
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(qp + c), inv));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(qp + c + 8), inv));
      _mm256_store_si256((__m256i*)(kr.qq[iq] + c), pack_i16(a, b));
    }
#if defined(__AVXVNNI__)
    int8_t* q8 = (int8_t*)kr.qq8[iq];
    for (int c = 0; c < 4 * k.nquads; ++c) q8[c] = (int8_t)kr.qq[iq][c];  // (|qq| <= 127; 0 beyond d)
#endif
  }
}

// One key block: u8 scales sq_c = rne(s_c * lim/smax), as = smax/lim; per row the split products
// lo/hi of w_c = qq_c*sq_c (with AVX-VNNI: the scales as bytes instead, shared by the rows),
// A = aq*as and qz = sum_c q_c*(z_c + h*s_c) - h*A*sum_c w_c, less the debias term
// dcoef * sum_c q_c^2 s_c^2 where k.dcoef > 0.
// padded: room for bits*nquads*J words, used when d % 4 != 0.
void prep_key_block(const KeyCtx& k, const uint8_t* block, const KeyRows& kr, int nq, KeyPrep& kp,
                    uint8_t* padded) {
  const int d = k.d, d16 = k.d16;
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
  const __m256 hv = _mm256_set1_ps(k.h);
  alignas(32) float s[kMaxDim], zc[kMaxDim];
  __m256 sm = _mm256_setzero_ps();
  for (int c = 0; c < d16; c += 8) {  // lanes beyond d: s = z = 0
    const int n = std::min(8, d - c);
    const __m256 sv = load_f16(sp + 2 * c, n);
    _mm256_store_ps(s + c, sv);
    _mm256_store_ps(zc + c, _mm256_fmadd_ps(sv, hv, load_f16(zp + 2 * c, n)));
    sm = _mm256_max_ps(sm, sv);
  }
  const float smax = hmax8(sm);
  const __m256 invs = _mm256_set1_ps(smax > 0.0f ? k.lim / smax : 0.0f);
  const float as = smax / k.lim;
  alignas(32) int16_t sq[kMaxDim];
  for (int c = 0; c < d16; c += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(s + c), invs));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(s + c + 8), invs));
    const __m256i v = pack_i16(a, b);
    _mm256_store_si256((__m256i*)(sq + c), v);
#if defined(__AVXVNNI__)
    // The same scales as bytes, 4 per quad (<= 255; 2 bits: <= 85, doubled <= 170; 0 beyond d).
    const __m128i u8 = _mm_packus_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_store_si128((__m128i*)((uint8_t*)kp.sq + c), u8);
    if (k.bits == 2) _mm_store_si128((__m128i*)((uint8_t*)kp.sq2 + c), _mm_add_epi8(u8, u8));
#endif
  }
  const __m256i ones16 = _mm256_set1_epi16(1), r128 = _mm256_set1_epi16(128);
  for (int iq = 0; iq < nq; ++iq) {
    __m256 tz = _mm256_setzero_ps(), tz1 = _mm256_setzero_ps();  // two chains (d16 % 16 == 0)
    for (int c = 0; c < d16; c += 16) {
      tz = _mm256_fmadd_ps(_mm256_load_ps(kr.q[iq] + c), _mm256_load_ps(zc + c), tz);
      tz1 = _mm256_fmadd_ps(_mm256_load_ps(kr.q[iq] + c + 8), _mm256_load_ps(zc + c + 8), tz1);
    }
    tz = _mm256_add_ps(tz, tz1);
    if (k.dcoef > 0.0f) {  // (lanes beyond d: q = s = 0)
      __m256 tb = _mm256_setzero_ps(), tb1 = _mm256_setzero_ps();
      for (int c = 0; c < d16; c += 16) {
        const __m256 q0 = _mm256_load_ps(kr.q[iq] + c), q1 = _mm256_load_ps(kr.q[iq] + c + 8);
        const __m256 s0 = _mm256_load_ps(s + c), s1 = _mm256_load_ps(s + c + 8);
        tb = _mm256_fmadd_ps(_mm256_mul_ps(q0, q0), _mm256_mul_ps(s0, s0), tb);
        tb1 = _mm256_fmadd_ps(_mm256_mul_ps(q1, q1), _mm256_mul_ps(s1, s1), tb1);
      }
      tz = _mm256_fnmadd_ps(_mm256_add_ps(tb, tb1), _mm256_set1_ps(k.dcoef), tz);
    }
    __m256i wsum = _mm256_setzero_si256();
#if defined(__AVXVNNI__)
    (void)r128;
    for (int c = 0; c < d16; c += 16)  // sum_c w_c only: the dot products take qq and sq apart
      wsum = _mm256_add_epi32(wsum, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)(kr.qq[iq] + c)),
                                                      _mm256_load_si256((const __m256i*)(sq + c))));
    (void)ones16;
#else
    uint32_t* lo = kp.lo[iq];
    uint32_t* hi = kp.hi[iq];
    for (int c = 0; c < d16; c += 32) {
      __m256i l[2], h[2];
      for (int i = 0; i < 2; ++i) {
        if (c + 16 * i < d16) {
          const __m256i w = _mm256_mullo_epi16(_mm256_load_si256((const __m256i*)(kr.qq[iq] + c + 16 * i)),
                                               _mm256_load_si256((const __m256i*)(sq + c + 16 * i)));
          wsum = _mm256_add_epi32(wsum, _mm256_madd_epi16(w, ones16));
          h[i] = _mm256_srai_epi16(_mm256_add_epi16(w, r128), 8);
          l[i] = _mm256_sub_epi16(w, _mm256_slli_epi16(h[i], 8));
        } else {
          l[i] = h[i] = _mm256_setzero_si256();
        }
      }
      _mm256_store_si256((__m256i*)(lo + c / 4), pack_i8(l[0], l[1]));
      _mm256_store_si256((__m256i*)(hi + c / 4), pack_i8(h[0], h[1]));
    }
#endif
    kp.A[iq] = kr.aq[iq] * as;
    kp.qz[iq] = hsum8(tz) - k.h * kp.A[iq] * (float)hsum_epi32(wsum);
  }
}

// Integer scores of TR halves (8 tokens each) of one chunk for NQ rows over quads [u0, u1):
// words = plane 0's word of quad 0 at the tile's first half, quads quad_stride bytes apart.
// isum[iq*8*TR + t] (+)= sum_c w_c * code_ct (add: accumulate). u1 - u0 <= kKeyQuadGroup(BITS):
// the int16 accumulators cannot overflow.
template <int BITS>
constexpr int kKeyQuadGroup = BITS == 1 ? 64 : 40;  // pair sums <= 256 (768) per quad

#if defined(__AVXVNNI__)
// The same integer scores with AVX-VNNI (the AVX-512 kernel's form at 256 bits): per channel quad
// and 8 tokens the code bytes become code * sq (u8: <= 255), shared by the rows, and each row does
// one vpdpbusd with its int8 query dword broadcast into int32 accumulators (no splits, no
// widening; u1 - u0 is not limited).
template <int BITS>
SPC_AI inline __m256i code_sq_bytes(const uint8_t* p, size_t plane_bytes, __m256i sq, __m256i sq2) {
  const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                       3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
  auto mask = [&](const uint8_t* a) SPC_AI {  // 0xFF where the code bit is set
    const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32((int)load_u32(a)), idx);
    return _mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit);
  };
  __m256i c = _mm256_and_si256(mask(p), sq);
  if constexpr (BITS == 2) c = _mm256_add_epi8(c, _mm256_and_si256(mask(p + plane_bytes), sq2));
  (void)plane_bytes;
  (void)sq2;
  return c;
}

template <int BITS, int NQ, int TR>
void key_tile(const uint8_t* words, int u0, int u1, size_t quad_stride, size_t plane_bytes, const KeyPrep& kp,
              const KeyRows& kr, int32_t* isum, bool add) {
  __m256i acc[NQ][TR];
  unroll<NQ>([&](auto iq) SPC_AI { unroll<TR>([&](auto r) SPC_AI { acc[iq][r] = _mm256_setzero_si256(); }); });
  const uint8_t* wp = words + (size_t)u0 * quad_stride;
  for (int u = u0; u < u1; ++u, wp += quad_stride) {
    const __m256i sq = _mm256_set1_epi32((int)kp.sq[u]);
    const __m256i sq2 = BITS == 2 ? _mm256_set1_epi32((int)kp.sq2[u]) : sq;
    __m256i code[TR];
    unroll<TR>([&](auto r) SPC_AI { code[r] = code_sq_bytes<BITS>(wp + 4 * r, plane_bytes, sq, sq2); });
    unroll<NQ>([&](auto iq) SPC_AI {
      const __m256i qv = _mm256_set1_epi32((int)kr.qq8[iq][u]);
      unroll<TR>([&](auto r) SPC_AI { acc[iq][r] = _mm256_dpbusd_avx_epi32(acc[iq][r], code[r], qv); });
    });
  }
  unroll<NQ>([&](auto iq) SPC_AI {
    unroll<TR>([&](auto r) SPC_AI {
      __m256i v = acc[iq][r];
      __m256i* dst = (__m256i*)(isum + (iq * TR + r) * 8);
      if (add) v = _mm256_add_epi32(v, _mm256_load_si256(dst));
      _mm256_store_si256(dst, v);
    });
  });
}
#else
template <int BITS, int NQ, int TR>
void key_tile(const uint8_t* words, int u0, int u1, size_t quad_stride, size_t plane_bytes, const KeyPrep& kp,
              const KeyRows& kr, int32_t* isum, bool add) {
  (void)kr;
  __m256i alo[NQ][TR], ahi[NQ][TR];
  unroll<NQ>([&](auto iq) SPC_AI {
    unroll<TR>([&](auto r) SPC_AI { alo[iq][r] = ahi[iq][r] = _mm256_setzero_si256(); });
  });
  const uint8_t* wp = words + (size_t)u0 * quad_stride;
  for (int u = u0; u < u1; ++u, wp += quad_stride) {
    __m256i code[TR];
    unroll<TR>([&](auto r) SPC_AI { code[r] = code_bytes<BITS>(wp + 4 * r, plane_bytes); });
    unroll<NQ>([&](auto iq) SPC_AI {
      bcast_maddubs_acc<TR, false>(alo[iq], code, &kp.lo[iq][u]);
      bcast_maddubs_acc<TR, false>(ahi[iq], code, &kp.hi[iq][u]);
    });
  }
  const __m256i ones16 = _mm256_set1_epi16(1), k256 = _mm256_set1_epi16(256);
  unroll<NQ>([&](auto iq) SPC_AI {
    unroll<TR>([&](auto r) SPC_AI {
      __m256i v = _mm256_add_epi32(_mm256_madd_epi16(alo[iq][r], ones16), _mm256_madd_epi16(ahi[iq][r], k256));
      __m256i* dst = (__m256i*)(isum + (iq * TR + r) * 8);
      if (add) v = _mm256_add_epi32(v, _mm256_load_si256(dst));
      _mm256_store_si256(dst, v);
    });
  });
}
#endif

using KeyTileFn = void (*)(const uint8_t*, int, int, size_t, size_t, const KeyPrep&, const KeyRows&, int32_t*, bool);

// Halves per tile: both halves of a chunk for up to 3 rows (1 bit) or 2 rows (2 bits: the second
// plane's expansion needs a register more), else one: <= 12 int16 accumulators (two per row and
// half), no spills. AVX-VNNI needs one int32 accumulator per row and half: both halves for up to
// 6 rows at 1 bit and 3 at 2 bits. A row's sums then run as two independent vpdpbusd chains
// instead of one 16-quad chain whose latency bounded the tile: BM_LowBitScore 1 bit 6 rows
// 38.3-40.5 -> 34.9-35.2 us, 2 bits 3 rows 33.6-46.9 -> 27.4-27.8 us (2 bits 6 rows: no gain).
#if defined(__AVXVNNI__)
inline int key_halves_per_tile(int bits, int nq) { return nq <= (bits == 1 ? 6 : 3) ? 2 : 1; }
#else
inline int key_halves_per_tile(int bits, int nq) { return nq <= (bits == 1 ? 3 : 2) ? 2 : 1; }
#endif

template <int BITS>
KeyTileFn key_tile_b(int nq) {
  if (key_halves_per_tile(BITS, nq) == 1) {
    switch (nq) {
      case 1: return key_tile<BITS, 1, 1>;
      case 2: return key_tile<BITS, 2, 1>;
      case 3: return key_tile<BITS, 3, 1>;
      case 4: return key_tile<BITS, 4, 1>;
      case 5: return key_tile<BITS, 5, 1>;
      default: return key_tile<BITS, 6, 1>;
    }
  }
  switch (nq) {
    case 1: return key_tile<BITS, 1, 2>;
    case 2: return key_tile<BITS, 2, 2>;
#if defined(__AVXVNNI__)
    case 3: return key_tile<BITS, 3, 2>;
    case 4: return key_tile<BITS, 4, 2>;
    case 5: return key_tile<BITS, 5, 2>;
    default: return key_tile<BITS, 6, 2>;
#else
    default: return key_tile<BITS, 3, 2>;
#endif
  }
}

KeyTileFn pick_key_tile(int bits, int nq) { return bits == 1 ? key_tile_b<1>(nq) : key_tile_b<2>(nq); }

// ---- values ----

struct ValCtx {
  int d, g, bits, gv, ng, J;
  size_t pb;
  float h;
};

struct ValPrep {
  alignas(32) uint8_t w[kMaxNq][kWRow];  // u8 weights [row][group*g + t]
  int32_t mU[kMaxNq][kMaxGroups];         // maxc * sum_t uq_t per (row, group)
  float half_b[kMaxNq];                   // b/2 per row
};

// Lane i of the result: the maximum of v[i]'s 8 lanes, for i < n <= 8 (the other lanes hold
// maxima of rows below n, to be ignored). Exact (max neither rounds nor depends on the order),
// and one short tree for all rows instead of a horizontal reduction per row.
inline __m256 rows_max8(const __m256* v, int n) {
  const auto at = [&](int i) { return v[i < n ? i : 0]; };
  auto pair = [](__m256 a, __m256 b) { return _mm256_max_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)); };
  auto quad = [&](int i) {  // lanes per 128-bit half: rows i..i+3
    const __m256 x = pair(at(i), at(i + 1)), y = pair(at(i + 2), at(i + 3));
    return _mm256_max_ps(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  };
  const __m256 lo = quad(0), hi = n > 4 ? quad(4) : lo;
  return _mm256_max_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
// The same for int32 sums (exact in any order).
inline __m256i rows_sum8(const __m256i* v, int n) {
  const __m256i z = _mm256_setzero_si256();
  const auto at = [&](int i) { return i < n ? v[i] : z; };
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(at(0), at(1)), _mm256_hadd_epi32(at(2), at(3)));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(at(4), at(5)), _mm256_hadd_epi32(at(6), at(7)));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// Weights of rows p[0..nq) (p_stride apart, at the block's first token) for one value block; adds
// the zero terms p*(z + h*s) to zacc ([row][kMaxGroups] x 8 lanes) and folds p into pmin.
// EXP: p holds the rows' scores; the weights are the softmax numerators exp_fast(p - m[iq]),
// written back over the scores (the values vec_exp_fast_shift_sum writes) and added lane-wise to
// lsum[iq]; bmax[iq] = the block's largest numerator of row iq (pmin is not needed: exp >= 0).
// The per-row maxima, scales and code sums are reduced for all rows at once (rows_max8,
// rows_sum8): one horizontal reduction and scalar division per row and block left the core
// waiting on their latency.
template <bool EXP>
void prep_value_block(const ValCtx& c, const uint8_t* block, float* p, size_t p_stride, int nq, ValPrep& vp,
                      __m256* zacc, __m256& pmin, const float* m = nullptr, __m256* lsum = nullptr,
                      float* bmax = nullptr) {
  const int g = c.g, ng = c.ng, n8 = g / 8, maxc = (1 << c.bits) - 1;
  const uint8_t* sp = block + (size_t)c.bits * c.pb;
  const uint8_t* zp = sp + 2 * (size_t)ng * g;
  const __m256 hv = _mm256_set1_ps(c.h);
  alignas(32) float s[kMaxGroups * 64], zc[kMaxGroups * 64];  // [group][t]
  for (int i = 0; i < ng * n8; ++i) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + 16 * i)));
    _mm256_store_ps(s + 8 * i, sv);
    _mm256_store_ps(zc + 8 * i, _mm256_fmadd_ps(sv, hv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zp + 16 * i)))));
  }
  __m256 pm = pmin;
  __m256 mxv[kMaxNq], bmv[kMaxNq];  // per row, lane-wise: max of p*s; EXP: max of the numerators
  for (int iq = 0; iq < nq; ++iq) {
    float* pr = p + (size_t)iq * p_stride;
    __m256* za = zacc + iq * kMaxGroups;
    // Two partial sums per group and two maxima (even / odd j; n8 = g/8 is even): a single
    // chain per row was latency-bound (n8 dependent FMAs per row and block).
    __m256 m0 = _mm256_setzero_ps(), m1 = m0;
    __m256 bm = _mm256_setzero_ps();  // EXP: the block's numerators' maximum, lane-wise
    for (int gi = 0; gi < ng; ++gi) {
      __m256 z0 = _mm256_setzero_ps(), z1 = z0;
      for (int j = 0; j < n8; j += 2) {
        __m256 p0 = _mm256_loadu_ps(pr + 8 * j), p1 = _mm256_loadu_ps(pr + 8 * j + 8);
        if constexpr (EXP) {
          if (gi == 0) {  // (later groups read the numerators stored here)
            const __m256 mv = _mm256_set1_ps(m[iq]);
            p0 = exp_fast8(_mm256_sub_ps(p0, mv));
            p1 = exp_fast8(_mm256_sub_ps(p1, mv));
            _mm256_storeu_ps(pr + 8 * j, p0);
            _mm256_storeu_ps(pr + 8 * j + 8, p1);
            lsum[iq] = _mm256_add_ps(lsum[iq], _mm256_add_ps(p0, p1));
            bm = _mm256_max_ps(bm, _mm256_max_ps(p0, p1));
          }
        } else if (gi == 0) {
          pm = _mm256_min_ps(p1, _mm256_min_ps(p0, pm));  // a NaN in p keeps pm
        }
        m0 = _mm256_max_ps(m0, _mm256_mul_ps(p0, _mm256_load_ps(s + gi * g + 8 * j)));
        m1 = _mm256_max_ps(m1, _mm256_mul_ps(p1, _mm256_load_ps(s + gi * g + 8 * j + 8)));
        z0 = _mm256_fmadd_ps(p0, _mm256_load_ps(zc + gi * g + 8 * j), z0);
        z1 = _mm256_fmadd_ps(p1, _mm256_load_ps(zc + gi * g + 8 * j + 8), z1);
      }
      za[gi] = _mm256_add_ps(za[gi], _mm256_add_ps(z0, z1));
    }
    mxv[iq] = _mm256_max_ps(m0, m1);
    bmv[iq] = bm;
  }
  pmin = pm;
  // Lane iq: row iq's largest p*s, its inverse step 255/mx (0 where mx is not positive) and b/2.
  alignas(32) float inv[8], half_b[8];
  {
    const __m256 mx = rows_max8(mxv, nq);
    const __m256 k255 = _mm256_set1_ps(255.0f);
    const __m256 pos = _mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_GT_OQ);
    _mm256_store_ps(inv, _mm256_and_ps(pos, _mm256_div_ps(k255, mx)));
    _mm256_store_ps(half_b, _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_div_ps(mx, k255)));
    if constexpr (EXP) {
      alignas(32) float bx[8];
      _mm256_store_ps(bx, rows_max8(bmv, nq));
      for (int iq = 0; iq < nq; ++iq) bmax[iq] = bx[iq];
    }
  }
  __m256i usum[kMaxGroups][kMaxNq];
  for (int iq = 0; iq < nq; ++iq) {
    const float* pr = p + (size_t)iq * p_stride;
    vp.half_b[iq] = half_b[iq];
    const __m256 iv = _mm256_set1_ps(inv[iq]);
    for (int gi = 0; gi < ng; ++gi) {
      __m256i us = _mm256_setzero_si256();
      for (int j0 = 0; j0 < n8; j0 += 4) {
        __m256i ui[4];
        for (int i = 0; i < 4; ++i) {
          const int j = j0 + i;
          const __m256 u = _mm256_mul_ps(_mm256_loadu_ps(pr + 8 * j), _mm256_load_ps(s + gi * g + 8 * j));
          ui[i] = _mm256_cvtps_epi32(_mm256_mul_ps(u, iv));
          us = _mm256_add_epi32(us, ui[i]);
        }
        _mm256_store_si256((__m256i*)(vp.w[iq] + gi * g + 8 * j0), pack_u8(ui[0], ui[1], ui[2], ui[3]));
      }
      usum[gi][iq] = us;
    }
  }
  for (int gi = 0; gi < ng; ++gi) {
    alignas(32) int32_t u[8];
    _mm256_store_si256((__m256i*)u, rows_sum8(usum[gi], nq));
    for (int iq = 0; iq < nq; ++iq) vp.mU[iq][gi] = maxc * u[iq];
  }
}

// TR halves (8 channels each) of one 16-channel chunk, inside one value group, of one block for
// NQ rows. rec: plane 0's first record at the tile's first half; MASK: the halves' code bits are
// masked by mask[] (the compact tail chunk). w: the group's u8 weights of row 0 (row iq at
// + iq*kWRow); mU: maxc*U of the group, row 0 (row iq at + iq*kMaxGroups). Adds half_b * sums to
// facc ([NQ][kMaxDim], at the tile's first channel).
template <int BITS, int NQ, int TR, bool MASK>
void value_tile(const uint8_t* rec, size_t rec_bytes, size_t plane_bytes, int n_quads, const uint32_t* mask,
                const uint8_t* w, const int32_t* mU, const float* half_b, float* facc) {
  __m256i acc[NQ][TR];
  unroll<NQ>([&](auto iq) SPC_AI { unroll<TR>([&](auto r) SPC_AI { acc[iq][r] = _mm256_setzero_si256(); }); });
  for (int i = 0; i < n_quads; ++i, rec += rec_bytes) {
    // The tail field is followed by the next record or the block's scales: reading 4 bytes
    // at the second half stays inside the block.
    __m256i code[TR];
    unroll<TR>([&](auto r) SPC_AI {
      if constexpr (MASK) code[r] = code_bytes<BITS, true>(rec + 4 * r, plane_bytes, mask[r]);
      else code[r] = code_bytes<BITS>(rec + 4 * r, plane_bytes);
    });
    unroll<NQ>([&](auto iq) SPC_AI {
#if defined(__AVXVNNI__)  // int32 sums straight from vpdpbusd (u8 weights x codes as s8)
      const __m256i wv = _mm256_set1_epi32((int)load_u32(w + iq * kWRow + 4 * i));
      unroll<TR>([&](auto r) SPC_AI { acc[iq][r] = _mm256_dpbusd_avx_epi32(acc[iq][r], wv, code[r]); });
#else
      bcast_maddubs_acc<TR, true>(acc[iq], code, (const uint32_t*)(w + iq * kWRow + 4 * i));
#endif
    });
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  unroll<NQ>([&](auto iq) SPC_AI {
    const __m256 hb = _mm256_set1_ps(half_b[iq]);
    const __m256i mu = _mm256_set1_epi32(mU[iq * kMaxGroups]);
    unroll<TR>([&](auto r) SPC_AI {
#if defined(__AVXVNNI__)
      (void)ones16;
      const __m256i sum = acc[iq][r];
#else
      const __m256i sum = _mm256_madd_epi16(acc[iq][r], ones16);
#endif
      const __m256i cen = _mm256_sub_epi32(_mm256_add_epi32(sum, sum), mu);  // sum_t uq_t*(2*code - maxc)
      float* f = facc + iq * kMaxDim + 8 * r;
      _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(cen), hb, _mm256_loadu_ps(f)));
    });
  });
}

using ValueFn = void (*)(const uint8_t*, size_t, size_t, int, const uint32_t*, const uint8_t*, const int32_t*,
                         const float*, float*);

template <int BITS, int TR, bool MASK>
ValueFn value_fn_q(int nq) {
  static_assert(TR == 1);
  switch (nq) {
    case 1: return value_tile<BITS, 1, TR, MASK>;
    case 2: return value_tile<BITS, 2, TR, MASK>;
    case 3: return value_tile<BITS, 3, TR, MASK>;
    case 4: return value_tile<BITS, 4, TR, MASK>;
    case 5: return value_tile<BITS, 5, TR, MASK>;
    default: return value_tile<BITS, 6, TR, MASK>;
  }
}

// Both halves of a chunk per tile for up to 3 rows, else one (<= 6 accumulators).
template <int BITS, bool MASK>
ValueFn value_fn_q2(int nq) {
  switch (nq) {
    case 1: return value_tile<BITS, 1, 2, MASK>;
    case 2: return value_tile<BITS, 2, 2, MASK>;
    default: return value_tile<BITS, 3, 2, MASK>;
  }
}

template <int BITS>
ValueFn value_fn_b(int tr, bool mask, int nq) {
  if (tr == 1) return mask ? value_fn_q<BITS, 1, true>(nq) : value_fn_q<BITS, 1, false>(nq);
  return mask ? value_fn_q2<BITS, true>(nq) : value_fn_q2<BITS, false>(nq);
}

ValueFn pick_value_fn(int bits, int tr, bool mask, int nq) {
  return bits == 1 ? value_fn_b<1>(tr, mask, nq) : value_fn_b<2>(tr, mask, nq);
}

}  // namespace

void score_keys_avx2(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                     size_t q_stride, float* scores, size_t score_stride, float debias, float* row_max) {
  spec.validate();
  KeyCtx k;
  k.d = spec.head_dim;
  k.g = spec.group;
  k.bits = spec.bits;
  k.J = k.g / 16;
  k.nq4 = k.d / 4;
  k.r = k.d % 4;
  k.nquads = (k.d + 3) / 4;
  k.d16 = (k.d + 15) / 16 * 16;
  k.bb = spec.key_block_bytes();
  k.pb = spec.key_plane_bytes();
  k.h = 0.5f * (float)((1 << k.bits) - 1);
  k.lim = key_scale_levels(k.bits);
  k.dcoef = debias / 24.0f;
  KeyRows rows;
  KeyPrep prep;
  alignas(32) uint8_t padded[2 * kMaxQuads * 4 * 8];  // d % 4 != 0
  alignas(32) int32_t isum[kMaxNq * 16];
  for (int q0 = 0; q0 < n_q; q0 += kMaxNq) {
    const int nq = std::min(kMaxNq, n_q - q0);
    prep_key_rows(k, q + (size_t)q0 * q_stride, q_stride, nq, rows);
    const int tr = key_halves_per_tile(k.bits, nq);
    const KeyTileFn fn = pick_key_tile(k.bits, nq);
    const int qg = k.bits == 1 ? kKeyQuadGroup<1> : kKeyQuadGroup<2>;
    __m256 rmax[kMaxNq];  // the rows' running maxima of the written scores, lane-wise
    for (int iq = 0; iq < nq; ++iq) rmax[iq] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int blk = 0; blk < n_blocks; ++blk) {
      if (blk + kPrefetchBlocks < n_blocks) prefetch_bytes(blocks + (size_t)(blk + kPrefetchBlocks) * k.bb, k.bb);
      prep_key_block(k, blocks + (size_t)blk * k.bb, rows, nq, prep, padded);
      for (int j = 0; j < k.J; ++j)
        for (int h0 = 0; h0 < 2; h0 += tr) {
          for (int u0 = 0; u0 < k.nquads; u0 += qg)
            fn(prep.words + 8 * j + 4 * h0, u0, std::min(k.nquads, u0 + qg), (size_t)k.J * 8, prep.plane_bytes, prep,
               rows, isum, u0 > 0);
          const size_t t0 = (size_t)blk * k.g + 16 * j + 8 * h0;
          for (int iq = 0; iq < nq; ++iq) {
            const __m256 av = _mm256_set1_ps(prep.A[iq]), zv = _mm256_set1_ps(prep.qz[iq]);
            float* out = scores + (size_t)(q0 + iq) * score_stride + t0;
            for (int r = 0; r < tr; ++r) {
              const __m256 sc = _mm256_fmadd_ps(
                  _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i*)(isum + (iq * tr + r) * 8))), av, zv);
              _mm256_storeu_ps(out + 8 * r, sc);
              rmax[iq] = _mm256_max_ps(rmax[iq], sc);
            }
          }
        }
    }
    if (row_max)
      for (int iq = 0; iq < nq; ++iq) row_max[q0 + iq] = hmax8(rmax[iq]);
  }
}

namespace {

// accumulate_values_avx2 (m == nullptr) and softmax_values_avx2 (p holds scores; m, l, block_max).
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
  // The compact tail chunk: 4*r code bits, the halves' masks; halves needed.
  const uint64_t tail_mask64 = r > 0 ? (1ull << (4 * r)) - 1 : ~0ull;
  const uint32_t tail_mask[2] = {(uint32_t)tail_mask64, (uint32_t)(tail_mask64 >> 32)};
  const int tail_halves = r == 0 ? 2 : (r + 7) / 8;
  ValPrep prep;
  alignas(32) float facc[kMaxNq * kMaxDim];
  __m256 zacc[kMaxNq * kMaxGroups];

  for (int q0 = 0; q0 < n_q; q0 += kMaxNq) {
    const int nq = std::min(kMaxNq, n_q - q0);
    float* pt = p + (size_t)q0 * p_stride;
    std::fill(facc, facc + nq * kMaxDim, 0.0f);
    for (int i = 0; i < nq * kMaxGroups; ++i) zacc[i] = _mm256_setzero_ps();
    __m256 pmin = _mm256_setzero_ps();
    __m256 lsum[kMaxNq];
    for (int iq = 0; iq < nq; ++iq) lsum[iq] = _mm256_setzero_ps();
    float bmax[kMaxNq];
    const int tr = nq <= 3 ? 2 : 1;
    const ValueFn full = pick_value_fn(c.bits, tr, false, nq);
    for (int blk = 0; blk < n_blocks; ++blk) {
      const uint8_t* block = values.block(blk, vb);
      if (blk + kPrefetchBlocks < n_blocks) prefetch_bytes(values.block(blk + kPrefetchBlocks, vb), vb);
      if (m) {
        prep_value_block<true>(c, block, pt + (size_t)blk * g, p_stride, nq, prep, zacc, pmin, m + q0, lsum, bmax);
        if (block_max)
          for (int iq = 0; iq < nq; ++iq) block_max[(size_t)(q0 + iq) * bm_stride + blk] = bmax[iq];
      } else {
        prep_value_block<false>(c, block, pt + (size_t)blk * g, p_stride, nq, prep, zacc, pmin);
      }
      for (int m = 0; m < nchunks; ++m) {
        const bool tail = r > 0 && m == nchunks - 1;
        const int halves = tail ? tail_halves : 2;
        const int gi = 16 * m / gv;  // a 16-channel chunk lies in one value group
        for (int h0 = 0; h0 < halves; h0 += tr) {
          const int nh = std::min(tr, halves - h0);
          const ValueFn fn = !tail && nh == tr ? full : pick_value_fn(c.bits, nh, tail, nq);
          fn(block + 8 * (size_t)m + 4 * h0, R, c.pb, n_quads, tail_mask + h0, prep.w[0] + gi * g, &prep.mU[0][gi],
             prep.half_b, facc + 16 * m + 8 * h0);
        }
      }
    }
    SPC_CHECK(!(hmin8(pmin) < 0.0f), "low-bit values: weights must be >= 0, got %g", (double)hmin8(pmin));
    if (m)
      for (int iq = 0; iq < nq; ++iq) l[q0 + iq] = hsum8(lsum[iq]);
    for (int iq = 0; iq < nq; ++iq) {
      float zs[kMaxGroups];
      for (int gi = 0; gi < ng; ++gi) zs[gi] = hsum8(zacc[iq * kMaxGroups + gi]);
      float* o = out + (size_t)(q0 + iq) * out_stride;
      const float* f = facc + iq * kMaxDim;
      for (int ch = 0; ch < d; ++ch) o[ch] += f[ch] + zs[ch / gv];
    }
  }
}

}  // namespace

void accumulate_values_avx2(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                            size_t p_stride, float* out, size_t out_stride) {
  // (p is only read when m is null.)
  values_impl(spec, values, n_blocks, const_cast<float*>(p), n_q, p_stride, out, out_stride, nullptr, nullptr, nullptr,
              0);
}

void softmax_values_avx2(const LowBitSpec& spec, BlockMem values, int n_blocks, float* s, int n_q,
                         size_t s_stride, const float* m, float* l, float* out, size_t out_stride, float* block_max,
                         size_t bm_stride) {
  values_impl(spec, values, n_blocks, s, n_q, s_stride, out, out_stride, m, l, block_max, bm_stride);
}

}  // namespace spc::lowbit_detail

#endif  // SPC_LOWBIT_AVX2
