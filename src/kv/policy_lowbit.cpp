// The low-bit policies: `kivi` (low-bit copy + residual window), `specache` (plus a 16-bit
// top-k buffer prefetched asynchronously from the slow tier, selected by the speculative row),
// `specache-exact` (the real token selects its own top-k, fetched synchronously) and
// `topk-oracle` (top-k chosen from exact 16-bit scores). See docs/specache-method.md §3-§8.
//
// Per layer and KV head the fast tier holds: key blocks of g tokens (per-channel codes), value
// tokens (per-token codes), the residual window of recent 16-bit tokens, and the top-k buffer:
// k slots of 16-bit K|V rows (the slow store's row format). A new selection keeps the slots of
// positions it shares with the old one (hit map) and the copy engine writes the misses straight
// into the slots of evicted positions, so the buffer is k rows, not k rows plus staging.
// Decode attention per layer (one pool dispatch):
//   [exact/oracle: score, select top-k from row 0 and fetch it synchronously first]
//   fused pass (parallel over head x chunk of key blocks, plus one task per head for the
//           16-bit window and the step's own rows): exact scores at top-k positions, low-bit
//           scores (debias and chunk maxima in the score kernel; top-k positions -> -inf),
//           softmax numerators computed inside the packed value sum (lowbit_softmax_values),
//           exact V at top-k positions; merge of the partial states (serial, cheap);
//   selection pass (specache only), as background work on the pool's worker while the caller
//           goes on with the layer's projections (inline, parallel over heads, with one thread
//           or --kv-diagnostics): the speculative row's attention probabilities, averaged over
//           its query heads, pick the next top-k (exact radix select), then the prefetch of
//           that top-k starts at once, overlapping the remaining layers of this step;
//           spec_recall from the real row's own top-k; the next attend or end_step waits for it;
//   append the kept rows (slow store + window; full key blocks leave the window).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "kv/kv_policy.h"
#include "kv/lowbit.h"
#include "kv/policies.h"
#include "kv/shared_segments.h"
#include "kv/topk.h"
#include "ops/attention.h"
#include "ops/vec_math.h"
#include "tier/copy_engine.h"
#include "tier/slow_store.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/lazy_buffer.h"
#include "util/prefetch.h"
#include "util/threadpool.h"

namespace spc {

namespace {

enum class Select { None, Speculative, OwnLowBit, Oracle };

constexpr uint64_t kRecallEvery = 4;  // spec_recall sampling period in decode steps
constexpr int kMaxGroup = 16;         // query heads per KV head (GQA ratio)

// Low-bit blocks of a shared prompt prefix (share_prefix) that live in another session's buffers:
// blocks [end of the segment before, end), indexed in those buffers by absolute block number.
struct BlockSegment {
  std::shared_ptr<const LazyBuffer> k, v;
  int64_t end = 0;
};

struct HeadState {
  std::shared_ptr<LazyBuffer> kblocks;  // [n_ctx/g + 2][key_block_bytes] low-bit key blocks
  std::shared_ptr<LazyBuffer> vals;     // [n_ctx/g + 2][value_block_bytes] low-bit value blocks
  std::vector<BlockSegment> shared;     // a shared prefix's blocks (before those of kblocks/vals)
  std::vector<fp16_t> win;         // [n_win][2*head_dim] residual window, K|V rows (positions n_quant ..)
  // What the top-k buffer holds, sorted by position: (position, slot). While a prefetch is in
  // flight it already describes the buffer as it will be once the layer's ticket completes.
  std::vector<std::pair<int64_t, int32_t>> resident;
  std::vector<int64_t> next_pos;   // the next selection (ascending)
  // Top-k thresholds carried from step to step (topk_indices' hint): the speculative selection,
  // and row 0's own top-k for spec_recall.
  float sel_hint = -std::numeric_limits<float>::infinity();
  float recall_hint = -std::numeric_limits<float>::infinity();

  // Calls f(keys, values, b0, b1) for each run [b0, b1) of blocks [lo, hi) that lives in one
  // memory; keys and values are indexed by absolute block number.
  template <class F> void for_block_runs(int64_t lo, int64_t hi, F&& f) const {
    for (const BlockSegment& sg : shared) {
      if (lo >= hi) return;
      if (lo >= sg.end) continue;
      const int64_t e = std::min(hi, sg.end);
      f(sg.k->data(), sg.v->data(), lo, e);
      lo = e;
    }
    if (lo < hi) f(static_cast<const uint8_t*>(kblocks->data()), static_cast<const uint8_t*>(vals->data()), lo, hi);
  }

  bool holds(int64_t p) const {
    auto it = std::lower_bound(resident.begin(), resident.end(), std::make_pair(p, INT32_MIN));
    return it != resident.end() && it->first == p;
  }
  // Share of the positions `sel` that the buffer holds (spec_recall); 1 for an empty selection.
  double share_held(const std::vector<int64_t>& sel) const {
    size_t inter = 0;
    for (int64_t p : sel) inter += holds(p);
    return sel.empty() ? 1.0 : (double)inter / sel.size();
  }
};

struct LayerState {
  std::vector<HeadState> heads;
  int64_t n_quant = 0;  // positions in the low-bit copy (multiple of g)
  int64_t n_tok = 0;    // positions stored (low-bit + window)
  std::vector<fp16_t> topk_rows;  // [n_head_kv][k][2*head_dim] the top-k buffer (allocated at the first fetch)
  CopyEngine::Ticket ticket = 0;
  bool pending = false;  // a prefetch into topk_rows is in flight
  double recall_sum = 0;
  uint64_t recall_n = 0;
};

// Per-thread scratch of the decode passes (reused across calls).
struct ThreadScratch {
  std::vector<float> sc, pr, exact, rows;  // exact: the chunk's top-k scores, then weights
  std::vector<float> ub, bv, cw;  // selection: bounds per block, a shifted term's block values, chunk weights
  std::vector<std::pair<int64_t, int64_t>> spans;  // selection: the position ranges it reads
  std::vector<int64_t> top;
  std::vector<fp16_t> ex;
  std::vector<const void*> lines;  // the fused pass: the chunk's top-k rows, line by line
  std::vector<const fp16_t*> keys;  // the fused pass: the chunk's top-k rows
  TopkScratch tk;
};

// The shape of one layer's fused-pass buffers (scores_, win_s_, parts_): the fused pass writes
// them, the selection pass (possibly later, in the background) reads them, both through these.
struct PassLayout {
  int n_q = 0;  // queries per KV head
  int64_t nqt = 0, n_win = 0, n_chunks = 0, chunk_tok = 0;
  size_t score(int h, int iq) const { return ((size_t)h * n_q + iq) * nqt; }
  size_t win(int h, int iq) const { return ((size_t)h * n_q + iq) * n_win; }
  size_t part(int h, int64_t ch, int iq) const { return ((size_t)h * (n_chunks + 1) + ch) * n_q + iq; }
  int64_t n_blocks(int g) const { return nqt / g; }
  size_t block_max(int h, int iq, int g) const { return ((size_t)h * n_q + iq) * (size_t)n_blocks(g); }
};

// What the selection pass of one layer needs besides the policy's score buffers: nkv tasks
// selecting (when n_sel > 0), then nkv measuring spec_recall (when recall).
struct SelJob {
  PassLayout lay;
  int il = 0, n_rows = 0;
  int64_t n_sel = 0;
  bool recall = false;
  int64_t n_sel_tasks(int nkv) const { return n_sel > 0 ? nkv : 0; }
  int64_t n_tasks(int nkv) const { return n_sel_tasks(nkv) + (recall ? nkv : 0); }
};
constexpr int kSelQueued = 0, kSelRunning = 1, kSelDone = 2;  // a background selection's state

class LowBitPolicy final : public KvPolicy {
 public:
  LowBitPolicy(const KvConfig& cfg, const KvGeometry& g, Select sel, const char* name, bool refetch_on_miss = false)
      : g_(g), cfg_(cfg), sel_(sel), name_(name), refetch_on_miss_(refetch_on_miss) {
    spec_ = LowBitSpec{cfg.bits, cfg.group, g.head_dim};
    spec_.validate();
    k_ = sel == Select::None ? 0 : cfg.topk;
    exact_predecode_ = sel == Select::Speculative && cfg.predecode == "exact";
    group_ = g.n_head / g.n_head_kv;
    SPC_CHECK(group_ <= kMaxGroup, "%s supports at most %d query heads per KV head (the model has %d)", name, kMaxGroup,
              group_);
    row_elems_ = 2 * g.head_dim;
    if (sel != Select::None) {
      SlowGeometry sg{g.n_layer, g.n_head_kv, g.head_dim, g.n_ctx + 2};
      store_ = cfg.store == "file" ? std::shared_ptr<SlowStore>(make_file_store(sg, cfg.dir))
                                   : std::shared_ptr<SlowStore>(make_host_store(sg));
      copy_ = std::make_unique<CopyEngine>(*store_);
      if (cfg.inject_delay_us) copy_->inject_delays(cfg.inject_delay_us, cfg.inject_seed);
    }
    layers_.resize(g.n_layer);
    const int64_t n_blocks = g.n_ctx / spec_.group + 2;
    for (auto& L : layers_) {
      L.heads.resize(g.n_head_kv);
      for (auto& H : L.heads) {
        H.kblocks = std::make_shared<LazyBuffer>((size_t)n_blocks * spec_.key_block_bytes());
        H.vals = std::make_shared<LazyBuffer>((size_t)n_blocks * spec_.value_block_bytes());
      }
    }
  }

