// Int8 matmuls over the row-interleaved copy (i8x8_repack, matmul_i8x8.cpp; decode, and prefill
// with Model::set_int8_prefill): the same
// integer dot products and scales as the row-major int8 kernels, so the two agree to float
// summation order; both stay within the int8 budget of a double-precision reference. Also the
// joint dispatch of matmul_many and the shapes and types without an interleaved layout.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "matmul_test_util.h"
#include "ops/matmul.h"
#include "ops/matmul_kernels.h"
#include "ops/quant.h"
#include "util/error.h"
#include "util/threadpool.h"

using namespace spc;


namespace {

const GgmlType kTypes[] = {GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0};

bool have_kernel() { return i8x8_bytes(WeightView{GgmlType::Q4_1, 64, 8, nullptr}) > 0; }

struct Mat : MatmulCase {
  std::vector<uint8_t> il;  // the interleaved copy
  GgmlType type;
  int64_t n_in, n_out;
  WeightView plain() const { return WeightView{type, n_in, n_out, w.data()}; }
  WeightView inter() const {
    WeightView v = plain();
    v.i8x8 = il.data();
    return v;
  }
};

// m.w holds the n_out rows of type t: sets the shape and builds the interleaved copy.
void attach_copy(Mat& m, GgmlType t, int64_t n_in, int64_t n_out) {
  m.type = t, m.n_in = n_in, m.n_out = n_out;
  m.il.resize(i8x8_bytes(m.plain()));
  i8x8_repack(m.plain(), m.il.data());
}

Mat make(GgmlType t, int64_t n_in, int64_t n_out, std::mt19937& rng, bool from_quantizer) {
  Mat m;
  static_cast<MatmulCase&>(m) = make_matmul_weights(t, n_in, n_out, rng, from_quantizer);
  attach_copy(m, t, n_in, n_out);
  return m;
}

std::vector<float> random_x(int64_t n_tok, int64_t n_in, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(n_tok * n_in);
  for (auto& v : x) v = nd(rng);
  // An outlier in one block (where the row has enough blocks to keep the int8 rounding of that
  // block's other elements within the reference budget).
  if (n_in >= 256) x[3] = 30.f;
  return x;
}

}  // namespace

TEST(MatmulI8x8, MatchesRowMajorInt8AndReference) {
  if (!have_kernel()) GTEST_SKIP() << "this build has no interleaved int8 kernel (needs AVX2)";
  std::mt19937 rng(11);
  ThreadPool pool1(1), pool2(2);
  for (GgmlType t : kTypes) {
    for (auto [n_in, n_out] : std::vector<std::pair<int64_t, int64_t>>{{32, 8}, {576, 192}, {1536, 64}, {576, 200}}) {
      for (bool from_quantizer : {false, true}) {
        const Mat m = make(t, n_in, n_out, rng, from_quantizer);
        ASSERT_EQ(m.il.size(), m.w.size()) << "the interleaved copy holds the same bytes, rearranged";
        for (int64_t n_tok : {1, 2, 3, 4, 5, 8, 9, 37}) {  // > kTileT: blocks of groups (prefill)
          const std::vector<float> x = random_x(n_tok, n_in, rng);
          for (ThreadPool* pool : {&pool1, &pool2}) {
            std::vector<float> yi(n_tok * n_out, NAN), yr(n_tok * n_out, NAN);
            matmul(m.inter(), x.data(), n_tok, yi.data(), *pool, /*int8_activations=*/true);
            matmul(m.plain(), x.data(), n_tok, yr.data(), *pool, /*int8_activations=*/true);
            double worst_pair = 0, worst_ref = 0;
            for (int64_t tt = 0; tt < n_tok; ++tt) {
              double xn = 0;
              for (int64_t i = 0; i < n_in; ++i) xn += (double)x[tt * n_in + i] * x[tt * n_in + i];
              xn = std::sqrt(xn);
              for (int64_t o = 0; o < n_out; ++o) {
                const double got = yi[tt * n_out + o];
                ASSERT_TRUE(std::isfinite(got)) << "token " << tt << " row " << o;
                double want = 0;
                for (int64_t i = 0; i < n_in; ++i) want += m.wd[o * n_in + i] * x[tt * n_in + i];
                const double denom = std::max(m.wnorm[o] * xn, 1e-30);
                worst_pair = std::max(worst_pair, std::fabs(got - yr[tt * n_out + o]) / denom);
                worst_ref = std::max(worst_ref, std::fabs(got - want) / denom);
              }
            }
            const auto where = testing::Message() << type_name(t) << " " << n_out << "x" << n_in << " n_tok=" << n_tok
                                                  << " threads=" << pool->size();
            // Same integers and scales; only the order of the float sums differs.
            EXPECT_LE(worst_pair, 1e-5) << where;
            EXPECT_GT(worst_pair + worst_ref, 0.0) << where;
            EXPECT_LE(worst_ref, 5e-3) << where;  // the int8 budget of tests/test_matmul.cpp
          }
        }
      }
    }
  }
}

