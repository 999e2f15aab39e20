// `streaming` (StreamingLLM-style eviction baseline): the first `sinks` positions and the most
// recent `window` positions in 16-bit; everything else is dropped for good. Positions keep the
// RoPE of their original position.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kv/kv_policy.h"
#include "kv/policies.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/threadpool.h"

namespace spc {

namespace {

class StreamingPolicy final : public KvPolicy {
 public:
  StreamingPolicy(const KvConfig& cfg, const KvGeometry& g) : g_(g), sinks_(cfg.sinks), window_(cfg.window) {
    SPC_CHECK(cfg.window >= 1, "streaming needs --kv-window >= 1");
    layers_.resize((size_t)g.n_layer);
  }
  const char* name() const override { return "streaming"; }
  const KvGeometry& geometry() const override { return g_; }
  int64_t n_cached() const override { return n_; }

  void store_prefill(int il, int64_t pos0, int64_t n, const float* k, const float* v) override {
    SPC_CHECK(pos0 == n_ && pos0 + n <= g_.n_ctx, "prefill does not fit the context");
    for (int64_t i = 0; i < n; ++i) push(il, pos0 + i, k + i * kv_stride(), v + i * kv_stride());
    if (il == g_.n_layer - 1) n_ = pos0 + n;
  }
  void begin_step(int, int n_keep) override {
    SPC_CHECK(n_ + n_keep <= g_.n_ctx, "context full: %lld positions cached", (long long)n_);
    n_keep_ = n_keep;
  }
  void end_step() override {
    n_ += n_keep_;
    ++steps_;
  }

  void attend(int il, const DecodeRows& rows, float* out, ThreadPool&) override {
    const Layer& L = layers_[il];
    const int d = g_.head_dim, group = g_.n_head / g_.n_head_kv;
    const float scale = 1.0f / std::sqrt((float)d);
    std::vector<float> sc;
    for (int r = 0; r < rows.n_rows; ++r)
      for (int hq = 0; hq < g_.n_head; ++hq) {
        const int h = hq / group;
        const float* q = rows.q + ((int64_t)r * g_.n_head + hq) * d;
        const size_t n_old = L.k.size() / kv_stride();
        sc.assign(n_old + r + 1, 0.0f);
        for (size_t j = 0; j < n_old; ++j) sc[j] = dot16(q, L.k.data() + j * kv_stride() + h * d) * scale;
        for (int rr = 0; rr <= r; ++rr) sc[n_old + rr] = dot_rounded(q, rows.k + ((int64_t)rr * g_.n_head_kv + h) * d) * scale;
        const float m = *std::max_element(sc.begin(), sc.end());
        double l = 0;
        for (float& s : sc) l += (s = std::exp(s - m));
        float* o = out + ((int64_t)r * g_.n_head + hq) * d;
        std::fill(o, o + d, 0.0f);
        for (size_t j = 0; j < sc.size(); ++j) {
          const float p = (float)(sc[j] / l);
          if (j < n_old) {
            const fp16_t* vr = L.v.data() + j * kv_stride() + h * d;
            for (int c = 0; c < d; ++c) o[c] += p * fp16_to_fp32(vr[c]);
          } else {
            const float* vr = rows.v + ((int64_t)(j - n_old) * g_.n_head_kv + h) * d;
            for (int c = 0; c < d; ++c) o[c] += p * round16(vr[c]);
          }
        }
      }
    for (int r = 0; r < rows.n_keep; ++r) push(il, rows.pos0 + r, rows.k + r * kv_stride(), rows.v + r * kv_stride());
  }

  KvStats stats() const override {
    KvStats s;
    s.policy = name();
    s.fast_bytes = peak_bytes_;
    s.decode_steps = steps_;
    return s;
  }
  void export_layer(int, int64_t, int64_t, float*, float*) const override {
    throw Error("streaming evicts positions: it has no complete K/V to export");
  }

 private:
  struct Layer {
    std::vector<fp16_t> k, v;  // [n_kept][n_head_kv][head_dim]: sinks first, then the recent window in order
  };
  int64_t kv_stride() const { return (int64_t)g_.n_head_kv * g_.head_dim; }
  // The step's own rows are rounded to 16-bit exactly as they will be stored (and as `full` stores
  // them before attending), so a window covering everything reproduces `full`.
  static float round16(float x) { return fp16_to_fp32(fp32_to_fp16(x)); }
  float dot_rounded(const float* a, const float* b) const {
    float s = 0;
    for (int c = 0; c < g_.head_dim; ++c) s += a[c] * round16(b[c]);
    return s;
  }
  float dot16(const float* a, const fp16_t* b) const {
    float s = 0;
    for (int c = 0; c < g_.head_dim; ++c) s += a[c] * fp16_to_fp32(b[c]);
    return s;
  }
  void push(int il, int64_t pos, const float* k, const float* v) {
    Layer& L = layers_[il];
    const int64_t st = kv_stride();
    for (int64_t c = 0; c < st; ++c) {
      L.k.push_back(fp32_to_fp16(k[c]));
      L.v.push_back(fp32_to_fp16(v[c]));
    }
    // Evict the oldest non-sink position once sinks + window are full.
    const int64_t n_kept = (int64_t)L.k.size() / st;
    if (pos >= sinks_ && n_kept > sinks_ + window_) {
      L.k.erase(L.k.begin() + sinks_ * st, L.k.begin() + (sinks_ + 1) * st);
      L.v.erase(L.v.begin() + sinks_ * st, L.v.begin() + (sinks_ + 1) * st);
    }
    uint64_t total = 0;
    for (const auto& l : layers_) total += (l.k.size() + l.v.size()) * sizeof(fp16_t);
    peak_bytes_ = std::max(peak_bytes_, total);
  }

  KvGeometry g_;
  int64_t sinks_, window_;
  std::vector<Layer> layers_;
  int64_t n_ = 0;
  int n_keep_ = 0;
  uint64_t steps_ = 0, peak_bytes_ = 0;
};

}  // namespace

std::unique_ptr<KvPolicy> make_streaming_policy(const KvConfig& cfg, const KvGeometry& g) {
  return std::make_unique<StreamingPolicy>(cfg, g);
}

}  // namespace spc
