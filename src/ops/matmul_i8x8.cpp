// Int8-activation decode matmuls over a row-interleaved copy of the weights ("i8x8"): 8 rows
// per group, and per 32-element block the 8 rows' scales, constant terms and codes side by side,
// so that one 256-bit vpdpbusd computes 4 elements of all 8 rows at once (lane r = row r) with
// the activations' dword as an embedded broadcast. The row-major kernels (matmul_vnni.cpp) do
// the same multiply-adds one row at a time and pay a conversion, a scale multiply and an FMA per
// block, row and token; here those are shared by 8 rows, so a second token (SpeCache's
// speculative row) costs ~12 operations per block and 8 rows instead of ~32. On plain AVX2 (no
// VNNI) each vpdpbusd becomes a vpmaddubsw whose int16 pair sums add up exactly over the block
// (block_products), the same integers for about twice the operations.
//
// Record of one group and block (R = 8 rows):
//   Q4_0: d[8] fp16 | codes 128 B                (144 B)
//   Q4_1: d[8] fp16 | m[8] fp16 | codes 128 B    (160 B)
//   Q8_0: d[8] fp16 | codes 256 B                (272 B)
// Q4 codes: 4 chunks of 32 bytes; chunk k, dword r = bytes 4k..4k+3 of row r's 16 nibble bytes
// (low nibbles: elements 4k..4k+3, high nibbles: elements 16+4k..16+4k+3). Q8_0 codes: 8 chunks;
// chunk k, dword r = row r's elements 4k..4k+3 as u8 (code + 128). A group's records follow one
// another block by block, and the groups one another: each thread reads one stream.
//
// Result, as the row-major int8 kernels: y = sum_b d_b xd_b P_b + coef * sum_b c_b xs32_b, with
// P_b the integer dot product of the block's codes and int8 activations, c_b = m_b (Q4_1) or d_b,
// coef = 1 (Q4_1), -8 (Q4_0), -128 (Q8_0). Only the order of the float sums differs.
//
// On CPUs with AMX-INT8, many tokens (prefill) go through pair_amx instead: the same integer
// block products from tdpbsud tiles, 16 rows x 16 tokens at a time, and the same epilogue.
#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/matmul.h"
#include "ops/matmul_kernels.h"
#include "util/aligned.h"
#include "util/amx_tiles.h"
#include "util/cpu_features.h"
#include "util/error.h"
#include "util/unroll.h"

namespace spc {

namespace {

struct I8x8Geom {
  size_t src_block;   // bytes of one block of the GGUF type
  size_t rec;         // bytes of one interleaved record (8 rows, one block)
  size_t code_off;    // offset of the codes in the record
  bool has_min;       // Q4_1: m[8] after d[8]
  bool q8;            // Q8_0 codes (else 4-bit)
};

bool geom_of(GgmlType t, I8x8Geom& g) {
  switch (t) {
    case GgmlType::Q4_0: g = {18, 144, 16, false, false}; return true;
    case GgmlType::Q4_1: g = {20, 160, 32, true, false}; return true;
    case GgmlType::Q8_0: g = {34, 272, 16, false, true}; return true;
    default: return false;
  }
}

}  // namespace

size_t i8x8_bytes(const WeightView& w) {
  I8x8Geom g;
  if (mmk::i8x8_for(w.type, 1) == nullptr || !geom_of(w.type, g) || w.n_out % 8 != 0 || w.n_in % 32 != 0 || w.n_out <= 0)
    return 0;
  return (size_t)(w.n_out / 8) * (size_t)(w.n_in / 32) * g.rec;
}

namespace {

// Row r's fields of one 32-element block, between its GGUF block blk and its group's record rec:
// into the record (Pack: blk is only read) or back out of it (rec is only read). The one place
// that knows where a row's scale, minimum and codes sit in a record.
template <bool Pack>
void move_block(const I8x8Geom& g, uint8_t* rec, int r, uint8_t* blk) {
  auto mv = [](uint8_t* in_rec, uint8_t* in_blk, size_t n) {
    if constexpr (Pack) std::memcpy(in_rec, in_blk, n);
    else std::memcpy(in_blk, in_rec, n);
  };
  mv(rec + 2 * r, blk, 2);                          // d
  if (g.has_min) mv(rec + 16 + 2 * r, blk + 2, 2);  // m
  uint8_t* codes = rec + g.code_off;
  uint8_t* qs = blk + (g.has_min ? 4 : 2);
  if (g.q8) {  // int8 codes stored as u8 (code + 128): the same xor both ways
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < 4; ++i) {
        uint8_t& c = codes[32 * k + 4 * r + i];
        uint8_t& q = qs[4 * k + i];
        if constexpr (Pack) c = (uint8_t)(q ^ 0x80);
        else q = (uint8_t)(c ^ 0x80);
      }
  } else {
    for (int k = 0; k < 4; ++k) mv(codes + 32 * k + 4 * r, qs + 4 * k, 4);
  }
}

}  // namespace

