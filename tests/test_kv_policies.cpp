// Invariants of the KV policies on a real model (stories260K: fast, exact F32 weights):
// SpeCache with k and R covering everything equals full; k = 0 equals kivi; copy delays never
// change results; every policy runs its own decode path.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "engine/sampler.h"
#include "kv/lowbit.h"
#include "engine/session.h"
#include "model/model.h"
#include "test_util.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

struct Fixture {
  std::unique_ptr<Model> model;
  std::vector<int32_t> prompt, cont;  // prompt and full's greedy continuation
};

const Fixture* stories() {
  static Fixture* f = [] {
    auto* fx = new Fixture();
    const std::string path = shared_path("models/stories260K/stories260K.gguf");
    if (!std::filesystem::exists(path)) return fx;
    fx->model = Model::load(path);
    ThreadPool pool(2);
    KvConfig kc;
    Session s(*fx->model, make_kv_policy(kc, fx->model->kv_geometry(512)), pool);
    s.prefill({1});
    std::vector<int32_t> all = {1};
    const auto cont = greedy_continuation(s, 360);  // a 300-token "document" and 60 tokens to score
    all.insert(all.end(), cont.begin(), cont.end());
    fx->prompt.assign(all.begin(), all.begin() + 300);
    fx->cont.assign(all.begin() + 300, all.end());
    return fx;
  }();
  return f;
}

// Teacher-forced logits along `cont` after prefilling `prompt`: [n][n_vocab].
std::vector<float> teacher_forced(const Fixture& fx, const KvConfig& kc, KvStats* stats = nullptr) {
  ThreadPool pool(2);
  Session s(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
  s.prefill(fx.prompt);
  std::vector<float> out;
  for (int32_t t : fx.cont) {
    out.insert(out.end(), s.logits().begin(), s.logits().end());
    s.decode(t);
  }
  if (stats) *stats = s.kv().stats();
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}

KvConfig policy(const std::string& name, int bits = 1, int topk = 64, int window = 64, int group = 32) {
  KvConfig kc;
  kc.policy = name;
  kc.bits = bits;
  kc.topk = topk;
  kc.window = window;
  kc.group = group;
  return kc;
}

#define NEED_STORIES() \
  if (!stories()->model) GTEST_SKIP() << "missing ../shared/models/stories260K/stories260K.gguf"

}  // namespace

TEST(KvPolicy, SpecacheWithTopkCoveringEverythingEqualsFull) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  // Small window, many key blocks: every quantized position is fetched in 16-bit. The two
  // paths sum in different orders (~1e-6 relative), and each decoded token's K/V is rounded to
  // fp16, where a 1e-6 difference can flip the last fp16 bit (5e-4 relative) and carry on in
  // later steps: logits agree to ~1e-3 .. 1e-2 depending on the values (the AVX2 and AVX-512
  // prefill kernels land at 7e-3 and < 2e-3), while a low-bit value anywhere costs > 0.1.
  for (int bits : {1, 2}) {
    const auto spec = teacher_forced(*stories(), policy("specache", bits, /*topk=*/512, /*window=*/8));
    EXPECT_LT(max_abs_diff(full, spec), 1.5e-2) << bits << "-bit";
    const auto lossy = teacher_forced(*stories(), policy("specache", bits, /*topk=*/64, /*window=*/8));
    EXPECT_GT(max_abs_diff(full, lossy), 0.1) << bits << "-bit";
  }
}

// With exact attention the guess row computes what the next step's real row will: along full's
// greedy continuation every guess is the token that comes next (the pre-decoding row's too), and
// every step after the first is checked. With k = 0 and a small window, 1-bit guesses miss some.
TEST(KvPolicy, GuessesOfExactSpecacheAreAlwaysRight) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  for (int topk : {512, 0}) {
    Session s(*fx.model, make_kv_policy(policy("specache", 1, topk, topk ? 8 : 16), fx.model->kv_geometry(512)), pool);
    s.prefill(fx.prompt);
    for (int32_t t : fx.cont) s.decode(t);
    EXPECT_EQ(s.guesses().checked, (int64_t)fx.cont.size() - 1);
    if (topk) EXPECT_EQ(s.guesses().hits, s.guesses().checked);
    else EXPECT_LT(s.guesses().hits, s.guesses().checked);
  }
}

