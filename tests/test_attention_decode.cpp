// Decode attention over the fp16 cache (ops/attention.h attention_decode_f16, kv/f16_cache.h
// attend_f16_cache) vs a double-precision scalar reference: n_q 1..8, head_dim 64 (the streaming
// AVX-512 kernel), other multiples of 16 and a non-multiple (the generic fallback), causal
// limits inside / before / after the range, ranges that are not multiples of the key tile or
// of the kernel's key block, and chunked (flash-decoding) splits over 1 and 2 threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kv/f16_cache.h"
#include "ops/attention.h"
#include "ops/ops.h"
#include "ops/vec_math.h"
#include "util/fp16.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

// One KV head's keys/values at positions [0, n): keys tile-transposed, values row-major, plus the
// fp16-rounded values as doubles for the reference.
struct Head {
  int d;
  int64_t n;
  std::vector<fp16_t> kt, v;
  std::vector<double> kd, vd;  // [n][d]
};

Head make_head(int d, int64_t n, std::mt19937& rng) {
  Head h{d, n, {}, {}, {}, {}};
  const int64_t cap = (n + kKeyTile - 1) / kKeyTile * kKeyTile;
  h.kt.assign(cap * d, fp32_to_fp16(0.f));
  h.v.assign(cap * d, fp32_to_fp16(0.f));
  h.kd.resize(n * d);
  h.vd.resize(n * d);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t p = 0; p < n; ++p)
    for (int c = 0; c < d; ++c) {
      // A few large keys so the softmax is peaked somewhere (exercises the running max).
      const float kv = nd(rng) * (p % 37 == 5 ? 3.f : 1.f);
      const fp16_t kh = fp32_to_fp16(kv), vh = fp32_to_fp16(nd(rng));
      h.kt[key_tile_offset(p, d) + (int64_t)c * kKeyTile] = kh;
      h.v[p * d + c] = vh;
      h.kd[p * d + c] = fp16_to_fp32(kh);
      h.vd[p * d + c] = fp16_to_fp32(vh);
    }
  return h;
}

// Reference over positions [k0, min(k1, lim)): max score, sum of exp, normalized output.
struct Ref {
  double m, l;
  std::vector<double> o;
};
Ref reference(const Head& h, const float* q, int64_t k0, int64_t k1, int64_t lim) {
  const int d = h.d;
  const double scale = 1.0 / std::sqrt((double)d);
  Ref r{-std::numeric_limits<double>::infinity(), 0, std::vector<double>(d, 0.0)};
  const int64_t e = std::min(k1, lim);
  std::vector<double> s;
  for (int64_t p = k0; p < e; ++p) {
    double acc = 0;
    for (int c = 0; c < d; ++c) acc += (double)q[c] * h.kd[p * d + c];
    s.push_back(acc * scale);
    r.m = std::max(r.m, s.back());
  }
  for (int64_t p = k0; p < e; ++p) {
    const double w = std::exp(s[p - k0] - r.m);
    r.l += w;
    for (int c = 0; c < d; ++c) r.o[c] += w * h.vd[p * d + c];
  }
  if (r.l > 0)
    for (double& x : r.o) x /= r.l;
  return r;
}

void check_range(const Head& h, int n_q, int64_t k0, int64_t k1, const std::vector<int64_t>& lim, std::mt19937& rng) {
  const int d = h.d;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q(n_q * d);
  for (auto& x : q) x = nd(rng);
  std::vector<AttnPartial> part(n_q);
  std::vector<float> o(n_q * d, NAN);
  std::vector<float> scratch(n_q * (k1 - k0 + kKeyTile), NAN);
  attention_decode_f16(q.data(), n_q, d, h.kt.data(), h.v.data(), k0, k1, lim.data(), part.data(), o.data(),
                       scratch.data());
  for (int i = 0; i < n_q; ++i) {
    const Ref r = reference(h, q.data() + i * d, k0, k1, lim[i]);
    SCOPED_TRACE(testing::Message() << "d=" << d << " n_q=" << n_q << " k0=" << k0 << " k1=" << k1 << " q=" << i
                                    << " lim=" << lim[i]);
    if (r.l == 0) {  // sees nothing in this range: an empty partial state
      EXPECT_EQ(part[i].l, 0.f);
      continue;
    }
    EXPECT_NEAR(part[i].m, r.m, 1e-4 * (1 + std::fabs(r.m)));
    // l and o relative to this kernel's own max (equal to the reference max up to rounding).
    const double rescale = std::exp(r.m - (double)part[i].m);
    EXPECT_NEAR(part[i].l, r.l * rescale, 1e-4 * r.l * rescale);
    double worst = 0;
    for (int c = 0; c < d; ++c) worst = std::max(worst, std::fabs(o[i * d + c] / part[i].l - r.o[c]));
    EXPECT_LE(worst, 2e-5);
  }
}

}  // namespace

