// The low-bit policies: `kivi` (low-bit copy + residual window), `specache` (plus a 16-bit
// top-k buffer prefetched asynchronously from the slow tier, selected by the speculative row),
// `specache-exact` (the real token selects its own top-k, fetched synchronously) and
// `topk-oracle` (top-k chosen from exact 16-bit scores). See docs/specache-method.md §3-§8.
//
// Per layer and KV head the fast tier holds: key blocks of g tokens (per-channel codes), value
// tokens (per-token codes), the residual window of recent 16-bit tokens, and the top-k buffer
// (16-bit K|V rows, the slow store's row format) with the positions it holds.
// Decode attention per layer:
//   pass 1 (parallel over head x chunk): low-bit scores of every query against the key blocks;
//   [exact/oracle: select top-k from row 0 and fetch it now]
//   pass 2 (parallel over head x chunk): exact scores replace low-bit ones at top-k positions,
//           chunk-local softmax, low-bit value sum corrected to exact V at top-k positions;
//   pass 3 (per head): window and the step's own rows in 16-bit; merge all partial states;
//   [specache: select top-k from the last (speculative) row, start its prefetch at once].
// Only the first n_keep rows are appended (slow store + window); full key blocks leave the window.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

#include "kv/kv_policy.h"
#include "kv/lowbit.h"
#include "kv/policies.h"
#include "ops/attention.h"
#include "tier/copy_engine.h"
#include "tier/slow_store.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/lazy_buffer.h"
#include "util/threadpool.h"

namespace spc {

namespace {

enum class Select { None, Speculative, OwnLowBit, Oracle };

struct HeadState {
  LazyBuffer kblocks;              // [n_ctx/g + 1][key_block_bytes] low-bit key blocks
  LazyBuffer vals;                 // [n_ctx + g][value_token_bytes] low-bit value tokens
  std::vector<fp16_t> win;         // [n_win][2*head_dim] residual window, K|V rows (positions n_quant ..)
  std::vector<int64_t> topk_pos;   // positions held by the top-k buffer (ascending)
  std::vector<fp16_t> topk_rows;   // [topk_pos.size()][2*head_dim] their 16-bit K|V rows
  std::vector<int64_t> next_pos;   // selection for the next step (row i <-> next_rows row i)
  std::vector<fp16_t> next_rows;
  std::vector<int32_t> next_miss;  // for each miss: index into next_pos; rows arrive in staging order
};

struct LayerState {
  std::vector<HeadState> heads;
  int64_t n_quant = 0;  // positions in the low-bit copy (multiple of g)
  int64_t n_tok = 0;    // positions stored (low-bit + window)
  CopyEngine::Ticket ticket = 0;
  bool pending = false;             // a prefetch is in flight into next_* / staging
  std::vector<fp16_t> staging;      // [n_miss_total][2*head_dim] gathered rows, all heads
  double recall_sum = 0;
  uint64_t recall_n = 0;
};

// probs[j] += softmax(s)[j]
void softmax_probs_add(std::vector<float>& s, std::vector<float>& probs) {
  if (s.empty()) return;
  const float m = *std::max_element(s.begin(), s.end());
  double l = 0;
  for (float& x : s) l += (x = exp_approx(x - m));
  const float inv = (float)(1.0 / l);
  for (size_t j = 0; j < s.size(); ++j) probs[j] += s[j] * inv;
}

class LowBitPolicy final : public KvPolicy {
 public:
  LowBitPolicy(const KvConfig& cfg, const KvGeometry& g, Select sel, const char* name)
      : g_(g), cfg_(cfg), sel_(sel), name_(name) {
    spec_ = LowBitSpec{cfg.bits, cfg.group, g.head_dim};
    spec_.validate();
    k_ = sel == Select::None ? 0 : cfg.topk;
    group_ = g.n_head / g.n_head_kv;
    row_elems_ = 2 * g.head_dim;
    if (sel != Select::None) {
      SlowGeometry sg{g.n_layer, g.n_head_kv, g.head_dim, g.n_ctx + 2};
      store_ = cfg.store == "file" ? make_file_store(sg, cfg.dir) : make_host_store(sg);
      copy_ = std::make_unique<CopyEngine>(*store_);
      if (cfg.inject_delay_us) copy_->inject_delays(cfg.inject_delay_us, cfg.inject_seed);
    }
    layers_.resize(g.n_layer);
    const int64_t n_blocks = g.n_ctx / spec_.group + 2;
    for (auto& L : layers_) {
      L.heads.resize(g.n_head_kv);
      for (auto& H : L.heads) {
        H.kblocks = LazyBuffer((size_t)n_blocks * spec_.key_block_bytes());
        H.vals = LazyBuffer((size_t)(n_blocks * spec_.group) * spec_.value_token_bytes());
      }
    }
  }