void i8x8_repack(const WeightView& w, uint8_t* dst) {
  I8x8Geom g;
  SPC_CHECK(i8x8_bytes(w) > 0 && geom_of(w.type, g), "i8x8_repack: unsupported matrix (type %s, %lld x %lld)",
            type_name(w.type), (long long)w.n_out, (long long)w.n_in);
  const int64_t nb = w.n_in / 32;
  const size_t rs = (size_t)nb * g.src_block;
  uint8_t* src = const_cast<uint8_t*>((const uint8_t*)w.data);  // only read (move_block<true>)
  for (int64_t grp = 0; grp < w.n_out / 8; ++grp)
    for (int64_t b = 0; b < nb; ++b, dst += g.rec)
      for (int r = 0; r < 8; ++r)
        move_block<true>(g, dst, r, src + (size_t)(grp * 8 + r) * rs + (size_t)b * g.src_block);
}

void i8x8_unpack_row(const WeightView& w, int64_t row, uint8_t* dst) {
  I8x8Geom g;
  SPC_CHECK(w.i8x8 != nullptr && geom_of(w.type, g) && row >= 0 && row < w.n_out,
            "i8x8_unpack_row: no interleaved copy of row %lld (type %s, %lld rows)", (long long)row,
            type_name(w.type), (long long)w.n_out);
  const int64_t nb = w.n_in / 32;
  uint8_t* rec = const_cast<uint8_t*>(w.i8x8) + (size_t)(row / 8) * (size_t)nb * g.rec;  // only read
  for (int64_t b = 0; b < nb; ++b, rec += g.rec, dst += g.src_block) move_block<false>(g, rec, (int)(row % 8), dst);
}

namespace mmk {

#if defined(SPC_MM_I8X8)
namespace {

inline __m256 ld_h8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
// The 4 int8 activations at x in every dword lane.
inline __m256i bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// Codes vectors per block: 8 chunks (the layout above); on plain AVX2 the Q8_0 codes are split
// into low and high nibbles, 16 vectors.
#if defined(SPC_MM_I8X8_VNNI)
constexpr int kCodeVecs8 = 8;
#else
constexpr int kCodeVecs8 = 16;
#endif

// The block's codes as cv[] for block_products: chunk k, dword r = 4 elements of row r (k < 4:
// elements 4k.., k >= 4: elements 16+4(k-4)..), as u8. Plain AVX2, Q8_0: cv[k] the low nibbles
// of chunk k's u8 codes, cv[8 + k] the high ones.
template <bool kQ8>
inline void load_codes(const uint8_t* codes, __m256i* cv) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  if constexpr (kQ8) {
    for (int k = 0; k < 8; ++k) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(codes + 32 * k));
#if defined(SPC_MM_I8X8_VNNI)
      cv[k] = v;
#else
      cv[k] = _mm256_and_si256(v, m4);
      cv[8 + k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#endif
    }
  } else {
    for (int k = 0; k < 4; ++k) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(codes + 32 * k));
      cv[k] = _mm256_and_si256(v, m4);
      cv[4 + k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
  }
}