TEST(AttentionDecode, MatchesReferenceAllShapes) {
  std::mt19937 rng(7);
  for (int d : {64, 32, 128, 40, 24}) {
    const Head h = make_head(d, 700, rng);
    for (int n_q = 1; n_q <= 8; ++n_q) {
      // [k0, k1): tile-aligned starts; lengths around the tile (16) and the kernel block (128).
      for (auto [k0, k1] : std::vector<std::pair<int64_t, int64_t>>{
               {0, 1}, {0, 15}, {0, 16}, {16, 33}, {0, 127}, {0, 128}, {128, 257}, {32, 300}, {0, 700}}) {
        std::vector<int64_t> lim(n_q);
        // All see everything.
        for (int i = 0; i < n_q; ++i) lim[i] = k1 + 5;
        check_range(h, n_q, k0, k1, lim, rng);
        // Decode-like limits: query i sees positions < k1 - (n_q - 1 - i) (the last rows of a
        // multi-token step), some limits inside the range, one before it.
        for (int i = 0; i < n_q; ++i) lim[i] = std::max<int64_t>(k0 - 1, k1 - (n_q - 1 - i) * 7);
        lim[0] = k0;  // sees nothing
        check_range(h, n_q, k0, k1, lim, rng);
      }
    }
  }
}

// attend_f16_cache: chunked over the pool, merged with attn_merge, normalized; GQA groups and
// 1..3 rows per step (n_q up to 9 per KV head: two kernel batches), 1 and 2 threads.
TEST(AttentionDecode, F16CacheMatchesReference) {
  std::mt19937 rng(9);
  ThreadPool pool1(1), pool2(2);
  for (int d : {64, 40}) {
    KvGeometry g{};
    g.n_layer = 2;
    g.n_head = 9;
    g.n_head_kv = 3;
    g.head_dim = d;
    for (int64_t n_pos : {1, 17, 300, 2100}) {
      F16Cache cache(g, n_pos + 4);
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> k(n_pos * g.n_head_kv * d), v(k.size());
      for (auto& x : k) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      cache.write(1, 0, n_pos, k.data(), v.data());
      std::vector<float> kr(k.size()), vr(v.size());  // fp16-rounded
      cache.read(1, 0, n_pos, kr.data(), vr.data());
      // A cache sharing the first positions of `cache` (F16Cache::share_prefix) and holding the
      // rest itself: the chunks that straddle its end are two kernel calls, merged.
      const int64_t n_shared = n_pos * 3 / 5 / kKeyTile * kKeyTile;
      F16Cache sharer(g, n_pos + 4);
      sharer.share_prefix(cache, n_shared);
      const int64_t row = (int64_t)g.n_head_kv * d;
      sharer.write(1, n_shared, n_pos - n_shared, k.data() + n_shared * row, v.data() + n_shared * row);
      EXPECT_EQ(sharer.shared_positions(), n_shared);
      std::vector<float> ks(k.size()), vs(v.size());
      sharer.read(1, 0, n_pos, ks.data(), vs.data());
      EXPECT_EQ(ks, kr);
      EXPECT_EQ(vs, vr);
      for (int n_rows : {1, 2, 3}) {
        if (n_rows > n_pos) continue;
        std::vector<float> q(n_rows * g.n_head * d);
        for (auto& x : q) x = nd(rng);
        DecodeRows rows{};
        rows.n_rows = n_rows;
        rows.n_keep = n_rows;
        rows.pos0 = n_pos - n_rows;
        rows.q = q.data();
        std::vector<float> unshared[2];  // per pool size (the chunks depend on it)
        for (int variant = 0; variant < 4; ++variant) {
          ThreadPool* pool = variant % 2 ? &pool2 : &pool1;
          const F16Cache& c = variant < 2 ? cache : sharer;
          std::vector<float> out(q.size(), NAN);
          attend_f16_cache(c, g, 1, rows, out.data(), *pool);
          // The same bits with a shared prefix (its chunk over the prefix's end: one kernel pass).
          if (variant < 2) unshared[variant] = out;
          else EXPECT_EQ(out, unshared[variant - 2]) << "d=" << d << " n_pos=" << n_pos << " rows=" << n_rows;
          double worst = 0;
          for (int r = 0; r < n_rows; ++r)
            for (int hq = 0; hq < g.n_head; ++hq) {
              const int hk = hq / (g.n_head / g.n_head_kv);
              const float* qi = q.data() + (r * g.n_head + hq) * d;
              const int64_t e = rows.pos0 + r + 1;
              std::vector<double> s(e);
              double mx = -1e300;
              for (int64_t p = 0; p < e; ++p) {
                double acc = 0;
                for (int c = 0; c < d; ++c) acc += (double)qi[c] * kr[(p * g.n_head_kv + hk) * d + c];
                s[p] = acc / std::sqrt((double)d);
                mx = std::max(mx, s[p]);
              }
              double l = 0;
              std::vector<double> o(d, 0.0);
              for (int64_t p = 0; p < e; ++p) {
                const double w = std::exp(s[p] - mx);
                l += w;
                for (int c = 0; c < d; ++c) o[c] += w * vr[(p * g.n_head_kv + hk) * d + c];
              }
              for (int c = 0; c < d; ++c)
                worst = std::max(worst, std::fabs(out[(r * g.n_head + hq) * d + c] - o[c] / l));
            }
          EXPECT_LE(worst, 2e-5) << "d=" << d << " n_pos=" << n_pos << " rows=" << n_rows << " threads=" << pool->size()
                                 << (variant < 2 ? "" : " shared prefix");
        }
      }
    }
  }
}

