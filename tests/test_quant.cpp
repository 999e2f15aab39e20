// Dequantizers vs the double-precision reference, and quantize -> dequantize round trips.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "ops/quant.h"
#include "ops/quant_ref.h"
#include "util/fp16.h"

using namespace spc;

namespace {

const GgmlType kAllTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1,
                              GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q3_K,
                              GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};

// Byte offsets of the fp16 scale fields in a block of each quantized type.
std::vector<int> scale_fields(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: case GgmlType::Q5_0: case GgmlType::Q8_0: return {0};
    case GgmlType::Q4_1: case GgmlType::Q5_1: case GgmlType::Q4_K: case GgmlType::Q5_K: return {0, 2};
    case GgmlType::Q2_K: return {80, 82};
    case GgmlType::Q3_K: return {108};
    case GgmlType::Q6_K: return {208};
    default: return {};
  }
}

}  // namespace

// Random row of n elements: random payload bytes, sane finite fp16 scales (either sign).
// Also used by test_matmul.cpp.
std::vector<uint8_t> quant_test_random_row(GgmlType t, int64_t n, std::mt19937& rng) {
  const TypeTraits& tr = type_traits(t);
  std::vector<uint8_t> buf(row_size(t, n));
  std::uniform_real_distribution<float> val(-2.f, 2.f);
  if (t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16) {
    for (int64_t i = 0; i < n; ++i) {
      const float f = val(rng);
      if (t == GgmlType::F32) std::memcpy(&buf[4 * i], &f, 4);
      else {
        const uint16_t h = t == GgmlType::F16 ? fp32_to_fp16(f) : fp32_to_bf16(f);
        std::memcpy(&buf[2 * i], &h, 2);
      }
    }
    return buf;
  }
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f);
  for (auto& b : buf) b = (uint8_t)byte(rng);
  for (int64_t b = 0; b < n / tr.block_size; ++b)
    for (int off : scale_fields(t)) {
      const float s = scale(rng) * (byte(rng) & 1 ? 1.f : -1.f);
      const uint16_t h = fp32_to_fp16(s);
      std::memcpy(&buf[b * tr.type_size + off], &h, 2);
    }
  return buf;
}

TEST(Quant, DequantizeMatchesReference) {
  std::mt19937 rng(1234);
  for (GgmlType t : kAllTypes) {
    SCOPED_TRACE(type_name(t));
    const int64_t bs = type_traits(t).block_size;
    for (int64_t nblocks : {1, 3, 7}) {
      const int64_t n = (bs == 1 ? 97 : bs) * nblocks;
      const auto row = quant_test_random_row(t, n, rng);
      std::vector<float> got(n);
      dequantize_row(t, row.data(), got.data(), n);
      const auto want = ref::dequantize_row(t, row.data(), n);
      // Within 1e-6 relative to the largest magnitude in the block (exact products of
      // fp16 scale and integer code; the asymmetric types add a min term).
      const int64_t blk = bs == 1 ? 1 : bs;
      for (int64_t b0 = 0; b0 < n; b0 += blk) {
        double mx = 0;
        for (int64_t i = b0; i < b0 + blk; ++i) mx = std::max(mx, std::fabs(want[i]));
        for (int64_t i = b0; i < b0 + blk; ++i)
          ASSERT_LE(std::fabs(got[i] - want[i]), 1e-6 * mx) << "element " << i << " got " << got[i] << " want " << want[i];
      }
    }
  }
}

// Normalized RMS error budget of quantize -> dequantize on Gaussian data, per type.
static double roundtrip_budget(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1e-3;
    case GgmlType::BF16: return 5e-3;
    case GgmlType::Q8_0: return 0.01;
    case GgmlType::Q6_K: return 0.03;
    case GgmlType::Q5_0: case GgmlType::Q5_1: case GgmlType::Q5_K: return 0.06;
    case GgmlType::Q4_0: case GgmlType::Q4_1: case GgmlType::Q4_K: return 0.12;
    case GgmlType::Q3_K: return 0.25;
    case GgmlType::Q2_K: return 0.5;
    default: return 0;
  }
}

static double nrms(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0, s = 0;
  for (size_t i = 0; i < a.size(); ++i) e += (a[i] - b[i]) * (double)(a[i] - b[i]), s += a[i] * (double)a[i];
  return s == 0 ? std::sqrt(e) : std::sqrt(e / s);
}

TEST(Quant, RoundTripWithinBudget) {
  std::mt19937 rng(99);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n = 256 * 5;
  for (GgmlType t : kAllTypes) {
    SCOPED_TRACE(type_name(t));
    std::vector<float> x(n), y(n);
    for (auto& v : x) v = nd(rng) * 0.3f + 0.05f;
    std::vector<uint8_t> q(row_size(t, n));
    quantize_row(t, x.data(), q.data(), n);
    dequantize_row(t, q.data(), y.data(), n);
    const double err = nrms(x, y);
    EXPECT_LE(err, roundtrip_budget(t));
    // The encoded bytes must also decode identically through the reference decoder.
    const auto r = ref::dequantize_row(t, q.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(r[i], y[i], 1e-5 * (1 + std::fabs(r[i])));
  }
}

TEST(Quant, RoundTripDegenerateRows) {
  const int64_t n = 512;
  for (GgmlType t : kAllTypes) {
    SCOPED_TRACE(type_name(t));
    std::vector<uint8_t> q(row_size(t, n));
    std::vector<float> y(n);
    std::vector<float> zeros(n, 0.f);
    quantize_row(t, zeros.data(), q.data(), n);
    dequantize_row(t, q.data(), y.data(), n);
    for (float v : y) ASSERT_EQ(v, 0.f);
    for (float c : {0.5f, -2.f, 1e-3f, 37.f}) {
      std::vector<float> x(n, c);
      quantize_row(t, x.data(), q.data(), n);
      dequantize_row(t, q.data(), y.data(), n);
      // fp16 scales: ~1e-3; BF16 values: 8 mantissa bits; K types: 6-bit sub-block scales
      // under an fp16 super-block scale that is subnormal for the tiny constant.
      const bool k_type = type_traits(t).block_size == 256;
      EXPECT_LE(nrms(x, y), k_type ? 1e-2 : t == GgmlType::BF16 ? 5e-3 : 2e-3) << "constant " << c;
    }
    // A row with one large outlier and zeros elsewhere.
    std::vector<float> x(n, 0.f);
    x[77] = 5.f;
    quantize_row(t, x.data(), q.data(), n);
    dequantize_row(t, q.data(), y.data(), n);
    EXPECT_LE(nrms(x, y), 5e-3);
  }
}

TEST(Quant, RejectsBadLengths) {
  std::vector<float> x(33);
  std::vector<uint8_t> q(64);
  EXPECT_THROW(quantize_row(GgmlType::Q4_0, x.data(), q.data(), 33), std::exception);
  EXPECT_THROW(dequantize_row(GgmlType::Q4_K, q.data(), x.data(), 32), std::exception);
  EXPECT_THROW(dequantize_row(GgmlType::Q8_K, q.data(), x.data(), 256), std::exception);
}