// The 8 rows' integer products P (lane r) of one block's codes cv (load_codes) with one token's
// 32 int8 activations xb: chunk k pairs with activations 4k..4k+3.
template <bool kQ8>
inline __m256i block_products(const __m256i* cv, const int8_t* xb) {
#if defined(SPC_MM_I8X8_VNNI)
  // vpdpbusd with the activations' dword broadcast (AVX-512: its EVEX form, else AVX-VNNI's VEX
  // form; the same integer products). Two independent chains (elements 0..15 and 16..31)
  // shorten the dependency on vpdpbusd.
  __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
  for (int k = 0; k < 4; ++k) {
#if defined(SPC_MM_VNNI)
    p0 = _mm256_dpbusd_epi32(p0, cv[k], bcast4(xb + 4 * k));
    p1 = _mm256_dpbusd_epi32(p1, cv[4 + k], bcast4(xb + 16 + 4 * k));
#else
    p0 = _mm256_dpbusd_avx_epi32(p0, cv[k], bcast4(xb + 4 * k));
    p1 = _mm256_dpbusd_avx_epi32(p1, cv[4 + k], bcast4(xb + 16 + 4 * k));
#endif
  }
  return _mm256_add_epi32(p0, p1);
#else
  // vpmaddubsw: each int16 lane the sum of 2 products of a code (0..15) and an activation
  // (|x| <= 128, quantize_act_row gives <= 127): at most 3840 in magnitude, so the 8 chunks' pair
  // sums of a block (<= 30720) add up in int16 without saturating; one vpmaddwd then sums each
  // row's two pairs. Q8_0's u8 codes (up to 255) would saturate vpmaddubsw: their low and high
  // nibbles go through it separately, P = P_low + 16 P_high. Two chains of 4 chunks each.
  const __m256i ones = _mm256_set1_epi16(1);
  auto nibble_sums = [&](const __m256i* c) {
    __m256i s0 = _mm256_maddubs_epi16(c[0], bcast4(xb));
    __m256i s1 = _mm256_maddubs_epi16(c[1], bcast4(xb + 4));
    for (int k = 2; k < 8; k += 2) {
      s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(c[k], bcast4(xb + 4 * k)));
      s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(c[k + 1], bcast4(xb + 4 * k + 4)));
    }
    return _mm256_add_epi16(s0, s1);
  };
  if constexpr (kQ8) {
    return _mm256_add_epi32(_mm256_madd_epi16(nibble_sums(cv), ones),
                            _mm256_madd_epi16(nibble_sums(cv + 8), _mm256_set1_epi16(16)));
  } else {
    return _mm256_madd_epi16(nibble_sums(cv), ones);
  }
#endif
}

constexpr size_t kPrefetchRecords = 32;

// A record of type TY (the layout above): codes Q8_0 (else 4-bit), a min per row (Q4_1), record
// bytes, the codes' offset, and the coefficient of the constant term.
template <GgmlType TY>
struct Rec {
  static constexpr bool kQ8 = TY == GgmlType::Q8_0, kMin = TY == GgmlType::Q4_1;
  static constexpr size_t kBytes = TY == GgmlType::Q4_0 ? 144 : TY == GgmlType::Q4_1 ? 160 : 272;
  static constexpr size_t kCodes = kMin ? 32 : 16;
  static constexpr float kCoef = TY == GgmlType::Q4_1 ? 1.f : TY == GgmlType::Q4_0 ? -8.f : -128.f;
};

