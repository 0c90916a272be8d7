"""Render one procedural scene with open3d into a NeRF-Blender folder, for per-scene fits (issue 7).

The object is a Shepard–Metzler 7-cube object from ``scene3d.generators`` (``--object sm``), or a
sphere, a cylinder and a cube of random hues side by side (``--object shapes``); its ground-truth
mesh is written as ``mesh.ply``. Cameras are uniform on the sphere at distance 6.5 (fov 45°),
looking at the origin. Images are rendered (not by Plato's differentiable renderers) on a white
background, by open3d's offscreen renderer or by PyTorch3D's rasteriser at twice the size and
box-filtered down (``--renderer pytorch3d``); ``--specular S`` (PyTorch3D only) adds a white Phong
highlight, i.e. view-dependent appearance. They are written as PNGs with
``transforms_{train,test}.json`` (OpenGL camera-to-world, ``camera_angle_x``), read back by
``scene3d.data.load_nerf_folder``.

    python scripts/nerf_scene.py --out runs/nerf-scene --train 100 --test 20 --size 64
    python scripts/nerf_scene.py --out runs/nerf-shiny --object shapes --renderer pytorch3d --specular 0.6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("LP_NUM_THREADS", "1")  # lavapipe's worker threads thrash on a busy CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from plato_core.runinfo import atomic_path, atomic_write, write_config  # noqa: E402
from renderers.cameras import Camera  # noqa: E402
from scene3d.generators import (  # noqa: E402
    SM_DIST,
    SM_FOV,
    _downsample,
    part_mesh,
    random_hue,
    render_pytorch3d,
    shepard_metzler_scene,
    sphere_cameras,
)
from scene3d.viz import Offscreen  # noqa: E402


def shapes_parts(rng: np.random.Generator) -> list:
    """A sphere, a cylinder and a cube (size 1.6) of random hues in a row along x: [(kind, params, colour)]."""
    return [(kind, {"center": np.array([x, 0.0, 0.0]), "size": 1.6}, random_hue(rng))
            for kind, x in (("sphere", -1.9), ("cylinder", 0.0), ("cube", 1.9))]


class _P3DRenderer:
    """PyTorch3D's rasteriser at twice the size, box-filtered down (the Offscreen interface used here)."""

    def __init__(self, size: int, specular: float):
        self.size, self.specular, self.meshes = size, specular, []

    def add_geometry(self, name, mesh) -> None:
        self.meshes.append(mesh)

    def render(self, cams) -> np.ndarray:
        big = Camera(cams.R, cams.t, cams.focal * 2, cams.principal * 2, (2 * self.size, 2 * self.size))
        return _downsample(render_pytorch3d(self.meshes, big, (1.0, 1.0, 1.0), self.specular), self.size)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=100)
    p.add_argument("--test", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--object", choices=["sm", "shapes"], default="sm")
    p.add_argument("--renderer", choices=["open3d", "pytorch3d"], default="open3d")
    p.add_argument("--specular", type=float, default=0.0, help="Phong highlight strength (pytorch3d only)")
    a = p.parse_args(argv)
    if a.specular and a.renderer != "pytorch3d":
        p.error("--specular needs --renderer pytorch3d")
    import open3d as o3d

    out = Path(a.out)
    rng = np.random.default_rng([a.seed, 0])
    if a.object == "sm":
        parts, _, occ = shepard_metzler_scene(rng, 7)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "occupancy_xyz.npy", occ)
    else:
        parts = shapes_parts(rng)
    meshes = [part_mesh(*q) for q in parts]
    merged = meshes[0]
    for m in meshes[1:]:
        merged += m
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "mesh.ply") as tmp:
        o3d.io.write_triangle_mesh(str(tmp), merged)
    ctx = Offscreen(a.size, a.size, background=(1.0, 1.0, 1.0)) if a.renderer == "open3d" else \
        contextlib.nullcontext(_P3DRenderer(a.size, a.specular))
    with ctx as r:
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
    name = {"sm": "shepard-metzler-7", "shapes": "sphere-cylinder-cube"}[a.object]
    write_config(out, {**vars(a), "object": name, "background": "white"})


if __name__ == "__main__":
    main()
