// Internal to matmul: tile geometry, small helpers, and the AVX-512 VNNI kernel tables
// (matmul_vnni.cpp). Not a public API.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "ops/vec_math.h"  // hsum8, vec_dot

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SPC_MM_VNNI 1
#endif

// The interleaved int8 decode kernels (matmul_i8x8.cpp) take their integer products from 256-bit
// vpdpbusd where the CPU has it (AVX-512 VL + VNNI, or the VEX-encoded AVX-VNNI of CPUs without
// AVX-512: Intel cores since Alder Lake), and on plain AVX2 (AMD Zen 1-3, Intel cores before Ice
// Lake) from vpmaddubsw pairs summed exactly in int16 (the same integers).
#if defined(SPC_MM_VNNI) || (defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define SPC_MM_I8X8_VNNI 1
#endif
#if defined(SPC_MM_I8X8_VNNI) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define SPC_MM_I8X8 1
#endif

// AVX2 + FMA + F16C fallbacks for hosts without AVX-512 (the AVX-512 paths take precedence).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !(defined(__AVX512F__) && defined(__AVX512BW__))
#define SPC_MM_AVX2 1
#endif

namespace spc::mmk {

constexpr int kTileR = 4;  // weight rows per tile
constexpr int kTileT = 4;  // tokens per tile


// Fused kernel: R (1..4) consecutive weight rows starting at w (row stride rs bytes, nvb
// 32-element sub-blocks per row) times T (1..4) tokens of quantized activations (xq: stride
// n_in; xd: stride nvb; xs16: stride 2*nvb; xs32: stride nvb). Writes out[r*kTileT + t].
// mrow: scratch of R*2*nvb floats.
using FusedFn = void (*)(const uint8_t* w, size_t rs, int64_t nvb, const int8_t* xq, const float* xd,
                         const float* xs16, const float* xs32, int64_t n_in, float* mrow, float* out);
// nullptr when no fused kernel exists for the type (or the build lacks AVX-512 VNNI / AVX2).
FusedFn fused_for(GgmlType type, int r, int t);

// Unpacks a row (nvb sub-blocks) into codes u, per-half scales sc8 (x4 each) and per-half
// constant terms m2 with the code offset folded in. nullptr when unavailable.
using UnpackFn = void (*)(const uint8_t* row, int64_t nvb, uint8_t* u, float* sc8, float* m2);
UnpackFn unpack_fast_for(GgmlType type);

// Fused kernel with fp32 activations: R (1..4) consecutive weight rows starting at w (row
// stride rs bytes, nb 32-element blocks per row) times T (1..4) fp32 tokens (stride n_in).
// Weight blocks are widened to fp32 in registers. xs: per-token sums of each 32-block of x
// (stride nb); mrow: scratch of R*nb floats. Writes out[r*kTileT + t].
using F32QFn = void (*)(const uint8_t* w, size_t rs, int64_t nb, const float* x, int64_t n_in, const float* xs,
                        float* mrow, float* out);
// nullptr when no such kernel exists for the type (K-quants, or a build without AVX-512 / AVX2).
F32QFn f32q_for(GgmlType type, int r, int t);
// True when the type's f32q kernels expect x with each 16-element group permuted by
// f32q_permute_x (element 4*(k%4) + k/4 of the group at position k); n: multiple of 16.
bool f32q_permuted(GgmlType type);
void f32q_permute_x(const float* x, int64_t n, float* xp);

// Int8 decode kernel over the row-interleaved copy (matmul_i8x8.cpp): one group of 8 rows (its
// records from rec, nb blocks) times T (1..4) tokens of quantized activations (xq: stride n_in;
// xd, xs32: stride nb). Writes y[t * y_stride + r], r < 8.
using I8x8Fn = void (*)(const uint8_t* rec, int64_t nb, const int8_t* xq, const float* xd, const float* xs32,
                        int64_t n_in, float* y, int64_t y_stride);
// nullptr when the type has no interleaved layout or the build lacks AVX2 (with FMA and F16C).
I8x8Fn i8x8_for(GgmlType type, int t);
// Bytes of one interleaved record (8 rows, one 32-element block); 0 for other types.
size_t i8x8_record_bytes(GgmlType type);

// The same products for many tokens on AMX-INT8 tiles (tdpbsud): two consecutive groups
// (rec0, rec1: 16 rows) times n_tok tokens, y[t * y_stride + r] for r < 16, equal bit for bit to
// two I8x8Fn passes (the same integer block products, the same fp32 operations in the same
// order). nullptr when the type has no interleaved layout, the build lacks AVX-512 VNNI, or the
// CPU lacks AMX-INT8 (cpu_amx_int8_usable).
using I8x8PairFn = void (*)(const uint8_t* rec0, const uint8_t* rec1, int64_t nb, const int8_t* xq, const float* xd,
                            const float* xs32, int64_t n_in, int64_t n_tok, float* y, int64_t y_stride);
I8x8PairFn i8x8_pair_amx_for(GgmlType type);
// The decode form of the same: two consecutive groups times n_tok (1..kTileT) tokens in 512-bit
// vpdpbusd registers, equal bit for bit to two I8x8Fn passes. nullptr when the type has no
// interleaved layout or the build lacks AVX-512 VNNI.
I8x8PairFn i8x8_pair_for(GgmlType type);

}  // namespace spc::mmk