  ~LowBitPolicy() override {
    try {
      finish_selection();
    } catch (...) {  // a failed selection nobody will use
    }
    // Drain in-flight prefetches before their destination buffers go away.
    copy_.reset();
  }

  const char* name() const override { return name_; }
  const KvGeometry& geometry() const override { return g_; }
  int64_t n_cached() const override { return n_; }
  bool wants_speculative_row() const override { return sel_ == Select::Speculative; }
  bool guess_by_lookup() const override { return wants_speculative_row() && cfg_.guess == "lookup"; }
  void note_guess_miss() override { miss_noted_ = refetch_on_miss_; }

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
    refetch_ = miss_noted_ && n_keep > 0;
    miss_noted_ = false;
    if (refetch_) ++refetch_steps_;
  }

  void end_step() override {
    finish_selection();  // nothing of a step runs past its end (stats, export, the next prefill)
    // The step after the pre-decoding pass attends with the buffer that pass chose for this very
    // row: from the row's own low-bit scores unless that choice was exact (--kv-predecode).
    own_buffer_ = n_keep_ == 0 && sel_ == Select::Speculative && k_ > 0 && !exact_predecode_;
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
    s.shared_bytes = (uint64_t)shared_blocks_ * g_.n_layer * g_.n_head_kv * (spec_.key_block_bytes() + spec_.value_block_bytes());
    s.decode_steps = steps_;
    s.refetch_steps = refetch_steps_;
    if (copy_) {
      const CopyEngine::Stats cs = copy_->stats();
      s.stall_ms = cs.stall_ms;
      s.copy_ms = cs.copy_ms;
      s.fetched_bytes_per_step = steps_ ? (double)cs.bytes / steps_ : 0;
    }
    s.prefetch_reuse_rate = selected_ ? (double)hits_ / selected_ : 0;
    const uint64_t sb = sel_blocks_.load(std::memory_order_relaxed);
    s.selection_read_share = sb ? (double)sel_blocks_read_.load(std::memory_order_relaxed) / sb : 0;
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

  void export_layer(int il, int64_t pos0, int64_t n, float* k, float* v) const override {
    SPC_CHECK(store_ != nullptr, "policy %s keeps no 16-bit copy to export", name_);
    SPC_CHECK(n >= 0 && pos0 >= 0 && pos0 + n <= n_, "export_layer: positions [%lld, %lld) asked, %lld cached",
              (long long)pos0, (long long)(pos0 + n), (long long)n_);
    std::vector<fp16_t> buf((size_t)n * row_elems_);
    const int d = g_.head_dim;
    for (int h = 0; h < g_.n_head_kv; ++h) {
      if (n > 0) store_->read_range(il, h, pos0, n, buf.data());
      for (int64_t p = 0; p < n; ++p)
        for (int c = 0; c < d; ++c) {
          k[(p * g_.n_head_kv + h) * d + c] = fp16_to_fp32(buf[p * row_elems_ + c]);
          v[(p * g_.n_head_kv + h) * d + c] = fp16_to_fp32(buf[p * row_elems_ + d + c]);
        }
    }
  }

  int64_t share_prefix(const KvPolicy& other, int64_t n) override {
    SPC_CHECK(n_ == 0 && steps_ == 0, "share_prefix needs an empty cache");
    const auto* o = dynamic_cast<const LowBitPolicy*>(&other);
    // Blocks are the same where the other policy quantized them the same way (bits, group, sinks
    // kept out of their block's ranges), and its 16-bit copy is a store of the same kind.
    if (!o || o == this || !store_ || !o->store_ || o->spec_.bits != spec_.bits || o->spec_.group != spec_.group ||
        o->cfg_.sinks != cfg_.sinks || o->cfg_.store != cfg_.store)
      return 0;
    SPC_CHECK(o->g_.n_layer == g_.n_layer && o->g_.n_head_kv == g_.n_head_kv && o->g_.head_dim == g_.head_dim,
              "share_prefix: the other cache has another geometry");
    SPC_CHECK(n >= 0 && n <= o->n_ && n <= g_.n_ctx, "share_prefix: %lld positions asked, the other cache holds %lld",
              (long long)n, (long long)o->n_);
    // The blocks a prefill of n positions would quantize here (flush_window), as far as the other
    // policy has them; the positions after them go through this policy's window as usual.
    const int g = spec_.group;
    int64_t s = n >= cfg_.window + g ? (n - cfg_.window) / g * g : 0;
    for (const LayerState& L : o->layers_) s = std::min(s, L.n_quant);
    if (s == 0) return 0;
    const int64_t nb = s / g;
    store_->share_prefix(o->store_, s);
    for (int il = 0; il < g_.n_layer; ++il) {
      LayerState& L = layers_[il];
      for (int h = 0; h < g_.n_head_kv; ++h) {
        const HeadState& OH = o->layers_[il].heads[h];
        share_segments(L.heads[h].shared, OH.shared, BlockSegment{OH.kblocks, OH.vals, 0}, nb);
      }
      L.n_quant = L.n_tok = s;
    }
    shared_blocks_ = nb;
    n_ = s;
    update_peak();
    return s;
  }

 private:
  void append(int il, int64_t pos0, int64_t n, const float* k, const float* v);
  void flush_window(LayerState& L);
  int64_t n_quant_after_append(const LayerState& L, int64_t n) const;
  void select_topk(const float* probs, int64_t n_pos, std::vector<int64_t>& out, TopkScratch& tk,
                   float* hint = nullptr) const;
  void start_fetch(int il, bool sync);
  void selection_task(const SelJob& j, int64_t task, ThreadScratch& ts);
  struct SelTerm {  // probabilities of one row's query heads, weighted, shifted off positions later
    int r;
    float w;
    int64_t off;
  };
  void select_from_rows(const SelJob& j, int h, const SelTerm* terms, int n_terms, int64_t n, std::vector<int64_t>& out,
                        ThreadScratch& ts, float* hint);
  void run_selection_job(std::atomic<int>& state);
  void finish_selection();
  void finish_fetch(int il);
  void update_peak();
  // Whether the asynchronous prefetches run on the pool's idle workers (KvConfig::copy).
  bool copies_on_pool(const ThreadPool& pool) const {
    if (pool.size() < 2 || cfg_.copy == "thread") return false;
    static const int hw = (int)std::thread::hardware_concurrency();  // (a system call in glibc: once)
    return cfg_.copy == "pool" || pool.size() >= hw;
  }
  void measure_exact_mass(int il, const DecodeRows& rows);
  float exact_dot(const float* q, const fp16_t* krow) const { return dot_f32_f16(q, krow, g_.head_dim); }
  // spec_recall is measured on every kRecallEvery-th step (every step with --kv-diagnostics).
  bool recall_step() const { return cfg_.diagnostics || steps_ % kRecallEvery == 0; }
  const fp16_t* slot_row(const LayerState& L, int h, int32_t slot) const {
    return L.topk_rows.data() + ((size_t)h * k_ + slot) * row_elems_;
  }

  KvGeometry g_;
  KvConfig cfg_;
  Select sel_;
  const char* name_;
  bool refetch_on_miss_ = false;  // specache-refetch
  bool miss_noted_ = false;       // note_guess_miss() since the last begin_step
  bool refetch_ = false;          // this step selects row 0's own top-k (a miss under specache-refetch)
  bool own_buffer_ = false;       // this step attends with a top-k row 0 chose from its own scores (set by end_step)
  bool exact_predecode_ = false;  // the pre-decoding pass selects from exact scores (--kv-predecode exact)
  uint64_t refetch_steps_ = 0;
  LowBitSpec spec_;
  int k_ = 0, group_ = 1, row_elems_ = 0;
  std::shared_ptr<SlowStore> store_;  // shared: a later session may read a prefix of it (share_prefix)
  std::unique_ptr<CopyEngine> copy_;
  std::vector<LayerState> layers_;
  int64_t n_ = 0;
  int64_t shared_blocks_ = 0;  // low-bit blocks per layer and head read from other sessions (share_prefix)
  int n_rows_ = 1, n_keep_ = 1;
  uint64_t steps_ = 0, peak_fast_ = 0, hits_ = 0, selected_ = 0;
  // Quantized blocks the selections covered and read (selection_read_share; the selection tasks
  // may run on several threads with --kv-diagnostics).
  std::atomic<uint64_t> sel_blocks_{0}, sel_blocks_read_{0};
  double mass_sum_ = 0;
  uint64_t mass_n_ = 0;
  std::mutex recall_mu_;
  // Per-step scratch (reused).
  std::vector<float> qs_;           // [n_head_kv][n_q][d] queries scaled by 1/sqrt(d)
  std::vector<float> scores_;       // [n_head_kv][n_q][n_quant] scores, then chunk-local exp(score - chunk max)
  std::vector<float> bmax_;         // [n_head_kv][n_q][n_quant / g] the largest of each block's numerators in scores_
  std::vector<AttnPartial> parts_;  // [n_head_kv][n_chunks + 1][n_q]; chunk n_chunks: window + own rows
  std::vector<float> outs_;         // [n_head_kv][n_chunks + 1][n_q][d]
  std::vector<AttnPartial> glob_;   // [n_head_kv][n_q] merged state of each query
  std::vector<float> win_s_;        // [n_head_kv][n_q][n_win] exp(window score - exact part's max)
  std::vector<float> own_e_;        // own selection: [n_head_kv][group][n_quant] exp(row-0 score - chunk max)
  std::vector<AttnPartial> own_parts_;  // own selection: [n_head_kv][n_chunks][group] chunk max and sum
  std::vector<ThreadScratch> thr_;
  // The layer's selection pass running as background work (attend): its state, its job and the
  // scratch of whichever thread runs it.
  std::shared_ptr<std::atomic<int>> sel_pending_;
  SelJob sel_job_;
  ThreadScratch sel_scratch_;
  std::exception_ptr sel_error_;
  std::vector<fp16_t> rows_tmp_;    // append: [n][n_kv][K|V]
  std::vector<float> kb_tmp_, vb_tmp_;
  std::vector<RowRef> refs_;
  std::vector<std::pair<int64_t, int32_t>> next_tmp_;  // start_fetch: the new (position, slot) list
  std::vector<uint8_t> slot_used_;                     // start_fetch: slots kept by hits
};

void LowBitPolicy::append(int il, int64_t pos0, int64_t n, const float* k, const float* v) {
  LayerState& L = layers_[il];
  const int d = g_.head_dim, nkv = g_.n_head_kv;
  rows_tmp_.resize((size_t)n * nkv * row_elems_);
  fp16_t* rows = rows_tmp_.data();
  for (int64_t i = 0; i < n; ++i)
    for (int h = 0; h < nkv; ++h) {
      fp16_t* r = rows + (i * nkv + h) * row_elems_;
      for (int c = 0; c < d; ++c) {
        r[c] = fp32_to_fp16(k[(i * nkv + h) * d + c]);
        r[d + c] = fp32_to_fp16(v[(i * nkv + h) * d + c]);
      }
    }
  if (store_) store_->write_rows(il, pos0, n, rows);
  for (int h = 0; h < nkv; ++h) {
    HeadState& H = L.heads[h];
    const size_t old = H.win.size();
    H.win.resize(old + (size_t)n * row_elems_);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(H.win.data() + old + i * row_elems_, rows + (i * nkv + h) * row_elems_, sizeof(fp16_t) * row_elems_);
  }
  L.n_tok = pos0 + n;
  flush_window(L);
  // A prefill passes the whole prompt through here: give that scratch back.
  if (rows_tmp_.capacity() > (size_t)16 * nkv * row_elems_) std::vector<fp16_t>().swap(rows_tmp_);
}

// Positions the low-bit copy will hold after n more tokens are appended (see flush_window).
int64_t LowBitPolicy::n_quant_after_append(const LayerState& L, int64_t n) const {
  const int g = spec_.group;
  const int64_t n_win = L.n_tok + n - L.n_quant;
  if (n_win < cfg_.window + g) return L.n_quant;
  return L.n_quant + (n_win - cfg_.window) / g * g;
}

// Quantizes whole blocks of g tokens out of the window while it holds at least R + g tokens.
void LowBitPolicy::flush_window(LayerState& L) {
  const int g = spec_.group, d = g_.head_dim;
  const int64_t n_win = L.n_tok - L.n_quant;
  if (n_win < cfg_.window + g) return;
  const int64_t n_blocks = (n_win - cfg_.window) / g;
  kb_tmp_.resize((size_t)g * d);
  vb_tmp_.resize((size_t)g * d);
  float* kb = kb_tmp_.data();
  float* vb = vb_tmp_.data();
  for (auto& H : L.heads) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      const fp16_t* src = H.win.data() + b * g * row_elems_;
      for (int t = 0; t < g; ++t)
        vec_from_f16(src + t * row_elems_, kb + t * d, d);
      const int64_t blk = L.n_quant / g + b;
      // Sink positions are always served in 16-bit: keep their (often extreme) keys out of the
      // block's per-channel ranges so the other tokens of the block keep their resolution.
      const int64_t n_sink_here = std::clamp<int64_t>(cfg_.sinks - blk * g, 0, g - 1);
      for (int64_t t = 0; t < n_sink_here; ++t) std::copy_n(kb + n_sink_here * d, d, kb + t * d);
      lowbit_quantize_keys(spec_, kb, d, H.kblocks->data() + blk * spec_.key_block_bytes());
      for (int t = 0; t < g; ++t)
        vec_from_f16(src + t * row_elems_ + d, vb + t * d, d);
      lowbit_quantize_values(spec_, vb, d, H.vals->data() + blk * spec_.value_block_bytes());
    }
    H.win.erase(H.win.begin(), H.win.begin() + n_blocks * g * row_elems_);
    // A prefill passes the whole prompt through the window: give that memory back.
    if (H.win.capacity() > 4 * (size_t)(cfg_.window + g) * row_elems_) H.win.shrink_to_fit();
  }
  L.n_quant += n_blocks * g;
}

