// Deliberately simple double-precision reference dequantizers (tests only). Written
// independently of quant.cpp, following the block formats' loop structure directly.
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace spc::ref {

// Values of a row of n elements of type t (n a multiple of the block size).
std::vector<double> dequantize_row(GgmlType t, const void* src, int64_t n);

}  // namespace spc::ref
