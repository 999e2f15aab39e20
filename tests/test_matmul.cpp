// matmul vs a double-precision reference for every weight type; optional timing (SPECACHE_TIMING=1).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "matmul_test_util.h"
#include "ops/matmul.h"
#include "ops/quant.h"
#include "ops/quant_ref.h"
#include "util/threadpool.h"

using namespace spc;

namespace {

const GgmlType kAllTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1,
                              GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q3_K,
                              GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};

bool is_float(GgmlType t) { return t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16; }

// Error budget, per output, normalized by |W_o| * |x_t| (Cauchy-Schwarz bound of the dot).
// Default path (fp32 activations): weights widened to fp32, fp32 accumulation only; measured
// worst cases are a few 1e-7 (budget 1e-5). Opt-in int8 activations (quantized weights): the
// activations are rounded to 8 bits per 32 (absmax), a relative error of ~1/254 per element;
// measured worst cases are ~1e-3 (budget 5e-3).
double budget(GgmlType t, bool int8) { return is_float(t) || !int8 ? 1e-5 : 5e-3; }

using Case = MatmulCase;

Case make_weights(GgmlType t, int64_t n_in, int64_t n_out, std::mt19937& rng, bool from_quantizer) {
  return make_matmul_weights(t, n_in, n_out, rng, from_quantizer);
}

void check_matmul(GgmlType t, int64_t n_in, int64_t n_out, int64_t n_tok, ThreadPool& pool, const Case& c,
                  std::mt19937& rng, bool int8 = false) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(n_tok * n_in);
  for (auto& v : x) v = nd(rng);
  if (n_tok > 2) x[5] = 40.f;  // an outlier in one block
  std::vector<float> y(n_tok * n_out, NAN);
  matmul(WeightView{t, n_in, n_out, c.w.data()}, x.data(), n_tok, y.data(), pool, int8);
  double worst = 0;
  for (int64_t tt = 0; tt < n_tok; ++tt) {
    double xn = 0;
    for (int64_t i = 0; i < n_in; ++i) xn += (double)x[tt * n_in + i] * x[tt * n_in + i];
    xn = std::sqrt(xn);
    for (int64_t o = 0; o < n_out; ++o) {
      double want = 0;
      for (int64_t i = 0; i < n_in; ++i) want += c.wd[o * n_in + i] * x[tt * n_in + i];
      const double got = y[tt * n_out + o];
      ASSERT_TRUE(std::isfinite(got)) << "token " << tt << " row " << o;
      const double denom = c.wnorm[o] * xn;
      const double e = denom > 0 ? std::fabs(got - want) / denom : std::fabs(got - want);
      worst = std::max(worst, e);
    }
  }
  EXPECT_LE(worst, budget(t, int8)) << (int8 ? "int8 " : "fp32 ") << type_name(t) << " n_in=" << n_in << " n_out=" << n_out << " n_tok=" << n_tok
                              << " threads=" << pool.size();
}

}  // namespace

TEST(Matmul, AllTypesMatchReference) {
  std::mt19937 rng(42);
  ThreadPool pool1(1), pool2(2);
  for (GgmlType t : kAllTypes) {
    for (int64_t n_in : {256, 512, 1536}) {
      const int64_t n_out = 67;
      const Case c = make_weights(t, n_in, n_out, rng, false);
      for (int64_t n_tok : {1, 2, 3, 7, 8, 9, 33}) {
        check_matmul(t, n_in, n_out, n_tok, pool1, c, rng);
        check_matmul(t, n_in, n_out, n_tok, pool2, c, rng);
      }
    }
  }
}

