// Low-bit (1- or 2-bit) copy of the KV cache for one (layer, KV head) stream.
//
// Method (docs/specache-method.md §3): asymmetric KIVI-style quantization.
//   keys   : per channel, over blocks of g consecutive tokens (g = LowBitSpec::group);
//   values : per token, over groups of gv = min(g, d) consecutive channels (the last group of a
//            token is shorter when d is not a multiple of gv).
// For a group with minimum m and maximum M:
//   bits = 2 (KIVI)    : z = m,            s = (M - m) / 3, code = clamp(round((x - z)/s), 0, 3)
//   bits = 1 (SpeCache): z = (3m + M) / 4, s = (M - m) / 2, code = clamp(round((x - z)/s), 0, 1)
//   reconstruction     : z + s * code, with z and s the fp16-rounded stored values.
// Codes are computed from the fp16-rounded z and s, so each code is the reconstruction level
// nearest to x (ties round up). round(v) = floor(v + 0.5).
// Degenerate group (M == m, or s rounds to 0 in fp16): s = 0, z = fp16(m), all codes 0, so the
// group reconstructs to fp16(m) — "exact" means equal to the fp16 rounding of the input value.
// Inputs must be finite; values beyond the fp16 range (|x| > 65504) saturate to +-65504.
//
// ---- Byte layouts (all multi-byte fields little-endian, no alignment required) ----
// Let d = head_dim, g = group, J = g/16 (16-token chunks of a key block), h = (2^bits - 1)/2
// (0.5 for 1 bit, 1.5 for 2 bits). Both layouts put 4 codes of one operand of a vpdpbusd in
// 4 consecutive bits, so one 64-bit word expands (bit i -> byte i) into 16 dword lanes.
//
// Key block (g tokens x d channels), key_block_bytes() = bits*d*g/8 + 4*d:
//   planes[bits], each key_plane_bytes() = d*g/8:
//     for each full channel quad u < d/4, for each chunk j < J:
//       uint64   bit (4t + k) = code bit of token 16j+t, channel 4u+k
//     then, when r = d % 4 > 0, the tail quad compactly, for each chunk j < J:
//       uint{16r} bit (r*t + k) = code bit of token 16j+t, channel 4*(d/4)+k     (2r bytes)
//   fp16     scale[d]          per-channel scale s_c
//   fp16     zero[d]           per-channel zero  z_c
//   => K_hat[t][c] = zero[c] + scale[c] * (bit of plane 0 + 2 * bit of plane 1)
//
// Value block (g tokens x d channels, quantized token by token), value_block_bytes() =
// bits*value_plane_bytes() + 4*ngroups*g, with ngroups = ceil(d / gv):
//   planes[bits], each value_plane_bytes() = (g/4) * R, R = value_record_bytes() = 8*(d/16) + ceil(r/2):
//     for each token quad i < g/4 (a record of R bytes):
//       for each full channel chunk m < d/16:
//         uint64   bit (4c + k) = code bit of token 4i+k, channel 16m+c
//       then, when r = d % 16 > 0: ceil(r/2) bytes, bit (4c + k) = code bit of token 4i+k,
//       channel 16*(d/16)+c, for c < r (the unused high bits are 0)
//   fp16     scale[ngroups][g]  scale of token t's group gi at [gi][t]
//   fp16     zero[ngroups][g]
//   => V_hat[t][c] = zero[c/gv][t] + scale[c/gv][t] * (bit of plane 0 + 2 * bit of plane 1)
//
// Sizes for d = 64, g = 64: 1 bit -> 768 B per key block + 768 B per value block = 24 B/token vs
// 256 B/token for fp16 K+V (9.4%); 2 bits -> 20 + 20 = 40 B/token (15.6%). For every d, g the
// sizes per token equal (keys) or never exceed (values) those of the earlier per-token layout.
//
// ---- Kernels ----
// lowbit_score_keys and lowbit_accumulate_values work directly on the packed codes: 8-bit integer
// dot products (vpdpbusd: unsigned bytes x signed bytes, 4 per int32 lane) of the codes with
// quantized float operands. h = (2^bits - 1)/2; rne = round to nearest, ties to even.
//   score: q_c*s_c*code is split over both byte operands. Per query row (once per call):
//     int8 qq_c = rne(q_c * 127/qmax), aq = qmax/127. Per key block (shared by all rows): u8
//     sq_c = rne(s_c * L/smax), as = smax/L, with L = 255 (1 bit) or 85 (2 bits, code*sq <= 255).
//     Per quad of channels and chunk of 16 tokens the 64-bit code word expands (kmov + masked
//     byte move of the quad's sq dword; +1 masked add of 2*sq for 2 bits) into 64 bytes code*sq,
//     shared by the rows, and each row does one vpdpbusd with its qq dword (embedded broadcast):
//       score_t = qz + A * sum_c qq_c*sq_c*code_ct,   A = aq*as,
//       qz = sum_c q_c*(z_c + h*s_c) - h*A*sum_c qq_c*sq_c   (per block and row; centres the
//       rounding error on code - h).
//     The key scale absorbed by the code bytes keeps channels with small s_c precise: on
//     SmolLM2-135M keys at 4K tokens the score error RMS is 0.022 logits (1 bit; 0.030 for 2 bits)
//     vs 0.035 (0.039) for int8 weights q_c*s_c quantized per block and row, for scores of RMS
//     ~11.7, and the per-block work per row is one dot product of q with z + h*s.
//   accumulate, per block and row: u_t = p_t*s_t -> uint8 uq_t = rne(u_t * 255/M), step b = M/255,
//     M = max of u_t over the block's tokens and value groups. Per quad of tokens and chunk of
//     16 channels the code word expands into 64 signed bytes 2*code - 2h (shared by the rows) and
//     each row does one vpdpbusd with its 4 u8 weights; per block the int32 sums are scaled by
//     b/2 into fp32 accumulators. The zero terms sum_t p_t*(z_t + h*s_t) stay fp32.
//     Requires p >= 0 (softmax numerators): a negative weight throws spc::Error.
//   AVX-512 (F + BW; VNNI, else an exact emulation with vpmaddwd on the bytes widened to int16):
//   the per-block operands of 8 blocks are prepared first, then the dot products run with <= 12
//   int32 accumulators (scores: 4 chunks x <= 3 rows or 2 chunks x <= 6 rows; values: 32-channel
//   tiles x <= 6 rows).
// Error bound vs the exact dot products with the dequantized codes (the *_ref functions),
// beyond fp32 rounding. Each rounding is at most half a step and the errors multiply the centred
// codes, |code - h| <= h:
//   score      |err_t| <= h*A/2 * sum_c (|qq_c| + sq_c + 1/2)   (from |A*qq*sq - q*s| <=
//              A*(|qq|/2 + sq/2 + 1/4)) <= h*d*qmax*smax*(1/L + 1/127)/2 roughly;
//   accumulate |err_c| <= sum over blocks of b/2 * sum_t |code_tc - h|  <= sum_blocks b*h*g/2.
// The errors are unbiased and typically ~ h*A*sqrt(sum_c (qq_c^2 + sq_c^2)/12) (scores),
// h*sqrt(sum_blocks b^2 * g/12) (sums). Operands that are all +-max (or 0) are exact, so are
// degenerate groups (s = 0).
//   AVX2 (+ FMA, F16C; lowbit_avx2.cpp), without AVX-512: vpmaddubsw (u8 x s8, saturating int16
//   pair sums) with operands that cannot saturate: keys multiply the plain codes (u8 0..3) by the
//   two signed bytes of w_c = qq_c*sq_c = 256*hi_c + lo_c; values multiply uq (u8) by the plain
//   codes and recentre, sum_t uq_t*(2*code - 2h) = 2*sum_t uq_t*code - 2h*sum_t uq_t. The same
//   integers, computed exactly (int16 accumulators widened before they could overflow).
// Without AVX-512 F+BW and AVX2 the portable scalar kernels run (lowbit_detail::*_scalar): the
// same integer method with the same quantized operands (same float operations), so all paths
// agree to fp32 rounding and results do not depend on the machine.
// They never allocate (stack use <= ~40 KB), keep no state and are safe to call concurrently on
// disjoint outputs. The *_ref versions dequantize and accumulate in double (test references, slow).
#pragma once
#include <cstddef>
#include <cstdint>