// The largest products the kernels can meet: codes at the top of their range (Q4: 15; Q8_0: 127,
// stored as u8 255) against activations at +-127, the int8 extreme, on every element but one per
// block. Plain AVX2 sums these through vpmaddubsw in int16 (Q8_0 by nibbles), where a saturating
// or wrapping sum would be off by thousands; the inputs are exact in every format (d = 1, x = +-1
// quantizes to +-127 with scale 1/127), so the result must equal the double product to float
// rounding. Decode (1-2 tokens) and prefill sizes.
TEST(MatmulI8x8, ExtremeCodesAndActivationsAreExact) {
  if (!have_kernel()) GTEST_SKIP() << "this build has no interleaved int8 kernel (needs AVX2)";
  ThreadPool pool(2);
  const int64_t n_in = 256, n_out = 16;
  for (GgmlType t : kTypes) {
    // Row values: hi everywhere, lo at one element per block (which sets the block's range).
    const float hi = t == GgmlType::Q4_1 ? 15.f : t == GgmlType::Q4_0 ? 7.f : 127.f;
    const float lo = t == GgmlType::Q4_1 ? 0.f : t == GgmlType::Q4_0 ? -8.f : -127.f;
    const size_t rs = row_size(t, n_in);
    Mat m;
    m.w.resize(rs * n_out);
    std::vector<float> row(n_in), wd(n_in * n_out);
    for (int64_t o = 0; o < n_out; ++o) {
      for (int64_t i = 0; i < n_in; ++i) row[i] = i % 32 == o % 32 ? lo : hi;
      quantize_row(t, row.data(), m.w.data() + o * rs, n_in);
      dequantize_row(t, m.w.data() + o * rs, wd.data() + o * n_in, n_in);
      for (int64_t i = 0; i < n_in; ++i) ASSERT_EQ(wd[o * n_in + i], row[i]) << type_name(t) << ": inexact weights";
    }
    attach_copy(m, t, n_in, n_out);
    for (int64_t n_tok : {1, 2, 37}) {
      std::vector<float> x(n_tok * n_in);
      for (int64_t tt = 0; tt < n_tok; ++tt)
        for (int64_t i = 0; i < n_in; ++i) x[tt * n_in + i] = (tt % 2 == 0) == (i % 64 < 48) ? 1.f : -1.f;
      std::vector<float> y(n_tok * n_out, NAN);
      matmul(m.inter(), x.data(), n_tok, y.data(), pool, /*int8_activations=*/true);
      for (int64_t tt = 0; tt < n_tok; ++tt)
        for (int64_t o = 0; o < n_out; ++o) {
          double want = 0;
          for (int64_t i = 0; i < n_in; ++i) want += (double)wd[o * n_in + i] * x[tt * n_in + i];
          ASSERT_NEAR(y[tt * n_out + o], want, 1e-5 * n_in * hi)
              << type_name(t) << " n_tok=" << n_tok << " token " << tt << " row " << o;
        }
    }
  }
}

