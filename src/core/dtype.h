// Tensor element types as numbered by GGML/GGUF, with their block geometry.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace spc {

enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};

struct TypeTraits {
  const char* name;
  int64_t block_size;  // elements per block
  size_t type_size;    // bytes per block
  bool supported;      // dequantization and matmul implemented
};

// Traits of a raw GGUF type id; nullptr when the id is not a type this project knows.
const TypeTraits* type_traits_or_null(uint32_t id);
// Traits of a known type (aborts on an unknown one: callers validate ids first).
const TypeTraits& type_traits(GgmlType t);
inline const char* type_name(GgmlType t) { return type_traits(t).name; }
// Bytes of a row of n elements; n must be a multiple of the block size.
size_t row_size(GgmlType t, int64_t n);

}  // namespace spc