// Policy-level drivers (no model): random K/V prefilled into a small geometry, then decode steps
// with random rows, called as the model calls them.
namespace {

struct RandomSteps {
  KvGeometry g{2, 4, 2, 64, 1024};
  std::mt19937 rng{11};
  std::normal_distribution<float> nd{0.f, 1.f};
  std::vector<float> pk, pv;
  explicit RandomSteps(int64_t n_prefill) {
    pk.resize((size_t)n_prefill * g.n_head_kv * g.head_dim);
    pv.resize(pk.size());
    for (auto& e : pk) e = fp16_to_fp32(fp32_to_fp16(nd(rng)));
    for (auto& e : pv) e = fp16_to_fp32(fp32_to_fp16(nd(rng)));
  }
  std::unique_ptr<KvPolicy> make(const KvConfig& kc) const {
    auto kv = make_kv_policy(kc, g);
    const int64_t n = (int64_t)pk.size() / (g.n_head_kv * g.head_dim);
    for (int il = 0; il < g.n_layer; ++il) kv->store_prefill(il, 0, n, pk.data(), pv.data());
    return kv;
  }
  // One row's q, k, v (q: [n_head][d], k/v: [n_head_kv][d]); q sharpened so top-k matters.
  struct Row {
    std::vector<float> q, k, v;
  };
  Row row() {
    Row r;
    r.q.resize((size_t)g.n_head * g.head_dim);
    r.k.resize((size_t)g.n_head_kv * g.head_dim);
    r.v.resize(r.k.size());
    for (auto& e : r.q) e = 2.0f * nd(rng);
    for (auto& e : r.k) e = nd(rng);
    for (auto& e : r.v) e = nd(rng);
    return r;
  }
  // Runs one step of `rows` (row 0 kept unless n_keep = 0); returns row 0's outputs of every layer.
  std::vector<float> step(KvPolicy& kv, const std::vector<const Row*>& rows, int n_keep, ThreadPool& pool) const {
    const int n = (int)rows.size();
    std::vector<float> q, k, v;
    for (const Row* r : rows) {
      q.insert(q.end(), r->q.begin(), r->q.end());
      k.insert(k.end(), r->k.begin(), r->k.end());
      v.insert(v.end(), r->v.begin(), r->v.end());
    }
    std::vector<float> out((size_t)n * g.n_head * g.head_dim), row0;
    kv.begin_step(n, n_keep);
    DecodeRows dr{n, n_keep, kv.n_cached(), q.data(), k.data(), v.data()};
    for (int il = 0; il < g.n_layer; ++il) {
      kv.attend(il, dr, out.data(), pool);
      row0.insert(row0.end(), out.begin(), out.begin() + (size_t)g.n_head * g.head_dim);
    }
    kv.end_step();
    return row0;
  }
};


}  // namespace

// After the pre-decoding pass, the first step's row 0 is the same token at the same position, so
// it must attend with the top-k that pass selected for itself (the pass may not replace it with a
// selection for the position after): with --kv-predecode lowbit (the default) exactly as
// specache-exact's first step does (a top-k from the row's own low-bit scores), with exact as the
// oracle's first step (a top-k from exact scores).
TEST(KvPolicy, FirstStepAfterPreDecodingAttendsWithThePassOwnTopk) {
  ThreadPool pool(2);
  RandomSteps rs(448);
  KvConfig lowbit = policy("specache", 1, 16, 16, 64), exact = policy("specache", 1, 16, 16, 64);
  lowbit.predecode = "lowbit";
  exact.predecode = "exact";
  auto a = rs.make(lowbit), b = rs.make(policy("specache-exact", 1, 16, 16, 64));
  auto c = rs.make(exact), d = rs.make(policy("topk-oracle", 1, 16, 16, 64));
  auto kivi = rs.make(policy("kivi", 1, 0, 16, 64));
  const auto x = rs.row(), y = rs.row();
  rs.step(*a, {&x}, /*n_keep=*/0, pool);  // pre-decoding
  rs.step(*c, {&x}, /*n_keep=*/0, pool);
  const auto got = rs.step(*a, {&x, &y}, 1, pool);
  const auto want = rs.step(*b, {&x}, 1, pool);
  EXPECT_LT(max_abs_diff(got, want), 1e-5);
  const auto got_exact = rs.step(*c, {&x, &y}, 1, pool);
  const auto want_exact = rs.step(*d, {&x}, 1, pool);
  EXPECT_LT(max_abs_diff(got_exact, want_exact), 1e-5);
  EXPECT_GT(max_abs_diff(got_exact, want), 1e-3) << "the two pre-decoding choices should differ in this setup";
  EXPECT_GT(max_abs_diff(rs.step(*kivi, {&x}, 1, pool), want), 1e-3) << "the top-k should matter in this setup";
}

// specache-refetch: on a step after a miss, row 0 selects and fetches its own top-k before
// attending, so with a miss before every step it attends like specache-exact; with no miss noted
// it is specache, bit for bit.
TEST(KvPolicy, SpecacheRefetchAfterAMissAttendsLikeSpecacheExact) {
  ThreadPool pool(2);
  RandomSteps rs(448);
  // (a's pre-decoding pass chooses from its own low-bit scores, so its first step, which follows
  // no miss, also attends like specache-exact's.)
  KvConfig refetch_lowbit = policy("specache-refetch", 1, 16, 16, 64);
  refetch_lowbit.predecode = "lowbit";
  auto a = rs.make(refetch_lowbit), b = rs.make(policy("specache-exact", 1, 16, 16, 64));
  auto c = rs.make(policy("specache-refetch", 1, 16, 16, 64)), d = rs.make(policy("specache", 1, 16, 16, 64));
  auto x = rs.row();
  rs.step(*a, {&x}, 0, pool);
  rs.step(*c, {&x}, 0, pool);
  rs.step(*d, {&x}, 0, pool);
  double worst = 0, spec_vs_exact = 0;
  for (int i = 0; i < 6; ++i) {
    const auto y = rs.row();
    if (i > 0) a->note_guess_miss();
    const auto ra = rs.step(*a, {&x, &y}, 1, pool), rb = rs.step(*b, {&x}, 1, pool);
    worst = std::max(worst, max_abs_diff(ra, rb));
    const auto rc = rs.step(*c, {&x, &y}, 1, pool), rd = rs.step(*d, {&x, &y}, 1, pool);
    EXPECT_EQ(rc, rd) << "step " << i;
    spec_vs_exact = std::max(spec_vs_exact, max_abs_diff(rd, rb));
    x = rs.row();  // the next real token is never the guess y
  }
  EXPECT_LT(worst, 1e-5);
  EXPECT_GT(spec_vs_exact, 1e-3) << "specache's speculative buffer should differ from the row's own top-k";
  EXPECT_EQ(a->stats().refetch_steps, 5u);
  EXPECT_EQ(c->stats().refetch_steps, 0u);
}

