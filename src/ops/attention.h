// Attention kernels shared by the model (prefill) and the KV policies (decode).
// All take the scale 1/sqrt(head_dim) into account themselves.
#pragma once
#include <cstdint>

#include "util/fp16.h"

namespace spc {

class ThreadPool;

struct AttnShape {
  int n_head;     // query heads
  int n_head_kv;  // key/value heads (n_head % n_head_kv == 0)
  int head_dim;
};

// q . k for fp32 q and fp16 k of length d (AVX-512 when d % 16 == 0).
float dot_f32_f16(const float* q, const fp16_t* k, int d);
// out[i * out_stride] = q_i . k for the n_q fp32 rows q_i = q + i * q_stride against one fp16 k
// of length d: k is converted once for all of them (the GQA query heads of a KV head).
void dot_f32_f16_rows(const float* q, int n_q, int64_t q_stride, const fp16_t* k, int d, float* out,
                      int64_t out_stride);
// out[i * out_stride + j] = q_i . k_j for the same n_q rows q_i against n_k fp16 keys of length
// d: k_j = rows[j] when rows is given (gathered rows), else k + j * k_stride. Each result equals
// dot_f32_f16_rows' bit for bit. With AVX-512 and d = 64: 16 keys at a time, each converted
// once, and one transposing reduction that leaves a row's 16 sums in one vector, in the same
// order of additions as the per-product horizontal sum it replaces: ~35% fewer operations, and
// 128 keys x 6 rows in 1.25 instead of 1.65 us on a Xeon (AVX-512).
void dot_f32_f16_many(const float* q, int n_q, int64_t q_stride, const fp16_t* const* rows, const fp16_t* k,
                      int64_t k_stride, int64_t n_k, int d, float* out, int64_t out_stride);
// o += p * v for fp16 v of length d.
void axpy_f16(float p, const fp16_t* v, float* o, int d);

// exp(x) for x <= 0 (and moderately positive x), max relative error ~2e-7; vectorizes. Exactly 0
// below -87 (and for -inf).
float exp_approx(float x);

// Exact causal attention for a chunk of prefill rows.
// q:   [n_rows][n_head][head_dim]      rows are absolute positions p0 .. p0+n_rows-1
// k,v: [n_keys][n_head_kv][head_dim]   keys at absolute positions 0 .. n_keys-1, n_keys >= p0 + n_rows
// out: [n_rows][n_head][head_dim]
// Row r attends to keys 0 .. p0 + r.
void attention_prefill(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const float* k, const float* v,
                       float* out, ThreadPool& pool);
// The same with the portable scalar kernel (what attention_prefill uses without AVX-512);
// exposed so tests can check both paths on any build.
void attention_prefill_portable(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const float* k,
                                const float* v, float* out, ThreadPool& pool);

// Prefill attention with bf16 dot products (AVX-512 BF16, vdpbf16ps): Q, K, V and the softmax
// weights are rounded to bf16, products and sums stay fp32. About twice the multiply-adds per
// instruction of the fp32 kernel, and half the bytes of K/V per pass. Available where
// attention_prefill_bf16_supported (the build has AVX-512 BF16 and VNNI, n_head / n_head_kv <= 48,
// head_dim % 8 == 0); attention_prefill_bf16 throws spc::Error elsewhere.
// kb: [n_keys][n_head_kv][head_dim] bf16 (k's layout); vb: [ceil(n_keys / 2)][n_head_kv][head_dim][2]
// bf16, positions paired (V[2p][e], V[2p + 1][e]). kv_to_bf16 writes both for positions [j0, j1)
// of k/v ([n][n_head_kv][head_dim] fp32; for an odd j0 the pair's first half, position j0 - 1, is
// rewritten from v too; the second half of an odd last pair is 0).
// With k8, the scores come from int8 codes instead (vpdpbusd, twice the multiply-adds per
// instruction again): each query vector and each key (per position and KV head) quantized
// symmetrically to int8 over its head_dim values; the values stay bf16. keys_to_i8 writes the
// keys' codes [n][n_head_kv][head_dim], scales and code sums [n][n_head_kv] for positions
// [j0, j1) of k ([n][n_head_kv][head_dim] fp32).
struct PrefillKeysI8 {
  const int8_t* codes;
  const float* scale;
  const int32_t* sum;
};
bool attention_prefill_bf16_supported(const AttnShape& s);
void kv_to_bf16(const AttnShape& s, const float* k, const float* v, int64_t j0, int64_t j1, bf16_t* kb, bf16_t* vb);
void keys_to_i8(const AttnShape& s, const float* k, int64_t j0, int64_t j1, int8_t* codes, float* scale, int32_t* sum);
void attention_prefill_bf16(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const bf16_t* kb,
                            const bf16_t* vb, float* out, ThreadPool& pool, const PrefillKeysI8* k8 = nullptr);

// The same attention on AMX-BF16 tiles (the same roundings as attention_prefill_bf16: Q, K, V and
// the softmax weights in bf16, sums in fp32), for CPUs with AMX (checked at run time,
// cpu_amx_bf16_usable), n_head / n_head_kv <= 48 and head_dim a multiple of 32 up to 128;
// attention_prefill_amx throws spc::Error elsewhere. K as for the bf16 kernel ([n][n_head_kv]
// [head_dim]) but with the rows of at least prefill_amx_capacity(p0 + n_rows) keys allocated
// (those past p0 + n_rows are read and masked: any contents); V transposed in chunks of 32 keys,
// vt [n_head_kv][cap / 32][head_dim][32] (V[j][hk][c] at ((hk * cap / 32 + j / 32) * head_dim + c)
// * 32 + j % 32) with cap >= prefill_amx_capacity(p0 + n_rows) and the entries of positions past
// p0 + n_rows finite (zero): they are multiplied by weights 0. kv_to_bf16_amx writes positions
// [j0, j1) of both.
bool attention_prefill_amx_supported(const AttnShape& s);
int64_t prefill_amx_capacity(int64_t n_keys);
void kv_to_bf16_amx(const AttnShape& s, const float* k, const float* v, int64_t j0, int64_t j1, bf16_t* kb,
                    bf16_t* vt, int64_t cap);
void attention_prefill_amx(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const bf16_t* kb,
                           const bf16_t* vt, int64_t cap, float* out, ThreadPool& pool);

// Partial attention state over a subset of keys for one query vector: o is unnormalized.
// Two partial states over disjoint key sets merge exactly (flash-decoding).
struct AttnPartial {
  float m;  // running max of scores
  float l;  // sum of exp(score - m)
};
// dst <- merge(dst, src); o vectors of length d.
void attn_merge(AttnPartial& dst, float* dst_o, const AttnPartial& src, const float* src_o, int d);

// Keys of one KV head stored tile-transposed in fp16 for streaming: tiles of 16 positions,
// tile t holds [head_dim][16] (channel-major), so 16 scores come out of head_dim FMAs.
constexpr int kKeyTile = 16;
inline int64_t key_tile_offset(int64_t pos, int head_dim) {  // element offset of (pos, channel 0)
  return (pos / kKeyTile) * kKeyTile * head_dim + pos % kKeyTile;
}

// Decode attention of n_q query vectors (all sharing one KV head) over fp16 keys/values at
// positions [k0, k1) of one KV head, with per-query causal limits (query i sees positions < limit[i]).
// kt: tile-transposed keys (see key_tile_offset), v: [pos][head_dim] fp16.
// q: [n_q][head_dim] (unscaled). Produces partial states; o: [n_q][head_dim] unnormalized.
// n_q: 1..8. When attention_decode_f16_streams(head_dim) (AVX-512 with head_dim % 16 == 0, or AVX2
// with head_dim % 8 == 0; head_dim <= 256), keys and
// values are streamed once, block by block with an online softmax and the accumulators in
// registers, and scratch is not used (may be null); otherwise scratch must hold at least
// n_q * (k1 - k0 + kKeyTile) floats.
void attention_decode_f16(const float* q, int n_q, int head_dim, const fp16_t* kt, const fp16_t* v, int64_t k0,
                          int64_t k1, const int64_t* limit, AttnPartial* part, float* o, float* scratch);
// Keys and values of one KV head in two memories: positions below split (a multiple of kKeyTile)
// in (kt, v), the others in (kt2, v2), all indexed by absolute position (the end of a shared
// prompt prefix, F16Cache::share_prefix). The kernels walk the positions in the same blocks and
// order either way, so a split changes no result bit.
struct F16Mem {
  const fp16_t* kt;
  const fp16_t* v;
  const fp16_t* kt2;
  const fp16_t* v2;
  int64_t split;
  const fp16_t* keys_at(int64_t pos) const { return pos < split ? kt : kt2; }
  const fp16_t* values_at(int64_t pos) const { return pos < split ? v : v2; }
};
void attention_decode_f16(const float* q, int n_q, int head_dim, const F16Mem& mem, int64_t k0, int64_t k1,
                          const int64_t* limit, AttnPartial* part, float* o, float* scratch);
bool attention_decode_f16_streams(int head_dim);

}  // namespace spc
