// `full`: every K/V pair in 16-bit in fast memory. The quality and speed reference.
#include "kv/f16_cache.h"
#include "kv/kv_policy.h"
#include "kv/policies.h"
#include "ops/attention.h"
#include "util/error.h"

namespace spc {

namespace {

class FullPolicy final : public KvPolicy {
 public:
  explicit FullPolicy(const KvGeometry& g) : g_(g), cache_(g, g.n_ctx + 2) {}

  const char* name() const override { return "full"; }
  const KvGeometry& geometry() const override { return g_; }
  int64_t n_cached() const override { return n_; }

  void store_prefill(int il, int64_t pos0, int64_t n, const float* k, const float* v) override {
    SPC_CHECK(pos0 == n_ && pos0 + n <= g_.n_ctx, "prefill of positions [%lld, %lld) does not fit the cache (%lld cached, context %lld)",
              (long long)pos0, (long long)(pos0 + n), (long long)n_, (long long)g_.n_ctx);
    cache_.write(il, pos0, n, k, v);
    if (il == g_.n_layer - 1) n_ = pos0 + n;
  }

  void begin_step(int n_rows, int n_keep) override {
    SPC_CHECK(n_ + n_keep <= g_.n_ctx, "context full: %lld positions cached, context size %lld", (long long)n_,
              (long long)g_.n_ctx);
    n_keep_ = n_keep;
  }
  void end_step() override {
    n_ += n_keep_;
    ++steps_;
  }

  void attend(int il, const DecodeRows& rows, float* out, ThreadPool& pool) override {
    cache_.write(il, rows.pos0, rows.n_rows, rows.k, rows.v);
    attend_f16_cache(cache_, g_, il, rows, out, pool);
  }

  KvStats stats() const override {
    KvStats s;
    s.policy = name();
    s.fast_bytes = cache_.bytes_for(n_ - cache_.shared_positions());
    s.shared_bytes = cache_.bytes_for(cache_.shared_positions());
    s.decode_steps = steps_;
    return s;
  }

  void export_layer(int il, int64_t pos0, int64_t n, float* k, float* v) const override {
    SPC_CHECK(n >= 0 && pos0 >= 0 && pos0 + n <= n_, "export_layer: positions [%lld, %lld) asked, %lld cached",
              (long long)pos0, (long long)(pos0 + n), (long long)n_);
    cache_.read(il, pos0, n, k, v);
  }

  int64_t share_prefix(const KvPolicy& other, int64_t n) override {
    SPC_CHECK(n_ == 0, "share_prefix needs an empty cache");
    const auto* o = dynamic_cast<const FullPolicy*>(&other);
    if (!o || o == this) return 0;
    SPC_CHECK(n >= 0 && n <= o->n_ && n <= g_.n_ctx, "share_prefix: %lld positions asked, the other cache holds %lld",
              (long long)n, (long long)o->n_);
    const int64_t s = n / kKeyTile * kKeyTile;
    if (s == 0) return 0;
    cache_.share_prefix(o->cache_, s);
    n_ = s;
    return s;
  }

 private:
  KvGeometry g_;
  F16Cache cache_;
  int64_t n_ = 0;
  int n_keep_ = 0;
  uint64_t steps_ = 0;
};

}  // namespace

std::unique_ptr<KvPolicy> make_full_policy(const KvConfig&, const KvGeometry& g) { return std::make_unique<FullPolicy>(g); }

}  // namespace spc
