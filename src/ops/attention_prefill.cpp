// Exact causal attention for prefill chunks (see attention_prefill in attention.h).
//
// AVX-512 and AVX2 paths (one template over the vector width): a flash-attention style fp32
// kernel. A tile is a block of query rows of one KV head; the query heads that share the KV head
// (GQA) are stacked into the tile, so a tile holds kTileLanes = 48 query vectors (3 zmm
// registers; AVX2: 24 in 3 ymm), lane i = row i / g, head i % g. Queries
// live in the lanes, which makes everything per-query (running max, sum, rescale) a plain
// vector op with no horizontal reductions, and lets K and V be read in their natural
// [pos][n_head_kv][head_dim] layout by broadcasts:
//   scores  S^T[j][i] = sum_c K[j][c] * Q^T[c][i]     8 keys x 48 queries in 24 zmm accumulators (AVX2: 4 x 24, 12 ymm)
//   values  O^T[c][i] += V[j][c] * P^T[j][i]          8 channels x 48 queries in 24 zmm accumulators (AVX2: 4 x 24)
// Keys are processed in blocks of kKeyBlock with an online softmax; only the block(s) on the
// causal diagonal are masked. Every K/V element loaded is used by all 48 query vectors, and a
// task (KV head, group of up to kGroupTiles consecutive tiles) walks the keys once for the whole
// group so K/V come from memory once per group. Tasks go out most expensive first.
//
// bf16 path (attention_prefill_bf16, AVX-512 BF16 builds): the same tiles with vdpbf16ps, two
// multiply-adds per 32-bit lane: Q^T and the softmax weights are stored as bf16 pairs, K (row
// layout) and V (paired by position, kv_to_bf16) are broadcast a pair at a time. ~1.8x the fp32
// tile's throughput on Zen 4 (SPECACHE_TIMING=1 AttentionPrefill.Timing).
//
// Portable path: the scalar tile kernel (16 rows of one query head per task).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/attention.h"
#include "ops/vec_math.h"
#include "util/amx_tiles.h"
#include "util/cpu_features.h"
#include "util/error.h"
#include "util/threadpool.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define SPC_PREFILL_BF16 1
#endif