// --kv-debias: kivi's attention equals a reference over the dequantized copy whose low-bit
// scores are lowered by debias * sum_c q_c^2 s_c^2 / 24 per key block (s_c the block's stored
// channel step), and clearly not the reference without that correction.
TEST(KvPolicy, DebiasLowersLowBitScoresByHalfTheirErrorVariance) {
  ThreadPool pool(2);
  RandomSteps rs(448);  // g = 64, R = 64: positions 0..383 in 6 low-bit blocks, 384..447 in the window
  const KvGeometry& G = rs.g;
  const int d = G.head_dim, nkv = G.n_head_kv, grp = G.n_head / nkv, g = 64;
  const int64_t n = 448, n_quant = 384;
  const float beta = 1.0f;
  KvConfig kc = policy("kivi", 1, 0, 64, 64), kc_plain = kc;
  kc.debias = beta;
  kc_plain.debias = 0.0f;
  auto kv = rs.make(kc), plain = rs.make(kc_plain);
  const auto x = rs.row();
  const auto got = rs.step(*kv, {&x}, 1, pool), got_plain = rs.step(*plain, {&x}, 1, pool);

  LowBitSpec spec;
  spec.bits = 1, spec.group = g, spec.head_dim = d;
  auto reference = [&](float b) {
    std::vector<float> out;
    std::vector<uint8_t> kb(spec.key_block_bytes()), vb(spec.value_block_bytes());
    std::vector<float> kh((size_t)g * d), vh(d), K((size_t)(n + 1) * d), V((size_t)(n + 1) * d), bias(n + 1, 0.0f);
    for (int il = 0; il < G.n_layer; ++il)
      for (int hq = 0; hq < G.n_head; ++hq) {
        const int h = hq / grp;
        const float* q = x.q.data() + (size_t)hq * d;
        for (int64_t blk = 0; blk < n_quant / g; ++blk) {
          const float* k0 = rs.pk.data() + ((size_t)blk * g * nkv + h) * d;
          const float* v0 = rs.pv.data() + ((size_t)blk * g * nkv + h) * d;
          lowbit_quantize_keys(spec, k0, (size_t)nkv * d, kb.data());
          lowbit_quantize_values(spec, v0, (size_t)nkv * d, vb.data());
          lowbit_dequantize_keys(spec, kb.data(), kh.data());
          const fp16_t* sc = reinterpret_cast<const fp16_t*>(kb.data() + spec.key_plane_bytes());
          double var = 0;
          for (int c = 0; c < d; ++c) var += (double)q[c] * q[c] / d * fp16_to_fp32(sc[c]) * fp16_to_fp32(sc[c]);
          for (int t = 0; t < g; ++t) {
            std::copy_n(kh.data() + (size_t)t * d, d, K.data() + (blk * g + t) * d);
            lowbit_dequantize_value(spec, vb.data(), t, V.data() + (blk * g + t) * d);
            bias[blk * g + t] = (float)(b * var / 24);
          }
        }
        for (int64_t j = n_quant; j < n; ++j) {  // the 16-bit window
          std::copy_n(rs.pk.data() + ((size_t)j * nkv + h) * d, d, K.data() + j * d);
          std::copy_n(rs.pv.data() + ((size_t)j * nkv + h) * d, d, V.data() + j * d);
        }
        for (int c = 0; c < d; ++c) {  // the step's own row (kept in fp16)
          K[n * d + c] = fp16_to_fp32(fp32_to_fp16(x.k[(size_t)h * d + c]));
          V[n * d + c] = fp16_to_fp32(fp32_to_fp16(x.v[(size_t)h * d + c]));
        }
        std::vector<double> p(n + 1);
        double m = -1e300, l = 0;
        for (int64_t j = 0; j <= n; ++j) {
          double sdot = 0;
          for (int c = 0; c < d; ++c) sdot += (double)q[c] * K[j * d + c];
          p[j] = sdot / std::sqrt((double)d) - bias[j];
          m = std::max(m, p[j]);
        }
        for (auto& e : p) l += (e = std::exp(e - m));
        for (int c = 0; c < d; ++c) {
          double o = 0;
          for (int64_t j = 0; j <= n; ++j) o += p[j] * V[j * d + c];
          out.push_back((float)(o / l));
        }
      }
    return out;
  };
  const auto want = reference(beta), want_plain = reference(0.0f);
  // 0.03: the packed kernels' 8-bit operands (query, key steps, value weights; lowbit.h).
  const double tol = 0.03;
  EXPECT_LT(max_abs_diff(got_plain, want_plain), tol) << "the reference itself";
  EXPECT_LT(max_abs_diff(got, want), tol);
  EXPECT_GT(max_abs_diff(want, want_plain), 4 * tol) << "the correction should matter in this setup";
  EXPECT_GT(max_abs_diff(got, want_plain), 4 * tol);
  std::printf("kivi vs reference: %.4f (debiased), %.4f (plain); the correction moves outputs by %.4f\n",
              max_abs_diff(got, want), max_abs_diff(got_plain, want_plain), max_abs_diff(want, want_plain));
}

