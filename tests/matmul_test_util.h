// Random quantized weight matrices for the matmul tests, with their double-precision dequantized
// values and per-row norms (the reference and the error normalization).
#pragma once
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "ops/quant.h"
#include "ops/quant_ref.h"

// Defined in test_quant.cpp: random payload bytes with sane fp16 scales.
std::vector<uint8_t> quant_test_random_row(spc::GgmlType t, int64_t n, std::mt19937& rng);

struct MatmulCase {
  std::vector<uint8_t> w;
  std::vector<double> wd;     // reference weights
  std::vector<double> wnorm;  // per row
};

// n_out rows of n_in elements of type t: quantized from N(0, 0.1) values (from_quantizer), or
// random payloads (quant_test_random_row).
inline MatmulCase make_matmul_weights(spc::GgmlType t, int64_t n_in, int64_t n_out, std::mt19937& rng,
                                      bool from_quantizer) {
  MatmulCase c;
  const size_t rs = spc::row_size(t, n_in);
  c.w.resize(rs * n_out);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> tmp(n_in);
  for (int64_t o = 0; o < n_out; ++o) {
    if (from_quantizer) {
      for (auto& v : tmp) v = nd(rng) * 0.1f;
      spc::quantize_row(t, tmp.data(), c.w.data() + o * rs, n_in);
    } else {
      const auto row = quant_test_random_row(t, n_in, rng);
      std::copy(row.begin(), row.end(), c.w.begin() + o * rs);
    }
    const auto r = spc::ref::dequantize_row(t, c.w.data() + o * rs, n_in);
    double s = 0;
    for (double v : r) s += v * v;
    c.wnorm.push_back(std::sqrt(s));
    c.wd.insert(c.wd.end(), r.begin(), r.end());
  }
  return c;
}