// dot_f32_f16_many: every (row, key) product bit for bit dot_f32_f16_rows' (the window's and the
// gathered top-k rows' exact scores went through that one key at a time), for key counts around
// the 16-key tiles, strided and gathered keys, d = 64 (the tiled path) and other widths
// (fallback), and close to a double-precision dot product.
TEST(AttentionDecode, ManyKeyDotsEqualOneKeyAtATime) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  for (int d : {64, 32, 48, 128}) {
    for (int n_q : {1, 3, 6, 8}) {
      for (int64_t n_k : {0, 1, 5, 15, 16, 17, 31, 32, 64, 127}) {
        const int64_t k_stride = 2 * d + 8;  // K|V rows with padding, as the window stores them
        std::vector<fp16_t> kv((size_t)std::max<int64_t>(n_k, 1) * k_stride);
        for (auto& e : kv) e = fp32_to_fp16(nd(rng));
        std::vector<float> q((size_t)n_q * (d + 3));
        for (auto& e : q) e = nd(rng);
        const int64_t out_stride = n_k + 2;
        // Gathered: the rows in a shuffled order.
        std::vector<const fp16_t*> rows((size_t)n_k);
        std::vector<int64_t> perm((size_t)n_k);
        for (int64_t j = 0; j < n_k; ++j) perm[(size_t)j] = j;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int64_t j = 0; j < n_k; ++j) rows[(size_t)j] = kv.data() + perm[(size_t)j] * k_stride;
        for (bool gathered : {false, true}) {
          std::vector<float> got((size_t)n_q * out_stride, -7.0f), want = got;
          dot_f32_f16_many(q.data(), n_q, d + 3, gathered ? rows.data() : nullptr, kv.data(), k_stride, n_k, d,
                           got.data(), out_stride);
          for (int64_t j = 0; j < n_k; ++j) {
            const fp16_t* kj = gathered ? rows[(size_t)j] : kv.data() + j * k_stride;
            dot_f32_f16_rows(q.data(), n_q, d + 3, kj, d, want.data() + j, out_stride);
            for (int i = 0; i < n_q; ++i) {
              double ref = 0;
              for (int c = 0; c < d; ++c) ref += (double)q[(size_t)i * (d + 3) + c] * fp16_to_fp32(kj[c]);
              ASSERT_NEAR(got[(size_t)(i * out_stride + j)], ref, 1e-4 * (1 + std::fabs(ref)));
            }
          }
          for (size_t e = 0; e < got.size(); ++e)  // bit for bit, and nothing written past n_k
            ASSERT_EQ(std::bit_cast<uint32_t>(got[e]), std::bit_cast<uint32_t>(want[e]))
                << "d " << d << " n_q " << n_q << " n_k " << n_k << " gathered " << gathered << " at " << e;
        }
      }
    }
  }
}