namespace spc {

struct LowBitSpec {
  int bits = 2;       // 1 or 2
  int group = 64;     // g: 32 or 64 (tokens per key/value block; channels per value group, capped at d)
  int head_dim = 64;  // d: 1 .. 256

  // Throws spc::Error unless bits in {1,2}, group in {32,64}, 1 <= head_dim <= 256.
  void validate() const;

  int value_group() const { return group < head_dim ? group : head_dim; }      // gv
  int value_ngroups() const { return (head_dim + value_group() - 1) / value_group(); }
  size_t key_plane_bytes() const { return (size_t)head_dim * group / 8; }
  size_t key_block_bytes() const { return (size_t)bits * key_plane_bytes() + 4 * (size_t)head_dim; }
  size_t value_record_bytes() const { return 8 * (size_t)(head_dim / 16) + ((size_t)(head_dim % 16) + 1) / 2; }
  size_t value_plane_bytes() const { return (size_t)group / 4 * value_record_bytes(); }
  size_t value_block_bytes() const {
    return (size_t)bits * value_plane_bytes() + 4 * (size_t)value_ngroups() * group;
  }
};

// ---- Quantization / dequantization ----
// k: g token rows, row t at k + t*k_stride (first d floats used). block: key_block_bytes().
void lowbit_quantize_keys(const LowBitSpec& spec, const float* k, size_t k_stride, uint8_t* block);
// k: [g][d] contiguous.
void lowbit_dequantize_keys(const LowBitSpec& spec, const uint8_t* block, float* k);
// v: g token rows, row t at v + t*v_stride (first d floats used), each quantized on its own.
// block: value_block_bytes().
void lowbit_quantize_values(const LowBitSpec& spec, const float* v, size_t v_stride, uint8_t* block);
// Token t (0 <= t < g) of a value block: v[0..d).
void lowbit_dequantize_value(const LowBitSpec& spec, const uint8_t* block, int t, float* v);

// Where the value blocks of one call live: block b at lo + b*bytes below split, at hi + b*bytes
// from split on; both pointers address block 0 of the call, so only the memory differs (a shared
// prompt prefix's blocks, then a session's own: KvPolicy::share_prefix). A plain pointer converts
// to one memory. The kernels walk the blocks in the same order and with the same arithmetic
// either way, so a split changes no result bit.
struct BlockMem {
  const uint8_t* lo;
  const uint8_t* hi;
  int64_t split;
  BlockMem(const uint8_t* one) : lo(one), hi(one), split(INT64_MAX) {}  // NOLINT: implicit on purpose
  BlockMem(const uint8_t* lo_, const uint8_t* hi_, int64_t split_) : lo(lo_), hi(hi_), split(split_) {}
  const uint8_t* base(int64_t b) const { return b < split ? lo : hi; }
  const uint8_t* block(int64_t b, size_t bytes) const { return base(b) + (size_t)b * bytes; }
};

// ---- Packed kernels ----
// blocks: n_blocks consecutive key blocks (n_blocks*key_block_bytes() bytes), tokens
// t in [0, n_blocks*g) in order. q: n_q rows of d floats, row iq at q + iq*q_stride.
// Writes (overwrites) scores[iq*score_stride + t] = q_iq . K_hat_t (approximately: see the error bound).
void lowbit_score_keys(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride);
// values: n_blocks consecutive value blocks (n_blocks*value_block_bytes() bytes), tokens
// t in [0, n_blocks*g). p: n_q rows of n_blocks*g weights >= 0, row iq at p + iq*p_stride.
// Accumulates out[iq*out_stride + c] += sum_t p[iq][t] * V_hat_t[c] for c < d (approximately).
void lowbit_accumulate_values(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride);

// ---- Fused forms for the decode attention (one pass instead of several over the scores) ----
// lowbit_score_keys, and: every score of block b and row iq is lowered by
// debias * sum_c q_c^2 * s_c^2 / 24 (s_c: block b's key scales; the expected inflation of exp()
// by the score error, docs/ARCHITECTURE.md; debias >= 0, 0 = off); when row_max is not null,
// row_max[iq] = the largest score written to row iq. The AVX-512 and AVX2 kernels fold both in
// (the debias term into the per-block constant qz); the scalar path runs a pass over the scores.
// extra (optional): n_extra addresses of cache lines the caller reads right after this call
// (the decode attention: the chunk's top-k rows, just written by another core). The AVX-512
// kernel requests them spread over its blocks' dot products, where they arrive without holding
// anything up; the other paths request them on entry.
void lowbit_score_keys_ex(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                          size_t q_stride, float* scores, size_t score_stride, float debias, float* row_max,
                          const void* const* extra = nullptr, size_t n_extra = 0);
// Softmax numerators and their value sum at once: for each row iq, s[iq*s_stride + t] (a score,
// or -inf for a position to leave out) becomes p_t = exp_fast(s_t - m[iq]) (m[iq] >= every
// finite s_t of the row; exp_fast, ops/vec_math.h: relative error < 4e-6, about half of
// exp_approx's work, bit for bit the same on every SIMD level: the weights are quantized to 8 bits
// next), l[iq] = sum_t p_t, and out[iq*out_stride + c] += sum_t p_t * V_hat_t[c], as
// vec_exp_fast_shift_sum followed by lowbit_accumulate_values (AVX2 computes the exponentials
// inside the value kernel's per-block weight preparation, AVX-512 too where a token's values form
// one group).
// block_max (optional): block_max[iq*bm_stride + b] = the largest p_t of row iq in block b (of
// the values as written to s), for bounds on the blocks' attention (the selection's pruning).
void lowbit_softmax_values(const LowBitSpec& spec, BlockMem values, int n_blocks, float* s, int n_q,
                           size_t s_stride, const float* m, float* l, float* out, size_t out_stride,
                           float* block_max = nullptr, size_t bm_stride = 0);

// ---- References (dequantize, then double accumulation) ----
void lowbit_score_keys_ref(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                           size_t q_stride, float* scores, size_t score_stride);
void lowbit_accumulate_values_ref(const LowBitSpec& spec, const uint8_t* values, int n_blocks, const float* p,
                                  int n_q, size_t p_stride, float* out, size_t out_stride);

namespace lowbit_detail {
// The portable packed kernels (what lowbit_score_keys / lowbit_accumulate_values use without
// AVX-512 or AVX2); exposed so the tests cover them on SIMD machines too.
void score_keys_scalar(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride);
void accumulate_values_scalar(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride);
// Levels of the u8 key scales in the score kernels: 255 (1 bit) or 85 (2 bits: code*sq <= 255).
float key_scale_levels(int bits);
// True when the calls above dispatch to SIMD code for this spec (for test/benchmark labels).
bool score_keys_simd(const LowBitSpec& spec);
bool accumulate_values_simd(const LowBitSpec& spec);
// The code of token t, channel c of a key / value block (0 .. 2^bits - 1), read through the layout.
int key_code(const LowBitSpec& spec, const uint8_t* block, int t, int c);
int value_code(const LowBitSpec& spec, const uint8_t* block, int t, int c);
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPC_LOWBIT_AVX512 1
// AVX-512 kernels (lowbit_avx512.cpp), any spec.
// debias, row_max: as lowbit_score_keys_ex (0 / null: plain scores).
void score_keys_avx512(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride, float debias = 0.0f,
                       float* row_max = nullptr, const void* const* extra = nullptr, size_t n_extra = 0);
void accumulate_values_avx512(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride);
// lowbit_softmax_values' AVX-512 form; one value group per token (spec.value_ngroups() == 1).
void softmax_values_avx512(const LowBitSpec& spec, BlockMem values, int n_blocks, float* s, int n_q,
                           size_t s_stride, const float* m, float* l, float* out, size_t out_stride, float* block_max,
                           size_t bm_stride);
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SPC_LOWBIT_AVX2 1
// AVX2 kernels (lowbit_avx2.cpp), any spec: what the dispatch uses without AVX-512; also built on
// AVX-512 machines so the tests cover them there.
// debias, row_max: as lowbit_score_keys_ex (0 / null: plain scores).
void score_keys_avx2(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                     size_t q_stride, float* scores, size_t score_stride, float debias = 0.0f,
                     float* row_max = nullptr);
void accumulate_values_avx2(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                            size_t p_stride, float* out, size_t out_stride);
// lowbit_softmax_values' AVX2 form (any spec): the exponentials inside the weight preparation.
void softmax_values_avx2(const LowBitSpec& spec, BlockMem values, int n_blocks, float* s, int n_q,
                         size_t s_stride, const float* m, float* l, float* out, size_t out_stride, float* block_max,
                         size_t bm_stride);
#endif
}  // namespace lowbit_detail

}  // namespace spc
