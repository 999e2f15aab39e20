#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ops/attention.h"
#include "ops/quant.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/threadpool.h"

namespace spc {

namespace {

const GgufTensorInfo& need_tensor(const GgufFile& f, const std::string& name) {
  const GgufTensorInfo* t = f.find_tensor(name);
  if (!t) throw Error(strfmt("%s: missing tensor '%s'", f.path().c_str(), name.c_str()));
  return *t;
}

WeightView matrix(const GgufFile& f, const std::string& name, int64_t n_in, int64_t n_out) {
  const GgufTensorInfo& t = need_tensor(f, name);
  if (t.n_dims != 2 || t.ne[0] != n_in || t.ne[1] != n_out)
    throw Error(strfmt("%s: tensor '%s' has shape %s, expected [%lld, %lld]", f.path().c_str(), name.c_str(),
                       t.shape_string().c_str(), (long long)n_in, (long long)n_out));
  if (!type_traits(t.type).supported)
    throw Error(strfmt("%s: tensor '%s' has type %s, which this engine cannot compute with", f.path().c_str(),
                       name.c_str(), type_name(t.type)));
  return WeightView{t.type, n_in, n_out, t.data};
}

std::vector<float> vector_f32(const GgufFile& f, const std::string& name, int64_t n) {
  const GgufTensorInfo& t = need_tensor(f, name);
  if (t.n_elements() != n)
    throw Error(strfmt("%s: tensor '%s' has %lld elements, expected %lld", f.path().c_str(), name.c_str(),
                       (long long)t.n_elements(), (long long)n));
  SPC_CHECK(t.type == GgmlType::F32 || t.type == GgmlType::F16 || t.type == GgmlType::BF16,
            "%s: tensor '%s' has type %s, expected F32/F16/BF16", f.path().c_str(), name.c_str(), type_name(t.type));
  std::vector<float> out((size_t)n);
  dequantize_row(t.type, t.data, out.data(), n);
  return out;
}

int get_dim(const GgufFile& f, const std::string& key) {
  const auto v = f.get_int(key);
  if (!v) throw Error(strfmt("%s: missing metadata '%s'", f.path().c_str(), key.c_str()));
  if (*v <= 0 || *v > (1 << 24)) throw Error(strfmt("%s: metadata '%s' = %lld is out of range", f.path().c_str(), key.c_str(), (long long)*v));
  return (int)*v;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = GgufFile::open(path);
  const GgufFile& f = *m->file_;
  ModelConfig& c = m->cfg_;
  c.arch = f.get_string("general.architecture").value_or("");
  if (c.arch != "llama" && c.arch != "qwen2")
    throw Error(strfmt("%s: unsupported architecture '%s' (supported: llama, qwen2)", path.c_str(), c.arch.c_str()));
  const std::string a = c.arch + ".";
  c.n_embd = get_dim(f, a + "embedding_length");
  c.n_layer = get_dim(f, a + "block_count");
  c.n_head = get_dim(f, a + "attention.head_count");
  c.n_head_kv = f.get_int(a + "attention.head_count_kv") ? get_dim(f, a + "attention.head_count_kv") : c.n_head;
  c.n_ff = get_dim(f, a + "feed_forward_length");
  c.n_ctx_train = f.get_int(a + "context_length").value_or(2048);
  SPC_CHECK(c.n_ctx_train > 0, "%s: metadata '%scontext_length' = %lld is not positive", path.c_str(), a.c_str(),
            (long long)c.n_ctx_train);
  SPC_CHECK(c.n_head % c.n_head_kv == 0, "%s: head_count %d is not a multiple of head_count_kv %d", path.c_str(), c.n_head, c.n_head_kv);
  c.head_dim = f.get_int(a + "attention.key_length") ? get_dim(f, a + "attention.key_length") : c.n_embd / c.n_head;
  SPC_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0 && c.head_dim <= 256, "%s: head dimension %d unsupported (even, <= 256)", path.c_str(), c.head_dim);
  c.rms_eps = (float)f.get_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5);
  c.rope.freq_base = (float)f.get_float(a + "rope.freq_base").value_or(10000.0);
  c.rope.n_rot = f.get_int(a + "rope.dimension_count") ? get_dim(f, a + "rope.dimension_count") : c.head_dim;
  SPC_CHECK(c.rope.n_rot <= c.head_dim && c.rope.n_rot % 2 == 0, "%s: rope.dimension_count %d invalid", path.c_str(), c.rope.n_rot);
  c.rope.neox = (c.arch == "qwen2");
  const std::string scaling = f.get_string(a + "rope.scaling.type").value_or("none");
  if (scaling == "linear") {
    const double factor = f.get_float(a + "rope.scaling.factor").value_or(1.0);
    SPC_CHECK(factor > 0, "%s: rope.scaling.factor must be positive", path.c_str());
    c.rope.freq_scale = (float)(1.0 / factor);
  } else if (scaling != "none") {
    throw Error(strfmt("%s: unsupported RoPE scaling type '%s' (supported: none, linear)", path.c_str(), scaling.c_str()));
  }
  if (f.find_tensor("rope_freqs.weight")) c.rope.freq_factors = vector_f32(f, "rope_freqs.weight", c.rope.n_rot / 2);

