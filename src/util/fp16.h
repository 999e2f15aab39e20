// IEEE half and bfloat16 conversions (scalar; F16C used when the compiler targets it).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace spc {

using fp16_t = uint16_t;  // IEEE 754 binary16 bit pattern
using bf16_t = uint16_t;  // bfloat16 bit pattern

inline float fp32_from_bits(uint32_t w) { float f; std::memcpy(&f, &w, 4); return f; }
inline uint32_t fp32_to_bits(float f) { uint32_t w; std::memcpy(&w, &f, 4); return w; }

inline float fp16_to_fp32(fp16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) {
    if (mant == 0) return fp32_from_bits(sign);
    // subnormal: value = mant * 2^-24
    float f = (float)mant * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exp == 31) return fp32_from_bits(sign | 0x7f800000u | (mant << 13));
  return fp32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

inline fp16_t fp32_to_fp16(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x = fp32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffff;
  if (x >= 0x7f800000u) return (fp16_t)(sign | 0x7c00 | (x > 0x7f800000u ? 0x200 : 0));
  if (x >= 0x477ff000u) return (fp16_t)(sign | 0x7c00);  // overflow -> inf
  if (x < 0x38800000u) {                                   // subnormal or zero
    float v = fp32_from_bits(x) * 16777216.0f;               // scale by 2^24
    uint32_t m = (uint32_t)__builtin_roundevenf(v);
    return (fp16_t)(sign | m);
  }
  uint32_t mant = x & 0x7fffff, exp = (x >> 23) - 112;
  uint32_t r = (exp << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return (fp16_t)(sign | r);
#endif
}

inline float bf16_to_fp32(bf16_t h) { return fp32_from_bits((uint32_t)h << 16); }

inline bf16_t fp32_to_bf16(float f) {
  uint32_t x = fp32_to_bits(f);
  if ((x & 0x7fffffff) > 0x7f800000u) return (bf16_t)((x >> 16) | 0x40);  // quiet NaN
  x += 0x7fff + ((x >> 16) & 1);                                            // round to nearest even
  return (bf16_t)(x >> 16);
}

}  // namespace spc
