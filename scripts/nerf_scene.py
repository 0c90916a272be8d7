"""Render one procedural scene with open3d into a NeRF-Blender folder, for per-scene fits (issue 7).

The object is a Shepard–Metzler 7-cube object from ``scene3d.generators`` (its ground-truth mesh is
written as ``mesh.ply``). Cameras are uniform on the sphere at distance 8 (fov 45°), looking at the
origin; images are rendered by open3d's offscreen renderer (not by Plato's differentiable renderers)
on a white background and written as PNGs with ``transforms_{train,test}.json`` (OpenGL
camera-to-world, ``camera_angle_x``), read back by ``scene3d.data.load_nerf_folder``.

    python scripts/nerf_scene.py --out runs/nerf-scene --train 100 --test 20 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("LP_NUM_THREADS", "1")  # lavapipe's worker threads thrash on a busy CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from plato_core.runinfo import atomic_path, atomic_write, write_config  # noqa: E402
from scene3d.generators import SM_DIST, SM_FOV, part_mesh, shepard_metzler_scene, sphere_cameras  # noqa: E402
from scene3d.viz import Offscreen  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=100)
    p.add_argument("--test", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    import open3d as o3d

    out = Path(a.out)
    rng = np.random.default_rng([a.seed, 0])
    parts, factors, occ = shepard_metzler_scene(rng, 7)
    meshes = [part_mesh(*q) for q in parts]
    merged = meshes[0]
    for m in meshes[1:]:
        merged += m
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "mesh.ply") as tmp:
        o3d.io.write_triangle_mesh(str(tmp), merged)
    np.save(out / "occupancy_xyz.npy", occ)
    with Offscreen(a.size, a.size, background=(1.0, 1.0, 1.0)) as r:
        for k, m in enumerate(meshes):
            r.add_geometry(f"part{k}", m)
        for split, n in (("train", a.train), ("test", a.test)):
            cams = sphere_cameras(n, rng, SM_DIST, SM_FOV, a.size)
            images = r.render(cams)
            frames = []
            for i in range(n):
                name = f"{split}/r_{i:03d}.png"
                with atomic_path(out / name) as tmp:
                    Image.fromarray(images[i]).save(tmp)
                c2w = cams[i].to_opengl_c2w()[0].to(torch.float64).numpy()
                frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
            atomic_write(out / f"transforms_{split}.json",
                         json.dumps({"camera_angle_x": SM_FOV, "frames": frames}, indent=1))
            print(f"{split}: {n} views", flush=True)
    write_config(out, {**vars(a), "object": "shepard-metzler-7", "renderer": "open3d", "background": "white"})


if __name__ == "__main__":
    main()
