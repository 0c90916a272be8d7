#!/usr/bin/env bash
# A per-scene NeRF on bundled data (`make demo-scene`): fit the explicit-grid NeRF to 60 views (64 px) of a
# sphere, a cylinder and a cube with a specular highlight (scene3d/demo/shapes64, made by
# scripts/nerf_scene.py), score 10 held-out views, then write a turntable GIF and a coloured mesh.
# (The GQN walk-through is scripts/demo_gqn.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo_scene}
MINUTES=${MINUTES:-2}
DATA=scene3d/demo/shapes64
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1/3 fit a NeRF (grid field, empty-space skipping) for $MINUTES minutes; score the test views"
scene3d fit nerf --data "$DATA" --out "$OUT/fit" --eval-at "$MINUTES" --quiet

echo "== 2/3 turntable (36 frames of 64 px)"
scene3d render "$OUT/fit" --turntable --out "$OUT/turntable.gif"

echo "== 3/3 marching-cubes mesh with vertex colours, in the cameras' world units"
scene3d export "$OUT/fit" --out "$OUT/mesh.ply"
scene3d view "$OUT/mesh.ply" --out "$OUT/mesh.png" --size 256

echo
echo "Done. See $OUT/fit/metrics.json and test_${MINUTES}min.png (truth over prediction), $OUT/turntable.gif,"
echo "$OUT/mesh.ply and its snapshot $OUT/mesh.png"