  const GgufTensorInfo& emb = need_tensor(f, "token_embd.weight");
  SPC_CHECK(emb.n_dims == 2 && emb.ne[0] == c.n_embd, "%s: token_embd.weight has shape %s, expected [%d, n_vocab]",
            path.c_str(), emb.shape_string().c_str(), c.n_embd);
  c.n_vocab = (int)emb.ne[1];
  m->tok_embd_ = matrix(f, "token_embd.weight", c.n_embd, c.n_vocab);
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  m->w_out_ = c.tied_output ? m->tok_embd_ : matrix(f, "output.weight", c.n_embd, c.n_vocab);
  m->out_norm_ = vector_f32(f, "output_norm.weight", c.n_embd);

  const int64_t dq = (int64_t)c.n_head * c.head_dim, dkv = (int64_t)c.n_head_kv * c.head_dim;
  c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  // Layers are appended one at a time (no resize to n_layer up front): a corrupt block_count
  // then fails at the first missing tensor instead of allocating n_layer LayerWeights first.
  m->layers_.clear();
  for (int il = 0; il < c.n_layer; ++il) {
    LayerWeights& L = m->layers_.emplace_back();
    const std::string p = "blk." + std::to_string(il) + ".";
    L.attn_norm = vector_f32(f, p + "attn_norm.weight", c.n_embd);
    L.ffn_norm = vector_f32(f, p + "ffn_norm.weight", c.n_embd);
    L.wq = matrix(f, p + "attn_q.weight", c.n_embd, dq);
    L.wk = matrix(f, p + "attn_k.weight", c.n_embd, dkv);
    L.wv = matrix(f, p + "attn_v.weight", c.n_embd, dkv);
    L.wo = matrix(f, p + "attn_output.weight", dq, c.n_embd);
    L.w_gate = matrix(f, p + "ffn_gate.weight", c.n_embd, c.n_ff);
    L.w_up = matrix(f, p + "ffn_up.weight", c.n_embd, c.n_ff);
    L.w_down = matrix(f, p + "ffn_down.weight", c.n_ff, c.n_embd);
    if (c.qkv_bias) {
      L.bq = vector_f32(f, p + "attn_q.bias", dq);
      L.bk = vector_f32(f, p + "attn_k.bias", dkv);
      L.bv = vector_f32(f, p + "attn_v.bias", dkv);
    }
  }
  return m;
}

KvGeometry Model::kv_geometry(int64_t n_ctx) const {
  return KvGeometry{cfg_.n_layer, cfg_.n_head, cfg_.n_head_kv, cfg_.head_dim, n_ctx};
}

