// attention_prefill (and its portable path) vs a straightforward double-precision causal
// attention on random inputs; optional throughput report (SPECACHE_TIMING=1).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "ops/attention.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

// out[r][h][c] for rows at positions p0 + r over keys 0 .. p0 + r, in double.
// q is multiplied by 1/sqrt(head_dim) unless prescaled.
std::vector<double> reference(const AttnShape& s, const std::vector<float>& q, int64_t n_rows, int64_t p0,
                              const std::vector<float>& k, const std::vector<float>& v, bool prescaled = false) {
  const int d = s.head_dim, g = s.n_head / s.n_head_kv;
  const double scale = prescaled ? 1.0 : 1.0 / std::sqrt((double)d);
  std::vector<double> out((size_t)(n_rows * s.n_head * d));
  std::vector<double> w;
  for (int64_t r = 0; r < n_rows; ++r)
    for (int h = 0; h < s.n_head; ++h) {
      const int hk = h / g;
      const float* qr = q.data() + (r * s.n_head + h) * d;
      const int64_t nk = p0 + r + 1;
      w.assign((size_t)nk, 0.0);
      double mx = -1e300;
      for (int64_t j = 0; j < nk; ++j) {
        const float* kj = k.data() + (j * s.n_head_kv + hk) * d;
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += (double)qr[c] * kj[c];
        w[j] = dot * scale;
        mx = std::max(mx, w[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < nk; ++j) sum += (w[j] = std::exp(w[j] - mx));
      double* o = out.data() + (r * s.n_head + h) * d;
      for (int64_t j = 0; j < nk; ++j) {
        const float* vj = v.data() + (j * s.n_head_kv + hk) * d;
        for (int c = 0; c < d; ++c) o[c] += w[j] / sum * vj[c];
      }
    }
  return out;
}

struct Case {
  int n_head, n_head_kv, head_dim;
  int64_t n_rows, p0;
};

void check(const Case& cs, int threads, bool portable) {
  const AttnShape s{cs.n_head, cs.n_head_kv, cs.head_dim};
  std::mt19937 rng((unsigned)(cs.n_head * 131 + cs.head_dim * 17 + cs.n_rows * 7 + cs.p0));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n_keys = cs.p0 + cs.n_rows;  // exactly what the chunk may read
  std::vector<float> q((size_t)(cs.n_rows * s.n_head * s.head_dim)), k((size_t)(n_keys * s.n_head_kv * s.head_dim)),
      v(k.size());
  for (auto& x : q) x = 2.0f * nd(rng);  // peaked enough that the softmax is far from uniform
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<float> out(q.size(), -1.0f);
  ThreadPool pool(threads);
  if (portable)
    attention_prefill_portable(s, q.data(), cs.n_rows, cs.p0, k.data(), v.data(), out.data(), pool);
  else
    attention_prefill(s, q.data(), cs.n_rows, cs.p0, k.data(), v.data(), out.data(), pool);
  const auto ref = reference(s, q, cs.n_rows, cs.p0, k, v);
  double worst = 0;
  size_t bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double err = std::abs(out[i] - ref[i]);
    worst = std::max(worst, err / (1.0 + std::abs(ref[i])));
    if (!(err <= 1e-4 * (1.0 + std::abs(ref[i])))) ++bad;
  }
  EXPECT_EQ(bad, 0u) << "heads " << cs.n_head << "/" << cs.n_head_kv << " head_dim " << cs.head_dim << " rows "
                     << cs.n_rows << " p0 " << cs.p0 << " threads " << threads << (portable ? " portable" : "")
                     << ": worst relative error " << worst;
}

const Case kCases[] = {
    // SmolLM2-135M geometry (GQA 3, head_dim 64): tile-sized, ragged, chunked (p0 > 0).
    {9, 3, 64, 16, 0},
    {9, 3, 64, 37, 0},
    {9, 3, 64, 53, 200},
    {9, 3, 64, 1, 77},
    {9, 3, 64, 130, 129},
    // GQA 1 (stories260K uses head_dim 8), head_dim 48 and one not a multiple of 8.
    {8, 8, 8, 70, 0},
    {8, 8, 8, 33, 45},
    {4, 4, 48, 100, 31},
    {6, 2, 20, 41, 23},
    // Other group sizes: 2, 5 (48 lanes not a multiple of the group), 16.
    {4, 2, 64, 50, 10},
    {10, 2, 32, 29, 67},
    {16, 1, 16, 7, 5},
    // stories260K itself (GQA 2, head_dim 8), one chunk and chunked.
    {8, 4, 8, 300, 0},
    {8, 4, 8, 64, 250},
};

}  // namespace

