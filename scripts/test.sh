#!/usr/bin/env bash
# Fresh machine -> green test suite: installs build dependencies, fetches the default model,
# builds, and runs the whole GoogleTest suite through ctest. Tests that need ../shared skip
# with a message when it is absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" >/dev/null
bash "$root/scripts/build.sh"
cd "$root/build"
ctest --output-on-failure --timeout 900