// Debiasing leaves the steps whose top-k row 0 chose from its own low-bit scores alone
// (specache-exact; specache-refetch after a miss; the pre-decoding pass and the step after it with
// --kv-predecode lowbit): bit-identical to debias = 0. It changes specache's speculative steps, the
// oracle, and the exact pre-decoding pass and the step after it.
TEST(KvPolicy, DebiasSkipsStepsWhereRowZeroChoseItsOwnTopk) {
  ThreadPool pool(2);
  RandomSteps rs(448);
  auto with = [](KvConfig kc, float debias, const char* predecode) {
    kc.debias = debias;
    kc.predecode = predecode;
    return kc;
  };
  for (const char* label : {"specache-exact", "specache-refetch", "specache", "specache/exact", "topk-oracle"}) {
    const std::string l = label;
    const std::string name = l.substr(0, l.find('/'));
    const char* predecode = l.find("/exact") != std::string::npos ? "exact" : "lowbit";
    auto a = rs.make(with(policy(name, 1, 16, 16, 64), 0.0f, predecode));
    auto b = rs.make(with(policy(name, 1, 16, 16, 64), 0.5f, predecode));
    auto x = rs.row();
    const bool speculative = name == "specache" || name == "specache-refetch";
    const bool oracle = name == "topk-oracle";
    const bool exact_first = oracle || std::string(predecode) == "exact";
    const double first = max_abs_diff(rs.step(*a, {&x}, speculative ? 0 : 1, pool), rs.step(*b, {&x}, speculative ? 0 : 1, pool));
    if (exact_first) EXPECT_GT(first, 1e-3) << label << ": a choice from exact scores does not see the low-bit errors";
    else EXPECT_EQ(first, 0.0) << label << ": the first step" << (speculative ? " (the pre-decoding pass selects its own top-k)" : "");
    double diff = 0;
    for (int i = 0; i < 5; ++i) {
      const auto y = rs.row();
      if (name == "specache-refetch") a->note_guess_miss(), b->note_guess_miss();
      if (speculative) {
        const double e = max_abs_diff(rs.step(*a, {&x, &y}, 1, pool), rs.step(*b, {&x, &y}, 1, pool));
        if (i == 0 && exact_first) {
          EXPECT_GT(e, 1e-3) << label << ": the step after an exact pre-decoding choice";
        } else if (i == 0) {
          EXPECT_EQ(e, 0.0) << label << ": the step after pre-decoding attends with the row's own top-k";
        }
        diff = std::max(diff, e);
      }
      else diff = std::max(diff, max_abs_diff(rs.step(*a, {&x}, 1, pool), rs.step(*b, {&x}, 1, pool)));
      x = rs.row();
    }
    if (name == "specache" || oracle) EXPECT_GT(diff, 1e-3) << label;
    else EXPECT_EQ(diff, 0.0) << label;
  }
}

// Through Session: a refetch on exactly the steps whose guess missed.
TEST(KvPolicy, SpecacheRefetchCountsOneRefetchPerMiss) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  Session s(*fx.model, make_kv_policy(policy("specache-refetch", 1, 16, 16), fx.model->kv_geometry(512)), pool);
  s.prefill(fx.prompt);
  for (int32_t t : fx.cont) s.decode(t);
  const GuessStats& gs = s.guesses();
  EXPECT_GT(gs.checked - gs.hits, 0);
  EXPECT_EQ((int64_t)s.kv().stats().refetch_steps, gs.checked - gs.hits);
}

TEST(Session, LookupGuessTakesTheLatestLongestEarlierMatch) {
  EXPECT_EQ(lookup_guess({5, 1, 2, 3, 9, 1, 2}), 3);        // [1 2] occurred before, then 3
  EXPECT_EQ(lookup_guess({1, 2, 1, 2, 7, 2}), 7);           // only [2] matches: the latest occurrence
  EXPECT_EQ(lookup_guess({4, 5, 6, 9, 5, 6, 0, 4, 5, 6}), 9);  // [4 5 6] beats the later [5 6]
  EXPECT_EQ(lookup_guess({4, 5, 6, 9, 5, 6, 0, 4, 5, 6}, 2), 0);  // at most 2: the latest [5 6]
  EXPECT_EQ(lookup_guess({1, 2, 3}), -1);                   // 3 never occurred before
  EXPECT_EQ(lookup_guess({7}), -1);
  EXPECT_EQ(lookup_guess({}), -1);
}

// The guess only steers row 1 (and so the next selection); row 0 of a step never sees it. With a
// top-k covering everything the outputs are the same under either rule, also along a sequence
// the model does not predict (every guess misses); with k = 0 and 1 bit, lookup guesses the
// copied span of the prompt far better than the speculative row does.
TEST(KvPolicy, GuessRuleSteersOnlyTheSpeculativeRow) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  std::vector<int32_t> copied(fx.prompt.begin() + 100, fx.prompt.begin() + 160);
  auto run = [&](KvConfig kc, const char* guess, const std::vector<int32_t>& forced, GuessStats* gs) {
    kc.guess = guess;
    Session s(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
    s.prefill(fx.prompt);
    std::vector<float> out;
    for (int32_t t : forced) {
      out.insert(out.end(), s.logits().begin(), s.logits().end());
      s.decode(t);
    }
    *gs = s.guesses();
    return out;
  };
  GuessStats a, b;
  std::vector<int32_t> odd(60);
  for (size_t i = 0; i < odd.size(); ++i) odd[i] = (int32_t)(7 + 13 * i % 400);
  EXPECT_EQ(run(policy("specache", 1, 512, 8), "lookup", odd, &a), run(policy("specache", 1, 512, 8), "model", odd, &b));
  EXPECT_LT(b.hits, b.checked / 2);
  run(policy("specache", 1, 0, 16), "lookup", copied, &a);
  run(policy("specache", 1, 0, 16), "model", copied, &b);
  EXPECT_EQ(a.checked, b.checked);
  EXPECT_GT(a.hits, b.hits + 10) << "lookup " << a.hits << ", model " << b.hits << " of " << a.checked;
}