// The decode shapes of SmolLM2-135M (n_in 576 and 1536; row counts a multiple of the 4-row
// tile and not), single and two-token steps (the SpeCache real + speculative rows), every type,
// with inputs from the quantizer (realistic scales) and from random payloads.
TEST(Matmul, DecodeShapesOneAndTwoTokens) {
  std::mt19937 rng(5);
  ThreadPool pool1(1), pool2(2);
  for (GgmlType t : kAllTypes) {
    for (auto [n_in, n_out] : std::vector<std::pair<int64_t, int64_t>>{{576, 192}, {576, 197}, {1536, 64}}) {
      if (n_in % type_traits(t).block_size != 0) continue;
      for (bool from_quantizer : {false, true}) {
        const Case c = make_weights(t, n_in, n_out, rng, from_quantizer);
        for (int64_t n_tok : {1, 2}) {
          check_matmul(t, n_in, n_out, n_tok, pool1, c, rng);
          check_matmul(t, n_in, n_out, n_tok, pool2, c, rng);
        }
      }
    }
  }
}

// matmul_many gives exactly what separate matmul calls give, with fp32 or int8 activations: fused
// (one dispatch) when all matrices have a fused decode kernel and the same n_in, separate calls
// otherwise.
TEST(Matmul, ManySharedInputEqualsSeparateCalls) {
  std::mt19937 rng(9);
  ThreadPool pool(2);
  const int64_t n_in = 576;
  const std::vector<std::vector<std::pair<GgmlType, int64_t>>> sets = {
      {{GgmlType::Q4_1, 576}, {GgmlType::Q4_1, 192}, {GgmlType::Q4_1, 197}},  // SmolLM2's q, k, v (+ a ragged one)
      {{GgmlType::Q8_0, 1536}, {GgmlType::Q8_0, 1536}},
      {{GgmlType::Q4_0, 64}, {GgmlType::Q4_1, 100}},   // mixed types, same activation layout: fused
      {{GgmlType::Q4_1, 64}, {GgmlType::Q8_0, 61}},    // mixed types: separate calls on AVX-512 (one permuted, one not), one fused call on AVX2
      {{GgmlType::Q4_0, 96}, {GgmlType::F16, 40}},     // a type without a fused kernel: separate calls
      {{GgmlType::Q5_1, 33}},
  };
  std::normal_distribution<float> nd(0.f, 1.f);
  for (bool int8 : {false, true})
  for (const auto& set : sets)
    for (int64_t n_tok : {1, 2, 5, 40}) {
      std::vector<Case> cs;
      std::vector<WeightView> ws;
      for (auto [t, n_out] : set) cs.push_back(make_weights(t, n_in, n_out, rng, true));
      for (size_t i = 0; i < set.size(); ++i) ws.push_back({set[i].first, n_in, set[i].second, cs[i].w.data()});
      std::vector<float> x((size_t)(n_tok * n_in));
      for (auto& v : x) v = nd(rng);
      std::vector<std::vector<float>> got(set.size()), want(set.size());
      std::vector<float*> ys;
      for (size_t i = 0; i < set.size(); ++i) {
        got[i].assign((size_t)(n_tok * set[i].second), -1.f);
        want[i].assign(got[i].size(), -2.f);
        ys.push_back(got[i].data());
        matmul(ws[i], x.data(), n_tok, want[i].data(), pool, int8);
      }
      matmul_many(ws.data(), ys.data(), (int)ws.size(), x.data(), n_tok, pool, int8);
      for (size_t i = 0; i < set.size(); ++i)
        ASSERT_EQ(got[i], want[i]) << "set of " << set.size() << " n_tok " << n_tok << " int8 " << int8;
    }
}

// The opt-in int8-activation path keeps its (looser) budget.
TEST(Matmul, Int8ActivationsMatchReference) {
  std::mt19937 rng(11);
  ThreadPool pool1(1), pool2(2);
  for (GgmlType t : kAllTypes) {
    if (is_float(t)) continue;
    for (int64_t n_in : {256, 1536}) {
      const Case c = make_weights(t, n_in, 67, rng, false);
      for (int64_t n_tok : {1, 2, 3, 7, 8, 9, 33}) {
        check_matmul(t, n_in, 67, n_tok, pool1, c, rng, true);
        check_matmul(t, n_in, 67, n_tok, pool2, c, rng, true);
      }
    }
  }
}