// vec_argmax against the scan it replaces (first index whose value beats every earlier one):
// ties (first one wins), NaNs anywhere (ignored; at index 0 the scan never moves), +-0, +-inf,
// every length around the vector widths and a vocabulary-sized vector.
TEST(VecMath, ArgmaxEqualsTheFirstBestScan) {
  auto scan = [](const float* x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (x[i] > x[best]) best = i;
    return best;
  };
  std::mt19937 rng(7);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float specials[] = {nan, inf, -inf, 0.0f, -0.0f, 3.0f, -3.0f};
  std::vector<float> x;
  int checked = 0;
  for (int64_t n : {0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 130, 1000, 49152}) {
    for (int trial = 0; trial < 40; ++trial) {
      x.resize((size_t)std::max<int64_t>(n, 1));
      // Few distinct values so ties are common; some trials sprinkle specials.
      std::uniform_int_distribution<int> v(-4, 4), pick(0, 6), where(0, (int)std::max<int64_t>(n - 1, 0));
      for (auto& e : x) e = (float)v(rng);
      if (trial % 3 == 1)
        for (int s = 0; s < 3; ++s) x[(size_t)where(rng)] = specials[pick(rng)];
      if (trial % 5 == 2 && n > 0) x[0] = nan;
      if (trial % 7 == 3)
        for (auto& e : x) e = trial % 2 ? -0.0f : 0.0f;
      if (trial % 7 == 4) {
        for (auto& e : x) e = -inf;
        if (n > 3) x[(size_t)n / 2] = 0.0f;
      }
      ASSERT_EQ(vec_argmax(x.data(), n), scan(x.data(), n)) << "n " << n << " trial " << trial;
      ++checked;
    }
  }
  // All NaN but one, the answer deep inside and at the very end.
  x.assign(49152, nan);
  x[0] = -1.0f;
  x[40000] = 2.0f;
  EXPECT_EQ(vec_argmax(x.data(), 49152), 40000);
  x[49151] = 5.0f;
  EXPECT_EQ(vec_argmax(x.data(), 49152), 49151);
  EXPECT_GT(checked, 600);
}

// exp_approx: close to exp over the softmax range, exactly 0 below -87 and for -inf (a
// left-out position), like the 8- and 16-lane forms (vec_exp_shift_sum's tails use it).
TEST(VecMath, ExpApproxIsCloseAndZeroBelowTheRange) {
  for (float x = -86.5f; x <= 10.0f; x += 0.37f)
    ASSERT_NEAR(exp_approx(x), std::exp((double)x), 3e-7 * std::exp((double)x)) << x;
  EXPECT_EQ(exp_approx(-87.5f), 0.0f);
  EXPECT_EQ(exp_approx(-1000.0f), 0.0f);
  EXPECT_EQ(exp_approx(-INFINITY), 0.0f);
  EXPECT_GT(exp_approx(-86.9f), 0.0f);
  float x[3] = {-INFINITY, 0.5f, 1.0f};
  const float l = vec_exp_shift_sum(x, 3, 1.0f);  // a tail: masked lanes (AVX-512) or exp_approx (AVX2)
  EXPECT_EQ(x[0], 0.0f);
  EXPECT_NEAR(l, 1.0 + std::exp(-0.5), 1e-6);
}