void Model::set_int8_decode(bool on) {
  int8_decode_ = on;
  if (on && i8x8_.empty()) {
    // Each source matrix is released right after its copy is written, so the peak resident
    // memory grows by about one matrix, not by all of them.
    // All copies live in one buffer on huge pages (util/lazy_buffer.h: fewer TLB misses on the
    // per-token weight stream), each on a 64-byte boundary.
    auto padded = [](size_t bytes) { return (bytes + 63) / 64 * 64; };
    size_t total = 0;
    for_each_decode_matrix(*this, [&](WeightView& w) { total += padded(i8x8_bytes(w)); });
    i8x8_arena_ = LazyBuffer(total, LazyBuffer::huge);
    size_t off = 0;
    auto repack = [&](WeightView& w) {
      const size_t bytes = i8x8_bytes(w);
      if (bytes == 0) return;
      i8x8_.emplace_back(i8x8_arena_.data() + off, bytes);
      off += padded(bytes);
      i8x8_repack(w, i8x8_.back().first);
      i8x8_views_.emplace_back(&w, i8x8_.back().first);
      if (w.data == tok_embd_.data && w.type == tok_embd_.type && w.n_in == tok_embd_.n_in &&
          w.n_out == tok_embd_.n_out)
        i8x8_views_.emplace_back(&tok_embd_, i8x8_.back().first);  // tied output: same rows
      file_->release_pages(w.data, row_size(w.type, w.n_in) * (size_t)w.n_out);
    };
    for_each_decode_matrix(*this, repack);
  }
  // On: every path reads the copies (see WeightView::i8x8). Off: every path reads the mapped
  // file again, whose released pages fault back in.
  for (auto& [w, copy] : i8x8_views_) w->i8x8 = on ? copy : nullptr;
}

size_t Model::int8_copy_bytes() const {
  size_t n = 0;
  for (const auto& c : i8x8_) n += c.second;
  return n;
}

bool Model::int8_prefill() const {
  if (!int8_prefill_ || !int8_decode_) return false;
  bool all = true;
  for_each_decode_matrix(*this, [&](const WeightView& w) { all = all && w.i8x8 != nullptr; });
  return all;
}

const char* Model::prefill_attn_name(PrefillAttn a) {
  return a == PrefillAttn::amx ? "amx" : a == PrefillAttn::int8 ? "int8" : a == PrefillAttn::bf16 ? "bf16" : "fp32";
}

bool Model::prefill_attn_supported(PrefillAttn a) const {
  const AttnShape shape{cfg_.n_head, cfg_.n_head_kv, cfg_.head_dim};
  if (a == PrefillAttn::amx) return attention_prefill_amx_supported(shape);
  return a == PrefillAttn::fp32 || attention_prefill_bf16_supported(shape);
}

bool Model::int8_decode_supported() const {
  bool any = false;
  for_each_decode_matrix(*this, [&](const WeightView& w) { any = any || has_int8_decode_kernel(w.type); });
  return any;
}

uint64_t Model::weight_bytes_per_token() const {
  uint64_t total = row_size(tok_embd_.type, tok_embd_.n_in);  // one embedding row
  for_each_decode_matrix(*this, [&](const WeightView& w) { total += (uint64_t)row_size(w.type, w.n_in) * w.n_out; });
  return total;
}

void Model::embed(const int32_t* tokens, int64_t n, float* x) const {
  for (int64_t i = 0; i < n; ++i) {
    SPC_CHECK(tokens[i] >= 0 && tokens[i] < cfg_.n_vocab, "token id %d out of range [0, %d)", tokens[i], cfg_.n_vocab);
    dequantize_rows(tok_embd_, tokens[i], 1, x + i * cfg_.n_embd);
  }
}

namespace {

// f(b, e) over row ranges of [0, n): split over the pool for a prefill chunk's rows, so the
// row-wise steps between the matmuls do not run on one core while the others wait (and each
// thread mostly touches the rows it will quantize for the next matmul); inline for decode's few
// rows, where a dispatch costs more than the work.
template <class F>
void for_rows(ThreadPool& pool, int64_t n, F&& f) {
  if (n >= 32 && pool.size() > 1)
    pool.parallel_for(n, [&](int64_t b, int64_t e, int) { f(b, e); });
  else
    f(0, n);
}

}  // namespace

