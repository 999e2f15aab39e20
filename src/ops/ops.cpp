#include "ops/ops.h"

#include <cmath>

#include "ops/vec_math.h"
#include "util/error.h"

namespace spc {

void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps) {
  const double ss = vec_sumsq_f64(x, n);
  const float scale = (float)(1.0 / std::sqrt(ss / (double)n + (double)eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

void silu_mul(float* g, const float* u, int64_t n) { vec_silu_mul(g, u, n); }

void add_inplace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void softmax_inplace(float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  const float inv = (float)(1.0 / s);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void rope_tables(const RopeParams& rp, const int64_t* pos, int64_t n_pos, std::vector<float>& cos_out,
                 std::vector<float>& sin_out) {
  const int half = rp.n_rot / 2;
  SPC_ASSERT(rp.freq_factors.empty() || (int)rp.freq_factors.size() == half);
  cos_out.resize((size_t)(n_pos * half));
  sin_out.resize((size_t)(n_pos * half));
  for (int i = 0; i < half; ++i) {
    double inv_freq = std::pow((double)rp.freq_base, -2.0 * i / rp.n_rot);
    if (!rp.freq_factors.empty()) inv_freq /= rp.freq_factors[i];
    for (int64_t p = 0; p < n_pos; ++p) {
      const double theta = (double)pos[p] * rp.freq_scale * inv_freq;
      cos_out[p * half + i] = (float)std::cos(theta);
      sin_out[p * half + i] = (float)std::sin(theta);
    }
  }
}

void rope_apply(const RopeParams& rp, float* x, int64_t n_pos, int n_heads, int head_dim, const float* cos_t,
                const float* sin_t) {
  const int half = rp.n_rot / 2;
  for (int64_t p = 0; p < n_pos; ++p) {
    const float* c = cos_t + p * half;
    const float* s = sin_t + p * half;
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (p * n_heads + h) * head_dim;
      if (rp.neox) {
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = a * s[i] + b * c[i];
        }
      } else {
        for (int i = 0; i < half; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * c[i] - b * s[i];
          v[2 * i + 1] = a * s[i] + b * c[i];
        }
      }
    }
  }
}

}  // namespace spc