// exp_fast (the low-bit value sums' softmax numerators): within 4e-6 of exp over the softmax range
// (the polynomial's 2.7e-6, plus log2(e) rounded to float at the bottom of the range), exactly 0
// below -87 and for -inf, and the scalar, AVX2 and AVX-512 forms bit for bit the same (so results
// do not depend on the machine's SIMD level).
TEST(VecMath, ExpFastIsCloseZeroBelowTheRangeAndOneValueOnEveryPath) {
  double worst = 0;
  for (float x = -87.0f; x <= 0.0f; x += 0.00731f) {
    const double e = std::exp((double)x);
    worst = std::max(worst, std::fabs(exp_fast(x) - e) / e);
  }
  EXPECT_LT(worst, 4e-6);
  EXPECT_GT(worst, 1e-7);  // (it is the cheap form, not exp_approx)
  EXPECT_NEAR(exp_fast(0.0f), 1.0f, 1e-6f);
  EXPECT_EQ(exp_fast(-87.01f), 0.0f);
  EXPECT_EQ(exp_fast(-1000.0f), 0.0f);
  EXPECT_EQ(exp_fast(-INFINITY), 0.0f);
  EXPECT_GT(exp_fast(-87.0f), 0.0f);

  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-95.0f, 3.0f);
  const int n = 16 * 7 + 5;  // vector bodies and a scalar tail
  std::vector<float> x(n);
  for (auto& v : x) v = u(rng);
  x[3] = -INFINITY;
  x[20] = 3.0f;  // the maximum: exp_fast(0)
  std::vector<float> got = x;
  const float l = vec_exp_fast_shift_sum(got.data(), n, 3.0f);
  double sum = 0;
  for (int i = 0; i < n; ++i) {
    const float want = exp_fast(x[i] - 3.0f);
    ASSERT_EQ(got[i], want) << "i=" << i << " x=" << x[i];
    sum += want;
  }
  EXPECT_NEAR(l, sum, 1e-6 * sum);
  EXPECT_EQ(got[3], 0.0f);
#if defined(SPC_VEC_HAVE_AVX2)
  for (int i = 0; i + 8 <= n; i += 8) {
    alignas(32) float e[8];
    _mm256_store_ps(e, exp_fast8(_mm256_sub_ps(_mm256_loadu_ps(x.data() + i), _mm256_set1_ps(3.0f))));
    for (int j = 0; j < 8; ++j) ASSERT_EQ(e[j], exp_fast(x[i + j] - 3.0f)) << "AVX2, i=" << i + j;
  }
#endif
#if defined(__AVX512F__)
  for (int i = 0; i + 16 <= n; i += 16) {
    alignas(64) float e[16];
    _mm512_store_ps(e, exp_fast16(_mm512_sub_ps(_mm512_loadu_ps(x.data() + i), _mm512_set1_ps(3.0f))));
    for (int j = 0; j < 16; ++j) ASSERT_EQ(e[j], exp_fast(x[i + j] - 3.0f)) << "AVX-512, i=" << i + j;
  }
#endif
}

// vec_sumsq_f64 (rmsnorm's sum of squares) against a long-double sum, lengths around the
// vector widths; rmsnorm itself against a double reference.
TEST(VecMath, SumOfSquaresInDoubleAndRmsnorm) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (int64_t n : {0, 1, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 100, 576, 1536, 2049}) {
    std::vector<float> x((size_t)std::max<int64_t>(n, 1)), w(x.size()), out(x.size());
    for (auto& e : x) e = nd(rng) * (float)std::exp(nd(rng) / 3);
    for (auto& e : w) e = 1.0f + nd(rng) / 10;
    long double ref = 0;
    for (int64_t i = 0; i < n; ++i) ref += (long double)x[i] * x[i];
    const double got = vec_sumsq_f64(x.data(), n);
    ASSERT_NEAR(got, (double)ref, 1e-14 * (double)ref) << "n " << n;
    if (n == 0) continue;
    rmsnorm(x.data(), w.data(), out.data(), n, 1e-5f);
    const double scale = 1.0 / std::sqrt((double)ref / n + 1e-5);
    for (int64_t i = 0; i < n; ++i)
      ASSERT_NEAR(out[i], x[i] * scale * w[i], 2e-6 * std::fabs(x[i] * scale * w[i]) + 1e-12)
          << "n " << n << " i " << i;
  }
}

// The FFN gate: silu(g) * u against a double reference, over vector bodies and tails, including
// gates far in both saturated ranges (silu -> g for large g, -> 0 for very negative g).
TEST(VecMath, SiluMulMatchesDoubleReference) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> gate(-12.0f, 12.0f), up(-3.0f, 3.0f);
  for (int n : {1, 7, 8, 15, 16, 17, 40, 172, 1536}) {
    std::vector<float> g(n), u(n);
    for (int i = 0; i < n; ++i) {
      g[i] = i % 9 == 4 ? (i % 2 ? 120.0f : -120.0f) : gate(rng);
      u[i] = up(rng);
    }
    std::vector<float> got = g;
    vec_silu_mul(got.data(), u.data(), n);
    for (int i = 0; i < n; ++i) {
      const double want = (double)g[i] / (1.0 + std::exp(-(double)g[i])) * u[i];
      ASSERT_NEAR(got[i], want, 1e-6 * std::abs(want) + 1e-30) << "n " << n << " i " << i << " g " << g[i];
    }
    // Bitwise the same wherever an element sits (a row's FFN must not depend on how many rows run
    // together): every prefix, and the second half of the array on its own.
    for (int m = 1; m < n; m += 5) {
      std::vector<float> part(g.begin(), g.begin() + m);
      vec_silu_mul(part.data(), u.data(), m);
      for (int i = 0; i < m; ++i) ASSERT_EQ(part[i], got[i]) << "n " << n << " m " << m << " i " << i;
    }
    std::vector<float> tail(g.begin() + n / 2, g.end());
    vec_silu_mul(tail.data(), u.data() + n / 2, n - n / 2);
    for (int i = n / 2; i < n; ++i) ASSERT_EQ(tail[i - n / 2], got[i]) << "n " << n << " i " << i;
  }
}

