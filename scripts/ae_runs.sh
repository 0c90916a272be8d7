#!/bin/bash
# The issue-7 runs, as run on the shared 2-core CPU machine (see the closing note for the figures).
# Data: Shepard-Metzler 7-part, 32 px, 15 views (train: 2000 scenes, seed 0; test: 200 scenes, seed 1):
#   scene3d data shepard-metzler --scenes 2000 --size 32 --seed 0 --out runs/sm7-32-train   (and seed 1 -> test)
set -e
S=.venv/bin/scene3d
# amortised autoencoders (wall-clock budgets)
$S train voxel --data runs/sm7-32-train --out runs/voxel-ae --minutes 30 --batch-size 8
$S train mesh --data runs/sm7-32-train --out runs/mesh-ae --minutes 15 --batch-size 8
$S train nerf --data runs/sm7-32-train --out runs/nerf-ae --minutes 15 --batch-size 4 --rays 256
for r in voxel-ae mesh-ae nerf-ae; do $S eval runs/$r --data runs/sm7-32-test --contexts 1 3 --scenes 30; done
python scripts/ae_table.py --voxel runs/voxel-ae --mesh runs/mesh-ae --nerf runs/nerf-ae --gqn runs/gqn-eval
# per-scene NeRF: 100 open3d views at 64 px, ours and the PyTorch3D ImplicitRenderer reference, same budget
python scripts/nerf_scene.py --out runs/nerf-scene --train 100 --test 20 --size 64
OMP_NUM_THREADS=1 $S fit nerf --data runs/nerf-scene/transforms_train.json --out runs/nerf-ours --eval-at 5 10 20 &
OMP_NUM_THREADS=1 python scripts/nerf_reference.py --data runs/nerf-scene --out runs/nerf-ref --eval-at 5 10 20 &
wait
# session 4 (2026-11-28, 12:12-): the runs behind the issue 4 and 7 closing figures, alone on the machine
$S train gqn --data runs/sm7-32-train --out runs/gqn-epi --representation epipolar --depth-samples 16 \
  --minutes 30 --threads 2 --lr-anneal-steps 6000 --sigma-anneal-steps 3000
$S eval runs/gqn-epi --data runs/sm7-32-test --contexts 1 3 5
$S probe runs/gqn-epi --data runs/sm7-32-train --scenes 1000
$S train voxel --data runs/sm7-32-train --contexts 1 --out runs/voxel-k1 --minutes 30   # calibrates at the end
$S eval runs/voxel-k1 --data runs/sm7-32-test --contexts 1 3 --with-gqn runs/gqn-epi
python scripts/ae_table.py --voxel runs/voxel-k1 --mesh runs/mesh-ae --nerf runs/nerf-ae
