// Matrix multiplication of a (possibly quantized) weight matrix with fp32 activations.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "util/threadpool.h"

namespace spc {

// n_out rows of n_in elements each, row_size(type, n_in) bytes per row, contiguous.
struct WeightView {
  GgmlType type;
  int64_t n_in;
  int64_t n_out;
  const void* data;
  // Optional: the same matrix repacked by i8x8_repack (8 rows interleaved per block). When set,
  // decode matmuls with int8 activations read it instead of data (same results up to the order
  // of float sums; see matmul_i8x8.cpp), and every other path reads it too: fp32 activations
  // at any token count take the row-block path (rows rebuilt by i8x8_unpack_row and dequantized
  // to fp32: identical values), as do dequantize_rows and int8 matmuls of more than 8 tokens.
  // So data is not read at all and its pages may be released (Model::set_int8_decode).
  const uint8_t* i8x8 = nullptr;
};

// y[t*n_out + o] = sum_i W[o,i] * x[t*n_in + i] for t in [0, n_tok). x, y fp32, row-major.
// Default (int8_activations = false): fp32 activations as given; quantized weights are widened
// to fp32 (in registers at decode, into per-thread scratch per row block for prefill) and
// accumulated in fp32 (error ~1e-6 of |W_o| * |x_t|).
// int8_activations = true (quantized weights only): x is quantized per call to 8 bits (blocks
// of 32, absmax), then integer dot products (AVX-512 VNNI; scalar fallback). Faster, but adds
// an error of ~1e-3 of |W_o| * |x_t| per output (tests allow 5e-3). Ignored for F32/F16/BF16.
// y must not overlap x. Output rows are split over the pool's threads. Not reentrant for one
// pool; scratch is thread_local, no state is shared between calls.
void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool,
            bool int8_activations = false);

// Several matrices applied to the same x: ys[i] = W_i x for i < n_w. At decode sizes, when every
// W_i has the same n_in and a fused decode kernel (fp32 activations, or int8 activations for
// quantized weights), x is prepared once and one pool dispatch covers all of them (same kernels
// and summation order as separate matmul calls, so the results are identical); otherwise it is
// separate matmul calls.
void matmul_many(const WeightView* ws, float* const* ys, int n_w, const float* x, int64_t n_tok, ThreadPool& pool,
                 bool int8_activations = false);

// Many-token (prefill) int8 matmuls over the interleaved copies run on AMX-INT8 tiles where the
// CPU has them (cpu_amx_int8_usable; SPECACHE_NO_AMX=1 turns AMX off for the process), with the
// same sums bit for bit as the vpdpbusd kernels. On by default; set_matmul_amx(false) keeps the
// vpdpbusd kernels (tests, comparisons). matmul_amx_active: on and available.
void set_matmul_amx(bool on);
bool matmul_amx_active();

// True when this build has a SIMD int8-activation decode kernel for weights of type t (AVX-512
// VNNI, or AVX2): what int8_activations = true runs at decode sizes; false for F32/F16/BF16.
bool has_int8_decode_kernel(GgmlType t);

// Bytes of the row-interleaved copy of w for the int8 decode kernels (Q4_0, Q4_1, Q8_0 with
// n_out a multiple of 8, on builds with AVX2 + FMA + F16C or AVX-512); 0 where there is none.
size_t i8x8_bytes(const WeightView& w);
// Writes that copy (i8x8_bytes(w) bytes) to dst. Throws spc::Error where i8x8_bytes(w) is 0.
void i8x8_repack(const WeightView& w, uint8_t* dst);
// Row `row` of w in its GGUF layout (row_size(w.type, w.n_in) bytes to dst), rebuilt from w.i8x8:
// byte for byte the row of w.data that i8x8_repack read. Throws spc::Error without a copy.
void i8x8_unpack_row(const WeightView& w, int64_t row, uint8_t* dst);

// dst[r*n_in + i] = W[row0 + r, i] for r in [0, n_rows) (get_rows / embedding lookup).
void dequantize_rows(const WeightView& w, int64_t row0, int64_t n_rows, float* dst);

}  // namespace spc
