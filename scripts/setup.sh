#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (root, Python 3.11): system
# packages, then a virtualenv cached under ~/.cache keyed on the dependency pins,
# so that a fresh clone reuses it instead of downloading ~2 GB of torch again.
# Prints the venv path on its last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- Debian packages: open3d import (libusb) and headless rendering (lavapipe); chromium and its driver for
# the browser tests of `cryoem explore` (tests/cryoem/test_explore.py, through selenium)
APT_PKGS="libusb-1.0-0 mesa-vulkan-drivers libvulkan1 chromium chromium-driver"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >&2
fi

# --- Python environment, keyed on the pins
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
key=$(cat requirements.lock | sha256sum | cut -c1-12)
CACHE=${PLATO_CACHE:-$HOME/.cache/plato3d}
VENV="$CACHE/venv-$key"
if [ ! -f "$VENV/.complete" ]; then
  echo "setup: building $VENV (first run downloads ~2 GB)" >&2
  rm -rf "$VENV"; mkdir -p "$CACHE"
  "$PY" -m venv "$VENV" >&2
  if ! "$VENV/bin/pip" install -q -r requirements.lock > "$CACHE/pip-$key.log" 2>&1; then
    grep -v "is ignored: it is neither" "$CACHE/pip-$key.log" | tail -n 30 >&2
    echo "setup: pip install failed (full log: $CACHE/pip-$key.log)" >&2
    exit 1
  fi
  touch "$VENV/.complete"   # only a finished install counts
fi

# --- this checkout, editable (cheap; re-pointed at every clone)
if ! "$VENV/bin/python" -P - <<PYEOF >/dev/null 2>&1  # -P: only what is installed, not the working directory
import importlib, pathlib
for name in ("renderers", "plato_core", "scene3d", "cryoem"):  # every package of this checkout, new ones too
    pkg = importlib.import_module(name)
    assert pathlib.Path(pkg.__file__).resolve().parent.parent == pathlib.Path("$PWD").resolve()
import shutil; assert shutil.which("scene3d", path="$VENV/bin")
PYEOF
then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >&2
fi
ln -sfn "$VENV" .venv
echo "$VENV"