  ~LowBitPolicy() override {
    // Drain in-flight prefetches before their destination buffers go away.
    copy_.reset();
  }

  const char* name() const override { return name_; }
  const KvGeometry& geometry() const override { return g_; }
  int64_t n_cached() const override { return n_; }
  bool wants_speculative_row() const override { return sel_ == Select::Speculative; }

  void store_prefill(int il, int64_t pos0, int64_t n, const float* k, const float* v) override {
    LayerState& L = layers_[il];
    SPC_CHECK(pos0 == L.n_tok && pos0 + n <= g_.n_ctx, "prefill of positions [%lld, %lld) does not fit (%lld cached, context %lld)",
              (long long)pos0, (long long)(pos0 + n), (long long)L.n_tok, (long long)g_.n_ctx);
    append(il, pos0, n, k, v);
    if (il == g_.n_layer - 1) {
      n_ = pos0 + n;
      update_peak();
    }
  }

  void begin_step(int n_rows, int n_keep) override {
    SPC_CHECK(n_ + n_keep <= g_.n_ctx, "context full: %lld positions cached, context size %lld", (long long)n_,
              (long long)g_.n_ctx);
    SPC_CHECK(n_rows <= 2, "low-bit policies decode at most 2 rows per step");
    n_rows_ = n_rows;
    n_keep_ = n_keep;
  }

  void end_step() override {
    n_ += n_keep_;
    ++steps_;
    update_peak();
  }

  void attend(int il, const DecodeRows& rows, float* out, ThreadPool& pool) override;

  KvStats stats() const override {
    KvStats s;
    s.policy = name_;
    s.fast_bytes = peak_fast_;
    s.slow_bytes = store_ ? store_->bytes_stored() : 0;
    s.decode_steps = steps_;
    if (copy_) {
      const CopyEngine::Stats cs = copy_->stats();
      s.stall_ms = cs.stall_ms;
      s.copy_ms = cs.copy_ms;
      s.fetched_bytes_per_step = steps_ ? (double)cs.bytes / steps_ : 0;
    }
    s.prefetch_reuse_rate = selected_ ? (double)hits_ / selected_ : 0;
    double rs = 0;
    uint64_t rn = 0;
    for (const auto& L : layers_) {
      rs += L.recall_sum;
      rn += L.recall_n;
      s.spec_recall_per_layer.push_back(L.recall_n ? L.recall_sum / L.recall_n : 0);
    }
    s.spec_recall = rn ? rs / rn : 0;
    if (!wants_speculative_row()) s.spec_recall_per_layer.clear();
    if (cfg_.diagnostics && mass_n_) s.exact_mass_served = mass_sum_ / mass_n_;
    return s;
  }

