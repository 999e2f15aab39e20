// Compile-time unrolled loops for SIMD kernels: GCC keeps an accumulator array in registers only
// when every access has a constant index after inlining, so the body gets its index as a type.
#pragma once
#include <type_traits>
#include <utility>

namespace spc {

template <int N, class F, int... I>
__attribute__((always_inline)) inline void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, i>) for i = 0 .. N-1, fully unrolled (f should be always_inline
// too; an outlined lambda gets the array through memory).
template <int N, class F>
__attribute__((always_inline)) inline void unroll(F&& f) {
  unroll_impl<N>(f, std::make_integer_sequence<int, N>{});
}

}  // namespace spc