TEST(AttentionPrefill, MatchesDoubleReference) {
  for (const Case& cs : kCases)
    for (int threads : {1, 2}) check(cs, threads, false);
}

TEST(AttentionPrefill, PortablePathMatchesDoubleReference) {
  for (const Case& cs : kCases)
    for (int threads : {1, 2}) check(cs, threads, true);
}

float round_bf16(float x) { return bf16_to_fp32(fp32_to_bf16(x)); }

// int8 codes of one vector (the kernel's per-lane / per-key quantization), dequantized.
void dequant_i8(const float* x, int d, float* out) {
  float amax = 0;
  for (int c = 0; c < d; ++c) amax = std::max(amax, std::fabs(x[c]));
  const float inv = amax > 0 ? 127.0f / amax : 0.0f, sc = amax * (1.0f / 127.0f);
  for (int c = 0; c < d; ++c) out[c] = (float)std::nearbyint(x[c] * inv) * sc;
}

// The bf16 kernel against the double reference over bf16-rounded inputs (what the kernel
// multiplies): only the rounding of the softmax weights and the fp32 sums remain, a few 1e-3 at
// worst. Chunks after the first (p0 > 0) read bf16 K/V converted chunk by chunk, as the model does.
// int8: the scores from int8 codes of the queries and keys (keys_to_i8); the reference then
// multiplies the dequantized codes.
// amx: the AMX kernel (attention_prefill_amx) on its own copies (kv_to_bf16_amx in the same
// uneven pieces: K padded with NaN rows past the last key, which must be masked; V transposed),
// against the same reference, and against the bf16 kernel's output (the same roundings; only the
// order of the fp32 sums differs).
void check_bf16(const Case& cs, int threads, bool int8 = false, bool amx = false) {
  const AttnShape s{cs.n_head, cs.n_head_kv, cs.head_dim};
  std::mt19937 rng((unsigned)(cs.n_head * 131 + cs.head_dim * 17 + cs.n_rows * 7 + cs.p0));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n_keys = cs.p0 + cs.n_rows;
  const int64_t e = (int64_t)s.n_head_kv * s.head_dim;
  std::vector<float> q((size_t)(cs.n_rows * s.n_head * s.head_dim)), k((size_t)(n_keys * e)), v(k.size());
  for (auto& x : q) x = 2.0f * nd(rng);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<bf16_t> kb((size_t)(n_keys * e)), vb((size_t)((n_keys + 1) / 2 * 2 * e), (bf16_t)0x7fc0);  // NaN fill
  // Converted in uneven pieces (odd boundaries re-pair), like a prompt prefilled chunk by chunk.
  for (int64_t j0 = 0; j0 < n_keys;) {
    const int64_t j1 = std::min(n_keys, j0 + 1 + (j0 * 7 + 13) % 37);
    kv_to_bf16(s, k.data(), v.data(), j0, j1, kb.data(), vb.data());
    j0 = j1;
  }
  for (int64_t j = 0; j < n_keys; ++j)
    for (int64_t i = 0; i < e; ++i) {
      ASSERT_EQ(kb[j * e + i], fp32_to_bf16(k[j * e + i]));
      ASSERT_EQ(vb[((j / 2) * e + i) * 2 + j % 2], fp32_to_bf16(v[j * e + i]));
    }
  if (n_keys % 2) {
    ASSERT_EQ(vb[((n_keys / 2) * e) * 2 + 1], 0) << "the missing half of the last pair must be 0";
  }
  std::vector<int8_t> k8(k.size());
  std::vector<float> k8_scale((size_t)(n_keys * s.n_head_kv));
  std::vector<int32_t> k8_sum(k8_scale.size());
  for (int64_t j0 = 0; j0 < n_keys; j0 += 50)
    keys_to_i8(s, k.data(), j0, std::min<int64_t>(n_keys, j0 + 50), k8.data(), k8_scale.data(), k8_sum.data());
  for (size_t r = 0; r < k8_sum.size(); ++r) {
    int32_t total = 0;
    for (int c = 0; c < s.head_dim; ++c) total += k8[r * s.head_dim + c];
    ASSERT_EQ(total, k8_sum[r]);
  }
  const PrefillKeysI8 keys{k8.data(), k8_scale.data(), k8_sum.data()};
  std::vector<float> out(q.size(), -1.0f);
  ThreadPool pool(threads);
  attention_prefill_bf16(s, q.data(), cs.n_rows, cs.p0, kb.data(), vb.data(), out.data(), pool, int8 ? &keys : nullptr);
  if (amx) {
    const int64_t cap = prefill_amx_capacity(n_keys);
    ASSERT_EQ(cap % 32, 0);
    ASSERT_GE(cap, n_keys);
    std::vector<bf16_t> ka((size_t)(cap * e), (bf16_t)0x7fc0), vt((size_t)(cap * e), (bf16_t)0);
    for (int64_t j0 = 0; j0 < n_keys;) {
      const int64_t j1 = std::min(n_keys, j0 + 1 + (j0 * 7 + 13) % 37);
      kv_to_bf16_amx(s, k.data(), v.data(), j0, j1, ka.data(), vt.data(), cap);
      j0 = j1;
    }
    for (int64_t j = 0; j < n_keys; ++j)
      for (int hk = 0; hk < s.n_head_kv; ++hk)
        for (int c = 0; c < s.head_dim; ++c) {
          const int64_t i = j * e + hk * s.head_dim + c;
          ASSERT_EQ(ka[i], kb[i]);
          ASSERT_EQ(vt[(((int64_t)hk * (cap / 32) + j / 32) * s.head_dim + c) * 32 + j % 32], fp32_to_bf16(v[i]));
        }
    std::vector<float> out_amx(q.size(), -1.0f);
    attention_prefill_amx(s, q.data(), cs.n_rows, cs.p0, ka.data(), vt.data(), cap, out_amx.data(), pool);
    double worst = 0;
    for (size_t i = 0; i < out.size(); ++i)
      worst = std::max(worst, std::abs((double)out_amx[i] - out[i]) / (1.0 + std::abs(out[i])));
    // A score that differs in its last fp32 bits can move a weight across a bf16 rounding
    // boundary (one step: 2^-8 relative), so the bound is a few such steps, not the sums' 1e-6.
    EXPECT_LT(worst, 5e-3) << "AMX against the bf16 kernel, heads " << cs.n_head << "/" << cs.n_head_kv << " rows "
                           << cs.n_rows << " p0 " << cs.p0;
    out.swap(out_amx);
  }
  const float scale = 1.0f / std::sqrt((float)s.head_dim);
  const int d = s.head_dim;
  std::vector<float> qr(q.size()), kr(k.size()), vr(v.size());
  if (int8) {
    std::vector<float> qs(d);
    for (size_t r = 0; r < q.size() / d; ++r) {
      for (int c = 0; c < d; ++c) qs[c] = q[r * d + c] * scale;
      dequant_i8(qs.data(), d, qr.data() + r * d);
    }
    for (size_t r = 0; r < k.size() / d; ++r) {
      dequant_i8(k.data() + r * d, d, kr.data() + r * d);
      for (int c = 0; c < d; ++c) ASSERT_FLOAT_EQ(kr[r * d + c], k8[r * d + c] * k8_scale[r]);
    }
    for (size_t i = 0; i < v.size(); ++i) vr[i] = round_bf16(v[i]);
  } else {
    for (size_t i = 0; i < q.size(); ++i) qr[i] = round_bf16(q[i] * scale);
    for (size_t i = 0; i < k.size(); ++i) kr[i] = round_bf16(k[i]), vr[i] = round_bf16(v[i]);
  }
  const auto ref = reference(s, qr, cs.n_rows, cs.p0, kr, vr, true);
  const auto exact = reference(s, q, cs.n_rows, cs.p0, k, v);
  double worst = 0, sq = 0, sq_exact = 0;
  size_t bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double err = std::abs(out[i] - ref[i]);
    worst = std::max(worst, err / (1.0 + std::abs(ref[i])));
    if (!(err <= 1e-2 * (1.0 + std::abs(ref[i])))) ++bad;
    sq += err * err;
    sq_exact += (out[i] - exact[i]) * (out[i] - exact[i]);
  }
  const double rms = std::sqrt(sq / (double)out.size()), rms_exact = std::sqrt(sq_exact / (double)out.size());
  const std::string what = "heads " + std::to_string(cs.n_head) + "/" + std::to_string(cs.n_head_kv) + " head_dim " +
                           std::to_string(cs.head_dim) + " rows " + std::to_string(cs.n_rows) + " p0 " +
                           std::to_string(cs.p0) + " threads " + std::to_string(threads) + (int8 ? " int8 scores" : "") +
                           (amx ? " amx" : "");
  EXPECT_EQ(bad, 0u) << what << ": worst relative error " << worst;
  EXPECT_LT(rms, 1.5e-3) << what;
  // Against unrounded inputs the error is the rounding of q and k in the scores (bf16, or int8
  // codes; inputs of unit scale, scores up to ~10 here): still small, and far below any masking,
  // pairing or code-offset bug.
  EXPECT_LT(rms_exact, int8 ? 6e-2 : 3e-2) << what;
}