  void export_layer(int il, float* k, float* v) const override {
    SPC_CHECK(store_ != nullptr, "policy %s keeps no 16-bit copy to export", name_);
    std::vector<fp16_t> buf((size_t)n_ * row_elems_);
    const int d = g_.head_dim;
    for (int h = 0; h < g_.n_head_kv; ++h) {
      if (n_ > 0) store_->read_range(il, h, 0, n_, buf.data());
      for (int64_t p = 0; p < n_; ++p)
        for (int c = 0; c < d; ++c) {
          k[(p * g_.n_head_kv + h) * d + c] = fp16_to_fp32(buf[p * row_elems_ + c]);
          v[(p * g_.n_head_kv + h) * d + c] = fp16_to_fp32(buf[p * row_elems_ + d + c]);
        }
    }
  }

 private:
  void append(int il, int64_t pos0, int64_t n, const float* k, const float* v);
  void flush_window(LayerState& L);
  void select_topk(const float* probs, int64_t n_pos, std::vector<int64_t>& out) const;
  void start_fetch(int il, bool sync);
  void finish_fetch(int il);
  void update_peak();
  void measure_exact_mass(int il, const DecodeRows& rows);
  float exact_dot(const float* q, const fp16_t* krow) const { return dot_f32_f16(q, krow, g_.head_dim); }

  KvGeometry g_;
  KvConfig cfg_;
  Select sel_;
  const char* name_;
  LowBitSpec spec_;
  int k_ = 0, group_ = 1, row_elems_ = 0;
  std::unique_ptr<SlowStore> store_;
  std::unique_ptr<CopyEngine> copy_;
  std::vector<LayerState> layers_;
  int64_t n_ = 0;
  int n_rows_ = 1, n_keep_ = 1;
  uint64_t steps_ = 0, peak_fast_ = 0, hits_ = 0, selected_ = 0;
  double mass_sum_ = 0;
  uint64_t mass_n_ = 0;
  std::mutex recall_mu_;
  // Per-step scratch (reused).
  std::vector<float> qs_;       // [n_q][d] queries of all heads, scaled by 1/sqrt(d): index (h*n_q + iq)
  std::vector<float> scores_;   // [n_head_kv][n_q][n_quant]
  std::vector<AttnPartial> parts_;  // [n_head_kv][n_chunks + 1][n_q]
  std::vector<float> outs_;     // [n_head_kv][n_chunks + 1][n_q][d]
  std::vector<float> sel_probs_;  // [n_head_kv][n_tok] speculative row's attention, averaged over its query heads
};

void LowBitPolicy::append(int il, int64_t pos0, int64_t n, const float* k, const float* v) {
  LayerState& L = layers_[il];
  const int d = g_.head_dim, nkv = g_.n_head_kv;
  std::vector<fp16_t> rows((size_t)n * nkv * row_elems_);  // [n][n_kv][K|V]
  for (int64_t i = 0; i < n; ++i)
    for (int h = 0; h < nkv; ++h) {
      fp16_t* r = rows.data() + (i * nkv + h) * row_elems_;
      for (int c = 0; c < d; ++c) {
        r[c] = fp32_to_fp16(k[(i * nkv + h) * d + c]);
        r[d + c] = fp32_to_fp16(v[(i * nkv + h) * d + c]);
      }
    }
  if (store_) store_->write_rows(il, pos0, n, rows.data());
  for (int h = 0; h < nkv; ++h) {
    HeadState& H = L.heads[h];
    const size_t old = H.win.size();
    H.win.resize(old + (size_t)n * row_elems_);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(H.win.data() + old + i * row_elems_, rows.data() + (i * nkv + h) * row_elems_, sizeof(fp16_t) * row_elems_);
  }
  L.n_tok = pos0 + n;
  flush_window(L);
}

// Quantizes whole blocks of g tokens out of the window while it holds at least R + g tokens.
void LowBitPolicy::flush_window(LayerState& L) {
  const int g = spec_.group, d = g_.head_dim;
  const int64_t n_win = L.n_tok - L.n_quant;
  if (n_win < cfg_.window + g) return;
  const int64_t n_blocks = (n_win - cfg_.window) / g;
  std::vector<float> kb((size_t)g * d);
  std::vector<float> vt((size_t)d);
  for (auto& H : L.heads) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      const fp16_t* src = H.win.data() + b * g * row_elems_;
      for (int t = 0; t < g; ++t)
        for (int c = 0; c < d; ++c) kb[t * d + c] = fp16_to_fp32(src[t * row_elems_ + c]);
      const int64_t blk = L.n_quant / g + b;
      // Sink positions are always served in 16-bit: keep their (often extreme) keys out of the
      // block's per-channel ranges so the other tokens of the block keep their resolution.
      const int64_t n_sink_here = std::clamp<int64_t>(cfg_.sinks - blk * g, 0, g - 1);
      for (int64_t t = 0; t < n_sink_here; ++t)
        std::copy_n(kb.data() + n_sink_here * d, d, kb.data() + t * d);
      lowbit_quantize_keys(spec_, kb.data(), d, H.kblocks.data() + blk * spec_.key_block_bytes());
      for (int t = 0; t < g; ++t) {
        for (int c = 0; c < d; ++c) vt[c] = fp16_to_fp32(src[t * row_elems_ + d + c]);
        lowbit_quantize_value(spec_, vt.data(), H.vals.data() + (blk * g + t) * spec_.value_token_bytes());
      }
    }
    H.win.erase(H.win.begin(), H.win.begin() + n_blocks * g * row_elems_);
    // A prefill passes the whole prompt through the window: give that memory back.
    if (H.win.capacity() > 4 * (size_t)(cfg_.window + g) * row_elems_) H.win.shrink_to_fit();
  }
  L.n_quant += n_blocks * g;
}