// Top-k positions in [0, n_pos) by probs (descending, ties to the lower position), ascending.
// Attention sinks (the first --kv-sinks positions) always take their place in the k.
void LowBitPolicy::select_topk(const float* probs, int64_t n_pos, std::vector<int64_t>& out, TopkScratch& tk,
                               float* hint) const {
  const int64_t k = std::clamp<int64_t>(k_, 0, n_pos);
  const int64_t n_sink = std::min<int64_t>(cfg_.sinks, k);
  topk_indices(probs + n_sink, n_pos - n_sink, k - n_sink, out, tk, hint);
  for (int64_t& p : out) p += n_sink;
  out.insert(out.begin(), (size_t)n_sink, 0);
  for (int64_t j = 0; j < n_sink; ++j) out[j] = j;
}

// Makes next_pos the layer's top-k selection: positions already resident keep their slots (hit
// map), the misses are gathered from the slow tier straight into the slots of evicted positions,
// in one batch for the whole layer (asynchronously unless sync).
void LowBitPolicy::start_fetch(int il, bool sync) {
  LayerState& L = layers_[il];
  if (L.topk_rows.empty()) L.topk_rows.assign((size_t)g_.n_head_kv * k_ * row_elems_, fp16_t{});
  refs_.clear();
  for (int h = 0; h < g_.n_head_kv; ++h) {
    HeadState& H = L.heads[h];
    // Positions the new selection shares with the buffer keep their slots; the others are free.
    auto& next = next_tmp_;
    next.clear();
    slot_used_.assign((size_t)k_, 0);
    size_t a = 0;
    for (int64_t p : H.next_pos) {
      while (a < H.resident.size() && H.resident[a].first < p) ++a;
      if (a < H.resident.size() && H.resident[a].first == p) {
        next.emplace_back(p, H.resident[a].second);
        slot_used_[H.resident[a++].second] = 1;
        ++hits_;
      } else {
        next.emplace_back(p, -1);
      }
      ++selected_;
    }
    int32_t free_slot = 0;
    for (auto& [p, slot] : next) {
      if (slot >= 0) continue;
      while (slot_used_[free_slot]) ++free_slot;
      slot = free_slot++;
      refs_.push_back(RowRef{il, h, p, (int64_t)h * k_ + slot});
    }
    H.resident.swap(next);
    H.next_pos.clear();
  }
  if (refs_.empty()) return;
  if (sync) {
    copy_->gather_now(refs_.data(), refs_.size(), L.topk_rows.data());
  } else {
    L.ticket = copy_->submit_gather(refs_, L.topk_rows.data());
    L.pending = true;
  }
}

