// Low-bit KV codec: quantization, dequantization, scalar packed kernels, references, dispatch.
// Layouts, formulas and the kernels' integer method: see lowbit.h.
#include "kv/lowbit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/vec_math.h"
#include "util/error.h"
#include "util/fp16.h"
#include "util/prefetch.h"

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

// n <= 8 bytes, little-endian.
inline uint64_t load_bytes(const uint8_t* p, size_t n) {
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  return w;
}
inline void store_bytes(uint8_t* p, uint64_t w, size_t n) { std::memcpy(p, &w, n); }

inline float load_f16(const uint8_t* p) {
  fp16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

}  // namespace

namespace lowbit_detail {
float key_scale_levels(int bits) { return bits == 1 ? 255.0f : 85.0f; }
}  // namespace lowbit_detail

namespace {

using lowbit_detail::key_scale_levels;

// Codes of one block (0 .. 3): keys [c][t], values [t][c].
using KeyCodes = uint8_t[kMaxDim][64];
using ValueCodes = uint8_t[64][kMaxDim];

// Key planes (lowbit.h): full channel quads as 64-bit words (bit 4t+k) per 16-token chunk, then
// the tail quad of r = d % 4 channels as a 16r-bit field (bit r*t+k) per chunk.
void pack_key_codes(const LowBitSpec& spec, const KeyCodes& codes, uint8_t* block) {
  const int d = spec.head_dim, J = spec.group / 16, nq4 = d / 4, r = d % 4;
  for (int b = 0; b < spec.bits; ++b) {
    uint8_t* out = block + (size_t)b * spec.key_plane_bytes();
    for (int u = 0; u < nq4; ++u)
      for (int j = 0; j < J; ++j, out += 8) {
        uint64_t w = 0;
        for (int t = 0; t < 16; ++t)
          for (int k = 0; k < 4; ++k) w |= (uint64_t)((codes[4 * u + k][16 * j + t] >> b) & 1) << (4 * t + k);
        store_bytes(out, w, 8);
      }
    for (int j = 0; j < J && r > 0; ++j, out += 2 * r) {
      uint64_t w = 0;
      for (int t = 0; t < 16; ++t)
        for (int k = 0; k < r; ++k) w |= (uint64_t)((codes[4 * nq4 + k][16 * j + t] >> b) & 1) << (r * t + k);
      store_bytes(out, w, 2 * (size_t)r);
    }
  }
}

void unpack_key_codes(const LowBitSpec& spec, const uint8_t* block, KeyCodes& codes) {
  const int d = spec.head_dim, g = spec.group, J = g / 16, nq4 = d / 4, r = d % 4;
  for (int c = 0; c < d; ++c) std::memset(codes[c], 0, (size_t)g);
  for (int b = 0; b < spec.bits; ++b) {
    const uint8_t* in = block + (size_t)b * spec.key_plane_bytes();
    for (int u = 0; u < nq4; ++u)
      for (int j = 0; j < J; ++j, in += 8) {
        const uint64_t w = load_bytes(in, 8);
        for (int i = 0; i < 64; ++i) codes[4 * u + i % 4][16 * j + i / 4] |= (uint8_t)(((w >> i) & 1) << b);
      }
    for (int j = 0; j < J && r > 0; ++j, in += 2 * r) {
      const uint64_t w = load_bytes(in, 2 * (size_t)r);
      for (int i = 0; i < 16 * r; ++i) codes[4 * nq4 + i % r][16 * j + i / r] |= (uint8_t)(((w >> i) & 1) << b);
    }
  }
}

// Value planes (lowbit.h): per token quad a record of the full 16-channel chunks as 64-bit words
// (bit 4c+k), then the tail chunk of r = d % 16 channels in ceil(r/2) bytes.
void pack_value_codes(const LowBitSpec& spec, const ValueCodes& codes, uint8_t* block) {
  const int d = spec.head_dim, G4 = spec.group / 4, M16 = d / 16, r = d % 16;
  const size_t tail_bytes = ((size_t)r + 1) / 2;
  for (int b = 0; b < spec.bits; ++b) {
    uint8_t* out = block + (size_t)b * spec.value_plane_bytes();
    for (int i = 0; i < G4; ++i)
      for (int m = 0; m < M16 + (r > 0); ++m) {
        const int nc = m < M16 ? 16 : r;
        const size_t nb = m < M16 ? 8 : tail_bytes;
        uint64_t w = 0;
        for (int c = 0; c < nc; ++c)
          for (int k = 0; k < 4; ++k) w |= (uint64_t)((codes[4 * i + k][16 * m + c] >> b) & 1) << (4 * c + k);
        store_bytes(out, w, nb);
        out += nb;
      }
  }
}

void unpack_value_codes(const LowBitSpec& spec, const uint8_t* block, ValueCodes& codes) {
  const int d = spec.head_dim, g = spec.group, M16 = d / 16, r = d % 16;
  const size_t tail_bytes = ((size_t)r + 1) / 2;
  for (int t = 0; t < g; ++t) std::memset(codes[t], 0, (size_t)d);
  for (int b = 0; b < spec.bits; ++b) {
    const uint8_t* in = block + (size_t)b * spec.value_plane_bytes();
    for (int i = 0; i < g / 4; ++i)
      for (int m = 0; m < M16 + (r > 0); ++m) {
        const int nc = m < M16 ? 16 : r;
        const size_t nb = m < M16 ? 8 : tail_bytes;
        const uint64_t w = load_bytes(in, nb);
        in += nb;
        for (int c = 0; c < nc; ++c)
          for (int k = 0; k < 4; ++k) codes[4 * i + k][16 * m + c] |= (uint8_t)(((w >> (4 * c + k)) & 1) << b);
      }
  }
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

  KeyCodes codes;
  for (int t = 0; t < g; ++t) {
    const float* row = k + (size_t)t * k_stride;
    for (int c = 0; c < d; ++c) codes[c][t] = (uint8_t)encode(row[c], prm[c], maxc);
  }
  pack_key_codes(spec, codes, block);
  uint8_t* sp = block + (size_t)bits * spec.key_plane_bytes();
  uint8_t* zp = sp + 2 * (size_t)d;
  for (int c = 0; c < d; ++c) {
    std::memcpy(sp + 2 * c, &prm[c].s16, 2);
    std::memcpy(zp + 2 * c, &prm[c].z16, 2);
  }
}

void lowbit_dequantize_keys(const LowBitSpec& spec, const uint8_t* block, float* k) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group;
  KeyCodes codes;
  unpack_key_codes(spec, block, codes);
  const uint8_t* sp = block + (size_t)spec.bits * spec.key_plane_bytes();
  const uint8_t* zp = sp + 2 * (size_t)d;
  for (int c = 0; c < d; ++c) {
    const float s = load_f16(sp + 2 * c), z = load_f16(zp + 2 * c);
    for (int t = 0; t < g; ++t) k[(size_t)t * d + c] = z + s * (float)codes[c][t];
  }
}