namespace spc {

namespace {

constexpr int kRowTile = 16;          // query rows per portable prefill tile
constexpr int kScalarKeyBlock = 128;  // keys per online-softmax block in the portable path

// One portable prefill tile: query head h, rows [r0, r0+nr) (nr <= 16) of the chunk.
void prefill_tile(const AttnShape& s, const float* q, int64_t r0, int nr, int64_t p0, const float* k, const float* v,
                  float* out, int h) {
  const int d = s.head_dim;
  const int hk = h / (s.n_head / s.n_head_kv);
  const int64_t q_stride = (int64_t)s.n_head * d, kv_stride = (int64_t)s.n_head_kv * d;
  const float scale = 1.0f / std::sqrt((float)d);
  alignas(64) float qt[256 * kRowTile];  // [d][16]
  alignas(64) float ot[256 * kRowTile];  // [d][16] unnormalized output
  alignas(64) float sc[kScalarKeyBlock * kRowTile];
  float m[kRowTile], l[kRowTile];
  SPC_ASSERT(d <= 256);
  std::memset(qt, 0, sizeof(float) * d * kRowTile);
  std::memset(ot, 0, sizeof(float) * d * kRowTile);
  for (int r = 0; r < kRowTile; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0;
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < d; ++c) qt[c * kRowTile + r] = q[(r0 + r) * q_stride + h * d + c] * scale;
  const int64_t n_keys = p0 + r0 + nr;  // last row sees keys < n_keys
  for (int64_t j0 = 0; j0 < n_keys; j0 += kScalarKeyBlock) {
    const int nb = (int)std::min<int64_t>(kScalarKeyBlock, n_keys - j0);
    for (int j = 0; j < nb; ++j) {
      const float* kj = k + (j0 + j) * kv_stride + hk * d;
      float acc[kRowTile] = {};
      for (int c = 0; c < d; ++c) {
        const float kc = kj[c];
        for (int r = 0; r < kRowTile; ++r) acc[r] += kc * qt[c * kRowTile + r];
      }
      for (int r = 0; r < kRowTile; ++r) sc[j * kRowTile + r] = acc[r];
    }
    // Causal mask + online softmax update per row.
    float mnew[kRowTile], alpha[kRowTile];
    for (int r = 0; r < kRowTile; ++r) {
      const int64_t lim = p0 + r0 + r;  // row sees keys <= lim
      float mx = m[r];
      for (int j = 0; j < nb; ++j)
        if (j0 + j <= lim) mx = std::max(mx, sc[j * kRowTile + r]);
      mnew[r] = mx;
      alpha[r] = (m[r] == -std::numeric_limits<float>::infinity()) ? 0.0f : std::exp(m[r] - mx);
    }
    for (int j = 0; j < nb; ++j)
      for (int r = 0; r < kRowTile; ++r) {
        const bool ok = j0 + j <= p0 + r0 + r && r < nr;
        sc[j * kRowTile + r] = ok ? exp_approx(sc[j * kRowTile + r] - mnew[r]) : 0.0f;
      }
    for (int r = 0; r < kRowTile; ++r) {
      float sum = 0;
      for (int j = 0; j < nb; ++j) sum += sc[j * kRowTile + r];
      l[r] = l[r] * alpha[r] + sum;
      m[r] = mnew[r];
    }
    for (int c = 0; c < d; ++c)
      for (int r = 0; r < kRowTile; ++r) ot[c * kRowTile + r] *= alpha[r];
    for (int j = 0; j < nb; ++j) {
      const float* vj = v + (j0 + j) * kv_stride + hk * d;
      const float* pj = sc + j * kRowTile;
      for (int c = 0; c < d; ++c) {
        const float vc = vj[c];
        for (int r = 0; r < kRowTile; ++r) ot[c * kRowTile + r] += vc * pj[r];
      }
    }
  }
  for (int r = 0; r < nr; ++r) {
    const float inv = 1.0f / l[r];
    float* o = out + (r0 + r) * q_stride + h * d;
    for (int c = 0; c < d; ++c) o[c] = ot[c * kRowTile + r] * inv;
  }
}

// The tile kernel, written once over a vector traits class (V16: AVX-512, 16 lanes; V8: AVX2,
// 8 lanes). A tile is 3 vectors of query lanes (48 or 24); the register blocks are KU keys
// (scores) or KU channels (values) x 3 vectors: 8 x 3 zmm or 4 x 3 ymm accumulators.
#if defined(__AVX512F__)
struct V16 {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16, KU = 8;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, F v) { _mm512_store_ps(p, v); }
  static I load_i(const int32_t* p) { return _mm512_load_si512(p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F exp(F x) { return exp_approx16(x); }
  // -inf in the lanes whose limit is below position p, x elsewhere.
  static F hide_after(F x, I lim, int32_t p) {
    const __mmask16 hidden = _mm512_cmp_epi32_mask(lim, _mm512_set1_epi32(p), _MM_CMPINT_LT);
    return _mm512_mask_mov_ps(x, hidden, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
  }
};
#endif
#if defined(SPC_VEC_AVX2)
struct V8 {
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8, KU = 4;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, F v) { _mm256_store_ps(p, v); }
  static I load_i(const int32_t* p) { return _mm256_load_si256((const __m256i*)p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F exp(F x) { return exp_approx8(x); }
  static F hide_after(F x, I lim, int32_t p) {
    const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(p), lim));
    return _mm256_blendv_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), hidden);
  }
};
#endif

#if defined(__AVX512F__) || defined(SPC_VEC_AVX2)
constexpr int kKeyBlock = 64;  // keys per online-softmax block
// Up to kGroupTiles tiles of one KV head run together, key block by key block, so each K/V
// block is fetched from memory once for all of them and then served from L1/L2: at depth the
// K/V of a head (n_keys * head_dim * 8 bytes) is far larger than the caches.
constexpr int kGroupTiles = 4;

// out rows [r0, r0 + nr) of KV head hk's query heads from a tile's O^T [d][lanes] times inv[lane].
void store_rows(const AttnShape& s, const float* ot, const float* inv, int64_t r0, int nr, int lanes, float* out,
                int hk) {
  const int d = s.head_dim, g = s.n_head / s.n_head_kv;
  const int64_t q_stride = (int64_t)s.n_head * d;
  for (int r = 0; r < nr; ++r) {
    float* orow = out + (r0 + r) * q_stride + (int64_t)hk * g * d;
    for (int hl = 0; hl < g; ++hl) {
      const int i = r * g + hl;
      for (int c = 0; c < d; ++c) orow[hl * d + c] = ot[c * lanes + i] * inv[i];
    }
  }
}

// A tile's lane i is (row r0 + i / g, query head g * hk + i % g) of the chunk, g = n_head / n_head_kv.
// qt [d][lanes] = those rows' query vectors times 1/sqrt(d), transposed; unused lanes 0.
void load_rows(const AttnShape& s, const float* q, int64_t r0, int nr, int lanes, int hk, float* qt) {
  const int d = s.head_dim, g = s.n_head / s.n_head_kv;
  const int64_t q_stride = (int64_t)s.n_head * d;
  const float scale = 1.0f / std::sqrt((float)d);
  std::memset(qt, 0, sizeof(float) * d * lanes);
  for (int r = 0; r < nr; ++r) {
    const float* qr = q + (r0 + r) * q_stride + (int64_t)hk * g * d;  // the g heads of hk are contiguous
    for (int hl = 0; hl < g; ++hl)
      for (int c = 0; c < d; ++c) qt[c * lanes + r * g + hl] = qr[hl * d + c] * scale;
  }
}

// lim[i]: the last key lane i sees (chunk rows start at position p0); unused lanes see
// everything (their scores are 0 and their outputs are never stored).
void lane_limits(const AttnShape& s, int64_t p0, int64_t r0, int nr, int lanes, int32_t* lim) {
  const int g = s.n_head / s.n_head_kv;
  for (int i = 0; i < lanes; ++i)
    lim[i] = i < nr * g ? (int32_t)(p0 + r0 + i / g) : std::numeric_limits<int32_t>::max();
}

// Runs f(hk, tile0, tile1, rows, scratch) over the task grid of a chunk: tiles of `lanes` query
// vectors (lanes / g rows each), up to kGroupTiles consecutive tiles per task and KV head, with
// 64-byte aligned per-thread scratch of scratch_floats floats. The cost of a group grows with its
// last row: the most expensive groups go out first (largest first with dynamic claiming balances
// the causal triangle), and groups are aligned from the end of the chunk so the last, most
// expensive ones are full.
template <class F>
void for_each_group(const AttnShape& s, int64_t n_rows, int lanes, size_t scratch_floats, ThreadPool& pool, F&& f) {
  const int rows = lanes / (s.n_head / s.n_head_kv);  // rows per tile: all g heads of a row share the tile
  const int64_t n_tiles = (n_rows + rows - 1) / rows;
  const int64_t n_groups = (n_tiles + kGroupTiles - 1) / kGroupTiles;
  const int64_t n_tasks = n_groups * s.n_head_kv;
  const size_t per_thread = (scratch_floats + 15) / 16 * 16;
  std::vector<float> scratch(per_thread * (size_t)pool.size() + 16);
  float* base = scratch.data();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
  pool.for_each_task(n_tasks, [&](int64_t task, int thread) {
    const int64_t grp = task / s.n_head_kv;
    const int hk = (int)(task % s.n_head_kv);
    const int64_t tile1 = n_tiles - grp * kGroupTiles;
    const int64_t tile0 = std::max<int64_t>(0, tile1 - kGroupTiles);
    f(hk, tile0, tile1, rows, base + per_thread * (size_t)thread);
  });
}

template <class V>
struct TileKernel {
  using F = typename V::F;
  using I = typename V::I;
  static constexpr int kLanes = 3 * V::W;  // query vectors per tile
  static constexpr int KU = V::KU;

  // st[j][kLanes] = sum_c K[j][c] * qt[c][kLanes] for keys j < nb; kb points at key 0 of the
  // block (this KV head), ks is the key stride in floats.
  static void scores(const float* qt, const float* kb, int64_t ks, int d, int nb, float* st) {
    int j = 0;
    for (; j + KU <= nb; j += KU) {
      F a[KU][3];
      for (int i = 0; i < KU; ++i) a[i][0] = a[i][1] = a[i][2] = V::zero();
      const float* kp = kb + j * ks;
      for (int c = 0; c < d; ++c) {
        const F q0 = V::load(qt + c * kLanes), q1 = V::load(qt + c * kLanes + V::W), q2 = V::load(qt + c * kLanes + 2 * V::W);
        for (int i = 0; i < KU; ++i) {
          const F kc = V::bcast(kp + i * ks + c);
          a[i][0] = V::fma(kc, q0, a[i][0]);
          a[i][1] = V::fma(kc, q1, a[i][1]);
          a[i][2] = V::fma(kc, q2, a[i][2]);
        }
      }
      for (int i = 0; i < KU; ++i)
        for (int u = 0; u < 3; ++u) V::store(st + (j + i) * kLanes + V::W * u, a[i][u]);
    }
    for (; j < nb; ++j) {
      F a[3] = {V::zero(), V::zero(), V::zero()};
      const float* kp = kb + j * ks;
      for (int c = 0; c < d; ++c) {
        const F kc = V::bcast(kp + c);
        for (int u = 0; u < 3; ++u) a[u] = V::fma(kc, V::load(qt + c * kLanes + V::W * u), a[u]);
      }
      for (int u = 0; u < 3; ++u) V::store(st + j * kLanes + V::W * u, a[u]);
    }
  }