void LowBitPolicy::finish_fetch(int il) {
  LayerState& L = layers_[il];
  if (L.pending) {
    L.pending = false;
    copy_->wait(L.ticket);
  }
}

void LowBitPolicy::update_peak() {
  uint64_t total = 0;
  for (const auto& L : layers_) {
    const uint64_t lowbit =
        (uint64_t)(L.n_quant / spec_.group - shared_blocks_) * (spec_.key_block_bytes() + spec_.value_block_bytes());
    const uint64_t window = (uint64_t)(L.n_tok - L.n_quant) * row_elems_ * sizeof(fp16_t);
    total += g_.n_head_kv * (lowbit + window) + L.topk_rows.size() * sizeof(fp16_t);
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
  const int64_t n_win = L.n_tok - L.n_quant;
  if ((int)thr_.size() < pool.size()) thr_.resize((size_t)pool.size());

  // The previous layer's selection first: this pass reuses the buffers it reads.
  finish_selection();
  // This step's top-k buffer was prefetched during the previous step.
  finish_fetch(il);
  if (copy_) copy_->run_on(copies_on_pool(pool) ? &pool : nullptr);

  qs_.resize((size_t)nkv * n_q * d);
  for (int h = 0; h < nkv; ++h)
    for (int iq = 0; iq < n_q; ++iq) {
      const int r = iq / group_, hq = h * group_ + iq % group_;
      for (int c = 0; c < d; ++c) qs_[((size_t)h * n_q + iq) * d + c] = rows.q[((int64_t)r * g_.n_head + hq) * d + c] * scale;
    }
  auto Q = [&](int h, int iq) { return qs_.data() + ((size_t)h * n_q + iq) * d; };

  // Chunks of key blocks, two per thread over the layer's heads (SmolLM2 on 2 threads: two per
  // head, 3/4 and 1/4 of it, which the task order balances). Each chunk pays its own top-k
  // lookups, query quantization, kernel entry, partial softmax state and merge, and a pass of the
  // selection: in-process pairs had two per thread 4-6% faster per decode step than eight at 2K
  // and 8K, in both of the host's states, and 10% at 32K (one per thread swung between 0.89x and
  // 1.03x with the host's state: three equal tasks on two threads).
  const int64_t blocks_per_chunk = std::max<int64_t>(8, (n_blocks * nkv + 2 * pool.size() - 1) / (2 * pool.size()));
  const int64_t n_chunks = n_blocks ? (n_blocks + blocks_per_chunk - 1) / blocks_per_chunk : 0;
  const int64_t chunk_tok = blocks_per_chunk * g;
  const PassLayout lay{n_q, nqt, n_win, n_chunks, chunk_tok};
  scores_.resize((size_t)nkv * n_q * std::max<int64_t>(nqt, 1));
  bmax_.resize((size_t)nkv * n_q * std::max<int64_t>(n_blocks, 1));
  auto S = [&](int h, int iq) { return scores_.data() + lay.score(h, iq); };
  // Debiasing (cfg_.debias, KvConfig): a low-bit score carries an error e = q.(K - K_hat) of
  // variance ~ sum_c q_c^2 s_c^2/12 over the block's channel steps s_c, so exp(score) is inflated
  // by E[exp(e)] ~ exp(sigma^2/2) against the positions attended in 16-bit. Per block and query
  // row: one dot product of q^2 with the block's s^2 (1/g of the scoring work), folded into the
  // score kernel (lowbit_score_keys_ex), which also returns the rows' maxima over the chunk.
  const float debias = cfg_.debias;
  // Not where row 0 chose its own top-k from these very scores (specache-exact, the pre-decoding
  // pass and the step after it, a refetch step): that choice already moves the positions with the
  // largest positive errors to 16-bit, and the positions left in low bit are biased low
  // (measured: debiasing them as well raises perplexity; docs/RESULTS.md). The oracle's choice
  // does not see the errors.
  // row_max[iq]: the largest score of row iq in the chunk.
  // extra: cache lines for the kernel to request while it works (lowbit_score_keys_ex).
  auto score_chunk = [&](int h, int64_t ch, bool apply_debias, float* row_max,
                         const std::vector<const void*>* extra = nullptr) {
    const int64_t b0 = ch * blocks_per_chunk, b1 = std::min(n_blocks, b0 + blocks_per_chunk);
    // One kernel call per memory the blocks live in (two where the chunk straddles the end of a
    // shared prefix): the scores are the same, the row maxima the larger of the two.
    bool first = true;
    L.heads[h].for_block_runs(b0, b1, [&](const uint8_t* kb, const uint8_t*, int64_t r0, int64_t r1) {
      float rm2[2 * kMaxGroup];
      lowbit_score_keys_ex(spec_, kb + r0 * spec_.key_block_bytes(), (int)(r1 - r0), Q(h, 0), n_q, d, S(h, 0) + r0 * g,
                           nqt, apply_debias ? debias : 0.0f, first ? row_max : rm2,
                           first && extra ? extra->data() : nullptr, first && extra ? extra->size() : 0);
      if (!first)
        for (int iq = 0; iq < n_q; ++iq) row_max[iq] = std::max(row_max[iq], rm2[iq]);
      first = false;
    });
  };

  // Non-speculative selection: the real token picks its own top-k before attending. SpeCache's
  // pre-decoding row (n_keep == 0, once after prefill) does the same, so its deeper layers see
  // queries already corrected by the top-k of the layers before (our choice; see ARCHITECTURE).
  bool scored = false;
  // specache-refetch does the same on a step whose guess missed (refetch_): the buffer prefetched
  // for the wrong token is replaced (resident pairs kept) before anything attends.
  const bool own_select = sel_ == Select::OwnLowBit || sel_ == Select::Oracle ||
                          (sel_ == Select::Speculative && (rows.n_keep == 0 || refetch_));
  if (own_select && nqt > 0 && k_ > 0) {
    // Row 0's probabilities over the low-bit copy, GQA-averaged: chunk-local exponentials in
    // the scoring tasks (balanced over the threads), merged per query head, then one weighted
    // pass per KV head (vec_wsum) and the top-k. The raw scores stay in S for the fused pass.
    // The oracle selects from exact scores every step; SpeCache's pre-decoding pass does once
    // (--kv-predecode exact): one read of the slow tier per generation.
    const bool oracle = sel_ == Select::Oracle || (exact_predecode_ && rows.n_keep == 0);
    own_e_.resize((size_t)nkv * group_ * nqt);
    own_parts_.resize((size_t)nkv * n_chunks * group_);
    auto E = [&](int h, int iq) { return own_e_.data() + ((size_t)h * group_ + iq) * nqt; };
    auto EP = [&](int h, int64_t ch, int iq) -> AttnPartial& { return own_parts_[((size_t)h * n_chunks + ch) * group_ + iq]; };
    pool.for_each_task(n_chunks * nkv, [&](int64_t task, int) {
      const int h = (int)(task % nkv);
      const int64_t ch = task / nkv;
      float rm[2 * kMaxGroup];
      score_chunk(h, ch, /*apply_debias=*/oracle, rm);
      if (oracle) return;
      const int64_t t0 = ch * chunk_tok, t1 = std::min(nqt, t0 + chunk_tok);
      for (int iq = 0; iq < group_; ++iq) {  // row 0's query heads
        float* e = E(h, iq) + t0;
        std::copy_n(S(h, iq) + t0, t1 - t0, e);
        EP(h, ch, iq) = AttnPartial{rm[iq], vec_exp_shift_sum(e, t1 - t0, rm[iq])};
      }
    });
    scored = true;
    pool.for_each_task(nkv, [&](int64_t task, int t) {
      const int h = (int)task;
      ThreadScratch& ts = thr_[t];
      if (oracle) {
        ts.pr.assign((size_t)nqt, 0.0f);
        ts.ex.resize((size_t)nqt * row_elems_);
        store_->read_range(il, h, 0, nqt, ts.ex.data());
        for (int iq = 0; iq < group_; ++iq) {
          ts.sc.resize((size_t)nqt);
          for (int64_t j = 0; j < nqt; ++j) ts.sc[j] = exact_dot(Q(h, iq), ts.ex.data() + j * row_elems_);
          const float l = vec_exp_shift_sum(ts.sc.data(), nqt, vec_max(ts.sc.data(), nqt));
          vec_axpy(1.0f / l, ts.sc.data(), ts.pr.data(), nqt);
        }
      } else {
        ts.pr.resize((size_t)nqt);
        float gm[kMaxGroup], gl[kMaxGroup];
        const float* xs[kMaxGroup];
        float as[kMaxGroup];
        for (int iq = 0; iq < group_; ++iq) {
          gm[iq] = -std::numeric_limits<float>::infinity();
          for (int64_t ch = 0; ch < n_chunks; ++ch) gm[iq] = std::max(gm[iq], EP(h, ch, iq).m);
          gl[iq] = 0.0f;
          for (int64_t ch = 0; ch < n_chunks; ++ch) gl[iq] += EP(h, ch, iq).l * std::exp(EP(h, ch, iq).m - gm[iq]);
        }
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const int64_t t0 = ch * chunk_tok, t1 = std::min(nqt, t0 + chunk_tok);
          for (int iq = 0; iq < group_; ++iq) {
            xs[iq] = E(h, iq) + t0;
            as[iq] = std::exp(EP(h, ch, iq).m - gm[iq]) / gl[iq];
          }
          vec_wsum(xs, as, group_, ts.pr.data() + t0, t1 - t0, /*accumulate=*/false);
        }
      }
      select_topk(ts.pr.data(), nqt, L.heads[h].next_pos, ts.tk);
    });
    if (refetch_ && recall_step()) {
      // spec_recall of a refetch step: what the speculative prefetch held of the selection that
      // replaces it (measured here, before the buffer changes).
      for (int h = 0; h < nkv; ++h) {
        L.recall_sum += L.heads[h].share_held(L.heads[h].next_pos);
        L.recall_n += 1;
      }
    }
    start_fetch(il, /*sync=*/true);
  }

  // Fused pass. Tasks [0, n_chunks*nkv): one chunk of key blocks of one head; tasks
  // [n_chunks*nkv, +nkv): the 16-bit window and the step's own rows of one head.
  parts_.assign((size_t)nkv * (n_chunks + 1) * n_q, AttnPartial{-std::numeric_limits<float>::infinity(), 0.0f});
  outs_.assign((size_t)nkv * (n_chunks + 1) * n_q * d, 0.0f);
  win_s_.resize((size_t)nkv * n_q * std::max<int64_t>(n_win, 1));
  auto P = [&](int h, int64_t ch, int iq) -> AttnPartial& { return parts_[lay.part(h, ch, iq)]; };
  auto O = [&](int h, int64_t ch, int iq) { return outs_.data() + lay.part(h, ch, iq) * d; };
  auto W = [&](int h, int iq) { return win_s_.data() + lay.win(h, iq); };
  pool.for_each_task(n_chunks * nkv + nkv, [&](int64_t task, int t) {
    if (task < n_chunks * nkv) {
      const int h = (int)(task % nkv);
      const int64_t ch = task / nkv;
      float rm[2 * kMaxGroup], l[2 * kMaxGroup];
      const int64_t t0 = ch * chunk_tok, t1 = std::min(nqt, t0 + chunk_tok);
      const HeadState& H = L.heads[h];
      const auto lo = std::lower_bound(H.resident.begin(), H.resident.end(), std::make_pair(t0, INT32_MIN));
      const auto hi = std::lower_bound(lo, H.resident.end(), std::make_pair(t1, INT32_MIN));
      // The chunk's top-k rows were just written by the copy engine's thread (another core's
      // cache, or memory): their loads are scattered misses the hardware prefetcher does not
      // predict. The score kernel requests them while it works (a few lines per key block: all
      // at once, they outran the core's fill buffers and held up the kernel's start), and their
      // exact scores are computed after it; where the scores already exist, they are requested
      // here.
      std::vector<const fp16_t*>& keys = thr_[t].keys;  // the rows, in position order
      keys.clear();
      for (auto it = lo; it != hi; ++it) keys.push_back(slot_row(L, h, it->second));
      const size_t row_bytes = row_elems_ * sizeof(fp16_t);
      std::vector<const void*>& lines = thr_[t].lines;
      lines.clear();
      for (const fp16_t* row : keys) {
        const char* r = reinterpret_cast<const char*>(row);
        if (scored) prefetch_bytes(r, row_bytes);
        else
          for (size_t off = 0; off < row_bytes; off += 64) lines.push_back(r + off);
      }
      // Top-k positions attend in 16-bit: their exact scores go to ex ([row][position]), and their
      // low-bit scores become -inf, so the packed value sum (whose u8 weight quantization is
      // approximate, lowbit.h) gives them weight 0. The chunk's maximum m may stay above every
      // score left (a top-k position's low-bit score): any m >= the scores is a valid softmax shift.
      if (!scored) {
        score_chunk(h, ch, /*apply_debias=*/!own_buffer_, rm, &lines);
      } else {
        for (int iq = 0; iq < n_q; ++iq) rm[iq] = vec_max(S(h, iq) + t0, t1 - t0);
      }
      const int64_t n_res = hi - lo;
      std::vector<float>& ex = thr_[t].exact;
      ex.resize((size_t)n_res * n_q);
      dot_f32_f16_many(Q(h, 0), n_q, d, keys.data(), nullptr, 0, n_res, d, ex.data(), n_res);
      for (auto it = lo; it != hi; ++it)
        for (int iq = 0; iq < n_q; ++iq) S(h, iq)[it->first] = -std::numeric_limits<float>::infinity();
      if (n_res > 0)
        for (int iq = 0; iq < n_q; ++iq) rm[iq] = std::max(rm[iq], vec_max(ex.data() + iq * n_res, n_res));
      // Softmax numerators (written over the scores: the selection pass reads them) and the
      // packed value sum in one pass.
      // (The blocks' largest numerators go to bmax_: bounds for the selection pass, which then
      // reads only the blocks that can hold a top-k position.)
      auto BM = [&](int iq) { return bmax_.data() + lay.block_max(h, iq, g); };
      // The chunk's blocks in one call where they live in at most two memories (the end of a
      // shared prefix: BlockMem, the same arithmetic as one memory); three or more (a prefix
      // shared from a session that shares one itself, with a short middle part) take one call per
      // memory, which sums in another order.
      struct Run {
        const uint8_t* v;
        int64_t r0, r1;
      };
      Run runs[8];
      int n_runs = 0;
      H.for_block_runs(t0 / g, t1 / g, [&](const uint8_t*, const uint8_t* vb, int64_t r0, int64_t r1) {
        if (n_runs < 8) runs[n_runs] = Run{vb, r0, r1};
        ++n_runs;
      });
      const size_t vbb = spec_.value_block_bytes();
      const int64_t cb0 = t0 / g;
      if (n_runs <= 2) {
        const BlockMem mem = n_runs == 1 ? BlockMem(runs[0].v + cb0 * vbb)
                                         : BlockMem(runs[0].v + cb0 * vbb, runs[1].v + cb0 * vbb, runs[1].r0 - cb0);
        lowbit_softmax_values(spec_, mem, (int)((t1 - t0) / g), S(h, 0) + t0, n_q, nqt, rm, l, O(h, ch, 0), d,
                              BM(0) + cb0, (size_t)n_blocks);
      } else {
        bool first = true;
        H.for_block_runs(t0 / g, t1 / g, [&](const uint8_t*, const uint8_t* vb, int64_t r0, int64_t r1) {
          float l2[2 * kMaxGroup];
          lowbit_softmax_values(spec_, vb + r0 * vbb, (int)(r1 - r0), S(h, 0) + r0 * g, n_q, nqt, rm, first ? l : l2,
                                O(h, ch, 0), d, BM(0) + r0, (size_t)n_blocks);
          if (!first)
            for (int iq = 0; iq < n_q; ++iq) l[iq] += l2[iq];
          first = false;
        });
      }
      // The top-k terms, summed in double (they can carry most of the mass, and a float sum in
      // position order lost enough precision at -O0 to break
      // KvPolicy.SpecacheWithTopkCoveringEverythingEqualsFull); their weights restored in S.
      for (int iq = 0; iq < n_q; ++iq) {
        if (n_res > 0) l[iq] += vec_exp_shift_sum(ex.data() + iq * n_res, n_res, rm[iq]);
        P(h, ch, iq) = AttnPartial{rm[iq], l[iq]};
      }
      if (n_res > 0) {
        std::vector<float>& vres = thr_[t].rows;  // the top-k rows' values, [n_res][d]
        vres.resize((size_t)n_res * d);
        for (auto it = lo; it != hi; ++it) {
          vec_from_f16(keys[(size_t)(it - lo)] + d, vres.data() + (it - lo) * d, d);
          for (int iq = 0; iq < n_q; ++iq) {
            const float e = ex[(size_t)iq * n_res + (it - lo)];
            S(h, iq)[it->first] = e;
            float& b = BM(iq)[it->first / g];
            b = std::max(b, e);
          }
        }
        vec_axpy_rows_f64(ex.data(), n_res, n_q, vres.data(), n_res, d, O(h, ch, 0), d);
      }
      return;
    }
    const int h = (int)(task - n_chunks * nkv);
    const HeadState& H = L.heads[h];
    std::vector<float>& sc = thr_[t].sc;
    // Window scores of every query row at once (each window key converted once) into W, then
    // per row: the step's own rows, softmax (W then holds the window's weights), values.
    dot_f32_f16_many(Q(h, 0), n_q, d, nullptr, H.win.data(), row_elems_, n_win, d, W(h, 0), n_win);
    for (int iq = 0; iq < n_q; ++iq) {
      const int r = iq / group_;
      const float* q = Q(h, iq);
      const int64_t n_ex = n_win + r + 1;  // window, then rows 0..r
      sc.resize((size_t)n_ex);
      std::copy_n(W(h, iq), n_win, sc.data());
      for (int rr = 0; rr <= r; ++rr) {
        const float* kr = rows.k + ((int64_t)rr * nkv + h) * d;
        float s = 0;
        for (int c = 0; c < d; ++c) s += q[c] * kr[c];
        sc[n_win + rr] = s;
      }
      const float m = vec_max(sc.data(), n_ex);
      const float l = vec_exp_shift_sum(sc.data(), n_ex, m);
      float* o = O(h, n_chunks, iq);
      for (int rr = 0; rr <= r; ++rr) vec_axpy(sc[n_win + rr], rows.v + ((int64_t)rr * nkv + h) * d, o, d);
      std::copy_n(sc.data(), n_win, W(h, iq));
      P(h, n_chunks, iq) = AttnPartial{m, l};
    }
    // Window values: each row converted once, then summed per query row in registers.
    std::vector<float>& wv = thr_[t].rows;
    wv.resize((size_t)n_win * d);
    for (int64_t j = 0; j < n_win; ++j) vec_from_f16(H.win.data() + j * row_elems_ + d, wv.data() + j * d, d);
    for (int iq = 0; iq < n_q; ++iq) vec_axpy_rows(W(h, iq), wv.data(), n_win, d, O(h, n_chunks, iq));
  });

  // Merge every chunk into the exact part's state; normalize.
  glob_.resize((size_t)nkv * n_q);
  for (int h = 0; h < nkv; ++h)
    for (int iq = 0; iq < n_q; ++iq) {
      AttnPartial acc = P(h, n_chunks, iq);
      float* o = O(h, n_chunks, iq);
      for (int64_t ch = 0; ch < n_chunks; ++ch) attn_merge(acc, o, P(h, ch, iq), O(h, ch, iq), d);
      const int r = iq / group_, hq = h * group_ + iq % group_;
      float* dst = out + ((int64_t)r * g_.n_head + hq) * d;
      const float inv = 1.0f / acc.l;
      for (int c = 0; c < d; ++c) dst[c] = o[c] * inv;
      glob_[(size_t)h * n_q + iq] = acc;
    }

  // Selection pass: the speculative (last) row's attention over every position that will be in
  // the low-bit copy after this step's append (tokens about to leave the window compete with
  // their exact window scores), averaged over its query heads; and spec_recall: how much of the
  // real row's own top-k the buffer prefetched for this step held.
  // Not after the pre-decoding pass (n_keep == 0): the next step's row 0 is the same token at the
  // same position, so the top-k it just selected for itself (resident now) is already the right
  // buffer; a selection from its attention shifted one position later would be one step ahead.
  const bool speculate = sel_ == Select::Speculative && k_ > 0 && rows.n_keep > 0;
  const int64_t n_sel = speculate ? std::min(n_quant_after_append(L, rows.n_keep), L.n_tok) : 0;
  // spec_recall costs a second selection per head: measured on every kRecallEvery-th step
  // (every step with --kv-diagnostics).
  const bool recall = speculate && !refetch_ && rows.n_rows == 2 && nqt > 0 && !L.heads[0].resident.empty() &&
                      recall_step();
  if (n_sel > 0 || recall) {
    const SelJob job{lay, il, rows.n_rows, n_sel, recall};
    if (pool.size() > 1 && !cfg_.diagnostics) {
      // Nothing of this step needs the selection: it runs as background work on the pool's
      // worker, serially over its tasks, while this thread goes on with the layer's output
      // projection and FFN (the worker joins those when done). The next attend (or end_step)
      // waits for it first: its fused pass reuses the score buffers the selection reads.
      auto state = std::make_shared<std::atomic<int>>(kSelQueued);
      sel_pending_ = state;
      sel_job_ = job;
      pool.post_background([this, state] {
        int expected = kSelQueued;
        if (state->compare_exchange_strong(expected, kSelRunning)) run_selection_job(*state);
      });
    } else {
      // One task per (KV head, selection) and, on recall steps, per (KV head, recall).
      pool.for_each_task(job.n_tasks(nkv), [&](int64_t task, int t) { selection_task(job, task, thr_[t]); });
      if (cfg_.diagnostics && nqt > 0 && rows.n_keep > 0) measure_exact_mass(il, rows);
      if (n_sel > 0) start_fetch(il, /*sync=*/false);
    }
  } else if (cfg_.diagnostics && nqt > 0 && rows.n_keep > 0) {
    measure_exact_mass(il, rows);
  }
  if (rows.n_keep > 0) append(il, rows.pos0, rows.n_keep, rows.k, rows.v);
}