// matmul_many over interleaved copies is one dispatch over all matrices' 8-row groups; it must
// give exactly what separate calls give (the same kernel on the same groups).
// Prefill sizes on AMX-INT8 tiles (pairs of 8-row groups, 16-token tiles) give the vpdpbusd
// kernels' results bit for bit: ragged token tiles, an odd group left over in a thread's range,
// both thread counts, and through matmul_many.
TEST(MatmulI8x8, AmxPairsEqualVnniBitForBit) {
  if (!have_kernel() || !matmul_amx_active())
    GTEST_SKIP() << "no AMX int8 matmul here (needs a CPU with AMX-INT8, Linux's permission for its tile state and "
                    "an AVX-512 VNNI build)";
  std::mt19937 rng(14);
  ThreadPool pool1(1), pool2(2);
  for (GgmlType t : kTypes)
    for (auto [n_in, n_out] : std::vector<std::pair<int64_t, int64_t>>{{576, 192}, {1536, 40}, {32, 8}, {64, 24}}) {
      const Mat m = make(t, n_in, n_out, rng, true);
      for (int64_t n_tok : {25, 26, 31, 45, 256}) {  // AMX from kAmxMinTokens = 25 on
        const std::vector<float> x = random_x(n_tok, n_in, rng);
        for (ThreadPool* pool : {&pool1, &pool2}) {
          std::vector<float> ya(n_tok * n_out, NAN), yv(n_tok * n_out, NAN);
          matmul(m.inter(), x.data(), n_tok, ya.data(), *pool, true);
          set_matmul_amx(false);
          matmul(m.inter(), x.data(), n_tok, yv.data(), *pool, true);
          set_matmul_amx(true);
          for (size_t i = 0; i < ya.size(); ++i)
            ASSERT_EQ(ya[i], yv[i]) << type_name(t) << " " << n_out << "x" << n_in << " n_tok=" << n_tok << " threads "
                                    << pool->size() << " output " << i;
        }
      }
    }
  const Mat a = make(GgmlType::Q4_1, 576, 576, rng, true), b = make(GgmlType::Q4_1, 576, 192, rng, true);
  const WeightView ws[2] = {a.inter(), b.inter()};
  const std::vector<float> x = random_x(33, 576, rng);
  std::vector<float> ja(33 * 576), jb(33 * 192), sa(ja.size()), sb(jb.size());
  float* ys[2] = {ja.data(), jb.data()};
  matmul_many(ws, ys, 2, x.data(), 33, pool2, true);
  set_matmul_amx(false);
  matmul(ws[0], x.data(), 33, sa.data(), pool2, true);
  matmul(ws[1], x.data(), 33, sb.data(), pool2, true);
  set_matmul_amx(true);
  for (size_t i = 0; i < ja.size(); ++i) ASSERT_EQ(ja[i], sa[i]) << i;
  for (size_t i = 0; i < jb.size(); ++i) ASSERT_EQ(jb[i], sb[i]) << i;
}

// The decode kernel for two groups at once (512-bit registers, AVX-512 VNNI builds) gives two
// one-group passes' results bit for bit: every type, 1..kTileT tokens, extreme activations and
// scales of both signs.
TEST(MatmulI8x8, GroupPairsEqualOneGroupPassesBitForBit) {
  if (!have_kernel() || mmk::i8x8_pair_for(GgmlType::Q4_1) == nullptr)
    GTEST_SKIP() << "no two-group decode kernel in this build (needs AVX-512 VNNI)";
  std::mt19937 rng(31);
  for (GgmlType t : kTypes)
    for (int64_t n_in : {32, 576}) {
      const Mat m = make(t, n_in, 16, rng, true);
      const int64_t nb = n_in / 32;
      const size_t rec = mmk::i8x8_record_bytes(t);
      for (int T = 1; T <= mmk::kTileT; ++T) {
        std::vector<int8_t> xq((size_t)(T * n_in));
        std::vector<float> xd((size_t)(T * nb)), xs((size_t)(T * nb));
        for (size_t i = 0; i < xq.size(); ++i) xq[i] = (int8_t)(i % 7 == 0 ? (i % 2 ? 127 : -128) : (int)(rng() % 255) - 127);
        std::normal_distribution<float> nd(0.f, 3.f);
        for (auto& v : xd) v = nd(rng);
        for (auto& v : xs) v = nd(rng) * 40.f;
        std::vector<float> yp((size_t)(T * 16), NAN), ys((size_t)(T * 16), NAN);
        mmk::i8x8_pair_for(t)(m.il.data(), m.il.data() + (size_t)nb * rec, nb, xq.data(), xd.data(), xs.data(), n_in,
                              T, yp.data(), 16);
        const mmk::I8x8Fn one = mmk::i8x8_for(t, T);
        one(m.il.data(), nb, xq.data(), xd.data(), xs.data(), n_in, ys.data(), 16);
        one(m.il.data() + (size_t)nb * rec, nb, xq.data(), xd.data(), xs.data(), n_in, ys.data() + 8, 16);
        for (size_t i = 0; i < yp.size(); ++i)
          ASSERT_EQ(std::memcmp(&yp[i], &ys[i], sizeof(float)), 0)
              << type_name(t) << " n_in " << n_in << " T " << T << " output " << i << ": " << yp[i] << " vs " << ys[i];
      }
    }
}

