"""open3d visualisation: headless offscreen rendering (Mesa lavapipe) and interactive windows.

The one home for open3d rendering in Plato: the procedural scene generators, the
``scene3d view`` / ``cryoem view`` snapshots and the tests all call this module.
Cameras are Plato ``Camera`` objects (OpenCV axes), which open3d takes directly
as an extrinsic matrix and a pinhole intrinsic.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from plato_core.runinfo import UserError, atomic_path
from renderers.cameras import Camera, look_at


def _o3d():
    # lavapipe's worker threads thrash (10-100x slower) on a busy CPU; one thread is fast enough for our sizes
    os.environ.setdefault("LP_NUM_THREADS", "1")
    try:
        import open3d as o3d
    except ImportError as e:  # pragma: no cover - environment problem
        raise UserError(f"open3d could not be imported ({e}); run `make setup` to install libusb-1.0-0") from e
    return o3d


class Offscreen:
    """A reusable headless renderer of fixed size.

    Example::

        with Offscreen(64, 64, background=(1, 1, 1)) as r:
            r.add_mesh("cube", mesh)
            images = r.render(camera)   # (B, H, W, 3) uint8
    """

    def __init__(self, width: int, height: int, background=(1.0, 1.0, 1.0), lit: bool = True):
        o3d = _o3d()
        self.width, self.height = int(width), int(height)
        self.renderer = o3d.visualization.rendering.OffscreenRenderer(self.width, self.height)
        self.renderer.scene.set_background([*background, 1.0])
        self.renderer.scene.view.set_post_processing(False)  # keep colours linear and exact
        # Filament's default anti-aliasing costs seconds per frame on lavapipe (10x at 320², worse for big meshes)
        self.renderer.scene.view.set_antialiasing(False)
        self.lit = lit
        if lit:
            self.renderer.scene.scene.set_sun_light([-0.4, -0.6, -0.7], [1.0, 1.0, 1.0], 60000)
            self.renderer.scene.scene.enable_sun_light(True)

    def __enter__(self) -> "Offscreen":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.scene.clear_geometry()
            self.renderer = None

    def clear(self) -> None:
        self.renderer.scene.clear_geometry()

    def add_geometry(self, name: str, geometry, point_size: float = 3.0) -> None:
        """Add an open3d TriangleMesh / PointCloud / LineSet with its vertex colours."""
        o3d = _o3d()
        mat = o3d.visualization.rendering.MaterialRecord()
        if isinstance(geometry, o3d.geometry.TriangleMesh):
            if not geometry.has_vertex_normals():
                geometry.compute_vertex_normals()
            mat.shader = "defaultLit" if self.lit else "defaultUnlit"
        elif isinstance(geometry, o3d.geometry.LineSet):
            mat.shader = "unlitLine"
            mat.line_width = 2.0
        else:
            mat.shader = "defaultUnlit"
            mat.point_size = point_size
        self.renderer.scene.add_geometry(name, geometry, mat)

    def render(self, camera: Camera) -> np.ndarray:
        """Render every camera of the batch: returns (B, H, W, 3) uint8."""
        if camera.orthographic:
            raise ValueError("camera: open3d offscreen rendering needs a perspective camera")
        H, W = camera.image_size
        if (H, W) != (self.height, self.width):
            raise ValueError(f"camera: image_size {(H, W)} does not match the renderer's {(self.height, self.width)}")
        o3d = _o3d()
        R, t, K = (x.detach().double().cpu().numpy() for x in camera.to_opencv())
        # Filament puts the optical axis at continuous pixel coordinate (cx, cy), centres at +0.5 like ours, not at
        # OpenCV's integer-centred cx: with OpenCV's K every image came out half a pixel up and left (2026-12-08)
        K[:, :2, 2] += 0.5
        out = np.empty((len(camera), H, W, 3), np.uint8)
        for b in range(len(camera)):  # open3d draws one view at a time
            E = np.eye(4)
            E[:3, :3], E[:3, 3] = R[b], t[b]
            self.renderer.setup_camera(o3d.camera.PinholeCameraIntrinsic(W, H, K[b]), E)
            out[b] = np.asarray(self.renderer.render_to_image())[..., :3]
        return out


def fit_camera(points: np.ndarray, size: tuple[int, int] = (512, 512), azimuth: float = 0.6,
               elevation: float = 0.4, fov: float = np.radians(40)) -> Camera:
    """A perspective camera that frames ``points`` (N, 3) from the given azimuth / elevation (radians)."""
    import torch

    lo, hi = points.min(0), points.max(0)
    centre, radius = (lo + hi) / 2, max(np.linalg.norm(hi - lo) / 2, 1e-6)
    dist = radius / np.sin(fov / 2) * 1.05
    d = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    eye = torch.tensor(centre + dist * d)[None]
    R, t = look_at(eye, torch.tensor(centre)[None], up=(0.0, 0.0, 1.0))
    return Camera.create(R, t, size, fov=fov)


def snapshot(geometries: list, out: str | os.PathLike, size: tuple[int, int] = (512, 512),
             azimuth: float = 0.6, elevation: float = 0.4, background=(1.0, 1.0, 1.0)) -> Path:
    """Render open3d geometries headlessly to a PNG at ``out`` and return the path."""
    from PIL import Image

    pts = np.concatenate([_points_of(g) for g in geometries])
    if len(pts) == 0:
        raise UserError(f"{out}: nothing to draw (the geometry is empty)")
    cam = fit_camera(pts, size, azimuth, elevation)
    with Offscreen(size[1], size[0], background) as r:
        for i, g in enumerate(geometries):
            r.add_geometry(f"g{i}", g)
        img = r.render(cam)[0]
    with atomic_path(out) as tmp:
        Image.fromarray(img).save(tmp)
    return Path(out)


def show(geometries: list, title: str = "Plato") -> None:
    """Open an interactive open3d window; needs a display."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise UserError("no display available; pass --out snap.png for a headless snapshot")
    _o3d().visualization.draw_geometries(geometries, window_name=title)


def _points_of(g) -> np.ndarray:
    if hasattr(g, "vertices"):
        return np.asarray(g.vertices)
    if hasattr(g, "points"):
        return np.asarray(g.points)
    raise ValueError(f"geometries: unsupported open3d type {type(g).__name__}")
