// Llama-family transformer (llama, qwen2) over GGUF weights. The model owns the weights (a
// memory map) and the forward pass; K/V go through a KvPolicy it knows only by interface.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <initializer_list>
#include <vector>

#include "gguf/gguf.h"
#include "kv/kv_policy.h"
#include "ops/matmul.h"
#include "ops/ops.h"
#include "util/aligned.h"
#include "util/fp16.h"
#include "util/lazy_buffer.h"

namespace spc {

class ThreadPool;

struct ModelConfig {
  std::string arch;       // "llama" | "qwen2"
  int n_vocab = 0;
  int n_embd = 0;
  int n_layer = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_ff = 0;
  int64_t n_ctx_train = 0;
  float rms_eps = 1e-5f;
  RopeParams rope;
  bool tied_output = false;  // output matrix is token_embd
  bool qkv_bias = false;
};

struct LayerWeights {
  std::vector<float> attn_norm, ffn_norm;  // [n_embd]
  WeightView wq, wk, wv, wo;               // [n_head*hd, n_embd], [n_kv*hd, n_embd] x2, [n_embd, n_head*hd]
  std::vector<float> bq, bk, bv;           // qwen2 biases (empty otherwise)
  WeightView w_gate, w_up, w_down;         // [n_ff, n_embd] x2, [n_embd, n_ff]
};

// Wall time of Model::decode's phases, summed over its calls (ms): the attention norm, q/k/v
// projections and RoPE; the KV policy's attend; the output projection and residual; the FFN (norm,
// gate/up/down, residual); the policy's end_step (waiting for its last background work); the
// final norm and logits. Four clock reads per layer: ~3 us per step of a 30-layer model.
struct DecodePhases {
  double qkv_ms = 0, attend_ms = 0, wo_ms = 0, ffn_ms = 0, end_step_ms = 0, output_ms = 0;
  int64_t steps = 0;  // decode calls (a speculative step's two rows are one call)
  double total_ms() const { return qkv_ms + attend_ms + wo_ms + ffn_ms + end_step_ms + output_ms; }
  DecodePhases operator+(const DecodePhases& o) const {
    return {qkv_ms + o.qkv_ms, attend_ms + o.attend_ms, wo_ms + o.wo_ms, ffn_ms + o.ffn_ms,
            end_step_ms + o.end_step_ms, output_ms + o.output_ms, steps + o.steps};
  }
  DecodePhases operator-(const DecodePhases& o) const {
    return {qkv_ms - o.qkv_ms, attend_ms - o.attend_ms, wo_ms - o.wo_ms, ffn_ms - o.ffn_ms,
            end_step_ms - o.end_step_ms, output_ms - o.output_ms, steps - o.steps};
  }
};

// Reusable activation buffers of one forward caller (one per session; not shared across threads).
struct ForwardScratch {
  DecodePhases phases;  // accumulated by Model::decode
  std::vector<float> x, h, q, k, v, att, ff_g, ff_u, logits_in;
  std::vector<float> k_layer, v_layer;  // prefill: one layer's K/V for the whole prompt
  // Prefill with bf16 / int8 / amx attention: their bf16 copies (kv_to_bf16, kv_to_bf16_amx), on
  // cache lines: the AMX kernel loads 64-byte rows of them.
  std::vector<bf16_t, AlignedAllocator<bf16_t>> k_bf16, v_bf16;
  std::vector<int8_t> k_i8;             // with int8 scores: the keys' codes, scales, code sums (keys_to_i8)
  std::vector<float> k_i8_scale;
  std::vector<int32_t> k_i8_sum;
  std::vector<float> rope_cos, rope_sin;
};

// One sequence's part of a batched decode step (Model::decode_batch).
struct DecodeSeq {
  const int32_t* tokens = nullptr;  // [n_rows]
  int n_rows = 1;
  int n_keep = 1;
  KvPolicy* kv = nullptr;
};

class Model {
 public:
  // Loads a GGUF file. Throws spc::Error for unsupported architectures, missing tensors, bad shapes.
  static std::unique_ptr<Model> load(const std::string& path);

  const ModelConfig& config() const { return cfg_; }
  const GgufFile& gguf() const { return *file_; }
  KvGeometry kv_geometry(int64_t n_ctx) const;
  // Bytes of weights read per decoded token (every matrix once, one embedding row).
  uint64_t weight_bytes_per_token() const;