TEST(MatmulI8x8, ManyEqualsSeparateCalls) {
  if (!have_kernel()) GTEST_SKIP() << "this build has no interleaved int8 kernel (needs AVX2)";
  std::mt19937 rng(12);
  ThreadPool pool(2);
  const Mat a = make(GgmlType::Q4_1, 576, 576, rng, true), b = make(GgmlType::Q4_1, 576, 192, rng, true),
            c = make(GgmlType::Q8_0, 576, 64, rng, true);
  const WeightView ws[3] = {a.inter(), b.inter(), c.inter()};
  for (int64_t n_tok : {1, 2}) {
    const std::vector<float> x = random_x(n_tok, 576, rng);
    std::vector<std::vector<float>> joint(3), sep(3);
    float* ys[3];
    for (int i = 0; i < 3; ++i) {
      joint[i].assign(n_tok * ws[i].n_out, NAN);
      sep[i].assign(n_tok * ws[i].n_out, NAN);
      ys[i] = joint[i].data();
    }
    matmul_many(ws, ys, 3, x.data(), n_tok, pool, true);
    for (int i = 0; i < 3; ++i) {
      matmul(ws[i], x.data(), n_tok, sep[i].data(), pool, true);
      for (size_t j = 0; j < sep[i].size(); ++j) ASSERT_EQ(joint[i][j], sep[i][j]) << "matrix " << i << " output " << j;
    }
  }
}

// Where there is no interleaved layout (other types, row counts not a multiple of 8), the size is
// 0 and repacking is a clear error. fp32 activations at decode sizes read the copy too (the
// row-block path, not the fused kernels over the row-major data): the same values up to the
// order of the float sums.
TEST(MatmulI8x8, UnsupportedShapesAndTypes) {
  std::vector<uint8_t> buf(row_size(GgmlType::Q4_1, 64) * 12);
  EXPECT_EQ(i8x8_bytes(WeightView{GgmlType::Q4_1, 64, 12, buf.data()}), 0u);
  EXPECT_EQ(i8x8_bytes(WeightView{GgmlType::Q5_0, 64, 8, buf.data()}), 0u);
  EXPECT_EQ(i8x8_bytes(WeightView{GgmlType::F16, 64, 8, buf.data()}), 0u);
  EXPECT_EQ(i8x8_bytes(WeightView{GgmlType::Q4_K, 256, 8, buf.data()}), 0u);
  EXPECT_THROW(i8x8_repack(WeightView{GgmlType::Q4_1, 64, 12, buf.data()}, buf.data()), Error);
  if (!have_kernel()) return;
  std::mt19937 rng(13);
  ThreadPool pool(2);
  const Mat m = make(GgmlType::Q4_1, 576, 64, rng, true);
  const std::vector<float> x = random_x(2, 576, rng);
  std::vector<float> yi(2 * 64), yr(2 * 64);
  std::vector<uint8_t> garbage(m.w.size(), 0x5A);
  WeightView copy_only = m.inter();
  copy_only.data = garbage.data();
  matmul(copy_only, x.data(), 2, yi.data(), pool, /*int8_activations=*/false);
  matmul(m.plain(), x.data(), 2, yr.data(), pool, /*int8_activations=*/false);
  for (size_t i = 0; i < yi.size(); ++i) EXPECT_NEAR(yi[i], yr[i], 1e-4f + 1e-5f * std::fabs(yr[i])) << i;
}

