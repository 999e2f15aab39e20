// Low-bit KV codec: quantization, dequantization, scalar packed kernels, references, dispatch.
// Layouts and formulas: see lowbit.h.
#include "kv/lowbit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "util/error.h"
#include "util/fp16.h"

namespace spc {

namespace {

constexpr int kMaxDim = 256;

// Stored parameters of one quantization group, plus what the encoder needs.
struct GroupParams {
  fp16_t s16, z16;
  float s, z;  // fp16-rounded values, as the decoder sees them
  float inv;   // 1/s, or 0 for a degenerate group
};

constexpr float kF16Max = 65504.0f;

inline GroupParams group_params(int bits, float mn, float mx) {
  // Saturate to the fp16 range so z and s stay finite (values beyond it reconstruct as +-65504).
  mn = std::min(std::max(mn, -kF16Max), kF16Max);
  mx = std::min(std::max(mx, -kF16Max), kF16Max);
  float sf, zf;
  if (!(mx > mn)) {
    sf = 0.0f;
    zf = mn;  // degenerate: reconstruct fp16(mn) exactly
  } else if (bits == 2) {
    zf = mn;
    sf = (mx - mn) / 3.0f;
  } else {
    zf = (3.0f * mn + mx) * 0.25f;
    sf = (mx - mn) * 0.5f;
  }
  GroupParams p;
  p.s16 = fp32_to_fp16(sf);
  p.z16 = fp32_to_fp16(zf);
  p.s = fp16_to_fp32(p.s16);
  p.z = fp16_to_fp32(p.z16);
  p.inv = p.s > 0.0f ? 1.0f / p.s : 0.0f;
  return p;
}

inline int encode(float x, const GroupParams& p, int maxc) {
  const float v = std::floor((x - p.z) * p.inv + 0.5f);
  // Clamp in float first (v may be huge or -huge), then convert.
  return (int)std::min(std::max(v, 0.0f), (float)maxc);
}

inline uint64_t load_word(const uint8_t* p, int g) {
  if (g == 64) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
  }
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

inline float load_f16(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

}  // namespace

void LowBitSpec::validate() const {
  SPC_CHECK(bits == 1 || bits == 2, "low-bit KV: bits must be 1 or 2, got %d", bits);
  SPC_CHECK(group == 32 || group == 64, "low-bit KV: group must be 32 or 64, got %d", group);
  SPC_CHECK(head_dim >= 1 && head_dim <= kMaxDim, "low-bit KV: head_dim must be in [1, %d], got %d", kMaxDim,
            head_dim);
}

// ---------------------------------------------------------------------------------------------
// Keys

void lowbit_quantize_keys(const LowBitSpec& spec, const float* k, size_t k_stride, uint8_t* block) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits, maxc = (1 << bits) - 1;
  float mn[kMaxDim], mx[kMaxDim];
  for (int c = 0; c < d; ++c) mn[c] = mx[c] = k[c];
  for (int t = 1; t < g; ++t) {
    const float* row = k + (size_t)t * k_stride;
    for (int c = 0; c < d; ++c) {
      mn[c] = std::min(mn[c], row[c]);
      mx[c] = std::max(mx[c], row[c]);
    }
  }
  GroupParams prm[kMaxDim];
  for (int c = 0; c < d; ++c) prm[c] = group_params(bits, mn[c], mx[c]);