// One group of 8 rows, T tokens: y[t * y_stride + r] for r < 8.
template <GgmlType TY, int T>
void group_kernel(const uint8_t* rec, int64_t nb, const int8_t* xq, const float* xd, const float* xs32, int64_t n_in,
                  float* y, int64_t y_stride) {
  constexpr bool kQ8 = Rec<TY>::kQ8, kMin = Rec<TY>::kMin;
  constexpr size_t kRec = Rec<TY>::kBytes, kCodes = Rec<TY>::kCodes;
  constexpr float kCoef = Rec<TY>::kCoef;
  __m256 acc[T], accm[T];
  for (int t = 0; t < T; ++t) acc[t] = accm[t] = _mm256_setzero_ps();
  // Every line of this sequential stream (the groups of a thread's contiguous share follow one
  // another) requested kPrefetchRecords records ahead, one request per 64 bytes of record (some
  // lines twice). The earlier one or two requests per record, 8 records ahead, left the rest to
  // the hardware streamer. In-process pairs in both session orders, new/old per decode step:
  // specache:1 0.870 / 0.876 at 512 positions, 0.906 / 0.943 at 8K, 0.962 / 0.977 at 32K; full
  // 0.909 / 0.912 at 512, 0.963 / 0.966 at 8K. Tuning at 512 (specache:1): every line 8 records
  // ahead 0.925x, 16 ahead 0.886x, 32 ahead 0.874x and 0.883x, 64 ahead 0.903x.
  constexpr size_t kAhead = kPrefetchRecords * kRec;
  for (int64_t b = 0; b < nb; ++b, rec += kRec) {
    for (size_t o = 0; o < kRec; o += 64) _mm_prefetch((const char*)(rec + kAhead + o), _MM_HINT_T0);
    const __m256 d8 = ld_h8(rec);
    const __m256 c8 = kMin ? ld_h8(rec + 16) : d8;
    __m256i cv[kQ8 ? kCodeVecs8 : 8];
    load_codes<kQ8>(rec + kCodes, cv);
    for (int t = 0; t < T; ++t) {
      const __m256i P = block_products<kQ8>(cv, xq + t * n_in + b * 32);
      const __m256 s = _mm256_mul_ps(d8, _mm256_set1_ps(xd[t * nb + b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), s, acc[t]);
      accm[t] = _mm256_fmadd_ps(c8, _mm256_set1_ps(xs32[t * nb + b]), accm[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    _mm256_storeu_ps(y + t * y_stride, _mm256_fmadd_ps(accm[t], _mm256_set1_ps(kCoef), acc[t]));
}

#if defined(SPC_MM_VNNI)
// The same for two consecutive groups at once (16 rows, rec0 then rec1) in 512-bit registers:
// lanes 0..7 are group rec0's rows, 8..15 group rec1's, so that one vpdpbusd with the tokens'
// dword broadcast over 16 lanes, one nibble split and one fp32 epilogue serve both groups. Per lane
// the same integer block products and fp32 operations in the same order as group_kernel: equal
// bit for bit to two of its passes, in about half the vector operations (a second token, such as
// SpeCache's speculative row, made the 256-bit kernel compute-bound where the weights stream from
// the last-level cache).
inline __m512i join256(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                            _mm256_loadu_si256((const __m256i*)b), 1);
}
inline __m512 join_h8(const uint8_t* a, const uint8_t* b) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a)),
                                                 _mm_loadu_si128((const __m128i*)b), 1));
}
inline __m512i bcast4_16(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

template <GgmlType TY, int T>
void group_pair_kernel(const uint8_t* rec0, const uint8_t* rec1, int64_t nb, const int8_t* xq, const float* xd,
                       const float* xs32, int64_t n_in, float* y, int64_t y_stride) {
  constexpr bool kQ8 = Rec<TY>::kQ8, kMin = Rec<TY>::kMin;
  constexpr size_t kRec = Rec<TY>::kBytes, kCodes = Rec<TY>::kCodes;
  constexpr float kCoef = Rec<TY>::kCoef;
  constexpr size_t kAhead = kPrefetchRecords * kRec;  // as group_kernel, for each of the two streams
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  __m512 acc[T], accm[T];
  for (int t = 0; t < T; ++t) acc[t] = accm[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec0 += kRec, rec1 += kRec) {
    for (size_t o = 0; o < kRec; o += 64) {
      _mm_prefetch((const char*)(rec0 + kAhead + o), _MM_HINT_T0);
      _mm_prefetch((const char*)(rec1 + kAhead + o), _MM_HINT_T0);
    }
    const __m512 d16 = join_h8(rec0, rec1);
    const __m512 c16 = kMin ? join_h8(rec0 + 16, rec1 + 16) : d16;
    __m512i cv[8];
    if constexpr (kQ8) {
      for (int k = 0; k < 8; ++k) cv[k] = join256(rec0 + kCodes + 32 * k, rec1 + kCodes + 32 * k);
    } else {
      for (int k = 0; k < 4; ++k) {
        const __m512i v = join256(rec0 + kCodes + 32 * k, rec1 + kCodes + 32 * k);
        cv[k] = _mm512_and_si512(v, m4);
        cv[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* xb = xq + t * n_in + b * 32;
      __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) {
        p0 = _mm512_dpbusd_epi32(p0, cv[k], bcast4_16(xb + 4 * k));
        p1 = _mm512_dpbusd_epi32(p1, cv[4 + k], bcast4_16(xb + 16 + 4 * k));
      }
      const __m512i P = _mm512_add_epi32(p0, p1);
      const __m512 s = _mm512_mul_ps(d16, _mm512_set1_ps(xd[t * nb + b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P), s, acc[t]);
      accm[t] = _mm512_fmadd_ps(c16, _mm512_set1_ps(xs32[t * nb + b]), accm[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    _mm512_storeu_ps(y + t * y_stride, _mm512_fmadd_ps(accm[t], _mm512_set1_ps(kCoef), acc[t]));
}

// group_pair_kernel for n_tok (1..kTileT) tokens, in the I8x8PairFn form.
template <GgmlType TY>
void pair_zmm(const uint8_t* rec0, const uint8_t* rec1, int64_t nb, const int8_t* xq, const float* xd,
              const float* xs32, int64_t n_in, int64_t n_tok, float* y, int64_t y_stride) {
  switch (n_tok) {
    case 1: return group_pair_kernel<TY, 1>(rec0, rec1, nb, xq, xd, xs32, n_in, y, y_stride);
    case 2: return group_pair_kernel<TY, 2>(rec0, rec1, nb, xq, xd, xs32, n_in, y, y_stride);
    case 3: return group_pair_kernel<TY, 3>(rec0, rec1, nb, xq, xd, xs32, n_in, y, y_stride);
    default: return group_pair_kernel<TY, 4>(rec0, rec1, nb, xq, xd, xs32, n_in, y, y_stride);
  }
}

// AMX form (prefill): per pair of groups, every block's codes are first laid out as a tdpbsud B
// operand (8 rows of 64 bytes: row k holds elements 4k..4k+3 of the 16 rows, as u8) with the
// block's 16 scales d and constant terms c in fp32; then per 16-token tile, block by block, one
// product of the tokens' int8 activations (A: 16 x 32 bytes) with it gives the 16 x 16 integer
// block products, which the same fp32 epilogue as group_kernel accumulates (acc in registers).
// A last partial token tile reads its activations from a zero-padded copy.
template <GgmlType TY>
void pair_amx(const uint8_t* rec0, const uint8_t* rec1, int64_t nb, const int8_t* xq, const float* xd,
              const float* xs32, int64_t n_in, int64_t n_tok, float* y, int64_t y_stride) {
  constexpr bool kQ8 = Rec<TY>::kQ8, kMin = Rec<TY>::kMin;
  constexpr size_t kRec = Rec<TY>::kBytes, kCodes = Rec<TY>::kCodes;
  constexpr float kCoef = Rec<TY>::kCoef;
  thread_local std::vector<uint8_t, AlignedAllocator<uint8_t>> bop;  // [nb][8][64] B operands
  thread_local std::vector<float, AlignedAllocator<float>> dc;       // [nb][2][16] d, c
  thread_local std::vector<int8_t, AlignedAllocator<int8_t>> tail;   // [16][n_in]
  alignas(64) int32_t cbuf[2][16 * 16];
  bop.resize((size_t)nb * 512);
  dc.resize((size_t)nb * 32);
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* r0 = rec0 + (size_t)b * kRec;
    const uint8_t* r1 = rec1 + (size_t)b * kRec;
    float* dcb = dc.data() + b * 32;
    _mm256_store_ps(dcb, ld_h8(r0));
    _mm256_store_ps(dcb + 8, ld_h8(r1));
    _mm256_store_ps(dcb + 16, kMin ? ld_h8(r0 + 16) : ld_h8(r0));
    _mm256_store_ps(dcb + 24, kMin ? ld_h8(r1 + 16) : ld_h8(r1));
    uint8_t* out = bop.data() + (size_t)b * 512;
    for (int k = 0; k < (kQ8 ? 8 : 4); ++k) {
      const __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(r0 + kCodes + 32 * k))),
          _mm256_loadu_si256((const __m256i*)(r1 + kCodes + 32 * k)), 1);
      if constexpr (kQ8) {
        _mm512_store_si512(out + 64 * k, v);
      } else {
        _mm512_store_si512(out + 64 * k, _mm512_and_si512(v, m4));
        _mm512_store_si512(out + 64 * (4 + k), _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
      }
    }
  }
  amx::Config cfg;
  cfg.tile(0, 16, 32).tile(1, 8, 64).tile(2, 16, 64).tile(3, 16, 64);
  amx::Scope scope(cfg);
  for (int64_t t0 = 0; t0 < n_tok; t0 += 16) {
    const int nt = (int)std::min<int64_t>(16, n_tok - t0);
    const int8_t* a = xq + t0 * n_in;
    if (nt < 16) {
      tail.assign((size_t)16 * n_in, 0);
      std::memcpy(tail.data(), a, (size_t)nt * n_in);
      a = tail.data();
    }
    __m512 acc[16];
    unroll<16>([&](auto t) { acc[t] = _mm512_setzero_ps(); });
    for (int64_t b = 0; b < nb; ++b) {
      int32_t* cb = cbuf[b & 1];
      amx::load<0>(a + b * 32, n_in);
      amx::load<1>(bop.data() + (size_t)b * 512, 64);
      if (b & 1) {
        amx::zero<3>();
        amx::dp_su8<3, 0, 1>();
        amx::store<3>(cb, 64);
      } else {
        amx::zero<2>();
        amx::dp_su8<2, 0, 1>();
        amx::store<2>(cb, 64);
      }
      const __m512 d16 = _mm512_load_ps(dc.data() + b * 32);
      const float* xdb = xd + t0 * nb + b;
      unroll<16>([&](auto t) {
        if (t < nt) {
          const __m512 s = _mm512_mul_ps(d16, _mm512_set1_ps(xdb[t * nb]));
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * t)), s, acc[t]);
        }
      });
    }
    unroll<16>([&](auto t) {
      if (t >= nt) return;
      __m512 accm = _mm512_setzero_ps();
      const float* xsb = xs32 + (t0 + t) * nb;
      for (int64_t b = 0; b < nb; ++b)
        accm = _mm512_fmadd_ps(_mm512_load_ps(dc.data() + b * 32 + 16), _mm512_set1_ps(xsb[b]), accm);
      _mm512_storeu_ps(y + (t0 + t) * y_stride, _mm512_fmadd_ps(accm, _mm512_set1_ps(kCoef), acc[t]));
    });
  }
}

#endif  // SPC_MM_VNNI

template <GgmlType TY>
I8x8Fn for_t(int t) {
  switch (t) {
    case 1: return group_kernel<TY, 1>;
    case 2: return group_kernel<TY, 2>;
    case 3: return group_kernel<TY, 3>;
    default: return group_kernel<TY, 4>;
  }
}

}  // namespace