// Top-k positions in [0, n_pos) by probs (descending), returned ascending.
void LowBitPolicy::select_topk(const float* probs, int64_t n_pos, std::vector<int64_t>& out) const {
  out.clear();
  const int64_t k = std::min<int64_t>(k_, n_pos);
  if (k <= 0) return;
  // Attention sinks (the first --kv-sinks positions) always take their place in the k.
  const int64_t n_sink = std::min<int64_t>(cfg_.sinks, k);
  for (int64_t j = 0; j < n_sink; ++j) out.push_back(j);
  const int64_t rest = k - n_sink;
  if (rest > 0) {
    std::vector<int64_t> idx((size_t)(n_pos - n_sink));
    for (int64_t j = n_sink; j < n_pos; ++j) idx[j - n_sink] = j;
    std::nth_element(idx.begin(), idx.begin() + (rest - 1), idx.end(), [&](int64_t a, int64_t b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    out.insert(out.end(), idx.begin(), idx.begin() + rest);
  }
  std::sort(out.begin(), out.end());
}

// Builds next_* from next_pos: rows already resident are copied from the current buffer (hit
// map), the others are gathered from the slow tier in one batch for the whole layer.
void LowBitPolicy::start_fetch(int il, bool sync) {
  LayerState& L = layers_[il];
  std::vector<RowRef> refs;
  for (int h = 0; h < g_.n_head_kv; ++h) {
    HeadState& H = L.heads[h];
    H.next_rows.resize(H.next_pos.size() * row_elems_);
    H.next_miss.clear();
    for (size_t i = 0; i < H.next_pos.size(); ++i) {
      const int64_t p = H.next_pos[i];
      auto it = std::lower_bound(H.topk_pos.begin(), H.topk_pos.end(), p);
      if (it != H.topk_pos.end() && *it == p) {
        std::memcpy(H.next_rows.data() + i * row_elems_, H.topk_rows.data() + (it - H.topk_pos.begin()) * row_elems_,
                    sizeof(fp16_t) * row_elems_);
        ++hits_;
      } else {
        H.next_miss.push_back((int32_t)i);
        refs.push_back(RowRef{il, h, p});
      }
      ++selected_;
    }
  }
  L.staging.resize(refs.size() * row_elems_);
  if (refs.empty()) {
    L.pending = false;
    finish_fetch(il);
    return;
  }
  if (sync) {
    copy_->gather_now(refs.data(), refs.size(), L.staging.data());
    finish_fetch(il);
  } else {
    L.ticket = copy_->submit_gather(std::move(refs), L.staging.data());
    L.pending = true;
  }
}

// Places gathered rows, then the next selection becomes the current top-k buffer.
void LowBitPolicy::finish_fetch(int il) {
  LayerState& L = layers_[il];
  if (L.pending) {
    copy_->wait(L.ticket);
    L.pending = false;
  }
  size_t s = 0;
  for (auto& H : L.heads) {
    for (int32_t i : H.next_miss)
      std::memcpy(H.next_rows.data() + (size_t)i * row_elems_, L.staging.data() + (s++) * row_elems_, sizeof(fp16_t) * row_elems_);
    H.topk_pos.swap(H.next_pos);
    H.topk_rows.swap(H.next_rows);
    H.next_pos.clear();
    H.next_miss.clear();
  }
}

void LowBitPolicy::update_peak() {
  uint64_t total = 0;
  for (const auto& L : layers_) {
    const uint64_t lowbit = (uint64_t)(L.n_quant / spec_.group) * spec_.key_block_bytes() +
                            (uint64_t)L.n_quant * spec_.value_token_bytes();
    const uint64_t window = (uint64_t)(L.n_tok - L.n_quant) * row_elems_ * sizeof(fp16_t);
    // Top-k buffer: current + next selection, each k rows (the staging area holds the misses of next).
    const uint64_t topk = (uint64_t)2 * std::min<int64_t>(k_, L.n_quant) * row_elems_ * sizeof(fp16_t);
    total += g_.n_head_kv * (lowbit + window + topk);
  }
  peak_fast_ = std::max(peak_fast_, total);
}

void LowBitPolicy::attend(int il, const DecodeRows& rows, float* out, ThreadPool& pool) {
  LayerState& L = layers_[il];
  const int d = g_.head_dim, nkv = g_.n_head_kv, g = spec_.group;
  const int n_q = rows.n_rows * group_;  // queries per KV head: iq = r * group + (head within group)
  const float scale = 1.0f / std::sqrt((float)d);
  const int64_t nqt = L.n_quant;
  const int64_t n_blocks = nqt / g;

  // This step's top-k buffer was prefetched during the previous step.
  if (sel_ == Select::Speculative && L.pending) finish_fetch(il);

  qs_.resize((size_t)nkv * n_q * d);
  for (int h = 0; h < nkv; ++h)
    for (int iq = 0; iq < n_q; ++iq) {
      const int r = iq / group_, hq = h * group_ + iq % group_;
      for (int c = 0; c < d; ++c) qs_[((size_t)h * n_q + iq) * d + c] = rows.q[((int64_t)r * g_.n_head + hq) * d + c] * scale;
    }

  // Chunks of key blocks, several per thread.
  const int64_t blocks_per_chunk = std::max<int64_t>(8, (n_blocks * nkv + 4 * pool.size() - 1) / (4 * pool.size()));
  const int64_t n_chunks = n_blocks ? (n_blocks + blocks_per_chunk - 1) / blocks_per_chunk : 0;
  const int64_t n_tasks = n_chunks * nkv;
  scores_.resize((size_t)nkv * n_q * std::max<int64_t>(nqt, 1));
  auto S = [&](int h, int iq) { return scores_.data() + ((size_t)h * n_q + iq) * nqt; };

  // Pass 1: low-bit scores.
  pool.for_each_task(n_tasks, [&](int64_t task, int) {
    {
      const int h = (int)(task % nkv);
      const int64_t b0 = task / nkv * blocks_per_chunk, b1 = std::min(n_blocks, b0 + blocks_per_chunk);
      lowbit_score_keys(spec_, L.heads[h].kblocks.data() + b0 * spec_.key_block_bytes(), (int)(b1 - b0),
                        qs_.data() + (size_t)h * n_q * d, n_q, d, S(h, 0) + b0 * g, nqt);
    }
  });

  // Non-speculative selection: the real token picks its own top-k before attending.
  if ((sel_ == Select::OwnLowBit || sel_ == Select::Oracle) && nqt > 0 && k_ > 0) {
    std::vector<float> probs((size_t)nqt);
    std::vector<fp16_t> ex;
    for (int h = 0; h < nkv; ++h) {
      std::fill(probs.begin(), probs.end(), 0.0f);
      if (sel_ == Select::Oracle) {
        ex.resize((size_t)nqt * row_elems_);
        store_->read_range(il, h, 0, nqt, ex.data());
      }
      for (int iq = 0; iq < group_; ++iq) {  // row 0's query heads
        const float* q = qs_.data() + ((size_t)h * n_q + iq) * d;
        std::vector<float> s(S(h, iq), S(h, iq) + nqt);
        if (sel_ == Select::Oracle)
          for (int64_t j = 0; j < nqt; ++j) s[j] = exact_dot(q, ex.data() + j * row_elems_);
        softmax_probs_add(s, probs);
      }
      select_topk(probs.data(), nqt, L.heads[h].next_pos);
    }
    start_fetch(il, /*sync=*/true);
  }

  // Pass 2: exact scores at top-k positions, chunk softmax, value sums.
  parts_.assign((size_t)nkv * (n_chunks + 1) * n_q, AttnPartial{-std::numeric_limits<float>::infinity(), 0.0f});
  outs_.assign((size_t)nkv * (n_chunks + 1) * n_q * d, 0.0f);
  auto P = [&](int h, int64_t ch, int iq) -> AttnPartial& { return parts_[((size_t)h * (n_chunks + 1) + ch) * n_q + iq]; };
  auto O = [&](int h, int64_t ch, int iq) { return outs_.data() + (((size_t)h * (n_chunks + 1) + ch) * n_q + iq) * d; };
  pool.for_each_task(n_tasks, [&](int64_t task, int) {
    float vdq[256];
    {
      const int h = (int)(task % nkv);
      const int64_t ch = task / nkv;
      const int64_t t0 = ch * blocks_per_chunk * g, t1 = std::min(nqt, t0 + blocks_per_chunk * g);
      const HeadState& H = L.heads[h];
      const auto lo = std::lower_bound(H.topk_pos.begin(), H.topk_pos.end(), t0);
      const auto hi = std::lower_bound(H.topk_pos.begin(), H.topk_pos.end(), t1);
      for (int iq = 0; iq < n_q; ++iq) {
        float* s = S(h, iq);
        const float* q = qs_.data() + ((size_t)h * n_q + iq) * d;
        for (auto it = lo; it != hi; ++it) s[*it] = exact_dot(q, H.topk_rows.data() + (it - H.topk_pos.begin()) * row_elems_);
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = t0; j < t1; ++j) m = std::max(m, s[j]);
        float l = 0;
        for (int64_t j = t0; j < t1; ++j) {
          s[j] = exp_approx(s[j] - m);
          l += s[j];
        }
        P(h, ch, iq) = AttnPartial{m, l};
      }
      float* o0 = O(h, ch, 0);
      lowbit_accumulate_values(spec_, H.vals.data() + t0 * spec_.value_token_bytes(), (int)(t1 - t0), S(h, 0) + t0, n_q,
                               nqt, o0, d);
      // Top-k positions: replace the low-bit value by the exact one.
      for (auto it = lo; it != hi; ++it) {
        lowbit_dequantize_value(spec_, H.vals.data() + *it * spec_.value_token_bytes(), vdq);
        const fp16_t* vrow = H.topk_rows.data() + (it - H.topk_pos.begin()) * row_elems_ + d;
        for (int iq = 0; iq < n_q; ++iq) {
          const float p = S(h, iq)[*it];
          float* o = O(h, ch, iq);
          for (int c = 0; c < d; ++c) o[c] += p * (fp16_to_fp32(vrow[c]) - vdq[c]);
        }
      }
    }
  });

  // Pass 3 (per head): the 16-bit window and the step's own rows; merge; the speculative row's
  // probabilities over every stored position (quantized and window) for the selection.
  const bool speculate = sel_ == Select::Speculative && k_ > 0;
  const int64_t n_tok_old = L.n_tok;
  if (speculate) sel_probs_.assign((size_t)nkv * n_tok_old, 0.0f);
  pool.for_each_task(nkv, [&](int64_t task, int) {
    std::vector<float> sc, own;
    std::vector<int64_t> own_top;
    {
      const int h = (int)task;
      const HeadState& H = L.heads[h];
      const int64_t n_win = L.n_tok - L.n_quant;
      float* winp = speculate ? sel_probs_.data() + (size_t)h * n_tok_old + nqt : nullptr;
      for (int iq = 0; iq < n_q; ++iq) {
        const int r = iq / group_;
        const float* q = qs_.data() + ((size_t)h * n_q + iq) * d;
        const int64_t n_ex = n_win + r + 1;  // window, then rows 0..r
        sc.resize((size_t)n_ex);
        for (int64_t j = 0; j < n_win; ++j) sc[j] = exact_dot(q, H.win.data() + j * row_elems_);
        for (int rr = 0; rr <= r; ++rr) {
          const float* kr = rows.k + ((int64_t)rr * nkv + h) * d;
          float s = 0;
          for (int c = 0; c < d; ++c) s += q[c] * kr[c];
          sc[n_win + rr] = s;
        }
        float m = -std::numeric_limits<float>::infinity();
        for (float s : sc) m = std::max(m, s);
        float l = 0;
        float* o = O(h, n_chunks, iq);
        for (int64_t j = 0; j < n_ex; ++j) {
          const float p = exp_approx(sc[j] - m);
          l += p;
          const float* vr = nullptr;
          if (j < n_win) {
            axpy_f16(p, H.win.data() + j * row_elems_ + d, o, d);
          } else {
            vr = rows.v + ((int64_t)(j - n_win) * nkv + h) * d;
            for (int c = 0; c < d; ++c) o[c] += p * vr[c];
          }
        }
        P(h, n_chunks, iq) = AttnPartial{m, l};
        // Merge every chunk into the exact part's state.
        AttnPartial acc{m, l};
        for (int64_t ch = 0; ch < n_chunks; ++ch) attn_merge(acc, o, P(h, ch, iq), O(h, ch, iq), d);
        const int hq = h * group_ + iq % group_;
        float* dst = out + ((int64_t)r * g_.n_head + hq) * d;
        for (int c = 0; c < d; ++c) dst[c] = o[c] / acc.l;
        P(h, n_chunks, iq) = acc;  // global state, used to normalize chunk probabilities
        if (winp && r == rows.n_rows - 1)
          for (int64_t j = 0; j < n_win; ++j) winp[j] += exp_approx(sc[j] - acc.m) / acc.l;
      }
      if (!speculate) return;
      // Attention probabilities of a row over the quantized positions, averaged over its query heads.
      auto row_probs = [&](int r, std::vector<float>& pr) {
        pr.assign((size_t)nqt, 0.0f);
        for (int hi = 0; hi < group_; ++hi) {
          const int iq = r * group_ + hi;
          const AttnPartial glob = P(h, n_chunks, iq);
          const float* s = S(h, iq);
          for (int64_t ch = 0; ch < n_chunks; ++ch) {
            const float f = std::exp(P(h, ch, iq).m - glob.m) / glob.l;
            const int64_t t0 = ch * blocks_per_chunk * g, t1 = std::min(nqt, t0 + blocks_per_chunk * g);
            for (int64_t j = t0; j < t1; ++j) pr[j] += s[j] * f;
          }
        }
      };
      if (nqt > 0) {
        std::vector<float> last;
        row_probs(rows.n_rows - 1, last);
        std::copy(last.begin(), last.end(), sel_probs_.begin() + (ptrdiff_t)h * n_tok_old);
      }
      if (rows.n_rows == 2 && !H.topk_pos.empty() && nqt > 0) {  // recall of last step's guess vs the real row's own top-k
        row_probs(0, own);
        select_topk(own.data(), nqt, own_top);
        size_t inter = 0;
        for (int64_t p : own_top) inter += std::binary_search(H.topk_pos.begin(), H.topk_pos.end(), p);
        const double rc = own_top.empty() ? 1.0 : (double)inter / own_top.size();
        std::lock_guard<std::mutex> lock(recall_mu_);
        L.recall_sum += rc;
        L.recall_n += 1;
      }
    }
  });

  if (cfg_.diagnostics && nqt > 0 && rows.n_keep > 0) measure_exact_mass(il, rows);
  if (rows.n_keep > 0) append(il, rows.pos0, rows.n_keep, rows.k, rows.v);
  // Speculative selection over every position now in the low-bit copy (tokens that just left the
  // window compete with their exact window scores); its prefetch starts at once and overlaps the
  // remaining layers of this step.
  if (speculate && L.n_quant > 0) {
    for (int h = 0; h < nkv; ++h)
      select_topk(sel_probs_.data() + (size_t)h * n_tok_old, std::min(L.n_quant, n_tok_old), L.heads[h].next_pos);
    start_fetch(il, /*sync=*/false);
  }
}

// Diagnostics: share of the real row's exact attention mass that this step computed in 16-bit
// (top-k buffer, window, own row), using exact keys read back from the slow tier.
void LowBitPolicy::measure_exact_mass(int il, const DecodeRows& rows) {
  const LayerState& L = layers_[il];
  const int d = g_.head_dim, nkv = g_.n_head_kv, n_q = rows.n_rows * group_;
  const int64_t nqt = L.n_quant, n_win = L.n_tok - L.n_quant;
  std::vector<fp16_t> ex((size_t)nqt * row_elems_);
  std::vector<float> s;
  for (int h = 0; h < nkv; ++h) {
    const HeadState& H = L.heads[h];
    store_->read_range(il, h, 0, nqt, ex.data());
    for (int iq = 0; iq < group_; ++iq) {  // row 0 only
      const float* q = qs_.data() + ((size_t)h * n_q + iq) * d;
      s.resize((size_t)(nqt + n_win + 1));
      for (int64_t j = 0; j < nqt; ++j) s[j] = exact_dot(q, ex.data() + j * row_elems_);
      for (int64_t j = 0; j < n_win; ++j) s[nqt + j] = exact_dot(q, H.win.data() + j * row_elems_);
      float s0 = 0;
      for (int c = 0; c < d; ++c) s0 += q[c] * rows.k[(int64_t)h * d + c];
      s[nqt + n_win] = s0;
      const float m = *std::max_element(s.begin(), s.end());
      double total = 0, served = 0;
      for (int64_t j = 0; j < (int64_t)s.size(); ++j) {
        const double p = std::exp((double)s[j] - m);
        total += p;
        if (j >= nqt || std::binary_search(H.topk_pos.begin(), H.topk_pos.end(), j)) served += p;
      }
      mass_sum_ += served / total;
      mass_n_ += 1;
    }
  }
}

}  // namespace

std::unique_ptr<KvPolicy> make_lowbit_policy(const KvConfig& cfg, const KvGeometry& g) {
  if (cfg.policy == "kivi") return std::make_unique<LowBitPolicy>(cfg, g, Select::None, "kivi");
  if (cfg.policy == "specache") return std::make_unique<LowBitPolicy>(cfg, g, Select::Speculative, "specache");
  if (cfg.policy == "specache-exact") return std::make_unique<LowBitPolicy>(cfg, g, Select::OwnLowBit, "specache-exact");
  if (cfg.policy == "topk-oracle") return std::make_unique<LowBitPolicy>(cfg, g, Select::Oracle, "topk-oracle");
  SPC_ASSERT(false);
  return nullptr;
}

}  // namespace spc