// Equal up to float reordering, and what fp16 storage makes of it: the two policies sum attention
// in different orders, so a new token's K/V differ from full's by ~1e-6 relative, and where such a
// value sits near an fp16 rounding boundary the stored copies differ by one fp16 ulp (~2e-3 at
// magnitude 2..4). One such token moves later logits of this 260K model by up to ~7e-3: measured
// on the AVX2 build, where replacing std::exp by exp_approx in the FFN gate (same values to ~1e-7)
// turned one stored token's 18 fp16 K/V elements one ulp apart (max logit difference 1.2e-4 ->
// 7.2e-3; the AVX-512 build 1.9e-4 -> 1.1e-4).
TEST(KvPolicy, SpecacheWithWindowCoveringEverythingEqualsFull) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  const auto spec = teacher_forced(*stories(), policy("specache", 1, /*topk=*/0, /*window=*/512));
  EXPECT_LT(max_abs_diff(full, spec), 2e-2);
}

TEST(KvPolicy, SpecacheWithZeroTopkEqualsKivi) {
  NEED_STORIES();
  for (int bits : {1, 2}) {
    const auto kivi = teacher_forced(*stories(), policy("kivi", bits, 0, 16));
    const auto spec = teacher_forced(*stories(), policy("specache", bits, 0, 16));
    EXPECT_LT(max_abs_diff(kivi, spec), 1e-4) << bits << "-bit";
  }
}

TEST(KvPolicy, CopyDelaysNeverChangeResults) {
  NEED_STORIES();
  for (const char* name : {"specache", "specache-exact"}) {
    KvConfig a = policy(name, 1, 16, 16);
    a.copy = "thread";
    const auto ref = teacher_forced(*stories(), a);
    // Delays, and who runs the prefetch copies (the copy engine's thread or the pool's idle
    // workers), change only when the copies finish, never what attention sees.
    for (const char* copy : {"thread", "pool"})
      for (uint32_t delay : {0u, 300u}) {
        KvConfig b = a;
        b.copy = copy;
        b.inject_delay_us = delay;
        b.inject_seed = 42;
        EXPECT_EQ(ref, teacher_forced(*stories(), b)) << name << " copy " << copy << " delay " << delay;
      }
  }
}

TEST(KvPolicy, LowBitPoliciesDifferFromFullAndStayClose) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  KvStats st;
  for (const char* name : {"kivi", "specache", "specache-exact", "topk-oracle"}) {
    const auto got = teacher_forced(*stories(), policy(name, 1, 16, 16), &st);
    const double d = max_abs_diff(full, got);
    EXPECT_GT(d, 0.0) << name << " should run its own (low-bit) decode path";
    EXPECT_LT(d, 8.0) << name;
    EXPECT_EQ(st.policy, name);
    EXPECT_GT(st.fast_bytes, 0u);
  }
}

TEST(KvPolicy, SpecacheReportsTierStatistics) {
  NEED_STORIES();
  KvStats st;
  KvConfig kc = policy("specache", 1, 16, 16);
  kc.diagnostics = true;
  teacher_forced(*stories(), kc, &st);
  EXPECT_GT(st.slow_bytes, 0u);
  EXPECT_GT(st.fetched_bytes_per_step, 0.0);
  EXPECT_GE(st.prefetch_reuse_rate, 0.0);
  EXPECT_LE(st.prefetch_reuse_rate, 1.0);
  EXPECT_GT(st.spec_recall, 0.0);
  EXPECT_LE(st.spec_recall, 1.0);
  EXPECT_EQ(st.spec_recall_per_layer.size(), 5u);
  EXPECT_GT(st.exact_mass_served, 0.0);
  EXPECT_LE(st.exact_mass_served, 1.0 + 1e-9);
}

// The selection pass runs as background work on the pool's worker (overlapping the layer's
// projections), except with --kv-diagnostics, where it is a pool dispatch: the same selections,
// so the same logits and the same hit map (reuse), bit for bit, with and without copy delays
// (which make the background job and the copies finish at other times). (Fetched bytes are
// counted as batches complete, so the last step's may or may not be in by the time of stats().)
TEST(KvPolicy, BackgroundSelectionEqualsTheInlinePass) {
  NEED_STORIES();
  for (const char* name : {"specache", "specache-refetch"}) {
    KvConfig inline_cfg = policy(name, 1, 16, 16);
    inline_cfg.diagnostics = true;
    KvStats a, b, c;
    const auto ref = teacher_forced(*stories(), inline_cfg, &a);
    KvConfig bg = policy(name, 1, 16, 16);
    EXPECT_EQ(ref, teacher_forced(*stories(), bg, &b)) << name;
    bg.inject_delay_us = 200;
    bg.inject_seed = 5;
    EXPECT_EQ(ref, teacher_forced(*stories(), bg, &c)) << name;
    for (const KvStats* st : {&b, &c}) {
      EXPECT_EQ(a.prefetch_reuse_rate, st->prefetch_reuse_rate) << name;
      EXPECT_GT(st->spec_recall, 0.0) << name;
    }
  }
}