void Model::qkv(const LayerWeights& L, const float* h, int64_t n, const float* rope_cos, const float* rope_sin,
                float* q, float* k, float* v, ThreadPool& pool, bool i8) const {
  const int64_t dq = (int64_t)cfg_.n_head * cfg_.head_dim, dkv = (int64_t)cfg_.n_head_kv * cfg_.head_dim;
  const int64_t half = cfg_.rope.n_rot / 2;
  const WeightView ws[3] = {L.wq, L.wk, L.wv};
  float* const ys[3] = {q, k, v};
  matmul_many(ws, ys, 3, h, n, pool, i8);
  for_rows(pool, n, [&](int64_t b, int64_t e) {
    if (cfg_.qkv_bias)
      for (int64_t i = b; i < e; ++i) {
        add_inplace(q + i * dq, L.bq.data(), dq);
        add_inplace(k + i * dkv, L.bk.data(), dkv);
        add_inplace(v + i * dkv, L.bv.data(), dkv);
      }
    rope_apply(cfg_.rope, q + b * dq, e - b, cfg_.n_head, cfg_.head_dim, rope_cos + b * half, rope_sin + b * half);
    rope_apply(cfg_.rope, k + b * dkv, e - b, cfg_.n_head_kv, cfg_.head_dim, rope_cos + b * half, rope_sin + b * half);
    // The cache is 16-bit: round K/V here so prefill attention sees what decode will see.
    for (int64_t i = b * dkv; i < e * dkv; ++i) {
      k[i] = fp16_to_fp32(fp32_to_fp16(k[i]));
      v[i] = fp16_to_fp32(fp32_to_fp16(v[i]));
    }
  });
}

void Model::ffn(const LayerWeights& L, float* x, int64_t n, ForwardScratch& s, ThreadPool& pool, bool i8) const {
  const int64_t e = cfg_.n_embd, ff = cfg_.n_ff;
  s.h.resize((size_t)(n * e));
  s.ff_g.resize((size_t)(n * ff));
  s.ff_u.resize((size_t)(n * ff));
  for_rows(pool, n, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) rmsnorm(x + i * e, L.ffn_norm.data(), s.h.data() + i * e, e, cfg_.rms_eps);
  });
  const WeightView ws[2] = {L.w_gate, L.w_up};
  float* const ys[2] = {s.ff_g.data(), s.ff_u.data()};
  matmul_many(ws, ys, 2, s.h.data(), n, pool, i8);
  for_rows(pool, n, [&](int64_t b, int64_t end) { silu_mul(s.ff_g.data() + b * ff, s.ff_u.data() + b * ff, (end - b) * ff); });
  matmul(L.w_down, s.ff_g.data(), n, s.h.data(), pool, i8);
  for_rows(pool, n, [&](int64_t b, int64_t end) { add_inplace(x + b * e, s.h.data() + b * e, (end - b) * e); });
}

void Model::output(const float* x, int64_t n, ForwardScratch& s, float* logits, ThreadPool& pool, bool i8) const {
  const int64_t e = cfg_.n_embd;
  s.logits_in.resize((size_t)(n * e));
  for (int64_t i = 0; i < n; ++i) rmsnorm(x + i * e, out_norm_.data(), s.logits_in.data() + i * e, e, cfg_.rms_eps);
  matmul(w_out_, s.logits_in.data(), n, logits, pool, i8);
}

