#!/usr/bin/env bash
# GQN end to end: render Shepard-Metzler data, train a GQN for a few minutes,
# score it against the trivial baselines, and probe its representation.
# (The acceptance run used 2,000 train / 200 test scenes and MINUTES=25.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo_gqn}
MINUTES=${MINUTES:-3}
SCENES=${SCENES:-400}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1/4 render $SCENES train + 100 test Shepard-Metzler scenes (7 cubes, 15 views, 32 px)"
scene3d data shepard-metzler --scenes "$SCENES" --size 32 --seed 0 --renderer pytorch3d --out "$OUT/train"
scene3d data shepard-metzler --scenes 100 --size 32 --seed 1 --renderer pytorch3d --out "$OUT/test"

echo "== 2/4 train a GQN for $MINUTES minutes"
scene3d train gqn --data "$OUT/train" --out "$OUT/run" --minutes "$MINUTES" --threads 1

echo "== 3/4 evaluate with 1, 3 and 5 context views"
scene3d eval "$OUT/run" --data "$OUT/test" --contexts 1 3 5

echo "== 4/4 linear probes on r vs raw pixels"
scene3d probe "$OUT/run" --data "$OUT/train"

echo
echo "Done. See $OUT/run/metrics.json, samples.png and probe.json"
