#include "kv/f16_cache.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kv/shared_segments.h"
#include "ops/attention.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace spc {

F16Cache::F16Cache(const KvGeometry& g, int64_t capacity) : g_(g) {
  cap_ = (capacity + kKeyTile - 1) / kKeyTile * kKeyTile;
  const size_t n = (size_t)g.n_layer * g.n_head_kv * cap_ * g.head_dim * sizeof(fp16_t);
  kt_ = std::make_shared<LazyBuffer>(n);
  v_ = std::make_shared<LazyBuffer>(n);
}

F16Cache::Span F16Cache::span(int il, int h, int64_t pos) const {
  for (const Segment& s : segs_)
    if (pos < s.end) return {s.kt->as<fp16_t>() + slot(il, h, s.cap), s.v->as<fp16_t>() + slot(il, h, s.cap), s.end};
  return {kt_->as<fp16_t>() + slot(il, h, cap_), v_->as<fp16_t>() + slot(il, h, cap_), cap_};
}

void F16Cache::share_prefix(const F16Cache& base, int64_t n) {
  SPC_CHECK(base.g_.n_layer == g_.n_layer && base.g_.n_head_kv == g_.n_head_kv && base.g_.head_dim == g_.head_dim,
            "F16Cache::share_prefix: another geometry");
  SPC_CHECK(segs_.empty() && n % kKeyTile == 0 && n >= 0 && n <= std::min(cap_, base.cap_),
            "F16Cache::share_prefix: %lld positions (a multiple of %d, into an unshared cache)", (long long)n, kKeyTile);
  share_segments(segs_, base.segs_, Segment{base.kt_, base.v_, base.cap_, 0}, n);
}

void F16Cache::write(int il, int64_t pos0, int64_t n, const float* k, const float* v) {
  SPC_ASSERT(pos0 >= shared_positions() && pos0 + n <= cap_);
  const int d = g_.head_dim;
  for (int h = 0; h < g_.n_head_kv; ++h) {
    fp16_t* kt = kt_->as<fp16_t>() + slot(il, h, cap_);
    fp16_t* vv = v_->as<fp16_t>() + slot(il, h, cap_);
    for (int64_t i = 0; i < n; ++i) {
      const float* ki = k + (i * g_.n_head_kv + h) * d;
      const float* vi = v + (i * g_.n_head_kv + h) * d;
      const int64_t pos = pos0 + i;
      fp16_t* kdst = kt + key_tile_offset(pos, d);
      for (int c = 0; c < d; ++c) kdst[c * kKeyTile] = fp32_to_fp16(ki[c]);
      for (int c = 0; c < d; ++c) vv[pos * d + c] = fp32_to_fp16(vi[c]);
    }
  }
}

float F16Cache::key_at(int il, int h, int64_t pos, int c) const {
  return fp16_to_fp32(span(il, h, pos).keys[key_tile_offset(pos, g_.head_dim) + (int64_t)c * kKeyTile]);
}

void F16Cache::read(int il, int64_t pos0, int64_t n, float* k, float* v) const {
  const int d = g_.head_dim;
  for (int h = 0; h < g_.n_head_kv; ++h) {
    Span sp{nullptr, nullptr, pos0};
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = pos0 + i;
      if (pos >= sp.end) sp = span(il, h, pos);
      float* ki = k + (i * g_.n_head_kv + h) * d;
      float* vi = v + (i * g_.n_head_kv + h) * d;
      const fp16_t* kp = sp.keys + key_tile_offset(pos, d);
      for (int c = 0; c < d; ++c) ki[c] = fp16_to_fp32(kp[(int64_t)c * kKeyTile]);
      for (int c = 0; c < d; ++c) vi[c] = fp16_to_fp32(sp.values[pos * d + c]);
    }
  }
}

namespace {

// A chunk over three or more memories: one kernel call per memory, partial states merged. Out of
// line, so that the common path's task keeps the stack frame it had before shared prefixes (this
// made no measurable difference to `full`'s decode; docs/BENCHMARKS.md, session 27).
__attribute__((noinline)) void attend_pieces(const F16Cache& cache, int il, int h, const float* q, int nq, int d,
                                             int64_t k0, int64_t k1, const int64_t* lim, AttnPartial* part, float* o,
                                             float* scratch) {
  F16Cache::Span sp = cache.span(il, h, k0);
  attention_decode_f16(q, nq, d, sp.keys, sp.values, k0, std::min(k1, sp.end), lim, part, o, scratch);
  for (int64_t k = sp.end; k < k1; k = sp.end) {
    sp = cache.span(il, h, k);
    AttnPartial p2[8];
    alignas(64) float o2[8 * 256];
    attention_decode_f16(q, nq, d, sp.keys, sp.values, k, std::min(k1, sp.end), lim, p2, o2, scratch);
    for (int i = 0; i < nq; ++i) attn_merge(part[i], o + i * d, p2[i], o2 + i * d, d);
  }
}

}  // namespace