// One task of the selection pass: task < n_sel ? nkv : 0 selects KV head `task`'s next top-k;
// the others measure spec_recall for one KV head.
void LowBitPolicy::selection_task(const SelJob& j, int64_t task, ThreadScratch& ts) {
  LayerState& L = layers_[j.il];
  const int64_t n_sel_tasks = j.n_sel_tasks(g_.n_head_kv);
  if (task < n_sel_tasks) {
    const int h = (int)task;
    // The speculative row's probabilities; with cfg_.shift, plus row 0's attention one position
    // later: where a copying (induction) head of the next step's rows will look, read off the row
    // whose own top-k was in place; it does not depend on the guess being right (ARCHITECTURE:
    // the selection rule).
    const SelTerm terms[2] = {{j.n_rows - 1, 1.0f, 0}, {0, cfg_.shift, 1}};
    select_from_rows(j, h, terms, cfg_.shift > 0 ? 2 : 1, j.n_sel, L.heads[h].next_pos, ts, &L.heads[h].sel_hint);
    return;
  }
  const int h = (int)(task - n_sel_tasks);
  const SelTerm own{0, 1.0f, 0};
  select_from_rows(j, h, &own, 1, j.lay.nqt, ts.top, ts, &L.heads[h].recall_hint);
  const double rc = L.heads[h].share_held(ts.top);
  std::lock_guard<std::mutex> lock(recall_mu_);
  L.recall_sum += rc;
  L.recall_n += 1;
}

