#!/usr/bin/env bash
# Configures and builds specache (Release) into build/ (or $SPECACHE_BUILD_DIR). Extra
# arguments go to cmake.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${SPECACHE_BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C "$dir"