  // Decode matmuls with activations quantized to int8 per block of 32 (AVX-512 VNNI integer dot
  // products, like llama.cpp's Q8 activations) instead of fp32 activations. Faster (~1.4x per
  // matmul on Zen 4); adds a small error (SmolLM2-135M, teacher-forced along the fp32 greedy
  // path: mean KL 5e-4..8e-4 from the fp32 logits, same top-1 at every step; see
  // tests/test_int8_decode.cpp). Prefill stays fp32 unless set_int8_prefill.
  // Off by default. Set before decoding; applies to every session of this model.
  // Turning it on the first time also builds the row-interleaved copies of the decode matrices
  // that the int8 kernels read where the build has them (AVX2 or AVX-512; Q4_0, Q4_1, Q8_0:
  // i8x8_repack, 8 rows per dot product; ~96 MB for SmolLM2-135M Q4_1). While it is on, prefill
  // and the embedding lookup read the copies as well (identical values), and each source
  // matrix's pages of the mapped GGUF are released as soon as it is copied, so the resident
  // weights stay about one copy in size. Turning it off again detaches the copies: every path
  // reads the original layout, whose pages fault back in.
  void set_int8_decode(bool on);
  bool int8_decode() const { return int8_decode_; }
  // Bytes of the interleaved copies built by set_int8_decode (0 before, or without the kernels).
  size_t int8_copy_bytes() const;
  // Prefill matmuls with int8 activations too, through the interleaved copies' kernels (8 rows
  // per vpdpbusd, ~450 GOPS on 2 Zen 4 cores at 256 tokens against ~95-150 GFLOP/s for the fp32
  // row-block path): the same quantization of the activations as int8 decode, now also in the
  // K/V the prompt leaves in the cache and in its logits. Off by default. Takes effect only
  // while int8 decode is on and every matrix a decode step reads has an interleaved copy
  // (int8_prefill() says whether it does); otherwise prefill stays fp32.
  void set_int8_prefill(bool on) { int8_prefill_ = on; }
  bool int8_prefill() const;
  // Precision of the prompt's attention (attention_prefill_bf16): bf16 dot products (Q, K, V and
  // the softmax weights rounded to bf16, sums in fp32), or int8 scores (queries and keys as int8
  // codes per vector, vpdpbusd) with bf16 values, instead of fp32; amx: the bf16 roundings on
  // AMX tiles (attention_prefill_amx, CPUs with AMX-BF16). fp32 by default; a setting the build
  // or CPU has no kernel for runs fp32 (prefill_attn() says what is in effect).
  enum class PrefillAttn { fp32, bf16, int8, amx };
  static const char* prefill_attn_name(PrefillAttn a);
  void set_prefill_attn(PrefillAttn a) { prefill_attn_ = a; }
  PrefillAttn prefill_attn() const { return prefill_attn_supported(prefill_attn_) ? prefill_attn_ : PrefillAttn::fp32; }
  bool prefill_attn_supported(PrefillAttn a) const;
  // True when this build has SIMD int8 decode kernels for the model's decode matrices (any of
  // them quantized to a type has_int8_decode_kernel covers): where int8 decode pays off.
  bool int8_decode_supported() const;

  // Prefill of `tokens` at positions [kv.n_cached(), ...), layer by layer, exact attention,
  // chunked (chunk rows at a time). On a non-empty cache (a continued prefill) the new tokens
  // also attend over the cached positions, whose 16-bit K/V the policy exports layer by layer
  // (policies without a complete 16-bit copy, kivi and streaming, throw spc::Error). Each
  // position's result does not depend on where the prompt was split: prefill(a + b) and
  // prefill(a) then prefill(b) give the same K/V and logits. Writes the last position's logits
  // into last_logits [n_vocab]; all_logits (optional) gets [n_tokens][n_vocab].
  using Progress = std::function<void(int layers_done, int n_layer)>;
  void prefill(const int32_t* tokens, int64_t n_tokens, KvPolicy& kv, ThreadPool& pool, ForwardScratch& s,
               float* last_logits, std::vector<float>* all_logits = nullptr, const Progress& progress = {},
               int64_t chunk = 256) const;

  // One decode step of n_rows consecutive tokens at positions [kv.n_cached(), ...); K/V of the
  // first n_keep rows are kept. logits: [n_rows][n_vocab].
  void decode(const int32_t* tokens, int n_rows, int n_keep, KvPolicy& kv, ThreadPool& pool, ForwardScratch& s,
              float* logits) const;
  // One decode step of several sequences at once (batched decode): sequence i's n_rows tokens at
  // positions [kv->n_cached(), ...) of its own policy, K/V of its first n_keep rows kept. Rows are
  // stacked in sequence order, so the weights are read once for all of them; every op except
  // attention works row by row, and each policy attends over its own rows. logits: [total rows][n_vocab].
  // Each sequence gets the results decode() gives it alone (tests/test_batch_decode.cpp).
  // Distinct sequences must have distinct policies.
  void decode_batch(const DecodeSeq* seqs, int n_seqs, ThreadPool& pool, ForwardScratch& s, float* logits) const;

 private:
  Model() = default;
  void embed(const int32_t* tokens, int64_t n, float* x) const;
  // q/k/v projections (+bias) and RoPE for n rows of normalized input h; rope_cos/rope_sin: the
  // rows' angle tables (rope_tables, n_rot / 2 per row). i8: int8 activations in the matmuls.
  void qkv(const LayerWeights& L, const float* h, int64_t n, const float* rope_cos, const float* rope_sin, float* q,
           float* k, float* v, ThreadPool& pool, bool i8) const;
  void ffn(const LayerWeights& L, float* x, int64_t n, ForwardScratch& s, ThreadPool& pool, bool i8) const;
  void output(const float* x, int64_t n, ForwardScratch& s, float* logits, ThreadPool& pool, bool i8) const;
  // f(w) for every matrix a decode step reads in full: each layer's seven, then the output.
  template <class Self, class F>
  static void for_each_decode_matrix(Self& self, F&& f) {
    for (auto& L : self.layers_)
      for (auto* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) f(*w);
    f(self.w_out_);
  }

  std::unique_ptr<GgufFile> file_;
  ModelConfig cfg_;
  WeightView tok_embd_, w_out_;
  std::vector<float> out_norm_;
  std::vector<LayerWeights> layers_;
  bool int8_decode_ = false;
  bool int8_prefill_ = false;
  PrefillAttn prefill_attn_ = PrefillAttn::fp32;
  LazyBuffer i8x8_arena_;                           // holds every row-interleaved copy (set_int8_decode)
  std::vector<std::pair<uint8_t*, size_t>> i8x8_;  // the copies: start and size in the arena
  std::vector<std::pair<WeightView*, const uint8_t*>> i8x8_views_;  // matrix -> its copy
};

}  // namespace spc