// out = the top-k positions of pr over [0, n), pr[t] = sum over the terms of w * (the GQA-averaged
// probability of position t - off for row r): the layer's fused-pass state in scores_ (quantized
// positions, chunk-local numerators), win_s_ (window positions), parts_ and glob_ (the chunks'
// and rows' softmax states).
//
// Pruned by block bounds: with a hint tau (the k-th value of this layer and head's previous
// selection, a little lowered; topk_indices), a block of g quantized positions whose bound
// sum over the terms' heads of (weight x the block's largest numerator, bmax_) is below tau holds no
// position >= tau, and is not read. If at least k positions read reach tau, every member of the
// top-k is among them (a pruned position is below tau, hence below the k-th value), so the
// result is exactly the unpruned selection's, ties included (the positions read keep their order,
// and vec_wsum's per-element arithmetic does not depend on the ranges). Otherwise the k-th largest
// value read takes tau's place (it bounds the k-th largest overall from below) and the blocks
// whose bound reaches it are read; without a hint, or when fewer than k positions were read,
// every position is. Where most of the attention sits in a few places, few blocks reach the
// bound: SmolLM2 on War and Peace, 26% of the blocks at 8K and 12% at 32K.
void LowBitPolicy::select_from_rows(const SelJob& j, int h, const SelTerm* terms, int n_terms, int64_t n,
                                    std::vector<int64_t>& out, ThreadScratch& ts, float* hint) {
  const PassLayout& lay = j.lay;
  const int g = spec_.group;
  const int64_t nqt = lay.nqt, n_chunks = lay.n_chunks, chunk_tok = lay.chunk_tok;
  auto S = [&](int iq) { return scores_.data() + lay.score(h, iq); };
  auto W = [&](int iq) { return win_s_.data() + lay.win(h, iq); };
  // The weight of chunk ch's numerators of term i's query head gi (ch == n_chunks: the window) in
  // the average, once per selection: ts.cw[(i * group + gi) * (n_chunks + 1) + ch].
  ts.cw.resize((size_t)n_terms * group_ * (n_chunks + 1));
  for (int i = 0; i < n_terms; ++i)
    for (int gi = 0; gi < group_; ++gi) {
      const int iq = terms[i].r * group_ + gi;
      const AttnPartial glob = glob_[(size_t)h * lay.n_q + iq];
      for (int64_t ch = 0; ch <= n_chunks; ++ch)
        ts.cw[((size_t)i * group_ + gi) * (n_chunks + 1) + ch] =
            terms[i].w * std::exp(parts_[lay.part(h, ch, iq)].m - glob.m) / glob.l;
    }
  auto chunk_weight = [&](int i, int gi, int64_t ch) { return ts.cw[((size_t)i * group_ + gi) * (n_chunks + 1) + ch]; };
  // dst[t - pa] (+)= w * (row r's probability of position t - off), for t in [pa, pb), term i: per
  // chunk one pass over the row's query heads (accumulate false: the first term writes, no memset).
  auto add_term = [&](int ti, int64_t pa, int64_t pb, float* dst, bool accumulate) {
    const SelTerm& tm = terms[ti];
    const int64_t sa = std::max<int64_t>(0, pa - tm.off), sb = pb - tm.off;  // source positions
    auto pass = [&](int64_t ch, int64_t t0, int64_t t1) {
      const float* xs[kMaxGroup];
      float as[kMaxGroup];
      for (int i = 0; i < group_; ++i) {
        const int iq = tm.r * group_ + i;
        xs[i] = ch == n_chunks ? W(iq) - nqt + t0 : S(iq) + t0;
        as[i] = chunk_weight(ti, i, ch);
      }
      vec_wsum(xs, as, group_, dst + (t0 + tm.off - pa), t1 - t0, accumulate);
    };
    for (int64_t t0 = sa, qb = std::min(sb, nqt); t0 < qb;) {  // the chunks the range meets
      const int64_t ch = t0 / chunk_tok, t1 = std::min(qb, (ch + 1) * chunk_tok);
      pass(ch, t0, t1);
      t0 = t1;
    }
    if (sb > std::max(sa, nqt)) pass(n_chunks, std::max(sa, nqt), sb);
  };
  auto read_spans = [&]() {  // ts.pr = pr over ts.spans, back to back
    int64_t m = 0;
    for (const auto& [a, b] : ts.spans) m += b - a;
    ts.pr.resize((size_t)m);
    float* dst = ts.pr.data();
    for (const auto& [a, b] : ts.spans) {
      for (int i = 0; i < n_terms; ++i) add_term(i, a, b, dst, /*accumulate=*/i > 0);
      dst += b - a;
    }
    return m;
  };

  const int64_t k = std::clamp<int64_t>(k_, 0, n);
  const float tau = *hint;
  const int64_t nb = lay.n_blocks(g);
  sel_blocks_.fetch_add((uint64_t)nb, std::memory_order_relaxed);
  // out (positions) from out (indices into ts.pr): out is ascending, so is the walk through the spans.
  auto to_positions = [&]() {
    size_t si = 0;
    int64_t base = 0;  // index in ts.pr of span si's first position
    for (int64_t& p : out) {
      while (p >= base + (ts.spans[si].second - ts.spans[si].first)) {
        base += ts.spans[si].second - ts.spans[si].first;
        ++si;
      }
      p = ts.spans[si].first + (p - base);
    }
  };
  if (cfg_.selection_bounds && cfg_.sinks == 0 && k > 0 && tau > 0.0f && std::isfinite(tau) && nb > 0 && n >= nqt) {
    // Bounds per block of pr positions (terms with off = 1 also reach one position back).
    ts.ub.assign((size_t)nb, 0.0f);
    ts.bv.resize((size_t)nb);
    const int64_t bpc = chunk_tok / g;  // blocks per chunk
    for (int i = 0; i < n_terms; ++i)
      for (int gi = 0; gi < group_; ++gi) {
        const int iq = terms[i].r * group_ + gi;
        const float* bm = bmax_.data() + lay.block_max(h, iq, g);
        float* ub = ts.ub.data();
        float* v = terms[i].off == 0 ? ub : ts.bv.data();  // off = 0: added in place
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const float a = chunk_weight(i, gi, ch);
          const int64_t b1 = std::min(nb, (ch + 1) * bpc);
          if (terms[i].off == 0)
            for (int64_t b = ch * bpc; b < b1; ++b) v[b] += a * bm[b];
          else
            for (int64_t b = ch * bpc; b < b1; ++b) v[b] = a * bm[b];
        }
        if (terms[i].off != 0) {
          ub[0] += std::max(v[0], 0.0f);
          for (int64_t b = 1; b < nb; ++b) ub[b] += std::max(v[b], v[b - 1]);
        }
      }
    // The blocks whose bound reaches thr (the margin covers the sums' rounding) and the window.
    auto read_above = [&](float thr) {
      ts.spans.clear();
      for (int64_t b = 0; b < nb; ++b) {
        if (ts.ub[b] * 1.0001f < thr) continue;
        if (!ts.spans.empty() && ts.spans.back().second == b * g) ts.spans.back().second = (b + 1) * g;
        else ts.spans.emplace_back(b * g, (b + 1) * g);
      }
      if (n > nqt) ts.spans.emplace_back(nqt, n);  // the window positions: always read
      const int64_t m = read_spans();
      sel_blocks_read_.fetch_add((uint64_t)std::min(m / g, nb), std::memory_order_relaxed);
      return m;
    };
    int64_t m = read_above(tau);
    if (topk_indices_at_least(ts.pr.data(), m, k, tau, out, ts.tk, hint)) {
      to_positions();
      return;
    }
    // Fewer than k of the positions read reach tau. The k-th largest of them, T < tau, is a lower
    // bound of the k-th largest overall: reading the blocks whose bound reaches T as well (a few
    // more, usually) again holds the whole top-k.
    if (m >= k) {
      topk_indices(ts.pr.data(), m, k, out, ts.tk);
      float t = ts.pr[out[0]];
      for (int64_t i : out) t = std::min(t, ts.pr[i]);
      if (t > 0.0f) {
        m = read_above(t);
        if (topk_indices_at_least(ts.pr.data(), m, k, t, out, ts.tk, hint)) {
          to_positions();
          return;
        }
      }
    }
  }
  sel_blocks_read_.fetch_add((uint64_t)nb, std::memory_order_relaxed);
  ts.spans.assign(1, {0, n});
  read_spans();
  select_topk(ts.pr.data(), n, out, ts.tk, hint);
}