// dequantize_row (AVX-512 fast paths for the 32-element block types) is bit-identical to the
// unpacked form: sc * (u - offset) + mn, evaluated as one fused multiply-add where the build
// contracts it (FMA hardware), as the generic path is.
TEST(Matmul, DequantizeRowMatchesUnpackedForm) {
  std::mt19937 rng(9);
  for (GgmlType t : kAllTypes) {
    if (is_float(t)) continue;
    const int64_t n = 512;
    const auto row = quant_test_random_row(t, n, rng);
    std::vector<float> got(n);
    dequantize_row(t, row.data(), got.data(), n);
    std::vector<uint8_t> u(n);
    std::vector<float> sc8(n / 4), mn2(n / 16);
    detail::unpack_row(t, row.data(), n, u.data(), sc8.data(), mn2.data());
    const float off = (float)detail::unpack_offset(t);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = i / 32, h = (i % 32) / 16;
#if defined(__FMA__)
      const float want = std::fma(sc8[v * 8 + h * 4], (float)u[i] - off, mn2[v * 2 + h]);
#else
      const float want = sc8[v * 8 + h * 4] * ((float)u[i] - off) + mn2[v * 2 + h];
#endif
      uint32_t a, b;
      std::memcpy(&a, &got[i], 4);
      std::memcpy(&b, &want, 4);
      ASSERT_EQ(a, b) << type_name(t) << " element " << i << ": " << got[i] << " vs " << want;
    }
  }
}

TEST(Matmul, QuantizerWeightsAndOddShapes) {
  std::mt19937 rng(7);
  ThreadPool pool(2);
  for (GgmlType t : kAllTypes) {
    const int64_t bs = type_traits(t).block_size;
    const int64_t n_in = bs == 256 ? 768 : (bs == 32 ? 96 : 101);  // odd block counts / odd length
    for (int64_t n_out : {1, 5, 130}) {
      const Case c = make_weights(t, n_in, n_out, rng, true);
      for (int64_t n_tok : {1, 4, 9, 21, 70}) check_matmul(t, n_in, n_out, n_tok, pool, c, rng);
    }
  }
}

TEST(Matmul, DequantizeRows) {
  std::mt19937 rng(3);
  const Case c = make_weights(GgmlType::Q4_K, 512, 9, rng, false);
  std::vector<float> dst(3 * 512);
  dequantize_rows(WeightView{GgmlType::Q4_K, 512, 9, c.w.data()}, 4, 3, dst.data());
  for (int64_t i = 0; i < 3 * 512; ++i) ASSERT_NEAR(dst[i], c.wd[4 * 512 + i], 1e-6 * (1 + std::fabs(c.wd[4 * 512 + i])));
  EXPECT_THROW(dequantize_rows(WeightView{GgmlType::Q4_K, 512, 9, c.w.data()}, 8, 2, dst.data()), std::exception);
}

TEST(Matmul, RejectsBadShapes) {
  ThreadPool pool(1);
  std::vector<uint8_t> w(1024);
  std::vector<float> x(64), y(64);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q4_K, 128, 1, w.data()}, x.data(), 1, y.data(), pool), std::exception);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_K, 256, 1, w.data()}, x.data(), 1, y.data(), pool), std::exception);
}