  // ot[c][kLanes] = ot[c][kLanes] * alpha + sum_{j < nb} V[j][c] * pt[j][kLanes]; vb points at
  // key 0 of the block (this KV head).
  static void values(const float* pt, const float* vb, int64_t vs, int d, int nb, const F alpha[3], float* ot) {
    int c0 = 0;
    for (; c0 + KU <= d; c0 += KU) {
      F a[KU][3];
      for (int i = 0; i < KU; ++i)
        for (int u = 0; u < 3; ++u) a[i][u] = V::mul(V::load(ot + (c0 + i) * kLanes + V::W * u), alpha[u]);
      const float* vp = vb + c0;
      for (int j = 0; j < nb; ++j, vp += vs) {
        const F p0 = V::load(pt + j * kLanes), p1 = V::load(pt + j * kLanes + V::W), p2 = V::load(pt + j * kLanes + 2 * V::W);
        for (int i = 0; i < KU; ++i) {
          const F vc = V::bcast(vp + i);
          a[i][0] = V::fma(vc, p0, a[i][0]);
          a[i][1] = V::fma(vc, p1, a[i][1]);
          a[i][2] = V::fma(vc, p2, a[i][2]);
        }
      }
      for (int i = 0; i < KU; ++i)
        for (int u = 0; u < 3; ++u) V::store(ot + (c0 + i) * kLanes + V::W * u, a[i][u]);
    }
    for (; c0 < d; ++c0) {  // head_dim % KU tail, one channel at a time
      F a[3];
      for (int u = 0; u < 3; ++u) a[u] = V::mul(V::load(ot + c0 * kLanes + V::W * u), alpha[u]);
      for (int j = 0; j < nb; ++j) {
        const F vc = V::bcast(vb + j * vs + c0);
        for (int u = 0; u < 3; ++u) a[u] = V::fma(vc, V::load(pt + j * kLanes + V::W * u), a[u]);
      }
      for (int u = 0; u < 3; ++u) V::store(ot + c0 * kLanes + V::W * u, a[u]);
    }
  }

  // State of one tile between key blocks.
  struct Tile {
    float* qt;        // [d][kLanes] scaled queries, lane i = (row i / g, head i % g)
    float* ot;        // [d][kLanes] unnormalized outputs
    F m[3], l[3];     // running max and sum per lane
    I lim[3];         // lane i sees keys j <= lim[i]
    int64_t r0;       // first chunk row
    int nr;           // rows (nr * g <= kLanes)
    int64_t n_keys;   // keys seen by the last row
    int64_t all_see;  // keys < all_see are visible to every lane
  };

  // Floats of per-thread scratch: Q^T and O^T [d][kLanes] per tile, scores [kKeyBlock][kLanes].
  static size_t group_scratch_floats(int d) { return ((size_t)2 * d * kGroupTiles + kKeyBlock) * kLanes; }

  static void init(Tile& t, const AttnShape& s, const float* q, int64_t p0, int hk) {
    load_rows(s, q, t.r0, t.nr, kLanes, hk, t.qt);
    std::memset(t.ot, 0, sizeof(float) * s.head_dim * kLanes);
    alignas(64) int32_t lim_a[kLanes];
    lane_limits(s, p0, t.r0, t.nr, kLanes, lim_a);
    for (int u = 0; u < 3; ++u) {
      t.lim[u] = V::load_i(lim_a + V::W * u);
      t.m[u] = V::set1(-std::numeric_limits<float>::infinity());
      t.l[u] = V::zero();
    }
    t.n_keys = p0 + t.r0 + t.nr;
    t.all_see = p0 + t.r0 + 1;
  }

  // Keys [j0, j0 + nb) for one tile; kb/vb point at key j0 of this KV head.
  static void block(Tile& t, int64_t j0, int nb, const float* kb, const float* vb, int64_t kv_stride, int d, float* st) {
    scores(t.qt, kb, kv_stride, d, nb, st);
    if (j0 + nb > t.all_see)  // causal diagonal: masked scores become -inf (weight exactly 0)
      for (int j = (int)std::max<int64_t>(0, t.all_see - j0); j < nb; ++j)
        for (int u = 0; u < 3; ++u) {
          float* sj = st + j * kLanes + V::W * u;
          V::store(sj, V::hide_after(V::load(sj), t.lim[u], (int32_t)(j0 + j)));
        }
    // Online softmax. Key 0 is in the first block and visible to every lane, so m is finite
    // from then on; the exp of -inf is 0 for the first block's alpha and for masked scores.
    F bm[3] = {t.m[0], t.m[1], t.m[2]};
    for (int j = 0; j < nb; ++j)
      for (int u = 0; u < 3; ++u) bm[u] = V::max(bm[u], V::load(st + j * kLanes + V::W * u));
    F alpha[3], sum[3];
    for (int u = 0; u < 3; ++u) {
      alpha[u] = V::exp(V::sub(t.m[u], bm[u]));
      t.m[u] = bm[u];
      sum[u] = V::zero();
    }
    for (int j = 0; j < nb; ++j)
      for (int u = 0; u < 3; ++u) {
        float* sj = st + j * kLanes + V::W * u;
        const F p = V::exp(V::sub(V::load(sj), t.m[u]));
        V::store(sj, p);
        sum[u] = V::add(sum[u], p);
      }
    for (int u = 0; u < 3; ++u) t.l[u] = V::fma(t.l[u], alpha[u], sum[u]);
    values(st, vb, kv_stride, d, nb, alpha, t.ot);
  }

  static void finish(const Tile& t, const AttnShape& s, float* out, int hk) {
    alignas(64) float inv[kLanes];
    for (int u = 0; u < 3; ++u) V::store(inv + V::W * u, V::div(V::set1(1.0f), t.l[u]));
    store_rows(s, t.ot, inv, t.r0, t.nr, kLanes, out, hk);
  }