void Model::prefill(const int32_t* tokens, int64_t n, KvPolicy& kv, ThreadPool& pool, ForwardScratch& s,
                    float* last_logits, std::vector<float>* all_logits, const Progress& progress, int64_t chunk) const {
  SPC_CHECK(n > 0, "prefill needs at least one token");
  // A continued prefill (positions already cached) attends over the cached prefix too: its
  // exact 16-bit K/V come back from the policy layer by layer (KvPolicy::export_layer).
  const int64_t pos0 = kv.n_cached();
  SPC_CHECK(pos0 + n <= kv.geometry().n_ctx, "prompt of %lld tokens after %lld cached does not fit the context of %lld",
            (long long)n, (long long)pos0, (long long)kv.geometry().n_ctx);
  const int64_t e = cfg_.n_embd, dq = (int64_t)cfg_.n_head * cfg_.head_dim, dkv = (int64_t)cfg_.n_head_kv * cfg_.head_dim;
  chunk = std::max<int64_t>(1, std::min(chunk, n));
  s.x.resize((size_t)(n * e));                   // [n][n_embd] residual stream of the new tokens
  s.k_layer.resize((size_t)((pos0 + n) * dkv));  // [pos0 + n][n_head_kv][head_dim] this layer's keys
  s.v_layer.resize((size_t)((pos0 + n) * dkv));
  s.q.resize((size_t)(chunk * dq));              // [chunk][n_head][head_dim]
  s.att.resize((size_t)(chunk * dq));
  std::vector<float> hbuf((size_t)(chunk * e));
  // RoPE angles of every new position, once for all layers.
  std::vector<int64_t> pos((size_t)n);
  for (int64_t i = 0; i < n; ++i) pos[i] = pos0 + i;
  rope_tables(cfg_.rope, pos.data(), n, s.rope_cos, s.rope_sin);
  const int64_t half = cfg_.rope.n_rot / 2;
  embed(tokens, n, s.x.data());
  const bool i8 = int8_prefill();
  const PrefillAttn attn = prefill_attn();
  const bool bf16 = attn != PrefillAttn::fp32, i8_keys = attn == PrefillAttn::int8, amx = attn == PrefillAttn::amx;
  const AttnShape shape{cfg_.n_head, cfg_.n_head_kv, cfg_.head_dim};
  // AMX: K rows up to the padded capacity, V transposed per 32-key chunk, the padding 0
  // (attention_prefill_amx, kv_to_bf16_amx).
  const int64_t amx_cap = amx ? prefill_amx_capacity(pos0 + n) : 0;
  if (amx) {
    s.k_bf16.assign((size_t)(amx_cap * dkv), (bf16_t)0);
    s.v_bf16.assign((size_t)(amx_cap * dkv), (bf16_t)0);
  } else if (bf16) {
    s.k_bf16.resize((size_t)((pos0 + n) * dkv));
    s.v_bf16.resize((size_t)((pos0 + n + 1) / 2 * 2 * dkv));
  }
  if (i8_keys) {
    s.k_i8.resize((size_t)((pos0 + n) * dkv));
    s.k_i8_scale.resize((size_t)((pos0 + n) * cfg_.n_head_kv));
    s.k_i8_sum.resize(s.k_i8_scale.size());
  }
  const PrefillKeysI8 keys8{s.k_i8.data(), s.k_i8_scale.data(), s.k_i8_sum.data()};
  // The K/V of positions [j0, j1) in the copies the bf16 / int8 kernels read.
  auto convert = [&](int64_t j0, int64_t j1) {
    if (amx) {
      kv_to_bf16_amx(shape, s.k_layer.data(), s.v_layer.data(), j0, j1, s.k_bf16.data(), s.v_bf16.data(), amx_cap);
      return;
    }
    kv_to_bf16(shape, s.k_layer.data(), s.v_layer.data(), j0, j1, s.k_bf16.data(), s.v_bf16.data());
    if (i8_keys) keys_to_i8(shape, s.k_layer.data(), j0, j1, s.k_i8.data(), s.k_i8_scale.data(), s.k_i8_sum.data());
  };
  for (int il = 0; il < cfg_.n_layer; ++il) {
    const LayerWeights& L = layers_[il];
    if (pos0 > 0) kv.export_layer(il, 0, pos0, s.k_layer.data(), s.v_layer.data());
    if (bf16 && pos0 > 0) convert(0, pos0);
    float* kl = s.k_layer.data() + pos0 * dkv;  // the new tokens' K/V
    float* vl = s.v_layer.data() + pos0 * dkv;
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t nc = std::min(chunk, n - c0);
      float* x = s.x.data() + c0 * e;
      for_rows(pool, nc, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) rmsnorm(x + i * e, L.attn_norm.data(), hbuf.data() + i * e, e, cfg_.rms_eps);
      });
      qkv(L, hbuf.data(), nc, s.rope_cos.data() + c0 * half, s.rope_sin.data() + c0 * half, s.q.data(), kl + c0 * dkv,
          vl + c0 * dkv, pool, i8);
      if (bf16) {
        convert(pos0 + c0, pos0 + c0 + nc);
        if (amx)
          attention_prefill_amx(shape, s.q.data(), nc, pos0 + c0, s.k_bf16.data(), s.v_bf16.data(), amx_cap,
                                s.att.data(), pool);
        else
          attention_prefill_bf16(shape, s.q.data(), nc, pos0 + c0, s.k_bf16.data(), s.v_bf16.data(), s.att.data(), pool,
                                 i8_keys ? &keys8 : nullptr);
      } else {
        attention_prefill(shape, s.q.data(), nc, pos0 + c0, s.k_layer.data(), s.v_layer.data(), s.att.data(), pool);
      }
      matmul(L.wo, s.att.data(), nc, hbuf.data(), pool, i8);
      for_rows(pool, nc, [&](int64_t b, int64_t end) { add_inplace(x + b * e, hbuf.data() + b * e, (end - b) * e); });
      ffn(L, x, nc, s, pool, i8);
    }
    kv.store_prefill(il, pos0, n, kl, vl);
    if (progress) progress(il + 1, cfg_.n_layer);
  }
  if (all_logits) {
    all_logits->resize((size_t)(n * cfg_.n_vocab));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t nc = std::min(chunk, n - c0);
      output(s.x.data() + c0 * e, nc, s, all_logits->data() + c0 * cfg_.n_vocab, pool, i8);
    }
    std::memcpy(last_logits, all_logits->data() + (n - 1) * cfg_.n_vocab, sizeof(float) * cfg_.n_vocab);
  } else {
    output(s.x.data() + (n - 1) * e, 1, s, last_logits, pool, i8);
  }
  // Release the prompt-sized buffers: decode needs only a few rows.
  std::vector<float>().swap(s.x);
  std::vector<float>().swap(s.k_layer);
  std::vector<float>().swap(s.v_layer);
  decltype(s.k_bf16)().swap(s.k_bf16);
  decltype(s.v_bf16)().swap(s.v_bf16);
  std::vector<int8_t>().swap(s.k_i8);
  std::vector<float>().swap(s.k_i8_scale);
  std::vector<int32_t>().swap(s.k_i8_sum);
  std::vector<float>().swap(s.rope_cos);
  std::vector<float>().swap(s.rope_sin);
}