// ---------------------------------------------------------------------------------------------
// Values

void lowbit_quantize_values(const LowBitSpec& spec, const float* v, size_t v_stride, uint8_t* block) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits, maxc = (1 << bits) - 1;
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  uint8_t* sp = block + (size_t)bits * spec.value_plane_bytes();
  uint8_t* zp = sp + 2 * (size_t)ng * g;
  ValueCodes codes;
  for (int t = 0; t < g; ++t) {
    const float* row = v + (size_t)t * v_stride;
    for (int gi = 0; gi < ng; ++gi) {
      const int c0 = gi * gv, c1 = std::min(d, c0 + gv);
      float mn = row[c0], mx = row[c0];
      for (int c = c0 + 1; c < c1; ++c) {
        mn = std::min(mn, row[c]);
        mx = std::max(mx, row[c]);
      }
      const GroupParams prm = group_params(bits, mn, mx);
      std::memcpy(sp + 2 * ((size_t)gi * g + t), &prm.s16, 2);
      std::memcpy(zp + 2 * ((size_t)gi * g + t), &prm.z16, 2);
      for (int c = c0; c < c1; ++c) codes[t][c] = (uint8_t)encode(row[c], prm, maxc);
    }
  }
  pack_value_codes(spec, codes, block);
}

void lowbit_dequantize_value(const LowBitSpec& spec, const uint8_t* block, int t, float* v) {
  spec.validate();
  SPC_ASSERT(t >= 0 && t < spec.group);
  const int d = spec.head_dim, g = spec.group, M16 = d / 16, r = d % 16;
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  const size_t R = spec.value_record_bytes(), tail_bytes = ((size_t)r + 1) / 2;
  const uint8_t* sp = block + (size_t)spec.bits * spec.value_plane_bytes();
  const uint8_t* zp = sp + 2 * (size_t)ng * g;
  int code[kMaxDim] = {};
  for (int b = 0; b < spec.bits; ++b) {
    const uint8_t* rec = block + (size_t)b * spec.value_plane_bytes() + (size_t)(t / 4) * R;
    for (int m = 0; m < M16 + (r > 0); ++m) {
      const int nc = m < M16 ? 16 : r;
      const uint64_t w = load_bytes(rec + (size_t)m * 8, m < M16 ? 8 : tail_bytes) >> (t % 4);
      for (int c = 0; c < nc; ++c) code[16 * m + c] |= (int)((w >> (4 * c)) & 1) << b;
    }
  }
  for (int gi = 0; gi < ng; ++gi) {
    const float s = load_f16(sp + 2 * ((size_t)gi * g + t)), z = load_f16(zp + 2 * ((size_t)gi * g + t));
    for (int c = gi * gv, c1 = std::min(d, c + gv); c < c1; ++c) v[c] = z + s * (float)code[c];
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar packed kernels: the integer method of lowbit.h, with the same quantized weights as the
// AVX-512 and AVX2 kernels (the same float operations, rne rounding), so all agree to fp32 rounding.

namespace lowbit_detail {

int key_code(const LowBitSpec& spec, const uint8_t* block, int t, int c) {
  const int J = spec.group / 16, nq4 = spec.head_dim / 4, r = spec.head_dim % 4;
  const int u = c / 4, k = c % 4, j = t / 16, tt = t % 16;
  int code = 0;
  for (int b = 0; b < spec.bits; ++b) {
    const uint8_t* plane = block + (size_t)b * spec.key_plane_bytes();
    uint64_t bit;
    if (u < nq4) {
      bit = load_bytes(plane + (size_t)(u * J + j) * 8, 8) >> (4 * tt + k);
    } else {
      bit = load_bytes(plane + (size_t)nq4 * J * 8 + (size_t)j * 2 * r, 2 * (size_t)r) >> (r * tt + k);
    }
    code |= (int)(bit & 1) << b;
  }
  return code;
}

int value_code(const LowBitSpec& spec, const uint8_t* block, int t, int c) {
  const int M16 = spec.head_dim / 16, r = spec.head_dim % 16;
  const int m = c / 16, cc = c % 16;
  int code = 0;
  for (int b = 0; b < spec.bits; ++b) {
    const uint8_t* rec =
        block + (size_t)b * spec.value_plane_bytes() + (size_t)(t / 4) * spec.value_record_bytes() + (size_t)m * 8;
    const uint64_t w = load_bytes(rec, m < M16 ? 8 : ((size_t)r + 1) / 2);
    code |= (int)((w >> (4 * cc + t % 4)) & 1) << b;
  }
  return code;
}

void score_keys_scalar(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits;
  const float h = 0.5f * (float)((1 << bits) - 1), lim = key_scale_levels(bits);
  const size_t bb = spec.key_block_bytes();
  float s[kMaxDim], zc[kMaxDim];
  int qs[kMaxDim];  // qq_c * sq_c
  int32_t acc[64];
  KeyCodes codes;
  for (int blk = 0; blk < n_blocks; ++blk) {
    const uint8_t* block = blocks + (size_t)blk * bb;
    const uint8_t* sp = block + (size_t)bits * spec.key_plane_bytes();
    const uint8_t* zp = sp + 2 * (size_t)d;
    // u8 key scales sq_c = rne(s_c * lim/smax), step as = smax/lim (shared by the rows).
    float smax = 0.0f;
    for (int c = 0; c < d; ++c) {
      s[c] = load_f16(sp + 2 * c);
      zc[c] = load_f16(zp + 2 * c) + h * s[c];
      smax = std::max(smax, s[c]);
    }
    const float invs = smax > 0.0f ? lim / smax : 0.0f, as = smax / lim;
    unpack_key_codes(spec, block, codes);
    for (int iq = 0; iq < n_q; ++iq) {
      const float* qr = q + (size_t)iq * q_stride;
      // int8 query qq_c = rne(q_c * 127/qmax), step aq = qmax/127 (per row, the same for every block).
      float qmax = 0.0f;
      for (int c = 0; c < d; ++c) qmax = std::max(qmax, std::fabs(qr[c]));
      const float invq = qmax > 0.0f ? 127.0f / qmax : 0.0f, aq = qmax / 127.0f;
      const float A = aq * as;
      float qz = 0.0f;
      int sum_qs = 0;
      for (int c = 0; c < d; ++c) {
        qs[c] = (int)std::nearbyint(qr[c] * invq) * (int)std::nearbyint(s[c] * invs);
        sum_qs += qs[c];
        qz += qr[c] * zc[c];
      }
      qz -= h * A * (float)sum_qs;
      std::fill(acc, acc + g, 0);
      for (int c = 0; c < d; ++c)
        for (int t = 0; t < g; ++t) acc[t] += qs[c] * (int32_t)codes[c][t];
      float* out = scores + (size_t)iq * score_stride + (size_t)blk * g;
      for (int t = 0; t < g; ++t) out[t] = qz + A * (float)acc[t];
    }
  }
}

void accumulate_values_scalar(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group, bits = spec.bits, maxc = (1 << bits) - 1;
  const int gv = spec.value_group(), ng = spec.value_ngroups();
  const float h = 0.5f * (float)maxc;
  const size_t vb = spec.value_block_bytes();
  ValueCodes codes;  // then the centred codes 2*code - maxc as int8
  float s[8][64], zc[8][64];
  float facc[kMaxDim], zsum[8];
  int32_t acc[kMaxDim];
  int uq[8 * 64];  // [group][t]
  for (int iq = 0; iq < n_q; ++iq) {
    const float* pr = p + (size_t)iq * p_stride;
    std::fill(facc, facc + d, 0.0f);
    std::fill(zsum, zsum + ng, 0.0f);
    for (int blk = 0; blk < n_blocks; ++blk) {
      const uint8_t* block = values.block(blk, vb);
      const uint8_t* sp = block + (size_t)bits * spec.value_plane_bytes();
      const uint8_t* zp = sp + 2 * (size_t)ng * g;
      unpack_value_codes(spec, block, codes);
      for (int t = 0; t < g; ++t)
        for (int c = 0; c < d; ++c) codes[t][c] = (uint8_t)(int8_t)(2 * codes[t][c] - maxc);
      for (int gi = 0; gi < ng; ++gi)
        for (int t = 0; t < g; ++t) {
          s[gi][t] = load_f16(sp + 2 * ((size_t)gi * g + t));
          zc[gi][t] = load_f16(zp + 2 * ((size_t)gi * g + t)) + h * s[gi][t];
        }
      const float* pb = pr + (size_t)blk * g;
      // u8 weights: uq = rne(p_t*s_t * 255/M), step b = M/255.
      float mx = 0.0f;
      for (int t = 0; t < g; ++t) {
        SPC_CHECK(!(pb[t] < 0.0f), "low-bit values: weights must be >= 0, got %g", (double)pb[t]);
        for (int gi = 0; gi < ng; ++gi) {
          mx = std::max(mx, pb[t] * s[gi][t]);
          zsum[gi] += pb[t] * zc[gi][t];
        }
      }
      const float inv = mx > 0.0f ? 255.0f / mx : 0.0f, half_b = 0.5f * (mx / 255.0f);
      for (int gi = 0; gi < ng; ++gi)
        for (int t = 0; t < g; ++t) uq[(size_t)gi * g + t] = (int)std::nearbyint(pb[t] * s[gi][t] * inv);
      std::fill(acc, acc + d, 0);
      for (int t = 0; t < g; ++t)
        for (int c = 0; c < d; ++c) acc[c] += uq[(size_t)(c / gv) * g + t] * (int32_t)(int8_t)codes[t][c];
      for (int c = 0; c < d; ++c) facc[c] += half_b * (float)acc[c];
    }
    float* o = out + (size_t)iq * out_stride;
    for (int c = 0; c < d; ++c) o[c] += facc[c] + zsum[c / gv];
  }
}

bool score_keys_simd(const LowBitSpec& spec) {
  (void)spec;
#if defined(SPC_LOWBIT_AVX512) || defined(SPC_LOWBIT_AVX2)
  return true;
#else
  return false;
#endif
}

bool accumulate_values_simd(const LowBitSpec& spec) {
  (void)spec;
#if defined(SPC_LOWBIT_AVX512) || defined(SPC_LOWBIT_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace lowbit_detail

// ---------------------------------------------------------------------------------------------
// Dispatch

void lowbit_score_keys(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                       size_t q_stride, float* scores, size_t score_stride) {
  if (n_blocks <= 0 || n_q <= 0) return;
#if defined(SPC_LOWBIT_AVX512)
  if (lowbit_detail::score_keys_simd(spec)) {
    lowbit_detail::score_keys_avx512(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride);
    return;
  }
#elif defined(SPC_LOWBIT_AVX2)
  if (lowbit_detail::score_keys_simd(spec)) {
    lowbit_detail::score_keys_avx2(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride);
    return;
  }
#endif
  lowbit_detail::score_keys_scalar(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride);
}

void lowbit_accumulate_values(const LowBitSpec& spec, BlockMem values, int n_blocks, const float* p, int n_q,
                              size_t p_stride, float* out, size_t out_stride) {
  if (n_blocks <= 0 || n_q <= 0) return;
#if defined(SPC_LOWBIT_AVX512)
  if (lowbit_detail::accumulate_values_simd(spec)) {
    lowbit_detail::accumulate_values_avx512(spec, values, n_blocks, p, n_q, p_stride, out, out_stride);
    return;
  }
#elif defined(SPC_LOWBIT_AVX2)
  if (lowbit_detail::accumulate_values_simd(spec)) {
    lowbit_detail::accumulate_values_avx2(spec, values, n_blocks, p, n_q, p_stride, out, out_stride);
    return;
  }
#endif
  lowbit_detail::accumulate_values_scalar(spec, values, n_blocks, p, n_q, p_stride, out, out_stride);
}

namespace {

// The debias term and row maxima of lowbit_score_keys_ex as passes over written scores (the
// paths whose kernels do not fold them in).
void debias_and_max(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                    size_t q_stride, float* scores, size_t score_stride, float debias, float* row_max) {
  const int d = spec.head_dim, g = spec.group;
  const size_t bb = spec.key_block_bytes(), scale_off = (size_t)spec.bits * spec.key_plane_bytes();
  for (int iq = 0; iq < n_q; ++iq) {
    const float* qr = q + (size_t)iq * q_stride;
    float* sr = scores + (size_t)iq * score_stride;
    if (debias > 0.0f) {
      for (int b = 0; b < n_blocks; ++b) {
        const uint8_t* sp = blocks + (size_t)b * bb + scale_off;
        float t = 0.0f;
        for (int c = 0; c < d; ++c) {
          const float sc = load_f16(sp + 2 * c);
          t += (qr[c] * qr[c]) * (sc * sc);
        }
        const float bias = debias / 24.0f * t;
        for (int j = 0; j < g; ++j) sr[(size_t)b * g + j] -= bias;
      }
    }
    if (row_max) row_max[iq] = vec_max(sr, (int64_t)n_blocks * g);
  }
}

}  // namespace

void lowbit_score_keys_ex(const LowBitSpec& spec, const uint8_t* blocks, int n_blocks, const float* q, int n_q,
                          size_t q_stride, float* scores, size_t score_stride, float debias, float* row_max,
                          const void* const* extra, size_t n_extra) {
  SPC_CHECK(debias >= 0.0f, "low-bit scores: debias must be >= 0, got %g", (double)debias);
  if (n_q <= 0 || n_blocks <= 0) {
    for (size_t i = 0; i < n_extra; ++i) prefetch_line(extra[i]);
    if (row_max && n_q > 0) std::fill(row_max, row_max + n_q, -std::numeric_limits<float>::infinity());
    return;
  }
#if defined(SPC_LOWBIT_AVX512)
  if (lowbit_detail::score_keys_simd(spec)) {
    lowbit_detail::score_keys_avx512(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride, debias, row_max,
                                     extra, n_extra);
    return;
  }
#endif
  // The extra lines, and the first blocks (the AVX-512 kernel requests its first batch itself;
  // the AVX2 one requests blocks a few ahead of the one it scores, from its first on).
  for (size_t i = 0; i < n_extra; ++i) prefetch_line(extra[i]);
  prefetch_bytes(blocks, (size_t)std::min(n_blocks, 8) * spec.key_block_bytes());
#if defined(SPC_LOWBIT_AVX2)
  // The AVX2 kernel folds the debias term into each block's constant and keeps the row maxima.
  if (lowbit_detail::score_keys_simd(spec)) {
    lowbit_detail::score_keys_avx2(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride, debias, row_max);
    return;
  }
#endif
  lowbit_score_keys(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride);
  debias_and_max(spec, blocks, n_blocks, q, n_q, q_stride, scores, score_stride, debias, row_max);
}

void lowbit_softmax_values(const LowBitSpec& spec, BlockMem values, int n_blocks, float* s, int n_q,
                           size_t s_stride, const float* m, float* l, float* out, size_t out_stride, float* block_max,
                           size_t bm_stride) {
  if (n_q <= 0) return;
  if (n_blocks <= 0) {
    std::fill(l, l + n_q, 0.0f);
    return;
  }
#if defined(SPC_LOWBIT_AVX512)
  // Fused where a token's values form one group (the kernel's fast weight preparation).
  if (lowbit_detail::accumulate_values_simd(spec) && spec.value_ngroups() == 1) {
    lowbit_detail::softmax_values_avx512(spec, values, n_blocks, s, n_q, s_stride, m, l, out, out_stride, block_max,
                                         bm_stride);
    return;
  }
#elif defined(SPC_LOWBIT_AVX2)
  if (lowbit_detail::accumulate_values_simd(spec)) {
    lowbit_detail::softmax_values_avx2(spec, values, n_blocks, s, n_q, s_stride, m, l, out, out_stride, block_max,
                                       bm_stride);
    return;
  }
#endif
  for (int iq = 0; iq < n_q; ++iq) {
    float* sr = s + (size_t)iq * s_stride;
    l[iq] = vec_exp_fast_shift_sum(sr, (int64_t)n_blocks * spec.group, m[iq]);
    if (block_max)
      for (int b = 0; b < n_blocks; ++b) block_max[(size_t)iq * bm_stride + b] = vec_max(sr + (size_t)b * spec.group, spec.group);
  }
  lowbit_accumulate_values(spec, values, n_blocks, s, n_q, s_stride, out, out_stride);
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

void lowbit_accumulate_values_ref(const LowBitSpec& spec, const uint8_t* values, int n_blocks, const float* p,
                                  int n_q, size_t p_stride, float* out, size_t out_stride) {
  spec.validate();
  const int d = spec.head_dim, g = spec.group;
  std::vector<float> v((size_t)d);
  std::vector<double> acc((size_t)n_q * d, 0.0);
  for (int blk = 0; blk < n_blocks; ++blk)
    for (int t = 0; t < g; ++t) {
      lowbit_dequantize_value(spec, values + (size_t)blk * spec.value_block_bytes(), t, v.data());
      for (int iq = 0; iq < n_q; ++iq) {
        const double pt = p[(size_t)iq * p_stride + (size_t)blk * g + t];
        for (int c = 0; c < d; ++c) acc[(size_t)iq * d + c] += pt * (double)v[c];
      }
    }
  for (int iq = 0; iq < n_q; ++iq)
    for (int c = 0; c < d; ++c) out[(size_t)iq * out_stride + c] += (float)acc[(size_t)iq * d + c];
}

}  // namespace spc