  // Tiles [tile0, tile1) (at most kGroupTiles) of KV head hk; a tile is `rows` chunk rows.
  static void group(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const float* k, const float* v,
                    float* out, int hk, int64_t tile0, int64_t tile1, int rows, float* scratch) {
    const int d = s.head_dim;
    const int64_t kv_stride = (int64_t)s.n_head_kv * d;
    const int nt = (int)(tile1 - tile0);
    Tile tiles[kGroupTiles];
    float* st = scratch + (size_t)2 * d * kGroupTiles * kLanes;  // [kKeyBlock][kLanes]
    int64_t n_keys = 0;
    for (int i = 0; i < nt; ++i) {
      Tile& t = tiles[i];
      t.qt = scratch + (size_t)2 * i * d * kLanes;
      t.ot = t.qt + (size_t)d * kLanes;
      t.r0 = (tile0 + i) * rows;
      t.nr = (int)std::min<int64_t>(rows, n_rows - t.r0);
      init(t, s, q, p0, hk);
      n_keys = std::max(n_keys, t.n_keys);
    }
    const float* kh = k + (int64_t)hk * d;
    const float* vh = v + (int64_t)hk * d;
    for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock)
      for (int i = 0; i < nt; ++i) {
        Tile& t = tiles[i];
        if (j0 >= t.n_keys) continue;
        const int nb = (int)std::min<int64_t>(kKeyBlock, t.n_keys - j0);
        block(t, j0, nb, kh + j0 * kv_stride, vh + j0 * kv_stride, kv_stride, d, st);
      }
    for (int i = 0; i < nt; ++i) finish(tiles[i], s, out, hk);
  }
};

#if defined(SPC_PREFILL_BF16)
// The same tile and online softmax with bf16 dot products (vdpbf16ps: 32 multiply-adds per
// instruction against 16 for an fp32 FMA, products and sums in fp32). Operands are bf16 pairs
// in one 32-bit lane:
//   scores  Q^T pairs qt[c/2][48] x K broadcast as (K[j][c], K[j][c+1]): K's natural row layout
//   values  P^T pairs pt[j/2][48] x V broadcast as (V[j][c], V[j+1][c]): V paired by position
// (kv_to_bf16 writes both). The softmax stays fp32; the probabilities are rounded to bf16 only
// as the value weights (their sum l is taken before rounding).
template <bool kI8>
struct TileKernelBf16 {
  static constexpr int W = 16, KU = 8, kLanes = 48;