TEST(KvPolicy, StreamingWithWindowCoveringEverythingEqualsFull) {
  NEED_STORIES();
  const auto full = teacher_forced(*stories(), policy("full"));
  KvConfig kc = policy("streaming", 1, 0, 512);
  kc.sinks = 4;
  EXPECT_LT(max_abs_diff(full, teacher_forced(*stories(), kc)), 2e-3);
  kc.window = 32;
  EXPECT_GT(max_abs_diff(full, teacher_forced(*stories(), kc)), 0.0);
}

TEST(KvPolicy, PrefillHandOverMatchesOwnPrefill) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  KvConfig kc = policy("specache", 2, 16, 16);
  Session a(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
  a.prefill(fx.prompt);
  Session full(*fx.model, make_kv_policy(policy("full"), fx.model->kv_geometry(512)), pool);
  full.prefill(fx.prompt);
  Session b(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
  b.prefill_from(full);
  for (int i = 0; i < 20; ++i) {
    ASSERT_EQ(a.logits(), b.logits()) << "step " << i;
    a.decode(fx.cont[i]);
    b.decode(fx.cont[i]);
  }
}

// export_layer(il, n) gives the first n positions of the whole export (a prefix costs only its
// own rows), for the full cache and the slow tier; n beyond the cached positions throws.
TEST(KvPolicy, ExportOfAPrefixIsThePrefixOfTheExport) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  for (const char* name : {"full", "specache"}) {
    SCOPED_TRACE(name);
    Session s(*fx.model, make_kv_policy(policy(name, 1), fx.model->kv_geometry(512)), pool);
    s.prefill(fx.prompt);
    const KvGeometry& g = s.kv().geometry();
    const int64_t n = s.kv().n_cached(), row = (int64_t)g.n_head_kv * g.head_dim;
    std::vector<float> k((size_t)(n * row)), v(k.size());
    for (int il = 0; il < g.n_layer; ++il) {
      s.kv().export_layer(il, 0, n, k.data(), v.data());
      for (int64_t np : {int64_t(0), int64_t(1), int64_t(77), n}) {
        std::vector<float> kp((size_t)(np * row) + 1, -1.0f), vp(kp.size(), -1.0f);
        s.kv().export_layer(il, 0, np, kp.data(), vp.data());
        ASSERT_TRUE(std::equal(kp.begin(), kp.end() - 1, k.begin())) << "layer " << il << " n " << np;
        ASSERT_TRUE(std::equal(vp.begin(), vp.end() - 1, v.begin())) << "layer " << il << " n " << np;
        ASSERT_EQ(kp.back(), -1.0f);  // nothing written beyond n rows
        ASSERT_EQ(vp.back(), -1.0f);
      }
    }
    EXPECT_THROW(s.kv().export_layer(0, 0, n + 1, k.data(), v.data()), Error);
  }
}