// Throughput report; asserts nothing about speed. Run with SPECACHE_TIMING=1.
namespace {
double best_seconds(const WeightView& wv, const float* x, int64_t n_tok, float* y, ThreadPool& pool, bool int8) {
  matmul(wv, x, n_tok, y, pool, int8);
  // Best of many calls: the machine may be shared, and the minimum is the least disturbed.
  double sec = 1e30, el = 0;
  const auto t0 = std::chrono::steady_clock::now();
  do {
    const auto c0 = std::chrono::steady_clock::now();
    matmul(wv, x, n_tok, y, pool, int8);
    const auto c1 = std::chrono::steady_clock::now();
    sec = std::min(sec, std::chrono::duration<double>(c1 - c0).count());
    el = std::chrono::duration<double>(c1 - t0).count();
  } while (el < 0.3);
  return sec;
}
struct TimingShape {
  GgmlType t;
  int64_t n_in, n_out;
};
std::vector<uint8_t> timing_weights(const TimingShape& s, std::mt19937& rng) {
  const size_t rs = row_size(s.t, s.n_in);
  std::vector<uint8_t> w(rs * s.n_out);
  std::vector<float> tmp(s.n_in);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t o = 0; o < s.n_out; ++o) {
    for (auto& v : tmp) v = nd(rng);
    quantize_row(s.t, tmp.data(), w.data() + o * rs, s.n_in);
  }
  return w;
}
void report(const TimingShape& s, size_t bytes, int64_t n_tok, int threads, bool int8, double sec) {
  const double gbs = (double)bytes / sec / 1e9;
  const double gmacs = (double)s.n_in * s.n_out * n_tok / sec / 1e9;
  std::printf("%-5s %5lld x %5lld n_tok=%3lld threads=%d %s: best %9.3f ms  %7.2f GB/s weights  %8.2f GMAC/s\n",
              type_name(s.t), (long long)s.n_out, (long long)s.n_in, (long long)n_tok, threads,
              int8 ? "int8" : "fp32", sec * 1e3, gbs, gmacs);
}
}  // namespace

TEST(Matmul, Timing) {
  if (!std::getenv("SPECACHE_TIMING")) GTEST_SKIP() << "set SPECACHE_TIMING=1 to print matmul throughput";
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  // Decode shapes of the default model, fp32 vs int8 activations, 1 and 2 threads.
  {
    ThreadPool pool1(1), pool2(2);
    const TimingShape focus[] = {{GgmlType::Q8_0, 576, 49152}, {GgmlType::Q4_1, 576, 1536}, {GgmlType::Q4_1, 1536, 576}};
    for (const TimingShape& s : focus) {
      const auto w = timing_weights(s, rng);
      const WeightView wv{s.t, s.n_in, s.n_out, w.data()};
      for (int64_t n_tok : {1, 2}) {
        std::vector<float> x(n_tok * s.n_in), y(n_tok * s.n_out);
        for (auto& v : x) v = nd(rng);
        for (ThreadPool* p : {&pool1, &pool2})
          for (bool int8 : {false, true})
            report(s, w.size(), n_tok, (int)p->size(), int8, best_seconds(wv, x.data(), n_tok, y.data(), *p, int8));
      }
    }
  }
  const int threads = std::getenv("SPECACHE_THREADS") ? std::atoi(std::getenv("SPECACHE_THREADS")) : 2;
  ThreadPool pool(threads);
  const TimingShape shapes[] = {{GgmlType::Q4_1, 576, 1536}, {GgmlType::Q4_1, 1536, 576}, {GgmlType::Q8_0, 576, 49152},
                                {GgmlType::Q8_0, 576, 1536}, {GgmlType::Q4_0, 576, 1536}, {GgmlType::Q4_K, 1536, 576},
                                {GgmlType::Q5_K, 1536, 576}, {GgmlType::Q6_K, 1536, 576}, {GgmlType::F16, 576, 1536},
                                {GgmlType::F32, 576, 1536}};
  for (const TimingShape& s : shapes) {
    const auto w = timing_weights(s, rng);
    const WeightView wv{s.t, s.n_in, s.n_out, w.data()};
    for (int64_t n_tok : {1, 2, 4, 8, 32, 512}) {
      std::vector<float> x(n_tok * s.n_in), y(n_tok * s.n_out);
      for (auto& v : x) v = nd(rng);
      report(s, w.size(), n_tok, threads, false, best_seconds(wv, x.data(), n_tok, y.data(), pool, false));
      if (!is_float(s.t))
        report(s, w.size(), n_tok, threads, true, best_seconds(wv, x.data(), n_tok, y.data(), pool, true));
    }
  }
}