void Model::decode(const int32_t* tokens, int n_rows, int n_keep, KvPolicy& kv, ThreadPool& pool, ForwardScratch& s,
                   float* logits) const {
  const DecodeSeq seq{tokens, n_rows, n_keep, &kv};
  decode_batch(&seq, 1, pool, s, logits);
}

void Model::decode_batch(const DecodeSeq* seqs, int n_seqs, ThreadPool& pool, ForwardScratch& s, float* logits) const {
  SPC_CHECK(n_seqs >= 1, "decode step without sequences");
  const int64_t e = cfg_.n_embd, dq = (int64_t)cfg_.n_head * cfg_.head_dim, dkv = (int64_t)cfg_.n_head_kv * cfg_.head_dim;
  // The sequences' rows stacked in order: sequence i's rows start at row first[i].
  std::vector<int64_t> first((size_t)n_seqs + 1, 0);
  for (int i = 0; i < n_seqs; ++i) {
    const DecodeSeq& q = seqs[i];
    SPC_CHECK(q.kv != nullptr && q.tokens != nullptr, "decode step: sequence %d has no tokens or KV policy", i);
    SPC_CHECK(q.n_rows >= 1 && q.n_keep >= 0 && q.n_keep <= q.n_rows, "invalid decode step (%d rows, %d kept)",
              q.n_rows, q.n_keep);
    for (int j = 0; j < i; ++j)
      SPC_CHECK(seqs[j].kv != q.kv, "decode step: sequences %d and %d share one KV policy", j, i);
    // Checked here, before any policy begins the step, so that a full sequence leaves the others untouched.
    SPC_CHECK(q.kv->n_cached() + q.n_keep <= q.kv->geometry().n_ctx,
              "context full: %lld positions cached, context size %lld%s", (long long)q.kv->n_cached(),
              (long long)q.kv->geometry().n_ctx, n_seqs > 1 ? strfmt(" (sequence %d of the batch)", i).c_str() : "");
    first[(size_t)i + 1] = first[(size_t)i] + q.n_rows;
  }
  const int64_t n_rows = first[(size_t)n_seqs];
  s.x.resize((size_t)(n_rows * e));
  s.q.resize((size_t)(n_rows * dq));
  s.k.resize((size_t)(n_rows * dkv));
  s.v.resize((size_t)(n_rows * dkv));
  s.att.resize((size_t)(n_rows * dq));
  std::vector<float> hbuf((size_t)(n_rows * e));  // ffn() uses s.h for itself
  std::vector<int32_t> tokens((size_t)n_rows);
  std::vector<int64_t> pos((size_t)n_rows);
  for (int i = 0; i < n_seqs; ++i)
    for (int r = 0; r < seqs[i].n_rows; ++r) {
      tokens[(size_t)(first[(size_t)i] + r)] = seqs[i].tokens[r];
      pos[(size_t)(first[(size_t)i] + r)] = seqs[i].kv->n_cached() + r;
    }
  float* h = hbuf.data();
  embed(tokens.data(), n_rows, s.x.data());
  rope_tables(cfg_.rope, pos.data(), n_rows, s.rope_cos, s.rope_sin);  // once for all layers
  for (int i = 0; i < n_seqs; ++i) seqs[i].kv->begin_step(seqs[i].n_rows, seqs[i].n_keep);
  DecodePhases& ph = s.phases;
  double t = now_ms();
  auto lap = [&t](double& acc) {
    const double now = now_ms();
    acc += now - t;
    t = now;
  };
  // Every op but attention works row by row, so the sequences share each weight read; each
  // sequence's policy attends over its own rows.
  for (int il = 0; il < cfg_.n_layer; ++il) {
    const LayerWeights& L = layers_[il];
    for (int64_t r = 0; r < n_rows; ++r) rmsnorm(s.x.data() + r * e, L.attn_norm.data(), h + r * e, e, cfg_.rms_eps);
    qkv(L, h, n_rows, s.rope_cos.data(), s.rope_sin.data(), s.q.data(), s.k.data(), s.v.data(), pool, int8_decode_);
    lap(ph.qkv_ms);
    for (int i = 0; i < n_seqs; ++i) {
      const DecodeSeq& q = seqs[i];
      const int64_t r0 = first[(size_t)i];
      const DecodeRows rows{q.n_rows, q.n_keep, pos[(size_t)r0], s.q.data() + r0 * dq, s.k.data() + r0 * dkv,
                            s.v.data() + r0 * dkv};
      q.kv->attend(il, rows, s.att.data() + r0 * dq, pool);
    }
    lap(ph.attend_ms);
    matmul(L.wo, s.att.data(), n_rows, h, pool, int8_decode_);
    add_inplace(s.x.data(), h, n_rows * e);
    lap(ph.wo_ms);
    ffn(L, s.x.data(), n_rows, s, pool, int8_decode_);
    lap(ph.ffn_ms);
  }
  for (int i = 0; i < n_seqs; ++i) seqs[i].kv->end_step();
  lap(ph.end_step_ms);
  output(s.x.data(), n_rows, s, logits, pool, int8_decode_);
  lap(ph.output_ms);
  ph.steps += 1;
}

}  // namespace spc
