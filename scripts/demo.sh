#!/usr/bin/env bash
# The main job on bundled data; `make demo` runs it inside the project environment.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
scene3d info
