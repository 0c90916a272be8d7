"""Pictures of atomic models with open3d: one snapshot, a strip along an ensemble, or a GIF.

Headless pictures draw atoms as discs joined by their chain trace; an interactive window
draws spheres. Colours come from a per-atom value such as RMSF or displacement (viridis,
shared scale across models) or from the chain.
Rendering is headless through ``scene3d.viz`` unless a window is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plato_core.runinfo import UserError, atomic_path
from scene3d.viz import Offscreen, fit_camera

TRACE_MAX_A = 4.2  # consecutive atoms closer than this (Å) are joined in pictures: CA-CA is 3.8 Å


def atoms_mesh(coords: np.ndarray, colors: np.ndarray, radius: float = 1.6, resolution: int = 4):
    """One open3d TriangleMesh of spheres at ``coords`` (N, 3) Å with per-atom RGB ``colors`` (N, 3) in [0, 1]."""
    import open3d as o3d

    ball = o3d.geometry.TriangleMesh.create_sphere(radius=radius, resolution=resolution)
    v, f = np.asarray(ball.vertices), np.asarray(ball.triangles)
    n, nv = len(coords), len(v)
    verts = (coords[:, None, :] + v[None]).reshape(-1, 3)
    tris = (f[None] + nv * np.arange(n)[:, None, None]).reshape(-1, 3)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(verts), o3d.utility.Vector3iVector(tris))
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.repeat(colors, nv, axis=0))
    mesh.compute_vertex_normals()
    return mesh


def value_colors(values: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                 cmap: str = "viridis") -> np.ndarray:
    """(N,) values -> (N, 3) RGB through a matplotlib colormap."""
    import matplotlib

    lo = np.nanmin(values) if vmin is None else vmin
    hi = np.nanmax(values) if vmax is None else vmax
    t = (values - lo) / max(hi - lo, 1e-9)
    return matplotlib.colormaps[cmap](np.clip(t, 0, 1))[:, :3]


def chain_colors(chains: np.ndarray) -> np.ndarray:
    """(N,) chain ids -> (N, 3) RGB, one tab10 colour per chain."""
    import matplotlib

    ids = {c: i for i, c in enumerate(dict.fromkeys(chains.tolist()))}
    return matplotlib.colormaps["tab10"](np.array([ids[c] % 10 for c in chains]))[:, :3]


def render_models(models: np.ndarray, colors: np.ndarray, size: int = 320, azimuth: float = 0.6,
                  elevation: float = 0.35, radius: float = 1.0) -> np.ndarray:
    """(M, N, 3) models with (M, N, 3) or (N, 3) colours -> (M, size, size, 3) uint8, one shared camera.

    Headless frames draw each atom as a disc of ``radius`` Å (a point sprite) and join consecutive
    atoms closer than ``TRACE_MAX_A`` by a line (the C-alpha or backbone trace). Sphere meshes made
    Filament on lavapipe take 0.1-70 s per frame, unpredictably; sprites and lines take ~0.05 s.
    """
    if models.ndim != 3 or models.shape[-1] != 3 or models.shape[1] == 0:
        raise UserError(f"models: expected (M, N, 3) coordinates with N > 0, got {models.shape}")
    colors = np.broadcast_to(colors, models.shape)
    cam = fit_camera(models.reshape(-1, 3), (size, size), azimuth, elevation)
    R, t = cam.R[0].numpy(), cam.t[0].numpy()
    depth = float((R @ models.reshape(-1, 3).mean(0) + t)[2])
    point_px = float(np.clip(2 * radius * float(cam.focal[0, 0]) / depth, 2.0, 16.0))
    bonded = np.linalg.norm(np.diff(models[0], axis=0), axis=1) < TRACE_MAX_A
    pairs = np.flatnonzero(bonded)
    frames = []
    with Offscreen(size, size, lit=False) as r:
        for m, c in zip(models, colors):
            r.clear()
            if len(pairs):
                r.add_geometry("trace", trace_lines(m, c, pairs))
            r.add_geometry("atoms", atoms_points(m, c), point_size=point_px)
            frames.append(r.render(cam)[0])
    return np.stack(frames)


def atoms_points(coords: np.ndarray, colors: np.ndarray):
    """An open3d PointCloud of atoms (N, 3) Å with RGB ``colors`` (N, 3) in [0, 1]."""
    import open3d as o3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.array(coords, np.float64)))
    pc.colors = o3d.utility.Vector3dVector(np.array(colors, np.float64))
    return pc


def trace_lines(coords: np.ndarray, colors: np.ndarray, pairs: np.ndarray):
    """An open3d LineSet joining atom ``i`` to ``i + 1`` for each ``i`` in ``pairs``, coloured by their mean."""
    import open3d as o3d

    ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(np.array(coords, np.float64)),
                              o3d.utility.Vector2iVector(np.stack([pairs, pairs + 1], 1)))
    ls.colors = o3d.utility.Vector3dVector((colors[pairs] + colors[pairs + 1]) / 2)
    return ls


def save_frames(frames: np.ndarray, out: str | Path, labels: list[str] | None = None) -> Path:
    """Write one PNG (a horizontal strip when there are several frames) or an animated GIF."""
    from PIL import Image, ImageDraw

    out = Path(out)
    images = [Image.fromarray(f) for f in frames]
    if labels:
        for im, lab in zip(images, labels):
            ImageDraw.Draw(im).text((6, 6), lab, fill=(0, 0, 0))
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".gif":
            images[0].save(tmp, save_all=True, append_images=images[1:] + images[-2:0:-1], duration=150, loop=0)
        elif out.suffix.lower() == ".png":
            strip = Image.new("RGB", (sum(i.width for i in images), images[0].height), "white")
            x = 0
            for im in images:
                strip.paste(im, (x, 0))
                x += im.width
            strip.save(tmp)
        else:
            raise UserError(f"--out {out}: expected a .png or .gif file name")
    return out