// The background selection (claimed by whoever runs it): every task in turn, then the prefetch.
// An error (the worker must not throw) is kept for finish_selection to rethrow.
void LowBitPolicy::run_selection_job(std::atomic<int>& state) {
  const SelJob& j = sel_job_;
  try {
    for (int64_t task = 0; task < j.n_tasks(g_.n_head_kv); ++task) selection_task(j, task, sel_scratch_);
    if (j.n_sel > 0) start_fetch(j.il, /*sync=*/false);
  } catch (...) {
    sel_error_ = std::current_exception();
  }
  state.store(kSelDone);
}

// Waits for the pending background selection, running it here if no worker has started it.
void LowBitPolicy::finish_selection() {
  if (!sel_pending_) return;
  int expected = kSelQueued;
  if (sel_pending_->compare_exchange_strong(expected, kSelRunning)) {
    run_selection_job(*sel_pending_);
  } else {
    while (sel_pending_->load() != kSelDone) std::this_thread::yield();
  }
  sel_pending_.reset();
  if (sel_error_) std::rethrow_exception(std::exchange(sel_error_, nullptr));
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
        if (j >= nqt || H.holds(j)) served += p;
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
  if (cfg.policy == "specache-refetch")
    return std::make_unique<LowBitPolicy>(cfg, g, Select::Speculative, "specache-refetch", /*refetch_on_miss=*/true);
  if (cfg.policy == "specache-exact") return std::make_unique<LowBitPolicy>(cfg, g, Select::OwnLowBit, "specache-exact");
  if (cfg.policy == "topk-oracle") return std::make_unique<LowBitPolicy>(cfg, g, Select::Oracle, "topk-oracle");
  SPC_ASSERT(false);
  return nullptr;
}

}  // namespace spc