TEST(AttentionPrefill, Bf16AndInt8ScoresMatchRoundedReference) {
  if (!attention_prefill_bf16_supported(AttnShape{9, 3, 64}))
    GTEST_SKIP() << "this build has no bf16 prefill attention kernel (needs AVX-512 BF16 and VNNI)";
  int n = 0;
  for (const Case& cs : kCases) {
    if (!attention_prefill_bf16_supported(AttnShape{cs.n_head, cs.n_head_kv, cs.head_dim})) continue;
    for (int threads : {1, 2}) {
      check_bf16(cs, threads);
      check_bf16(cs, threads, true);
    }
    ++n;
  }
  EXPECT_GE(n, 10);
}

TEST(AttentionPrefill, AmxMatchesRoundedReference) {
  if (!attention_prefill_amx_supported(AttnShape{9, 3, 64}))
    GTEST_SKIP() << "no AMX prefill attention here (needs a CPU with AMX-BF16, Linux's permission for the tile "
                    "state, and an AVX-512 BF16 build)";
  int n = 0;
  for (const Case& cs : kCases) {
    if (!attention_prefill_amx_supported(AttnShape{cs.n_head, cs.n_head_kv, cs.head_dim})) continue;
    for (int threads : {1, 2}) check_bf16(cs, threads, false, true);
    ++n;
  }
  // Longer than one 128-key block, with a ragged last block and a chunk offset.
  for (const Case& cs : {Case{9, 3, 64, 300, 0}, Case{9, 3, 64, 77, 333}, Case{4, 1, 128, 90, 170}, Case{6, 3, 96, 40, 20}})
    for (int threads : {1, 2}) check_bf16(cs, threads, false, true);
  EXPECT_GE(n, 4);
}

