// Row-level conversion between fp32 and the GGML tensor types (ggml's exact block layouts).
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace spc {

// Types handled by dequantize_row / quantize_row / matmul:
// F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
bool quant_type_supported(GgmlType t);

// dst[0..n) = values of the row src (row_size(t, n) bytes). n must be a multiple of the block size.
void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);

// Encodes src[0..n) into dst (row_size(t, n) bytes) with a simple per-block min/max or absmax
// quantizer. Not bit-identical to llama.cpp's quantizers, but decodes with the same layout.
void quantize_row(GgmlType t, const float* src, void* dst, int64_t n);

namespace detail {

// "Unpacked" form of a quantized row, used by matmul. The row is cut into 32-element sub-blocks
// v; element i (0..31) of sub-block v has the value
//   sc8[v*8 + (i/16)*4] * (u[v*32 + i] - offset) + mn2[v*2 + i/16]
// with u unsigned bytes, sc8 holding each half's scale four times (lanes of a dot product),
// and offset a per-type constant (unpack_offset). mn2 is zero for the symmetric types.
int unpack_offset(GgmlType t);
// Writes n/32 sub-blocks. t must be one of the quantized types above.
void unpack_row(GgmlType t, const void* src, int64_t n, uint8_t* u, float* sc8, float* mn2);

}  // namespace detail
}  // namespace spc