  // exp(x) for finite x <= 0 (scores minus their running max), to the precision the weights keep:
  // they are rounded to bf16 (relative 2^-9) right after, so a degree-3 polynomial does (relative
  // error < 8e-5, least squares in relative error on [-ln2/2, ln2/2]). n = round(x * log2 e) comes
  // from the 1.5 * 2^23 shifter instead of vrndscaleps, and there is no clamp: below about -87 the
  // result underflows to 0 in vscalefps, and masked positions never count (softmax zeroes their
  // weights after, whatever their scores).
  static __m512 exp_le0(__m512 x) {
    constexpr __mmask16 all = 0xFFFF;
    const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945f), x);
    __m512 p = _mm512_set1_ps(0.16566773f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.50496262f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0001642f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.99992812f));
    return _mm512_maskz_scalef_ps(all, p, n);
  }

  static __m512 dp(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

  // Two vectors of 16 fp32 rounded to bf16 and interleaved into 16 pairs (lo[i], hi[i]): the
  // operand layout of vdpbf16ps (Q^T channel pairs, softmax weights of key pairs).
  static __m512i bf16_pairs(__m512 lo, __m512 hi) {
    const __m512i ilv = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                         5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(ilv, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }

  // st[j][48] = Q.K for keys j < nb; kb: key 0 of the block (this KV head) in bf16, ks: key
  // stride in bf16 elements.
  static void scores(const uint32_t* qt, const bf16_t* kb, int64_t ks, int d, int nb, float* st) {
    const int np = d / 2;
    int j = 0;
    for (; j + KU <= nb; j += KU) {
      __m512 a[KU][3];
      for (int i = 0; i < KU; ++i) a[i][0] = a[i][1] = a[i][2] = _mm512_setzero_ps();
      const bf16_t* kp = kb + j * ks;
      for (int p = 0; p < np; ++p) {
        const __m512i q0 = _mm512_load_si512(qt + p * kLanes), q1 = _mm512_load_si512(qt + p * kLanes + W),
                      q2 = _mm512_load_si512(qt + p * kLanes + 2 * W);
        for (int i = 0; i < KU; ++i) {
          uint32_t kk;
          std::memcpy(&kk, kp + i * ks + 2 * p, 4);
          const __m512i kc = _mm512_set1_epi32((int)kk);
          a[i][0] = dp(a[i][0], kc, q0);
          a[i][1] = dp(a[i][1], kc, q1);
          a[i][2] = dp(a[i][2], kc, q2);
        }
      }
      for (int i = 0; i < KU; ++i)
        for (int u = 0; u < 3; ++u) _mm512_store_ps(st + (j + i) * kLanes + W * u, a[i][u]);
    }
    for (; j < nb; ++j) {
      __m512 a[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const bf16_t* kp = kb + j * ks;
      for (int p = 0; p < np; ++p) {
        uint32_t kk;
        std::memcpy(&kk, kp + 2 * p, 4);
        const __m512i kc = _mm512_set1_epi32((int)kk);
        for (int u = 0; u < 3; ++u) a[u] = dp(a[u], kc, _mm512_load_si512(qt + p * kLanes + W * u));
      }
      for (int u = 0; u < 3; ++u) _mm512_store_ps(st + j * kLanes + W * u, a[u]);
    }
  }

  // The same scores from int8 codes (vpdpbusd, 64 multiply-adds per instruction): q8[c/4][48]
  // holds 4 query codes + 128 (u8) per lane, sq[48] their scales; k8 points at key 0 of the block
  // (this KV head; ks bytes per key), ksc / ksum at its scale and code sum (kstep apart). The
  // +128 comes off as 128 * ksum per key.
  static void scores_i8(const uint32_t* q8, const float* sq, const int8_t* k8, const float* ksc, const int32_t* ksum,
                        int64_t ks, int64_t kstep, int d, int nb, float* st) {
    const int nq = d / 4;
    for (int j = 0; j < nb; j += KU) {
      __m512i a[KU][3];
      for (int i = 0; i < KU; ++i) a[i][0] = a[i][1] = a[i][2] = _mm512_setzero_si512();
      const int8_t* kp = k8 + j * ks;
      const int nk = std::min(KU, nb - j);  // slots past nb re-read key 0's codes; never stored
      for (int p = 0; p < nq; ++p) {
        const __m512i q0 = _mm512_load_si512(q8 + p * kLanes), q1 = _mm512_load_si512(q8 + p * kLanes + W),
                      q2 = _mm512_load_si512(q8 + p * kLanes + 2 * W);
        for (int i = 0; i < KU; ++i) {
          int32_t kk;
          std::memcpy(&kk, kp + (i < nk ? i : 0) * ks + 4 * p, 4);
          const __m512i kc = _mm512_set1_epi32(kk);
          a[i][0] = _mm512_dpbusd_epi32(a[i][0], q0, kc);
          a[i][1] = _mm512_dpbusd_epi32(a[i][1], q1, kc);
          a[i][2] = _mm512_dpbusd_epi32(a[i][2], q2, kc);
        }
      }
      const __m512 s0 = _mm512_load_ps(sq), s1 = _mm512_load_ps(sq + W), s2 = _mm512_load_ps(sq + 2 * W);
      for (int i = 0; i < KU; ++i) {  // a constant bound keeps the accumulators in registers
        if (i >= nk) break;
        const __m512i corr = _mm512_set1_epi32(128 * ksum[(j + i) * kstep]);
        const __m512 kv = _mm512_set1_ps(ksc[(j + i) * kstep]);
        float* sj = st + (j + i) * kLanes;
        _mm512_store_ps(sj, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[i][0], corr)), _mm512_mul_ps(kv, s0)));
        _mm512_store_ps(sj + W, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[i][1], corr)), _mm512_mul_ps(kv, s1)));
        _mm512_store_ps(sj + 2 * W,
                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[i][2], corr)), _mm512_mul_ps(kv, s2)));
      }
    }
  }

  // ot[c][48] = ot * alpha + sum over key pairs jp < npairs of V pairs x P pairs; vb: pair 0 of
  // the block (this KV head) as 32-bit pairs, vs: pair stride in pairs.
  static void values(const uint32_t* pt, const uint32_t* vb, int64_t vs, int d, int npairs, const __m512 alpha[3],
                     float* ot) {
    for (int c0 = 0; c0 < d; c0 += KU) {  // d % KU == 0 (attention_prefill_bf16_supported)
      __m512 a[KU][3];
      for (int i = 0; i < KU; ++i)
        for (int u = 0; u < 3; ++u) a[i][u] = _mm512_mul_ps(_mm512_load_ps(ot + (c0 + i) * kLanes + W * u), alpha[u]);
      const uint32_t* vp = vb + c0;
      for (int jp = 0; jp < npairs; ++jp, vp += vs) {
        const __m512i p0 = _mm512_load_si512(pt + jp * kLanes), p1 = _mm512_load_si512(pt + jp * kLanes + W),
                      p2 = _mm512_load_si512(pt + jp * kLanes + 2 * W);
        for (int i = 0; i < KU; ++i) {
          const __m512i vc = _mm512_set1_epi32((int)vp[i]);
          a[i][0] = dp(a[i][0], vc, p0);
          a[i][1] = dp(a[i][1], vc, p1);
          a[i][2] = dp(a[i][2], vc, p2);
        }
      }
      for (int i = 0; i < KU; ++i)
        for (int u = 0; u < 3; ++u) _mm512_store_ps(ot + (c0 + i) * kLanes + W * u, a[i][u]);
    }
  }

  struct Tile {
    uint32_t* qt;  // [d/2][48] bf16 pairs of the scaled queries (kI8: [d/4][48] u8 codes + 128, 4 per lane)
    float* sq;     // kI8: [48] the lanes' code scales
    float* ot;     // [d][48]
    __m512 m[3], l[3];
    __m512i lim[3];
    int64_t r0;
    int nr;
    int64_t n_keys, all_see;
  };

  // Per-thread scratch in floats: per tile Q^T pairs (d/2 x 48), code scales (48) and O^T
  // (d x 48); scores [kKeyBlock][48] fp32 and their bf16 pairs [kKeyBlock/2][48].
  static size_t tile_floats(int d) { return (size_t)(d / 2 + 1 + d) * kLanes; }
  static size_t group_scratch_floats(int d) {
    return tile_floats(d) * kGroupTiles + (size_t)(kKeyBlock + kKeyBlock / 2) * kLanes;
  }

  static void init(Tile& t, const AttnShape& s, const float* q, int64_t p0, int hk) {
    const int d = s.head_dim;
    // The scaled queries transposed into ot ([d][48], unused lanes 0), then converted from there
    // vector by vector; ot is cleared for the outputs after.
    load_rows(s, q, t.r0, t.nr, kLanes, hk, t.ot);
    if constexpr (kI8) {
      // Per lane: symmetric int8 codes over its head_dim values (scale amax / 127), stored + 128
      // as u8, 4 channels per 32-bit lane.
      for (int u = 0; u < 3; ++u) {
        __m512 amax = _mm512_setzero_ps();
        for (int c = 0; c < d; ++c) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_load_ps(t.ot + c * kLanes + W * u)));
        const __mmask16 nz = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 inv = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.0f), amax);
        _mm512_store_ps(t.sq + W * u, _mm512_mul_ps(amax, _mm512_set1_ps(1.0f / 127.0f)));
        for (int p = 0; p < d / 4; ++p) {
          __m512i w = _mm512_setzero_si512();
          for (int b = 0; b < 4; ++b) {
            const __m512i code = _mm512_add_epi32(
                _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(t.ot + (4 * p + b) * kLanes + W * u), inv)),
                _mm512_set1_epi32(128));
            w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(255)), 8 * b));
          }
          _mm512_store_si512(t.qt + p * kLanes + W * u, w);
        }
      }
    } else {
      for (int p = 0; p < d / 2; ++p)
        for (int u = 0; u < 3; ++u)
          _mm512_store_si512(t.qt + p * kLanes + W * u, bf16_pairs(_mm512_load_ps(t.ot + 2 * p * kLanes + W * u),
                                                                   _mm512_load_ps(t.ot + (2 * p + 1) * kLanes + W * u)));
    }
    std::memset(t.ot, 0, sizeof(float) * d * kLanes);
    alignas(64) int32_t lim_a[kLanes];
    lane_limits(s, p0, t.r0, t.nr, kLanes, lim_a);
    for (int u = 0; u < 3; ++u) {
      t.lim[u] = _mm512_load_si512(lim_a + W * u);
      t.m[u] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      t.l[u] = _mm512_setzero_ps();
    }
    t.n_keys = p0 + t.r0 + t.nr;
    t.all_see = p0 + t.r0 + 1;
  }

  // The online softmax of keys [j0, j0 + nb) for the tile's lane vectors u in [u0, u1): the new
  // running maxima over the keys each lane sees (causal limit), alpha[u] = exp(old - new max), the
  // weights exp(st - max) (0 for hidden keys, whatever st holds there) as bf16 key pairs into pt
  // [(nb + 1) / 2][48] (a missing second key of the last pair is 0), and l updated. Every lane is
  // independent, so the vdpbf16ps path (all three vectors) and the AMX path (one vector at a time)
  // compute the same numbers.
  static void softmax(Tile& t, int64_t j0, int nb, const float* st, uint32_t* pt, int u0, int u1, __m512* alpha) {
    const int npairs = (nb + 1) / 2;
    // Keys from jd on are hidden from some lanes (the causal diagonal; nb when none is).
    const int jd = j0 + nb > t.all_see ? (int)std::max<int64_t>(0, t.all_see - j0) : nb;
    for (int u = u0; u < u1; ++u) {
      auto seen = [&](int j) { return _mm512_cmp_epi32_mask(t.lim[u], _mm512_set1_epi32((int32_t)(j0 + j)), _MM_CMPINT_GE); };
      __m512 bm = t.m[u];
      for (int j = 0; j < jd; ++j) bm = _mm512_max_ps(bm, _mm512_load_ps(st + j * kLanes + W * u));
      for (int j = jd; j < nb; ++j) bm = _mm512_mask_max_ps(bm, seen(j), bm, _mm512_load_ps(st + j * kLanes + W * u));
      alpha[u] = exp_approx16(_mm512_sub_ps(t.m[u], bm));
      t.m[u] = bm;
      __m512 sum = _mm512_setzero_ps();
      for (int jp = 0; jp < npairs; ++jp) {
        const int ja = 2 * jp, jb = ja + 1;
        __m512 pa = exp_le0(_mm512_sub_ps(_mm512_load_ps(st + ja * kLanes + W * u), bm));
        __m512 pb = jb < nb ? exp_le0(_mm512_sub_ps(_mm512_load_ps(st + jb * kLanes + W * u), bm)) : _mm512_setzero_ps();
        if (jb >= jd) {
          if (ja >= jd) pa = _mm512_maskz_mov_ps(seen(ja), pa);
          if (jb < nb) pb = _mm512_maskz_mov_ps(seen(jb), pb);
        }
        sum = _mm512_add_ps(sum, _mm512_add_ps(pa, pb));
        _mm512_store_si512(pt + jp * kLanes + W * u, bf16_pairs(pa, pb));  // (key 2jp, key 2jp + 1) per lane
      }
      t.l[u] = _mm512_fmadd_ps(t.l[u], alpha[u], sum);
    }
  }

  // Keys [j0, j0 + nb), j0 even; kb: key j0 of this KV head, vb: pair j0/2 of this KV head.
  static void block(Tile& t, int64_t j0, int nb, const bf16_t* kb, const PrefillKeysI8* k8, int hk, int n_head_kv,
                    const uint32_t* vb, int64_t ks, int64_t vs, int d, float* st, uint32_t* pt) {
    if constexpr (kI8) {
      const int64_t at = j0 * n_head_kv + hk;  // (key j0, head hk) in [n][n_head_kv]
      scores_i8(t.qt, t.sq, k8->codes + at * d, k8->scale + at, k8->sum + at, ks, n_head_kv, d, nb, st);
    } else {
      (void)k8, (void)hk, (void)n_head_kv;
      scores(t.qt, kb, ks, d, nb, st);
    }
    __m512 alpha[3];
    softmax(t, j0, nb, st, pt, 0, 3, alpha);
    values(pt, vb, vs, d, (nb + 1) / 2, alpha, t.ot);
  }

  static void finish(const Tile& t, const AttnShape& s, float* out, int hk) {
    alignas(64) float inv[kLanes];
    for (int u = 0; u < 3; ++u) _mm512_store_ps(inv + W * u, _mm512_div_ps(_mm512_set1_ps(1.0f), t.l[u]));
    store_rows(s, t.ot, inv, t.r0, t.nr, kLanes, out, hk);
  }

  // The tiles [tile0, tile1) of a group (their Q^T pairs and O^T in scratch, tile_floats(d) each),
  // initialized; returns the keys the last of them sees.
  static int64_t init_group(Tile* tiles, const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, int hk,
                            int64_t tile0, int64_t tile1, int rows, float* scratch) {
    const int d = s.head_dim;
    int64_t n_keys = 0;
    for (int i = 0; i < (int)(tile1 - tile0); ++i) {
      Tile& t = tiles[i];
      float* ts = scratch + tile_floats(d) * i;
      t.qt = reinterpret_cast<uint32_t*>(ts);
      t.sq = ts + (size_t)(d / 2) * kLanes;
      t.ot = t.sq + kLanes;
      t.r0 = (tile0 + i) * rows;
      t.nr = (int)std::min<int64_t>(rows, n_rows - t.r0);
      init(t, s, q, p0, hk);
      n_keys = std::max(n_keys, t.n_keys);
    }
    return n_keys;
  }

  static void group(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const bf16_t* k,
                    const PrefillKeysI8* k8, const bf16_t* v, float* out, int hk, int64_t tile0, int64_t tile1, int rows,
                    float* scratch) {
    const int d = s.head_dim;
    const int64_t ks = (int64_t)s.n_head_kv * d;  // bf16 elements per key; also 32-bit pairs per key pair
    const int nt = (int)(tile1 - tile0);
    Tile tiles[kGroupTiles];
    float* st = scratch + tile_floats(d) * kGroupTiles;
    uint32_t* pt = reinterpret_cast<uint32_t*>(st + (size_t)kKeyBlock * kLanes);
    const int64_t n_keys = init_group(tiles, s, q, n_rows, p0, hk, tile0, tile1, rows, scratch);
    const bf16_t* kh = k + (int64_t)hk * d;
    const uint32_t* vh = reinterpret_cast<const uint32_t*>(v) + (int64_t)hk * d;
    for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock)
      for (int i = 0; i < nt; ++i) {
        Tile& t = tiles[i];
        if (j0 >= t.n_keys) continue;
        const int nb = (int)std::min<int64_t>(kKeyBlock, t.n_keys - j0);
        block(t, j0, nb, kh + j0 * ks, k8, hk, s.n_head_kv, vh + (j0 / 2) * ks, ks, ks, d, st, pt);
      }
    for (int i = 0; i < nt; ++i) finish(tiles[i], s, out, hk);
  }
};