TEST(AttentionPrefill, AmxUnavailableIsAnError) {
  const AttnShape odd{4, 4, 48};  // head_dim not a multiple of 32: never on AMX
  ASSERT_FALSE(attention_prefill_amx_supported(odd));
  std::vector<float> q(4 * 48), out(q.size());
  std::vector<bf16_t> kb(32 * 4 * 48), vt(kb.size());
  ThreadPool pool(1);
  EXPECT_THROW(attention_prefill_amx(odd, q.data(), 1, 0, kb.data(), vt.data(), 32, out.data(), pool), spc::Error);
}

TEST(AttentionPrefill, Bf16UnavailableIsAnError) {
  const AttnShape odd{6, 2, 20};  // head_dim not a multiple of 8: never supported
  ASSERT_FALSE(attention_prefill_bf16_supported(odd));
  std::vector<float> q(6 * 20), out(q.size());
  std::vector<bf16_t> kb(2 * 20), vb(2 * 2 * 20);
  ThreadPool pool(1);
  EXPECT_THROW(attention_prefill_bf16(odd, q.data(), 1, 0, kb.data(), vb.data(), out.data(), pool), spc::Error);
}

// Throughput report; asserts nothing about speed. Run with SPECACHE_TIMING=1.
TEST(AttentionPrefill, Timing) {
  if (!std::getenv("SPECACHE_TIMING")) GTEST_SKIP() << "set SPECACHE_TIMING=1 to print prefill attention throughput";
  const AttnShape s{9, 3, 64};  // SmolLM2-135M
  const int64_t chunk = 256;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t p0 : {0, 1792, 7936, 16128}) {
    const int64_t n_keys = p0 + chunk;
    std::vector<float> q((size_t)(chunk * s.n_head * s.head_dim)), k((size_t)(n_keys * s.n_head_kv * s.head_dim)),
        v(k.size()), out(q.size());
    for (auto& x : q) x = nd(rng);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    // 4 * head_dim flops per (query head, visible key) pair: q.k and p*v.
    const double pairs = (double)chunk * (double)p0 + (double)chunk * (chunk + 1) / 2;
    const double flops = pairs * s.n_head * 4.0 * s.head_dim;
    for (int threads : {1, 2}) {
      ThreadPool pool(threads);
      std::vector<bf16_t> kb(k.size()), vb((size_t)((n_keys + 1) / 2 * 2 * s.n_head_kv * s.head_dim));
      kv_to_bf16(s, k.data(), v.data(), 0, n_keys, kb.data(), vb.data());
      std::vector<int8_t> k8(k.size());
      std::vector<float> k8_scale((size_t)(n_keys * s.n_head_kv));
      std::vector<int32_t> k8_sum(k8_scale.size());
      keys_to_i8(s, k.data(), 0, n_keys, k8.data(), k8_scale.data(), k8_sum.data());
      const PrefillKeysI8 keys{k8.data(), k8_scale.data(), k8_sum.data()};
      const int64_t cap = prefill_amx_capacity(n_keys);
      std::vector<bf16_t> ka_buf((size_t)cap * s.n_head_kv * s.head_dim + 32), vt_buf(ka_buf.size());
      bf16_t* ka = ka_buf.data() + (64 - reinterpret_cast<uintptr_t>(ka_buf.data()) % 64) % 64 / 2;
      bf16_t* vt = vt_buf.data() + (64 - reinterpret_cast<uintptr_t>(vt_buf.data()) % 64) % 64 / 2;
      if (std::getenv("MISALIGN")) ++ka, ++vt;
      kv_to_bf16_amx(s, k.data(), v.data(), 0, n_keys, ka, vt, cap);
      for (int kind : {0, 1, 2, 3, 4}) {  // default, portable, bf16, int8 scores, amx
        const bool portable = kind == 1;
        if (portable && p0 > 1792) continue;  // slow
        if ((kind == 2 || kind == 3) && !attention_prefill_bf16_supported(s)) continue;
        if (kind == 4 && !attention_prefill_amx_supported(s)) continue;
        auto run = [&] {
          if (kind == 4)
            attention_prefill_amx(s, q.data(), chunk, p0, ka, vt, cap, out.data(), pool);
          else if (kind >= 2)
            attention_prefill_bf16(s, q.data(), chunk, p0, kb.data(), vb.data(), out.data(), pool,
                                   kind == 3 ? &keys : nullptr);
          else if (portable)
            attention_prefill_portable(s, q.data(), chunk, p0, k.data(), v.data(), out.data(), pool);
          else
            attention_prefill(s, q.data(), chunk, p0, k.data(), v.data(), out.data(), pool);
        };
        run();
        double best = 1e30, el = 0;
        const auto t0 = std::chrono::steady_clock::now();
        do {
          const auto c0 = std::chrono::steady_clock::now();
          run();
          const auto c1 = std::chrono::steady_clock::now();
          best = std::min(best, std::chrono::duration<double>(c1 - c0).count());
          el = std::chrono::duration<double>(c1 - t0).count();
        } while (el < 0.5);
        std::printf("prefill attention %-8s chunk %lld at p0 %6lld, %d thread(s): %8.3f ms  %6.1f GFLOP/s\n",
                    kind == 4 ? "amx" : kind == 3 ? "int8" : kind == 2 ? "bf16" : portable ? "portable" : "default", (long long)chunk, (long long)p0, threads, best * 1e3,
                    flops / best * 1e-9);
      }
    }
  }
}
