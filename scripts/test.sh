#!/usr/bin/env bash
# Fresh machine -> green test suite: installs build dependencies, fetches the default model,
# builds, and runs the whole GoogleTest suite through ctest. Tests that need ../shared skip
# with a message when it is absent. On an AVX-512 machine the suite runs a second time on a
# build for AVX2 (x86-64-v3), so both SIMD levels of the kernels are tested wherever CI runs,
# and a third time with AVX-VNNI added where the CPU has it (the vpdpbusd forms of the int8
# matmuls and packed low-bit kernels on AVX2 CPUs since Alder Lake).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" >/dev/null
bash "$root/scripts/build.sh"
(cd "$root/build" && ctest --output-on-failure --timeout 900)
if grep -qw avx512f /proc/cpuinfo && grep -qw avx2 /proc/cpuinfo; then
  echo "== AVX-512 host: the suite again on the AVX2 build (build-avx2/, -march=x86-64-v3)"
  SPECACHE_BUILD_DIR="$root/build-avx2" bash "$root/scripts/build.sh" -DSPECACHE_NATIVE=OFF -DCMAKE_CXX_FLAGS=-march=x86-64-v3
  (cd "$root/build-avx2" && ctest --output-on-failure --timeout 900)
  if grep -qw avx_vnni /proc/cpuinfo; then
    echo "== and on an AVX2 + AVX-VNNI build (build-avxvnni/, -march=x86-64-v3 -mavxvnni)"
    SPECACHE_BUILD_DIR="$root/build-avxvnni" bash "$root/scripts/build.sh" -DSPECACHE_NATIVE=OFF \
      "-DCMAKE_CXX_FLAGS=-march=x86-64-v3 -mavxvnni"
    (cd "$root/build-avxvnni" && ctest --output-on-failure --timeout 900)
  fi
fi
