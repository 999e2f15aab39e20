#include "ops/quant_ref.h"

#include <cstring>

#include "util/error.h"
#include "util/fp16.h"

namespace spc::ref {
namespace {

double h2d(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return (double)fp16_to_fp32(h);
}

void q4_0(const uint8_t* b, double* y) {
  const double d = h2d(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * ((b[2 + j] & 0x0F) - 8);
    y[j + 16] = d * ((b[2 + j] >> 4) - 8);
  }
}
void q4_1(const uint8_t* b, double* y) {
  const double d = h2d(b), m = h2d(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (b[4 + j] & 0x0F) + m;
    y[j + 16] = d * (b[4 + j] >> 4) + m;
  }
}
void q5_0(const uint8_t* b, double* y) {
  const double d = h2d(b);
  const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
  for (int j = 0; j < 16; ++j) {
    const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
    y[j] = d * (((b[6 + j] & 0x0F) + 16 * h0) - 16);
    y[j + 16] = d * (((b[6 + j] >> 4) + 16 * h1) - 16);
  }
}
void q5_1(const uint8_t* b, double* y) {
  const double d = h2d(b), m = h2d(b + 2);
  const uint32_t qh = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
  for (int j = 0; j < 16; ++j) {
    const int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
    y[j] = d * ((b[8 + j] & 0x0F) + 16 * h0) + m;
    y[j + 16] = d * ((b[8 + j] >> 4) + 16 * h1) + m;
  }
}
void q8_0(const uint8_t* b, double* y) {
  const double d = h2d(b);
  for (int j = 0; j < 32; ++j) y[j] = d * (int8_t)b[2 + j];
}

// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin; }
void q2_k(const uint8_t* b, double* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const double d = h2d(b + 80), dmin = h2d(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half = 0; half < 2; ++half) {
        const int sc = scales[is++];
        const double dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * ((q[l + 16 * half] >> shift) & 3) - ml;
      }
    }
    q += 32;
  }
}

// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d; }
void q3_k(const uint8_t* b, double* y) {
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const uint8_t* s = b + 96;
  const double d = h2d(b + 108);
  // 16 six-bit scales: low 4 bits in s[0..7] (low then high nibbles), high 2 bits in s[8..11].
  int scale[16];
  for (int i = 0; i < 16; ++i) {
    const int low = (i < 8) ? (s[i] & 0xF) : ((s[i - 8] >> 4) & 0xF);
    const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    scale[i] = (low | (high << 4)) - 32;
  }
  int is = 0;
  int bit = 0;
  for (int n = 0; n < 256; n += 128) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half = 0; half < 2; ++half) {
        const double dl = d * scale[is++];
        for (int l = 0; l < 16; ++l) {
          const int idx = l + 16 * half;
          const int lowq = (q[idx] >> shift) & 3;
          const int sub = (hm[idx] >> bit) & 1 ? 0 : 4;
          *y++ = dl * (lowq - sub);
        }
      }
      ++bit;
    }
    q += 32;
  }
}

void scale_min_k4(int j, const uint8_t* q, int* d, int* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }
void q4_k(const uint8_t* b, double* y) {
  const double d = h2d(b), dmin = h2d(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    int sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const double d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const double d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
  }
}

// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
void q5_k(const uint8_t* b, double* y) {
  const double d = h2d(b), dmin = h2d(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  unsigned u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    int sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const double d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const double d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
  }
}

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }
void q6_k(const uint8_t* b, double* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = (const int8_t*)(b + 192);
  const double d = h2d(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

}  // namespace

std::vector<double> dequantize_row(GgmlType t, const void* src, int64_t n) {
  std::vector<double> y((size_t)n);
  const uint8_t* p = (const uint8_t*)src;
  switch (t) {
    case GgmlType::F32:
      for (int64_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        y[i] = f;
      }
      return y;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) y[i] = h2d(p + 2 * i);
      return y;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint32_t w = (uint32_t)p[2 * i] | ((uint32_t)p[2 * i + 1] << 8);
        w <<= 16;
        float f;
        std::memcpy(&f, &w, 4);
        y[i] = f;
      }
      return y;
    default: break;
  }
  void (*fn)(const uint8_t*, double*) = nullptr;
  int bs = 0, bytes = 0;
  switch (t) {
    case GgmlType::Q4_0: fn = q4_0; bs = 32; bytes = 18; break;
    case GgmlType::Q4_1: fn = q4_1; bs = 32; bytes = 20; break;
    case GgmlType::Q5_0: fn = q5_0; bs = 32; bytes = 22; break;
    case GgmlType::Q5_1: fn = q5_1; bs = 32; bytes = 24; break;
    case GgmlType::Q8_0: fn = q8_0; bs = 32; bytes = 34; break;
    case GgmlType::Q2_K: fn = q2_k; bs = 256; bytes = 84; break;
    case GgmlType::Q3_K: fn = q3_k; bs = 256; bytes = 110; break;
    case GgmlType::Q4_K: fn = q4_k; bs = 256; bytes = 144; break;
    case GgmlType::Q5_K: fn = q5_k; bs = 256; bytes = 176; break;
    case GgmlType::Q6_K: fn = q6_k; bs = 256; bytes = 210; break;
    default: SPC_CHECK(false, "ref::dequantize_row: unsupported type %u", (unsigned)t);
  }
  SPC_ASSERT(n % bs == 0);
  for (int64_t b = 0; b < n / bs; ++b) fn(p + b * bytes, y.data() + b * bs);
  return y;
}

}  // namespace spc::ref
