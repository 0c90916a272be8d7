#!/usr/bin/env bash
# The main job on bundled data (`make demo` runs it inside the project environment):
# simulate a conformational change of the GluA3 NTD (3O21 -> 6FLR, bundled in cryoem/data),
# train the atom VAE on the particles, analyse the latent space, and take snapshots.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
MINUTES=${MINUTES:-4}
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1/5 simulate 2,000 particles (64 px, 2 Å/px, SNR 0.1) of a morph between two real states"
cryoem simulate --morph cryoem/data/3o21.pdb.gz cryoem/data/6flr.pdb.gz --atoms ca --n 2000 --box 64 \
  --pixel-size 2.0 --snr 0.1 --defocus 1.0 2.5 --seed 0 --preview --out "$OUT/sim"

echo "== 2/5 train the atom VAE for $MINUTES minutes from the compact state (first model of gt_models.pdb)"
cryoem train --particles "$OUT/sim/particles.star" --structure "$OUT/sim/gt_models.pdb" --atoms ca \
  --center none --minutes "$MINUTES" --out "$OUT/run"

echo "== 3/5 analyse the latent space"
cryoem analyze "$OUT/run" --k 5 --color "$OUT/sim/ground_truth.npz:morph_t"

echo "== 4/5 score against the ground truth"
python -m cryoem.evaluate "$OUT/run" --sim "$OUT/sim"

echo "== 5/5 snapshot of the motion along PC1"
cryoem view "$OUT/run/analysis/pc1.pdb" --color displacement --size 200 --out "$OUT/run/analysis/pc1_strip.png"

echo
echo "Done. Open $(realpath "$OUT/run/analysis/index.html")"
