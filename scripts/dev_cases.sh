#!/usr/bin/env bash
# The atom VAE's development cases, each trained with the default flags beside cryoDRGN (issue 13).
#
#   CRYODRGN=/path/to/venv/bin/cryodrgn OUT=runs/cases bash scripts/dev_cases.sh [CASE ...]
#
# Cases differ in protein, motion, distribution, image formation and SNR:
#   morph     3O21 -> 6FLR linear morph (GluA3 NTD), uniform, one Gaussian per atom
#   hinge1    6FLR, chain A's C-terminal domain (323-403) turning by 40 degrees, bimodal; Peng's 5 Gaussians per atom,
#             a per-particle B-factor of 0-60 Å², uniform shifts (std 1.5 px): the model's image formation differs
#   morphp    the morph with hinge1's image formation (Peng's 5 Gaussians, B 0-60 Å², uniform shifts)
#   hinge2    6FLR, two independent hinges (a 2-D latent: A 323-403 by 40 and B 352-402 by 50 degrees), uniform
# The hinges turn about the axis whose path clashes least with the rest (cryoem.simulate.parse_hinge). Until
# session 16 they were A:290-381 and B:290-380, whose far states ran through the protein (issue 13's note).
#   ubq       2K39, a real NMR ensemble of ubiquitin (C-alpha only), small amplitude
#   morph001  the morph at SNR 0.01, 30 minutes
# Every case: 8,000 particles, 64 px, 2 Å/px. Plato and cryoDRGN run side by side (one thread each),
# Plato for MINUTES (10), cryoDRGN for EPOCHS (1: about 10 minutes at its measured 14 particles/s, encoder and decoder 3 x 256).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cases}
MINUTES=${MINUTES:-10}
EPOCHS=${EPOCHS:-1}
: "${CRYODRGN:?set CRYODRGN to a cryodrgn executable in its own virtualenv}"
D=cryoem/data
mkdir -p "$OUT"

simulate() {  # case -> simulation folder
  local c=$1 s="$OUT/$1/sim"
  [ -f "$s/particles.star" ] && return
  case $c in
    morph) cryoem simulate --morph $D/3o21.pdb.gz $D/6flr.pdb.gz --n 8000 --snr 0.1 --quiet --out "$s" ;;
    morphp) cryoem simulate --morph $D/3o21.pdb.gz $D/6flr.pdb.gz --potential peng5 --particle-bfactor 0 60 \
              --shift-dist uniform --shift-std 1.5 --n 8000 --snr 0.1 --quiet --out "$s" ;;
    morph001) cryoem simulate --morph $D/3o21.pdb.gz $D/6flr.pdb.gz --n 8000 --snr 0.01 --quiet --out "$s" ;;
    hinge1) cryoem simulate --structure $D/6flr.pdb.gz --hinge A:323-403:40 --morph-dist bimodal --potential peng5 \
              --particle-bfactor 0 60 --shift-dist uniform --shift-std 1.5 --n 8000 --quiet --out "$s" ;;
    hinge2) cryoem simulate --structure $D/6flr.pdb.gz --hinge A:323-403:40 --hinge B:352-402:50 --n 8000 --quiet \
              --out "$s" ;;
    ubq) cryoem simulate --structure $D/2k39_ca_ensemble.pdb.gz --atoms ca --n 8000 --quiet --out "$s" ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
}

for c in "${@:-morph hinge1 hinge2 ubq}"; do
  for c1 in $c; do
    simulate "$c1"
    s="$OUT/$c1/sim"
    minutes=$MINUTES; epochs=$EPOCHS; [ "$c1" = morph001 ] && { minutes=$((3 * MINUTES)); epochs=$((3 * EPOCHS)); }
    [ -f "$OUT/$c1/run/checkpoint.pt" ] || cryoem train --particles "$s/particles.star" --structure "$s/gt_models.pdb" \
      --center none --minutes "$minutes" --threads 1 --out "$OUT/$c1/run" > "$OUT/$c1/train.log" 2>&1 &
    python scripts/compare_cryodrgn.py --sim "$s" --plato "$OUT/$c1/run" --cryodrgn "$CRYODRGN" --epochs "$epochs" \
      --threads 1 --train-only --out "$OUT/$c1/cmp" > "$OUT/$c1/cryodrgn_train.log" 2>&1 &
    wait
    python -m cryoem.evaluate "$OUT/$c1/run" --sim "$s" --no-maps > "$OUT/$c1/evaluate.txt" 2>&1
    python scripts/compare_cryodrgn.py --sim "$s" --plato "$OUT/$c1/run" --cryodrgn "$CRYODRGN" --epochs "$epochs" \
      --out "$OUT/$c1/cmp" | tee "$OUT/$c1/comparison.txt"
  done
done