// AMX-BF16 path (attention_prefill_amx; CPUs with AMX, checked at run time): the bf16 path's
// tiles, online softmax and roundings, with both products on the tile unit (tdpbf16ps: a 16 x 16
// fp32 block of 16 x 32 bf16 products per instruction, 16x vdpbf16ps' work). Per block of
// kAmxKeyBlock keys and per 16-lane vector u of the tile (16 query vectors):
//   scores  S^T (16 keys x 16 lanes) = K (16 keys x 32 channels, natural row layout, kb) x the
//           Q^T pairs qt (16 channel pairs x 16 lanes), head_dim / 32 products, stored to st;
//   softmax TileKernelBf16::softmax on those lanes (the same code);
//   values  O^T (16 channels x 16 lanes) += V^T (16 channels x 32 keys, vt) x the weight pairs pt
//           (16 key pairs x 16 lanes), accumulated in place in ot.
// So st, pt, qt and ot keep the bf16 path's [row][48 lanes] layouts, K is read as it is, and V is
// read transposed in chunks of 32 keys ([n_head_kv][cap / 32][head_dim][32] bf16, kv_to_bf16_amx):
// a V^T operand is 1 KiB in one piece, not 16 rows cap * 2 bytes apart (one page each). K and V^T
// should start on a cache line (the model's buffers do): rows that straddle two lines cost ~20%.
// head_dim a multiple of 32, up to 128 (attention_prefill_amx_supported).
constexpr int kAmxKeyBlock = 128;