// vec_axpy_rows keeps the sums in registers across rows: bit-identical to one vec_axpy per row
// (channel counts with and without a 64-channel block and a tail). vec_axpy_rows_f64 sums each
// channel in double from 0 and adds it once: equal to that sum computed here in double.
TEST(VecMath, RowAxpysEqualSuccessiveAxpysAndDoubleSums) {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int d : {8, 37, 64, 100, 128, 200})
    for (int64_t n : {0, 1, 5, 64, 130}) {
      std::vector<float> x((size_t)(n * d)), w((size_t)n), y0((size_t)d);
      for (auto& e : x) e = nd(rng);
      for (auto& e : w) e = std::exp(nd(rng));
      for (auto& e : y0) e = nd(rng);
      std::vector<float> want = y0, got = y0;
      for (int64_t j = 0; j < n; ++j) vec_axpy(w[j], x.data() + j * d, want.data(), d);
      vec_axpy_rows(w.data(), x.data(), n, d, got.data());
      EXPECT_EQ(got, want) << "d " << d << " n " << n;
      // vec_axpy_rows_f64 over n_y output rows (weights: row i scaled by i + 1), groups of 6 and not.
      for (int n_y : {1, 3, 6, 8}) {
        const int64_t ws = n + 1, ys = d + 5;
        std::vector<float> w2((size_t)(n_y * ws)), y2((size_t)(n_y * ys));
        for (int i = 0; i < n_y; ++i) {
          for (int64_t j = 0; j < n; ++j) w2[(size_t)(i * ws + j)] = w[j] * (float)(i + 1);
          for (int c = 0; c < d; ++c) y2[(size_t)(i * ys + c)] = y0[c];
        }
        vec_axpy_rows_f64(w2.data(), ws, n_y, x.data(), n, d, y2.data(), ys);
        for (int i = 0; i < n_y; ++i)
          for (int c = 0; c < d; ++c) {
            double a = 0;
            for (int64_t j = 0; j < n; ++j) a = std::fma((double)w2[(size_t)(i * ws + j)], (double)x[j * d + c], a);
            ASSERT_EQ(y2[(size_t)(i * ys + c)], y0[c] + (float)a) << "d " << d << " n " << n << " n_y " << n_y;
          }
      }
    }
}

// vec_wsum is the fused form of a memset (or nothing) and one vec_axpy per stream: same fused
// multiply-adds in the same order, so bit-identical, for every stream count (more than one pass
// of 4 streams too) and lengths with vector tails.
TEST(VecMath, WeightedSumEqualsSuccessiveAxpys) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int nx : {0, 1, 3, 4, 6, 9})
    for (int64_t n : {1, 15, 16, 37, 200})
      for (bool acc : {false, true}) {
        std::vector<std::vector<float>> xs((size_t)nx, std::vector<float>((size_t)n));
        std::vector<const float*> ptr;
        std::vector<float> a((size_t)nx), y0((size_t)n);
        for (auto& x : xs) {
          for (auto& e : x) e = nd(rng);
          ptr.push_back(x.data());
        }
        for (auto& e : a) e = nd(rng);
        for (auto& e : y0) e = nd(rng);
        std::vector<float> want = acc ? y0 : std::vector<float>((size_t)n, 0.0f), got = y0;
        for (int r = 0; r < nx; ++r) vec_axpy(a[r], xs[r].data(), want.data(), n);
        vec_wsum(ptr.data(), a.data(), nx, got.data(), n, acc);
        EXPECT_EQ(got, want) << "nx " << nx << " n " << n << " acc " << acc;
      }
}
