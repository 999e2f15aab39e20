// Small element-wise ops of the forward pass (fp32). Each has a plain loop the compiler vectorizes.
#pragma once
#include <cstdint>
#include <vector>

namespace spc {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], for one row of n.
void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps);

// y[i] = silu(g[i]) * u[i]  (SwiGLU), in place into g.
void silu_mul(float* g, const float* u, int64_t n);

// y += x
void add_inplace(float* y, const float* x, int64_t n);

// Numerically stable softmax in place; returns nothing. n >= 1.
void softmax_inplace(float* x, int64_t n);

// Rotary position embedding tables for a set of positions.
struct RopeParams {
  int n_rot = 0;            // rotated dims per head (<= head_dim, even)
  float freq_base = 10000;  // theta
  float freq_scale = 1;     // linear scaling: position * freq_scale
  bool neox = false;        // false: pairs (2i, 2i+1) ("normal"); true: pairs (i, i + n_rot/2)
  std::vector<float> freq_factors;  // optional per-pair divisors (Llama 3.1 rope_freqs), size n_rot/2
};

// cos/sin for each position: cs[p][i] = {cos, sin} of pos[p] * inv_freq[i], i < n_rot/2.
void rope_tables(const RopeParams& rp, const int64_t* pos, int64_t n_pos, std::vector<float>& cos_out,
                 std::vector<float>& sin_out);

// Applies the rotation in place to n_pos rows of n_heads heads of head_dim each; row stride = n_heads*head_dim.
void rope_apply(const RopeParams& rp, float* x, int64_t n_pos, int n_heads, int head_dim, const float* cos_t,
                const float* sin_t);

}  // namespace spc
