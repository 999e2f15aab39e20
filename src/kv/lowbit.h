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
// Let d = head_dim, g = group, W = g/8 bytes (one g-bit word: uint32 for g = 32, uint64 for g = 64).
//
// Key block (g tokens x d channels), key_block_bytes() = bits*d*W + 4*d:
//   uint{g}  planes[bits][d]   bit t of planes[b][c] = bit b of the code of token t, channel c
//   fp16     scale[d]          per-channel scale s_c
//   fp16     zero[d]           per-channel zero  z_c
//   => K_hat[t][c] = zero[c] + scale[c] * sum_b 2^b * bit_t(planes[b][c])
//
// Value token (1 token x d channels), value_token_bytes() = bits*ceil(d/8) + 4*ngroups,
// with ngroups = ceil(d / gv):
//   uint8    planes[bits][ceil(d/8)]  bit (c%8) of byte planes[b][c/8] = bit b of channel c's code
//   fp16     scale[ngroups]
//   fp16     zero[ngroups]
//   => V_hat[c] = zero[c/gv] + scale[c/gv] * sum_b 2^b * bit_c(planes[b])
//
// Sizes for d = 64, g = 64: 1 bit -> 768 B per key block (12 B/token) + 12 B per value token,
// i.e. 24 B/token vs 256 B/token for fp16 K+V (9.4%); 2 bits -> 20 + 20 = 40 B/token (15.6%).
//
// ---- Kernels ----
// lowbit_score_keys and lowbit_accumulate_values work directly on the packed codes and process
// all n_q query rows per read of the codes (rows are tiled by 6 so the accumulators stay in
// registers). AVX-512 paths (lowbit_avx512.cpp), by case:
//   score, 1 bit, d % 4 == 0 : per block, per row and quad of channels, a 16-entry table of the
//                              subset sums of q_c*s_c; per 16 tokens and quad, the 4 code masks
//                              form a 4-bit lane index (shared by all rows); one vpermps + add per row.
//   score, 1 bit, other d    : masked add of broadcast(q_c*s_c) under each 16-token code mask.
//   score, 2 bits            : per channel and 16 tokens, the codes as floats (2 ops, shared),
//                              then one FMA with broadcast(q_c*s_c) per row.
//   accumulate, d % 16 == 0  : per 16 channels, 1 bit: per 4 tokens a table of the subset sums of
//                              p_t*s_t and a 4-bit index from the 4 tokens' code masks; 2 bits:
//                              codes as floats, one FMA with broadcast(p_t*s_t) per row. The zero
//                              terms sum_t p_t*z_t are accumulated per value group on the side.
//   accumulate, other d      : portable scalar path.
// Both start from the per-block constant sum_c q_c*z_c (scores) or add sum_t p_t*z_t (values).
// Without AVX-512 the portable scalar kernels run (lowbit_detail::*_scalar).
// They never allocate (stack use <= ~40 KB), keep no state and are safe to call concurrently on
// disjoint outputs. The *_ref versions dequantize and accumulate in double (test references, slow).
#pragma once
#include <cstddef>
#include <cstdint>

namespace spc {

struct LowBitSpec {
  int bits = 2;       // 1 or 2
  int group = 64;     // g: 32 or 64 (tokens per key block; channels per value group, capped at d)
  int head_dim = 64;  // d: 1 .. 256 (the AVX-512 value path needs d % 16 == 0; others use scalar)

  // Throws spc::Error unless bits in {1,2}, group in {32,64}, 1 <= head_dim <= 256.
  void validate() const;

  int value_group() const { return group < head_dim ? group : head_dim; }      // gv
  int value_ngroups() const { return (head_dim + value_group() - 1) / value_group(); }
  size_t key_word_bytes() const { return (size_t)group / 8; }
  size_t key_block_bytes() const { return (size_t)bits * head_dim * key_word_bytes() + 4 * (size_t)head_dim; }
  size_t value_plane_bytes() const { return ((size_t)head_dim + 7) / 8; }
  size_t value_token_bytes() const { return (size_t)bits * value_plane_bytes() + 4 * (size_t)value_ngroups(); }
};

// ---- Quantization / dequantization ----
// k: g token rows, row t at k + t*k_stride (first d floats used). block: key_block_bytes().
void lowbit_quantize_keys(const LowBitSpec& spec, const float* k, size_t k_stride, uint8_t* block);
// k: [g][d] contiguous.
void lowbit_dequantize_keys(const LowBitSpec& spec, const uint8_t* block, float* k);
// v: [d]; out: value_token_bytes().
void lowbit_quantize_value(const LowBitSpec& spec, const float* v, uint8_t* out);
void lowbit_dequantize_value(const LowBitSpec& spec, const uint8_t* in, float* v);

// ---- Packed kernels ----
// blocks: n_blocks consecutive key blocks (n_blocks*key_block_bytes() bytes), tokens
// t in [0, n_blocks*g) in order. q: n_q rows of d floats, row iq at q + iq*q_stride.
// Writes (overwrites) scores[iq*score_stride + t] = q_iq . K_hat_t.
void lowbit_score_keys(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride);
// values: n_tok consecutive value tokens (n_tok*value_token_bytes() bytes). p: n_q rows of n_tok
// weights, row iq at p + iq*p_stride. Accumulates out[iq*out_stride + c] += sum_t p[iq][t] * V_hat_t[c]
// for c < d.
void lowbit_accumulate_values(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride);

// ---- References (dequantize, then double accumulation) ----
void lowbit_score_keys_ref(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                           size_t q_stride, float* scores, size_t score_stride);
void lowbit_accumulate_values_ref(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p,
                                  int n_q, size_t p_stride, float* out, size_t out_stride);

namespace lowbit_detail {
// The portable packed kernels (what lowbit_score_keys / lowbit_accumulate_values use without
// AVX-512); exposed so the tests cover them on AVX-512 machines too.
void score_keys_scalar(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride);
void accumulate_values_scalar(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride);
// True when the calls above dispatch to SIMD code for this spec (for test/benchmark labels).
bool score_keys_simd(const LowBitSpec& spec);
bool accumulate_values_simd(const LowBitSpec& spec);
#if defined(__AVX512F__)
// AVX-512 kernels (lowbit_avx512.cpp). score: any spec; accumulate: head_dim % 16 == 0 only.
void score_keys_avx512(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride);
void accumulate_values_avx512(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride);
#endif
}  // namespace lowbit_detail

}  // namespace spc