struct TileKernelAmx {
  using Bf = TileKernelBf16<false>;
  using Tile = Bf::Tile;
  static constexpr int W = Bf::W, kLanes = Bf::kLanes;
  static constexpr int64_t kRow = kLanes * 4;  // bytes per row of qt, st, pt and ot

  static size_t group_scratch_floats(int d) {
    return Bf::tile_floats(d) * kGroupTiles + (size_t)(kAmxKeyBlock + kAmxKeyBlock / 2) * kLanes;
  }

  // One step of a group: the 16 lanes u of tile t against keys [j0, j0 + nb) (one block, j0 a
  // multiple of kAmxKeyBlock). kb: key j0 of this KV head (ks bf16 per key); vt: its V^T chunk
  // ([d][32] bf16 per 32 keys).
  struct Step {
    Tile* t;
    int64_t j0;
    int nb, u;
    const bf16_t* kb;
    const bf16_t* vt;
  };

  // Scores of a step into st's lanes u. Tiles: tmm0 (K), tmm1 (S^T), tmm4/5 (Q^T pairs, head_dim
  // <= 64; reloaded per product into tmm4 beyond).
  static void scores(const Step& x, int64_t ks, int d, float* st) {
    const int nh = d / 32, nsb = (x.nb + 15) / 16, u = x.u;
    const uint32_t* qt = x.t->qt + W * u;
    if (nh <= 2) {
      amx::load<4>(qt, kRow);
      if (nh == 2) amx::load<5>(qt + 16 * kLanes, kRow);
    }
    for (int sb = 0; sb < nsb; ++sb) {
      amx::zero<1>();
      for (int h = 0; h < nh; ++h) {
        amx::load<0>(x.kb + sb * 16 * ks + h * 32, ks * 2);
        if (nh > 2) {
          amx::load<4>(qt + (size_t)h * 16 * kLanes, kRow);
          amx::dp_bf16<1, 0, 4>();
        } else if (h == 0) {
          amx::dp_bf16<1, 0, 4>();
        } else {
          amx::dp_bf16<1, 0, 5>();
        }
      }
      amx::store<1>(st + (size_t)sb * 16 * kLanes + W * u, kRow);
    }
  }

  // Softmax of a step (st's lanes u -> pt's, padded with zero pairs to whole 32-key chunks), and
  // its O^T lanes rescaled for the new maximum.
  static void weights(const Step& x, int d, const float* st, uint32_t* pt) {
    const int u = x.u, npairs = (x.nb + 1) / 2, nkc = (x.nb + 31) / 32;
    __m512 alpha[3];
    Bf::softmax(*x.t, x.j0, x.nb, st, pt, u, u + 1, alpha);
    for (int jp = npairs; jp < nkc * 16; ++jp) _mm512_store_si512(pt + jp * kLanes + W * u, _mm512_setzero_si512());
    if (_mm512_cmp_ps_mask(alpha[u], _mm512_set1_ps(1.0f), _CMP_NEQ_UQ))
      for (int c = 0; c < d; ++c) {
        float* o = x.t->ot + c * kLanes + W * u;
        _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), alpha[u]));
      }
  }

  // Values of a step: O^T lanes u += V^T x weight pairs. Tiles: tmm2 (V^T), tmm6 (weight pairs),
  // tmm3 (O^T).
  static void values(const Step& x, int d, const uint32_t* pt) {
    const int nkc = (x.nb + 31) / 32;
    for (int cb = 0; cb < d / 16; ++cb) {
      float* oc = x.t->ot + (size_t)cb * 16 * kLanes + W * x.u;
      amx::load<3>(oc, kRow);
      for (int kc = 0; kc < nkc; ++kc) {
        amx::load<2>(x.vt + ((size_t)kc * d + cb * 16) * 32, 64);
        amx::load<6>(pt + (size_t)kc * 16 * kLanes + W * x.u, kRow);
        amx::dp_bf16<3, 2, 6>();
      }
      amx::store<3>(oc, kRow);
    }
  }

  // A group walks its keys block by block; per block, tile and lane vector: scores, softmax,
  // values. Tried on a Xeon with AMX and no faster (SPECACHE_TIMING=1 AttentionPrefill.Timing):
  // the three software-pipelined over consecutive steps, so none waits on the one before; each
  // K / V^T operand loaded once for the three lane vectors; 64-key blocks; 8 tiles per group;
  // the next block's K and V^T requested into L2 ahead. Issuing the tile work a product at a
  // time between the softmax's key pairs was 2.7x slower.
  static void group(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const bf16_t* k, const bf16_t* vt,
                    int64_t cap, float* out, int hk, int64_t tile0, int64_t tile1, int rows, float* scratch) {
    const int d = s.head_dim;
    const int64_t ks = (int64_t)s.n_head_kv * d;
    const int nt = (int)(tile1 - tile0);
    Tile tiles[kGroupTiles];
    float* st = scratch + Bf::tile_floats(d) * kGroupTiles;
    uint32_t* pt = reinterpret_cast<uint32_t*>(st + (size_t)kAmxKeyBlock * kLanes);
    const int64_t n_keys = Bf::init_group(tiles, s, q, n_rows, p0, hk, tile0, tile1, rows, scratch);
    const bf16_t* kh = k + (int64_t)hk * d;
    const bf16_t* vh = vt + (int64_t)hk * d * cap;  // this KV head's (cap / 32) chunks of [d][32]
    {
      amx::Config cfg;
      for (int i = 0; i < 8; ++i) cfg.tile(i, 16, 64);
      amx::Scope scope(cfg);
      for (int64_t j0 = 0; j0 < n_keys; j0 += kAmxKeyBlock)
        for (int i = 0; i < nt; ++i) {
          Tile& t = tiles[i];
          if (j0 >= t.n_keys) continue;
          const int nb = (int)std::min<int64_t>(kAmxKeyBlock, t.n_keys - j0);
          for (int u = 0; u < 3; ++u) {
            const Step x{&t, j0, nb, u, kh + j0 * ks, vh + j0 * d};
            scores(x, ks, d, st);
            weights(x, d, st, pt);
            values(x, d, pt);
          }
        }
    }
    for (int i = 0; i < nt; ++i) Bf::finish(tiles[i], s, out, hk);
  }
};
#endif

#if defined(__AVX512F__)
using Kernel = TileKernel<V16>;
#else
using Kernel = TileKernel<V8>;
#endif
constexpr int kTileLanes = Kernel::kLanes;
#endif

}  // namespace