void attend_f16_cache(const F16Cache& cache, const KvGeometry& g, int il, const DecodeRows& rows, float* out,
                      ThreadPool& pool) {
  const int d = g.head_dim, group = g.n_head / g.n_head_kv;
  const int n_pos = (int)(rows.pos0 + rows.n_rows);
  // Queries of one KV head: rows x group heads, in batches of at most 8 per kernel call.
  const int n_q = rows.n_rows * group;
  const int qb = std::min(n_q, 8), n_qbatch = (n_q + qb - 1) / qb;
  // Split positions into chunks (multiples of the key tile) so both threads stay busy: many
  // more tasks than threads (tasks are claimed dynamically, so the tail is one small chunk).
  const int64_t target_tasks = 8LL * pool.size();
  int64_t chunk = std::max<int64_t>(256, (int64_t)n_pos * g.n_head_kv * n_qbatch / target_tasks);
  chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
  const int64_t n_chunks = (n_pos + chunk - 1) / chunk;
  const int64_t n_tasks = (int64_t)g.n_head_kv * n_qbatch * n_chunks;

  // Partial states and outputs: thread-local buffers of the calling thread, grown as needed
  // (no allocation per call once warm). Scratch is only needed by the non-streaming fallback.
  struct Buffers {
    std::vector<AttnPartial> parts;
    std::vector<float> outs;
    std::vector<std::vector<float>> scratch;
  };
  thread_local Buffers tl_buf;
  Buffers& buf = tl_buf;  // the caller's instance (a thread_local named in the lambda would be the worker's)
  if (buf.parts.size() < (size_t)n_tasks * qb) buf.parts.resize((size_t)n_tasks * qb);
  if (buf.outs.size() < (size_t)n_tasks * qb * d) buf.outs.resize((size_t)n_tasks * qb * d);
  const bool streams = attention_decode_f16_streams(d);
  if (!streams) {
    if (buf.scratch.size() < (size_t)pool.size()) buf.scratch.resize((size_t)pool.size());
    for (auto& sc : buf.scratch)
      if (sc.size() < (size_t)qb * (chunk + kKeyTile)) sc.resize((size_t)qb * (chunk + kKeyTile));
  }
  AttnPartial* parts = buf.parts.data();
  float* outs = buf.outs.data();
  pool.for_each_task(n_tasks, [&](int64_t task, int t) {
    alignas(64) float qbuf[8 * 256];
    int64_t lim[8];
    {
      const int h = (int)(task / (n_qbatch * n_chunks));
      const int b = (int)(task / n_chunks % n_qbatch);
      const int64_t ch = task % n_chunks;
      const int q0 = b * qb, nq = std::min(qb, n_q - q0);
      for (int i = 0; i < nq; ++i) {
        const int r = (q0 + i) / group, hq = h * group + (q0 + i) % group;
        std::copy_n(rows.q + ((int64_t)r * g.n_head + hq) * d, d, qbuf + i * d);
        lim[i] = rows.pos0 + r + 1;
      }
      const int64_t k0 = ch * chunk, k1 = std::min<int64_t>(n_pos, k0 + chunk);
      AttnPartial* part = parts + task * qb;
      float* o = outs + task * qb * d;
      float* scratch = streams ? nullptr : buf.scratch[t].data();
      // Positions in one memory or two (a chunk over the end of a shared prefix: F16Mem, the
      // same arithmetic as one); three or more (a prefix shared from a session that shares one
      // itself, with a short middle part) take one call per memory, partial states merged, which
      // rounds differently.
      F16Cache::Span sp = cache.span(il, h, k0);
      if (sp.end >= k1) {
        attention_decode_f16(qbuf, nq, d, sp.keys, sp.values, k0, k1, lim, part, o, scratch);
        return;
      }
      if (const F16Cache::Span s2 = cache.span(il, h, sp.end); s2.end >= k1) {
        attention_decode_f16(qbuf, nq, d, F16Mem{sp.keys, sp.values, s2.keys, s2.values, sp.end}, k0, k1, lim, part, o,
                             scratch);
        return;
      }
      attend_pieces(cache, il, h, qbuf, nq, d, k0, k1, lim, part, o, scratch);
    }
  });
  // Merge the chunks of each query and normalize.
  for (int h = 0; h < g.n_head_kv; ++h)
    for (int b = 0; b < n_qbatch; ++b) {
      const int q0 = b * qb, nq = std::min(qb, n_q - q0);
      const int64_t base = ((int64_t)h * n_qbatch + b) * n_chunks;
      for (int i = 0; i < nq; ++i) {
        AttnPartial acc = parts[base * qb + i];
        float* o = outs + (base * qb + i) * d;
        for (int64_t ch = 1; ch < n_chunks; ++ch)
          attn_merge(acc, o, parts[(base + ch) * qb + i], outs + ((base + ch) * qb + i) * d, d);
        const int r = (q0 + i) / group, hq = h * group + (q0 + i) % group;
        float* dst = out + ((int64_t)r * g.n_head + hq) * d;
        const float inv = 1.0f / acc.l;
        for (int c = 0; c < d; ++c) dst[c] = o[c] * inv;
      }
    }
}

}  // namespace spc
