// A 16-bit K/V cache for every (layer, KV head), laid out for streaming decode attention:
// keys tile-transposed (ops/attention.h key_tile_offset), values row-major. Used by the `full`
// policy and by policies that need exact keys for every position (topk-oracle).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kv/kv_policy.h"
#include "util/fp16.h"
#include "util/lazy_buffer.h"

namespace spc {

class F16Cache {
 public:
  F16Cache() = default;
  // capacity: positions per (layer, head), rounded up to the key tile.
  F16Cache(const KvGeometry& g, int64_t capacity);

  int64_t capacity() const { return cap_; }
  // Writes n positions starting at pos0 of layer il from [n][n_head_kv][head_dim] fp32 rows
  // (pos0 >= shared_positions()).
  void write(int il, int64_t pos0, int64_t n, const float* k, const float* v);
  // Reads back positions [pos0, pos0 + n) of layer il as [n][n_head_kv][head_dim] fp32.
  void read(int il, int64_t pos0, int64_t n, float* k, float* v) const;

  // Where positions from pos of (layer il, head h) live: key tiles and value rows indexed by
  // absolute position (as the attention kernels take them), valid up to position end.
  struct Span {
    const fp16_t* keys;
    const fp16_t* values;
    int64_t end;
  };
  Span span(int il, int h, int64_t pos) const;
  float key_at(int il, int h, int64_t pos, int c) const;

  // Shared prompt prefix: positions [0, n) of every layer and head are read from base's memory
  // (or the caches base itself shares from) instead of being held here; n must be a multiple of
  // kKeyTile, base must hold them and this cache must be empty (the caller checks both). Caches
  // are append-only, so those positions never change; the shared_ptrs keep them alive after
  // their first owner is gone.
  void share_prefix(const F16Cache& base, int64_t n);
  int64_t shared_positions() const { return segs_.empty() ? 0 : segs_.back().end; }

  // Bytes used by n positions of every layer and head (K and V, 16-bit).
  uint64_t bytes_for(int64_t n) const { return (uint64_t)n * g_.n_layer * g_.n_head_kv * g_.head_dim * 4; }

 private:
  int64_t slot(int il, int h, int64_t cap) const { return ((int64_t)il * g_.n_head_kv + h) * cap * g_.head_dim; }
  KvGeometry g_;
  int64_t cap_ = 0;
  std::shared_ptr<LazyBuffer> kt_;  // [n_layer][n_head_kv][cap/16][head_dim][16]
  std::shared_ptr<LazyBuffer> v_;   // [n_layer][n_head_kv][cap][head_dim]
  // A shared prefix: segment i holds positions [segs_[i-1].end, segs_[i].end) in another cache's
  // buffers (of capacity cap); this cache's own buffers hold the positions after the last.
  struct Segment {
    std::shared_ptr<const LazyBuffer> kt, v;
    int64_t cap, end;
  };
  std::vector<Segment> segs_;
};

// Decode attention of the step's rows over positions [0, n_pos) of layer il of the cache, where
// row r sees positions < rows.pos0 + r + 1 (the rows' own K/V must already be written at
// rows.pos0 + r). Splits the positions across the pool (flash-decoding partial merge).
void attend_f16_cache(const F16Cache& cache, const KvGeometry& g, int il, const DecodeRows& rows, float* out,
                      ThreadPool& pool);

}  // namespace spc