void attention_prefill_portable(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const float* k,
                                const float* v, float* out, ThreadPool& pool) {
  const int64_t n_tiles = (n_rows + kRowTile - 1) / kRowTile;
  const int64_t n_tasks = n_tiles * s.n_head;
  // Later tiles see more keys: hand them out first so the threads finish together.
  pool.for_each_task(n_tasks, [&](int64_t task, int) {
    const int64_t tile = n_tiles - 1 - task / s.n_head;
    const int h = (int)(task % s.n_head);
    const int64_t r0 = tile * kRowTile;
    const int nr = (int)std::min<int64_t>(kRowTile, n_rows - r0);
    prefill_tile(s, q, r0, nr, p0, k, v, out, h);
  });
}

void attention_prefill(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const float* k, const float* v,
                       float* out, ThreadPool& pool) {
#if defined(__AVX512F__) || defined(SPC_VEC_AVX2)
  const int g = s.n_head / s.n_head_kv;
  if (g <= kTileLanes) {
    for_each_group(s, n_rows, kTileLanes, Kernel::group_scratch_floats(s.head_dim), pool,
                   [&](int hk, int64_t tile0, int64_t tile1, int rows, float* scratch) {
                     Kernel::group(s, q, n_rows, p0, k, v, out, hk, tile0, tile1, rows, scratch);
                   });
    return;
  }
#endif
  attention_prefill_portable(s, q, n_rows, p0, k, v, out, pool);
}

bool attention_prefill_bf16_supported(const AttnShape& s) {
#if defined(SPC_PREFILL_BF16)
  const int g = s.n_head / s.n_head_kv;
  return g <= TileKernelBf16<false>::kLanes && s.head_dim % TileKernelBf16<false>::KU == 0;
#else
  (void)s;
  return false;
#endif
}

namespace {
// Elements [i0, i1) of the keys in bf16, in their row layout (both bf16 kernels read them so).
void keys_to_bf16(const float* k, int64_t i0, int64_t i1, bf16_t* kb) {
  for (int64_t i = i0; i < i1; ++i) kb[i] = fp32_to_bf16(k[i]);
}
}  // namespace

int64_t prefill_amx_capacity(int64_t n_keys) { return (n_keys + 31) / 32 * 32; }

bool attention_prefill_amx_supported(const AttnShape& s) {
#if defined(SPC_PREFILL_BF16)
  return attention_prefill_bf16_supported(s) && s.head_dim % 32 == 0 && s.head_dim <= 128 && cpu_amx_bf16_usable();
#else
  (void)s;
  return false;
#endif
}

void kv_to_bf16_amx(const AttnShape& s, const float* k, const float* v, int64_t j0, int64_t j1, bf16_t* kb,
                    bf16_t* vt, int64_t cap) {
  const int d = s.head_dim;
  const int64_t e = (int64_t)s.n_head_kv * d;
  keys_to_bf16(k, j0 * e, j1 * e, kb);
  for (int64_t j = j0; j < j1; ++j)
    for (int hk = 0; hk < s.n_head_kv; ++hk) {
      bf16_t* col = vt + (((int64_t)hk * (cap / 32) + j / 32) * d) * 32 + j % 32;
      const float* src = v + j * e + (int64_t)hk * d;
      for (int c = 0; c < d; ++c) col[c * 32] = fp32_to_bf16(src[c]);
    }
}

void attention_prefill_amx(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const bf16_t* kb,
                           const bf16_t* vt, int64_t cap, float* out, ThreadPool& pool) {
  SPC_CHECK(attention_prefill_amx_supported(s), "AMX prefill attention is not available on this CPU, build or shape");
  SPC_CHECK(cap >= prefill_amx_capacity(p0 + n_rows), "AMX prefill attention: V^T capacity %lld below %lld keys",
            (long long)cap, (long long)prefill_amx_capacity(p0 + n_rows));
#if defined(SPC_PREFILL_BF16)
  for_each_group(s, n_rows, TileKernelAmx::kLanes, TileKernelAmx::group_scratch_floats(s.head_dim), pool,
                 [&](int hk, int64_t tile0, int64_t tile1, int rows, float* scratch) {
                   TileKernelAmx::group(s, q, n_rows, p0, kb, vt, cap, out, hk, tile0, tile1, rows, scratch);
                 });
#else
  (void)q, (void)kb, (void)vt, (void)out, (void)pool;
#endif
}

void kv_to_bf16(const AttnShape& s, const float* k, const float* v, int64_t j0, int64_t j1, bf16_t* kb, bf16_t* vb) {
  const int64_t e = (int64_t)s.n_head_kv * s.head_dim;
  keys_to_bf16(k, j0 * e, j1 * e, kb);
  // V pairs (position 2p, 2p + 1) per element; a missing second position of the last pair is 0.
  for (int64_t p = j0 / 2; p < (j1 + 1) / 2; ++p) {
    const float* v0 = v + 2 * p * e;
    const bool has1 = 2 * p + 1 < j1;
    for (int64_t i = 0; i < e; ++i) {
      vb[(p * e + i) * 2] = fp32_to_bf16(v0[i]);
      vb[(p * e + i) * 2 + 1] = has1 ? fp32_to_bf16(v0[e + i]) : (bf16_t)0;
    }
  }
}

void keys_to_i8(const AttnShape& s, const float* k, int64_t j0, int64_t j1, int8_t* codes, float* scale,
                int32_t* sum) {
  const int d = s.head_dim;
  for (int64_t r = j0 * s.n_head_kv; r < j1 * s.n_head_kv; ++r) {  // one (position, KV head) row
    const float* x = k + r * d;
    float amax = 0;
    for (int c = 0; c < d; ++c) amax = std::max(amax, std::fabs(x[c]));
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    int32_t total = 0;
    for (int c = 0; c < d; ++c) {
      const int v = (int)std::nearbyint(x[c] * inv);  // round half to even, like vcvtps2dq
      codes[r * d + c] = (int8_t)v;
      total += v;
    }
    scale[r] = amax * (1.0f / 127.0f);
    sum[r] = total;
  }
}

void attention_prefill_bf16(const AttnShape& s, const float* q, int64_t n_rows, int64_t p0, const bf16_t* kb,
                            const bf16_t* vb, float* out, ThreadPool& pool, const PrefillKeysI8* k8) {
  SPC_CHECK(attention_prefill_bf16_supported(s), "bf16 prefill attention is not available for this build or shape");
#if defined(SPC_PREFILL_BF16)
  auto run = [&](auto kernel) {
    using K = decltype(kernel);
    for_each_group(s, n_rows, K::kLanes, K::group_scratch_floats(s.head_dim), pool,
                   [&](int hk, int64_t tile0, int64_t tile1, int rows, float* scratch) {
                     K::group(s, q, n_rows, p0, kb, k8, vb, out, hk, tile0, tile1, rows, scratch);
                   });
  };
  if (k8)
    run(TileKernelBf16<true>{});
  else
    run(TileKernelBf16<false>{});
#else
  (void)q, (void)n_rows, (void)p0, (void)kb, (void)vb, (void)out, (void)pool, (void)k8;
#endif
}

}  // namespace spc