  uint64_t words[2][kMaxDim] = {};
  for (int t = 0; t < g; ++t) {
    const float* row = k + (size_t)t * k_stride;
    for (int c = 0; c < d; ++c) {
      const uint64_t code = (uint64_t)encode(row[c], prm[c], maxc);
      words[0][c] |= (code & 1) << t;
      if (bits == 2) words[1][c] |= (code >> 1) << t;
    }
  }
  const size_t W = spec.key_word_bytes();
  uint8_t* out = block;
  for (int b = 0; b < bits; ++b)
    for (int c = 0; c < d; ++c, out += W) {
      if (g == 64) {
        std::memcpy(out, &words[b][c], 8);
      } else {
        const uint32_t w = (uint32_t)words[b][c];
        std::memcpy(out, &w, 4);
      }
    }
  for (int c = 0; c < d; ++c) std::memcpy(out + 2 * c, &prm[c].s16, 2);
  out += 2 * (size_t)d;
  for (int c = 0; c < d; ++c) std::memcpy(out + 2 * c, &prm[c].z16, 2);
}

void lowbit_dequantize_keys(const LowBitSpec& spec, const uint8_t* block, float* k) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits;
  const size_t W = spec.key_word_bytes();
  const uint8_t* sp = block + (size_t)bits * d * W;
  const uint8_t* zp = sp + 2 * (size_t)d;
  for (int c = 0; c < d; ++c) {
    const float s = load_f16(sp + 2 * c), z = load_f16(zp + 2 * c);
    const uint64_t w0 = load_word(block + (size_t)c * W, g);
    const uint64_t w1 = bits == 2 ? load_word(block + (size_t)(d + c) * W, g) : 0;
    for (int t = 0; t < g; ++t) {
      const int code = (int)((w0 >> t) & 1) | (int)(((w1 >> t) & 1) << 1);
      k[(size_t)t * d + c] = z + s * (float)code;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Values

void lowbit_quantize_value(const LowBitSpec& spec, const float* v, uint8_t* out) {
  spec.validate();
  const int d = spec.head_dim, bits = spec.bits, maxc = (1 << bits) - 1;
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  const size_t pb = spec.value_plane_bytes();
  uint8_t* planes = out;
  std::memset(planes, 0, (size_t)bits * pb);
  uint8_t* sp = out + (size_t)bits * pb;
  uint8_t* zp = sp + 2 * (size_t)ng;
  for (int gi = 0; gi < ng; ++gi) {
    const int c0 = gi * gv, c1 = std::min(d, c0 + gv);
    float mn = v[c0], mx = v[c0];
    for (int c = c0 + 1; c < c1; ++c) {
      mn = std::min(mn, v[c]);
      mx = std::max(mx, v[c]);
    }
    const GroupParams prm = group_params(bits, mn, mx);
    std::memcpy(sp + 2 * gi, &prm.s16, 2);
    std::memcpy(zp + 2 * gi, &prm.z16, 2);
    for (int c = c0; c < c1; ++c) {
      const int code = encode(v[c], prm, maxc);
      planes[c >> 3] |= (uint8_t)((code & 1) << (c & 7));
      if (bits == 2) planes[pb + (c >> 3)] |= (uint8_t)((code >> 1) << (c & 7));
    }
  }
}

void lowbit_dequantize_value(const LowBitSpec& spec, const uint8_t* in, float* v) {
  spec.validate();
  const int d = spec.head_dim, bits = spec.bits;
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  const size_t pb = spec.value_plane_bytes();
  const uint8_t* sp = in + (size_t)bits * pb;
  const uint8_t* zp = sp + 2 * (size_t)ng;
  for (int gi = 0; gi < ng; ++gi) {
    const float s = load_f16(sp + 2 * gi), z = load_f16(zp + 2 * gi);
    const int c0 = gi * gv, c1 = std::min(d, c0 + gv);
    for (int c = c0; c < c1; ++c) {
      int code = (in[c >> 3] >> (c & 7)) & 1;
      if (bits == 2) code |= ((in[pb + (c >> 3)] >> (c & 7)) & 1) << 1;
      v[c] = z + s * (float)code;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar packed kernels

namespace lowbit_detail {

void score_keys_scalar(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits;
  const size_t W = spec.key_word_bytes(), bb = spec.key_block_bytes();
  float s[kMaxDim], z[kMaxDim], qs[2][kMaxDim];
  for (int blk = 0; blk < n_blocks; ++blk) {
    const uint8_t* block = blocks + (size_t)blk * bb;
    const uint8_t* sp = block + (size_t)bits * d * W;
    const uint8_t* zp = sp + 2 * (size_t)d;
    for (int c = 0; c < d; ++c) {
      s[c] = load_f16(sp + 2 * c);
      z[c] = load_f16(zp + 2 * c);
    }
    for (int iq = 0; iq < n_q; ++iq) {
      const float* qr = q + (size_t)iq * q_stride;
      float qz = 0.0f;
      for (int c = 0; c < d; ++c) {
        qs[0][c] = qr[c] * s[c];
        qs[1][c] = 2.0f * qs[0][c];
        qz += qr[c] * z[c];
      }
      float* out = scores + (size_t)iq * score_stride + (size_t)blk * g;
      for (int t = 0; t < g; ++t) out[t] = qz;
      for (int b = 0; b < bits; ++b)
        for (int c = 0; c < d; ++c) {
          uint64_t w = load_word(block + (size_t)(b * d + c) * W, g);
          const float a = qs[b][c];
          while (w) {
            out[__builtin_ctzll(w)] += a;
            w &= w - 1;
          }
        }
    }
  }
}

void accumulate_values_scalar(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride) {
  spec.validate();
  const int d = spec.head_dim, bits = spec.bits;
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  const size_t pb = spec.value_plane_bytes(), tb = spec.value_token_bytes();
  float code[kMaxDim];  // the token's codes as floats (0..3), shared by all rows
  for (int t = 0; t < n_tok; ++t) {
    const uint8_t* tok = values + (size_t)t * tb;
    const uint8_t* sp = tok + (size_t)bits * pb;
    const uint8_t* zp = sp + 2 * (size_t)ng;
    for (int c = 0; c < d; ++c) {
      int cd = (tok[c >> 3] >> (c & 7)) & 1;
      if (bits == 2) cd |= ((tok[pb + (c >> 3)] >> (c & 7)) & 1) << 1;
      code[c] = (float)cd;
    }
    for (int gi = 0; gi < ng; ++gi) {
      const float s = load_f16(sp + 2 * gi), z = load_f16(zp + 2 * gi);
      const int c0 = gi * gv, c1 = std::min(d, c0 + gv);
      for (int iq = 0; iq < n_q; ++iq) {
        const float pt = p[(size_t)iq * p_stride + t];
        const float a = pt * s, bz = pt * z;
        float* o = out + (size_t)iq * out_stride;
        for (int c = c0; c < c1; ++c) o[c] += bz + a * code[c];
      }
    }
  }
}

bool score_keys_simd(const LowBitSpec& spec) {
#if defined(__AVX512F__)
  (void)spec;
  return true;
#else
  (void)spec;
  return false;
#endif
}

bool accumulate_values_simd(const LowBitSpec& spec) {
#if defined(__AVX512F__)
  return spec.head_dim % 16 == 0;
#else
  (void)spec;
  return false;
#endif
}

}  // namespace lowbit_detail

// ---------------------------------------------------------------------------------------------
// Dispatch

void lowbit_score_keys(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride) {
  if (n_blocks <= 0 || n_q <= 0) return;
#if defined(__AVX512F__)
  if (lowbit_detail::score_keys_simd(spec)) {
    lowbit_detail::score_keys_avx512(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride);
    return;
  }
#endif
  lowbit_detail::score_keys_scalar(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride);
}

void lowbit_accumulate_values(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride) {
  if (n_tok <= 0 || n_q <= 0) return;
#if defined(__AVX512F__)
  if (lowbit_detail::accumulate_values_simd(spec)) {
    lowbit_detail::accumulate_values_avx512(spec, values, n_tok, p, n_q, p_stride, out, out_stride);
    return;
  }
#endif
  lowbit_detail::accumulate_values_scalar(spec, values, n_tok, p, n_q, p_stride, out, out_stride);
}

// ---------------------------------------------------------------------------------------------
// References

void lowbit_score_keys_ref(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                           size_t q_stride, float* scores, size_t score_stride) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group;
  std::vector<float> k((size_t)g * d);
  for (int blk = 0; blk < n_blocks; ++blk) {
    lowbit_dequantize_keys(spec, blocks + (size_t)blk * spec.key_block_bytes(), k.data());
    for (int iq = 0; iq < n_q; ++iq)
      for (int t = 0; t < g; ++t) {
        double acc = 0.0;
        for (int c = 0; c < d; ++c) acc += (double)q[(size_t)iq * q_stride + c] * (double)k[(size_t)t * d + c];
        scores[(size_t)iq * score_stride + (size_t)blk * g + t] = (float)acc;
      }
  }
}

void lowbit_accumulate_values_ref(const LowBitSpec& spec, const uint8_t* values, int n_tok, const float* p,
                                  int n_q, size_t p_stride, float* out, size_t out_stride) {
  spec.validate();
  const int d = spec.head_dim;
  std::vector<float> v((size_t)d);
  std::vector<double> acc((size_t)n_q * d, 0.0);
  for (int t = 0; t < n_tok; ++t) {
    lowbit_dequantize_value(spec, values + (size_t)t * spec.value_token_bytes(), v.data());
    for (int iq = 0; iq < n_q; ++iq) {
      const double pt = p[(size_t)iq * p_stride + t];
      for (int c = 0; c < d; ++c) acc[(size_t)iq * d + c] += pt * (double)v[c];
    }
  }
  for (int iq = 0; iq < n_q; ++iq)
    for (int c = 0; c < d; ++c) out[(size_t)iq * out_stride + c] += (float)acc[(size_t)iq * d + c];
}

}  // namespace spc