// With the interleaved copy, the model releases the row-major pages, so every path must read the
// copy: rows rebuilt by i8x8_unpack_row are the original bytes, and the prefill paths (row blocks
// dequantized to fp32, or the interleaved kernels for int8 activations) and the row lookups give
// bit-identical results with the row-major data replaced by garbage (the decode sizes: the test
// above).
TEST(MatmulI8x8, CopyServesPrefillAndRowLookups) {
  if (!have_kernel()) GTEST_SKIP() << "this build has no interleaved int8 kernel (needs AVX2)";
  std::mt19937 rng(14);
  ThreadPool pool(2);
  for (GgmlType t : kTypes) {
    const int64_t n_in = 256, n_out = 40;  // 40 rows: two full prefill row blocks of 16 and a partial one
    const Mat m = make(t, n_in, n_out, rng, true);
    const size_t rs = row_size(t, n_in);
    std::vector<uint8_t> row(rs);
    for (int64_t r = 0; r < n_out; ++r) {
      i8x8_unpack_row(m.inter(), r, row.data());
      ASSERT_EQ(0, std::memcmp(row.data(), m.w.data() + r * rs, rs)) << type_name(t) << " row " << r;
    }
    EXPECT_THROW(i8x8_unpack_row(m.inter(), n_out, row.data()), Error);
    EXPECT_THROW(i8x8_unpack_row(m.plain(), 0, row.data()), Error);

    std::vector<uint8_t> garbage(m.w.size(), 0xA5);
    WeightView copy_only = m.inter();
    copy_only.data = garbage.data();

    std::vector<float> a(20 * n_in), b(20 * n_in);
    dequantize_rows(m.plain(), 13, 20, a.data());
    dequantize_rows(copy_only, 13, 20, b.data());
    EXPECT_EQ(a, b) << type_name(t) << ": dequantize_rows";

    const int64_t n_tok = 33;  // > the decode kernels' token limit: the prefill paths
    const std::vector<float> x = random_x(n_tok, n_in, rng);
    std::vector<float> ya(n_tok * n_out), yb(n_tok * n_out), yc(n_tok * n_out);
    // fp32 activations: row blocks rebuilt from the copy, bit for bit the row-major result.
    matmul(m.plain(), x.data(), n_tok, ya.data(), pool, false);
    matmul(copy_only, x.data(), n_tok, yb.data(), pool, false);
    EXPECT_EQ(ya, yb) << type_name(t) << ": prefill matmul, fp32 activations";
    // int8 activations: the interleaved kernels, which read only the copy (the same result with
    // the row-major bytes replaced by garbage), and agree with the row-major int8 path up to the
    // order of the float sums.
    matmul(m.plain(), x.data(), n_tok, ya.data(), pool, true);
    matmul(m.inter(), x.data(), n_tok, yb.data(), pool, true);
    matmul(copy_only, x.data(), n_tok, yc.data(), pool, true);
    EXPECT_EQ(yb, yc) << type_name(t) << ": prefill matmul, int8 activations";
    for (size_t i = 0; i < ya.size(); ++i)
      ASSERT_NEAR(yb[i], ya[i], 1e-4f * (1.0f + std::fabs(ya[i]))) << type_name(t) << " output " << i;
  }
}

// What --act auto asks: SIMD int8 decode kernels exist for the block types on every SIMD level
// (the interleaved ones for these three) and never for float weights.
TEST(MatmulI8x8, Int8KernelAvailability) {
  for (GgmlType t : {GgmlType::F32, GgmlType::F16, GgmlType::BF16}) EXPECT_FALSE(has_int8_decode_kernel(t)) << type_name(t);
  if (have_kernel()) {
    for (GgmlType t : kTypes) EXPECT_TRUE(has_int8_decode_kernel(t)) << type_name(t);
  }
#if defined(__AVX2__) && defined(__FMA__)
  for (GgmlType t : kTypes) EXPECT_TRUE(has_int8_decode_kernel(t)) << type_name(t);
#endif
}