// A prompt prefilled in two parts (a prefix, then the rest attending over the cached prefix)
// gives the same logits, bit for bit, as one prefill: each position's result does not depend on
// where the prompt was split. The same when the prefix is taken over from another session, and
// for a policy with a slow tier (its prefix K/V come back from there), whose decode then starts
// with its pre-decoding pass. Policies without a complete 16-bit copy refuse to continue. With
// fp32 and (where the build and CPU have them) bf16, int8 and AMX prefill attention.
TEST(KvPolicy, ContinuedPrefillEqualsOnePrefill) {
  NEED_STORIES();
  const Fixture& fx = *stories();
  ThreadPool pool(2);
  for (Model::PrefillAttn attn : {Model::PrefillAttn::fp32, Model::PrefillAttn::bf16, Model::PrefillAttn::int8,
                                  Model::PrefillAttn::amx}) {
    if (!fx.model->prefill_attn_supported(attn)) continue;
    fx.model->set_prefill_attn(attn);
    SCOPED_TRACE(std::string(Model::prefill_attn_name(attn)) + " attention");
    for (const KvConfig& kc : {policy("full"), policy("specache", 1, 16, 16)}) {
      Session one(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
      one.prefill(fx.prompt);
      for (int64_t split : {1, 37, 256, 299}) {
        const std::vector<int32_t> head(fx.prompt.begin(), fx.prompt.begin() + split);
        const std::vector<int32_t> tail(fx.prompt.begin() + split, fx.prompt.end());
        Session two(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
        two.prefill(head);
        two.prefill(tail);
        ASSERT_EQ(one.logits(), two.logits()) << kc.policy << " split at " << split;
        ASSERT_EQ(two.sequence(), fx.prompt);
        Session taken(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
        taken.prefill_from(one, split);
        ASSERT_EQ(taken.n_past(), split);
        taken.prefill(tail);
        ASSERT_EQ(one.logits(), taken.logits()) << kc.policy << " prefix of " << split << " taken over";
        if (split != 37) continue;
        Session ref(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
        ref.prefill(fx.prompt);
        for (int i = 0; i < 8; ++i) {
          two.decode(fx.cont[i]);
          ref.decode(fx.cont[i]);
          ASSERT_EQ(ref.logits(), two.logits()) << kc.policy << " decode step " << i;
        }
      }
    }
  }
  fx.model->set_prefill_attn(Model::PrefillAttn::fp32);
  for (const char* name : {"kivi", "streaming"}) {
    Session s(*fx.model, make_kv_policy(policy(name), fx.model->kv_geometry(512)), pool);
    s.prefill({1, 2, 3});
    EXPECT_THROW(s.prefill({4, 5}), Error) << name;
  }
  Session full(*fx.model, make_kv_policy(policy("full"), fx.model->kv_geometry(512)), pool);
  full.prefill({1, 2, 3});
  Session s(*fx.model, make_kv_policy(policy("full"), fx.model->kv_geometry(512)), pool);
  EXPECT_THROW(s.prefill_from(full, 4), Error);
}

// The same on the default model (AVX-512 / AVX2 prefill kernels, 256-row chunks): a split that
// is not a multiple of the chunk or of any tile size.
TEST(KvPolicy, SmolLM2ContinuedPrefillEqualsOnePrefill) {
  SMOLLM2_WITH_BOOK(model, prompt, 3000, 600);
  ThreadPool pool(2);
  KvConfig kc;
  for (Model::PrefillAttn attn : {Model::PrefillAttn::fp32, Model::PrefillAttn::bf16, Model::PrefillAttn::int8,
                                  Model::PrefillAttn::amx}) {
    if (!model->prefill_attn_supported(attn)) continue;
    model->set_prefill_attn(attn);
    SCOPED_TRACE(std::string(Model::prefill_attn_name(attn)) + " attention");
    Session one(*model, make_kv_policy(kc, model->kv_geometry(1024)), pool);
    one.prefill(prompt);
    Session two(*model, make_kv_policy(kc, model->kv_geometry(1024)), pool);
    two.prefill_from(one, 301);
    two.prefill(std::vector<int32_t>(prompt.begin() + 301, prompt.end()));
    ASSERT_EQ(one.logits(), two.logits());
    for (int i = 0; i < 4; ++i) {
      const int32_t t = argmax(one.logits().data(), (int)one.logits().size());
      one.decode(t);
      two.decode(t);
      ASSERT_EQ(one.logits(), two.logits()) << "decode step " << i;
    }
  }
}

TEST(KvPolicy, RejectsBadConfigurations) {
  KvGeometry g{2, 4, 2, 16, 128};
  EXPECT_THROW(make_kv_policy(policy("nonsense"), g), Error);
  EXPECT_THROW(make_kv_policy(policy("specache", 3), g), Error);
  EXPECT_THROW(make_kv_policy(policy("kivi", 1, 64, 64, 48), g), Error);
  KvConfig f = policy("specache");
  f.store = "file";
  EXPECT_THROW(make_kv_policy(f, g), Error);
  KvConfig gu = policy("specache");
  gu.guess = "draft";
  EXPECT_THROW(make_kv_policy(gu, g), Error);
}

// The same invariants on the default model (head_dim 64: the AVX-512 paths of the low-bit and
// 16-bit kernels), with a 240-token real-text prompt.
TEST(KvPolicy, SmolLM2SpecacheCoveringEverythingEqualsFullAndZeroTopkEqualsKivi) {
  const std::string path = default_model_path();
  SKIP_IF_MISSING(path);
  Fixture fx;
  fx.model = Model::load(path);
  ThreadPool pool(2);
  {
    KvConfig kc;
    Session s(*fx.model, make_kv_policy(kc, fx.model->kv_geometry(512)), pool);
    std::vector<int32_t> all = {1};
    s.prefill(all);
    const auto cont = greedy_continuation(s, 264);
    all.insert(all.end(), cont.begin(), cont.end());
    fx.prompt.assign(all.begin(), all.begin() + 240);
    fx.cont.assign(all.begin() + 240, all.end());
  }
  // 30 layers and logits of magnitude ~20: float reordering alone moves logits by a few 1e-3.
  const auto full = teacher_forced(fx, policy("full"));
  EXPECT_LT(max_abs_diff(full, teacher_forced(fx, policy("specache", 1, 512, 8, 32))), 1e-2);
  EXPECT_LT(max_abs_diff(full, teacher_forced(fx, policy("specache", 2, 0, 512, 64))), 1e-2);
  const auto kivi = teacher_forced(fx, policy("kivi", 1, 0, 8, 32));
  EXPECT_GT(max_abs_diff(full, kivi), 0.1);
  EXPECT_LT(max_abs_diff(kivi, teacher_forced(fx, policy("specache", 1, 0, 8, 32))), 1e-4);
}

// The selection rule on a synthetic cache (one layer, one head): at step 1 the real row attends
// almost only to position 100, and at step 2 the real row attends almost only to position 101
// (a copying head moving one position per step), while the speculative row's queries point
// nowhere in particular. With --kv-shift 1 the top-k chosen at step 1 holds 101, so step 2's
// real row is served in 16-bit (close to exact attention); with the paper's rule (shift 0) it
// reads 101's 1-bit value and lands far from it.
TEST(KvPolicy, ShiftedRealRowBringsTheNextCopyPosition) {
  const int d = 64;
  KvGeometry g{1, 1, 1, d, 1024};
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 1);
  const int64_t n = 512;
  std::vector<float> k((size_t)n * d), v((size_t)n * d);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<float> s1(d), s2(d);
  for (int c = 0; c < d; ++c) s1[c] = (rng() & 1) ? 3.0f : -3.0f, s2[c] = (rng() & 1) ? 3.0f : -3.0f;
  std::copy(s1.begin(), s1.end(), k.begin() + 100 * d);
  std::copy(s2.begin(), s2.end(), k.begin() + 101 * d);
  auto round16 = [](float x) { return fp16_to_fp32(fp32_to_fp16(x)); };

  ThreadPool pool(2);
  double err[2];
  for (int shift : {0, 1}) {
    KvConfig kc = policy("specache", 1, /*topk=*/4, /*window=*/64, /*group=*/64);
    kc.shift = (float)shift;
    auto kv = make_kv_policy(kc, g);
    kv->store_prefill(0, 0, n, k.data(), v.data());
    std::vector<float> allk(k), allv(v);  // what the cache holds, for the exact reference
    std::vector<float> out(2 * d);
    for (int step = 0; step < 2; ++step) {
      std::vector<float> q(2 * d), rk(2 * d), rv(2 * d);
      for (int c = 0; c < d; ++c) q[c] = step == 0 ? s1[c] : s2[c];
      for (int c = d; c < 2 * d; ++c) q[c] = nd(rng);
      for (auto& x : rk) x = 0.1f * nd(rng);
      for (auto& x : rv) x = nd(rng);
      DecodeRows rows{2, 1, kv->n_cached(), q.data(), rk.data(), rv.data()};
      kv->begin_step(2, 1);
      kv->attend(0, rows, out.data(), pool);
      kv->end_step();
      allk.insert(allk.end(), rk.begin(), rk.begin() + d);
      allv.insert(allv.end(), rv.begin(), rv.begin() + d);
      if (step == 1) {  // exact attention of this step's real row over positions 0 .. n+1
        std::vector<double> sc(n + 2), o(d, 0.0);
        double mx = -1e300, l = 0;
        for (int64_t p = 0; p < n + 2; ++p) {
          double a = 0;
          for (int c = 0; c < d; ++c) a += (double)q[c] * round16(allk[p * d + c]);
          sc[p] = a / std::sqrt((double)d), mx = std::max(mx, sc[p]);
        }
        for (int64_t p = 0; p < n + 2; ++p) {
          const double w = std::exp(sc[p] - mx);
          l += w;
          for (int c = 0; c < d; ++c) o[c] += w * round16(allv[p * d + c]);
        }
        double e = 0, ref = 0;
        for (int c = 0; c < d; ++c) e += std::pow(out[c] - o[c] / l, 2), ref += std::pow(o[c] / l, 2);
        err[shift] = std::sqrt(e / ref);
      }
    }
  }
  std::printf("relative error at step 2: shift 0 %.4f, shift 1 %.5f\n", err[0], err[1]);
  EXPECT_LT(err[1], 0.01) << "shift 1: position 101 should be in the top-k";
  EXPECT_GT(err[0], 0.1) << "shift 0: position 101 should be read at 1 bit";
}

// The selection pass reads only the key blocks whose bound (the blocks' largest numerators,
// bmax_) reaches the previous selection's threshold; the result is the unbounded pass's exactly.
// On SmolLM2 with a 2K-token real-text prompt, 40 teacher-forced steps give the same logits bit
// for bit and the same selections (reuse, recall, refetches), for both selection rules (--kv-shift
// 1 and 0), both bit widths and specache-refetch, while the bounded pass reads a fraction of the
// blocks.
TEST(KvPolicy, SmolLM2SelectionBoundsChangeNothing) {
  SMOLLM2_WITH_BOOK(model, prompt, 9000, 2048);
  ThreadPool pool(2);
  const int n = 40;
  const int64_t n_ctx = (int64_t)prompt.size() + n + 8;
  KvConfig fc;
  Session full(*model, make_kv_policy(fc, model->kv_geometry(n_ctx)), pool);
  full.prefill(prompt);
  struct Case {
    const char* name;
    int bits;
    float shift;
  };
  const Case cases[] = {{"specache", 1, 1.0f}, {"specache", 1, 0.0f}, {"specache", 2, 1.0f}, {"specache-refetch", 1, 1.0f}};
  std::vector<std::unique_ptr<Session>> on, off;
  for (const Case& c : cases) {
    KvConfig kc;
    kc.policy = c.name;
    kc.bits = c.bits;
    kc.shift = c.shift;
    on.push_back(std::make_unique<Session>(*model, make_kv_policy(kc, model->kv_geometry(n_ctx)), pool));
    kc.selection_bounds = false;
    off.push_back(std::make_unique<Session>(*model, make_kv_policy(kc, model->kv_geometry(n_ctx)), pool));
    on.back()->prefill_from(full);
    off.back()->prefill_from(full);
  }
  const std::vector<int32_t> cont = greedy_continuation(full, n);
  for (size_t i = 0; i < on.size(); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(std::string(c.name) + ":" + std::to_string(c.bits) + " shift " + std::to_string(c.shift));
    Session &a = *on[i], &b = *off[i];
    for (int step = 0; step < n; ++step) {
      ASSERT_EQ(a.logits(), b.logits()) << "step " << step;
      a.decode(cont[step]);
      b.decode(cont[step]);
    }
    const KvStats sa = a.kv().stats(), sb = b.kv().stats();
    EXPECT_EQ(sa.prefetch_reuse_rate, sb.prefetch_reuse_rate);
    EXPECT_EQ(sa.spec_recall, sb.spec_recall);
    EXPECT_EQ(sa.refetch_steps, sb.refetch_steps);
    EXPECT_EQ(sb.selection_read_share, 1.0);
    EXPECT_LT(sa.selection_read_share, 0.75);
    EXPECT_GT(sa.selection_read_share, 0.0);
    RecordProperty(std::string("selection_read_share_") + std::to_string(i), std::to_string(sa.selection_read_share));
    std::printf("%s:%d shift %.0f: the bounded selection read %.1f%% of the blocks\n", c.name, c.bits, c.shift,
                100 * sa.selection_read_share);
  }
}