I8x8Fn i8x8_for(GgmlType type, int t) {
  switch (type) {
    case GgmlType::Q4_0: return for_t<GgmlType::Q4_0>(t);
    case GgmlType::Q4_1: return for_t<GgmlType::Q4_1>(t);
    case GgmlType::Q8_0: return for_t<GgmlType::Q8_0>(t);
    default: return nullptr;
  }
}
#if defined(SPC_MM_VNNI)
I8x8PairFn i8x8_pair_amx_for(GgmlType type) {
  if (!cpu_amx_int8_usable()) return nullptr;
  switch (type) {
    case GgmlType::Q4_0: return pair_amx<GgmlType::Q4_0>;
    case GgmlType::Q4_1: return pair_amx<GgmlType::Q4_1>;
    case GgmlType::Q8_0: return pair_amx<GgmlType::Q8_0>;
    default: return nullptr;
  }
}
I8x8PairFn i8x8_pair_for(GgmlType type) {
  switch (type) {
    case GgmlType::Q4_0: return pair_zmm<GgmlType::Q4_0>;
    case GgmlType::Q4_1: return pair_zmm<GgmlType::Q4_1>;
    case GgmlType::Q8_0: return pair_zmm<GgmlType::Q8_0>;
    default: return nullptr;
  }
}
#else
I8x8PairFn i8x8_pair_amx_for(GgmlType) { return nullptr; }
I8x8PairFn i8x8_pair_for(GgmlType) { return nullptr; }
#endif
#else
I8x8Fn i8x8_for(GgmlType, int) { return nullptr; }
I8x8PairFn i8x8_pair_amx_for(GgmlType) { return nullptr; }
I8x8PairFn i8x8_pair_for(GgmlType) { return nullptr; }
#endif

size_t i8x8_record_bytes(GgmlType type) {
  I8x8Geom g;
  return geom_of(type, g) ? g.rec : 0;
}

}  // namespace mmk
}  // namespace spc
