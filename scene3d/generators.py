"""Procedural multi-view scenes rendered headlessly with open3d (``scene3d.viz.Offscreen``).

World frame: z up (as GQN viewpoints), arbitrary units. Every scene ``i`` draws from
``numpy.random.default_rng([seed, i])``, so a scene does not depend on sharding or on
how many scenes are generated. Images are rendered at 64 px and box-filtered down when
``size < 64`` (anti-aliasing).

* **Shepard–Metzler** (:func:`shepard_metzler_scene`): 5 or 7 unit cubes joined face to
  face by a self-avoiding random walk, centred on the origin, each a random hue;
  15 cameras at distance 6.5 (fov 45°) on the sphere, |elevation| <= 75°, looking at the
  origin; black background. Factors: ``n_cubes``, ``positions`` (7, 3; NaN-padded),
  ``colors`` (7, 3; NaN-padded).
* **Rooms** (:func:`room_scene`): an 8 x 8 room, walls 3 high, floor and wall colours
  from small palettes, 1-3 objects (cube, sphere, cylinder) of random hue standing on the
  floor; 10 cameras on a ring of radius 3 at height 1.5, looking at the room's centre.
  Factors: ``n_objects``, ``kinds`` (3; -1 = none), ``colors`` (3, 3), ``positions`` (3, 3),
  ``floor_color``, ``wall_color`` (palette indices).

Two independent rasterisers can draw the scenes: open3d's offscreen renderer (the default,
Filament on Mesa lavapipe, in a child process that is restarted when a render stalls:
:class:`_WatchedRenderer`) and PyTorch3D's hard-flat mesh shader (``renderer="pytorch3d"``; with
``specular`` > 0 its Phong shader, smooth normals and a white highlight). Filament's job threads
spin; on an oversubscribed CPU a 64² view can take seconds instead of ~20 ms, while PyTorch3D
stays at ~10 ms per view. Both use the same cameras and a light from the direction
``(0.4, 0.6, 0.7)`` (world, pointing at the light), and their silhouettes agree to IoU 0.9997.

Ground truth for 3D metrics: object meshes (``meshes/scene-XXXXXX.ply``) and 32³
occupancy grids over the box ``meta["occupancy"]["bounds"]``.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import torch

from plato_core.runinfo import UserError, atomic_path, write_config
from renderers.cameras import Camera, look_at
from scene3d.data import ShardWriter, camera_arrays

RENDER = 64  # native render size (px)
GRID = 32  # occupancy resolution
SM_FOV, SM_DIST, SM_MAX_ELEV = math.radians(45), 6.5, math.radians(75)
SM_BOUNDS = (-4.0, 4.0)
ROOM_HALF, ROOM_HEIGHT, RING_RADIUS, RING_HEIGHT, ROOM_FOV = 4.0, 3.0, 3.0, 1.5, math.radians(60)
ROOM_BOUNDS = (-4.0, 4.0)
FLOOR_COLORS = [(0.55, 0.45, 0.35), (0.35, 0.35, 0.35), (0.7, 0.7, 0.65), (0.3, 0.45, 0.3)]
WALL_COLORS = [(0.85, 0.8, 0.7), (0.6, 0.7, 0.85), (0.8, 0.6, 0.55), (0.55, 0.75, 0.6), (0.75, 0.75, 0.75)]
KINDS = ("cube", "sphere", "cylinder")
_STEPS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def random_hue(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour of uniformly random hue (RGB in [0, 1])."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)))


def self_avoiding_walk(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) integer lattice positions, each a face neighbour of the previous one, all distinct."""
    while True:
        pos = [np.zeros(3, int)]
        while len(pos) < n:
            free = [p for p in pos[-1] + _STEPS if not any((p == q).all() for q in pos)]
            if not free:
                break
            pos.append(free[rng.integers(len(free))])
        if len(pos) == n:
            return np.stack(pos)


def sphere_cameras(n: int, rng: np.random.Generator, dist: float, fov: float, size: int,
                   max_elev: float = SM_MAX_ELEV) -> Camera:
    """n cameras uniformly on the sphere band |elevation| <= max_elev, looking at the origin (z up)."""
    az = rng.uniform(0, 2 * np.pi, n)
    el = np.arcsin(rng.uniform(-np.sin(max_elev), np.sin(max_elev), n))
    eye = dist * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    R, t = look_at(torch.from_numpy(eye), torch.zeros(n, 3, dtype=torch.float64), up=(0.0, 0.0, 1.0))
    return Camera.create(R, t, (size, size), fov=fov)


def ring_cameras(n: int, rng: np.random.Generator, size: int) -> Camera:
    """n cameras on a horizontal ring (random azimuths) looking at the room centre."""
    az = rng.uniform(0, 2 * np.pi, n)
    eye = np.stack([RING_RADIUS * np.cos(az), RING_RADIUS * np.sin(az), np.full(n, RING_HEIGHT)], -1)
    target = np.tile([0.0, 0.0, 0.8], (n, 1))
    R, t = look_at(torch.from_numpy(eye), torch.from_numpy(target), up=(0.0, 0.0, 1.0))
    return Camera.create(R, t, (size, size), fov=ROOM_FOV)


def occupancy_grid(inside, bounds=SM_BOUNDS, res: int = GRID) -> np.ndarray:
    """(res, res, res) bool grid (index order x, y, z) of voxel centres where ``inside(points (M, 3))`` holds."""
    c = bounds[0] + (np.arange(res) + 0.5) * (bounds[1] - bounds[0]) / res
    pts = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    return inside(pts).reshape(res, res, res)


# -------------------------------------------------------------- Shepard–Metzler
def shepard_metzler_scene(rng: np.random.Generator, n_cubes: int = 7):
    """Returns (object meshes [(kind, params, colour)], factors, occupancy)."""
    pos = self_avoiding_walk(n_cubes, rng).astype(np.float64)
    pos -= (pos.min(0) + pos.max(0)) / 2
    colors = np.stack([random_hue(rng) for _ in range(n_cubes)])
    parts = [("cube", {"center": p, "size": 1.0}, c) for p, c in zip(pos, colors)]
    pad = lambda a: np.concatenate([a, np.full((7 - len(a), 3), np.nan)]).astype(np.float32)
    factors = {"n_cubes": np.int64(n_cubes), "positions": pad(pos), "colors": pad(colors)}
    occ = occupancy_grid(lambda x: (np.abs(x[:, None] - pos[None]).max(-1) <= 0.5).any(1))
    return parts, factors, occ


# ------------------------------------------------------------------------- rooms
def room_scene(rng: np.random.Generator):
    """Returns (object meshes, factors, occupancy, (floor colour, wall colour))."""
    n = int(rng.integers(1, 4))
    kinds = np.full(3, -1)
    colors, positions = np.full((3, 3), np.nan), np.full((3, 3), np.nan)
    parts, placed = [], []
    for k in range(n):
        kind = int(rng.integers(len(KINDS)))
        for _ in range(100):  # rejection-sample non-overlapping footprints
            xy = rng.uniform(-2.5, 2.5, 2)
            if all(np.linalg.norm(xy - q) > 1.6 for q in placed):
                break
        placed.append(xy)
        size = rng.uniform(0.8, 1.3)
        centre = np.array([*xy, size / 2])
        color = random_hue(rng)
        parts.append((KINDS[kind], {"center": centre, "size": size}, color))
        kinds[k], colors[k], positions[k] = kind, color, centre
    fi, wi = int(rng.integers(len(FLOOR_COLORS))), int(rng.integers(len(WALL_COLORS)))
    factors = {"n_objects": np.int64(n), "kinds": kinds, "colors": colors.astype(np.float32),
               "positions": positions.astype(np.float32), "floor_color": np.int64(fi), "wall_color": np.int64(wi)}
    occ = occupancy_grid(lambda x: np.any([_inside(kd, p, x) for kd, p, _ in parts], 0), ROOM_BOUNDS)
    return parts, factors, occ, (FLOOR_COLORS[fi], WALL_COLORS[wi])


def _inside(kind: str, p: dict, x: np.ndarray) -> np.ndarray:
    d = x - p["center"]
    h = p["size"] / 2
    if kind == "cube":
        return np.abs(d).max(-1) <= h
    if kind == "sphere":
        return np.linalg.norm(d, axis=-1) <= h
    return (np.linalg.norm(d[:, :2], axis=-1) <= h) & (np.abs(d[:, 2]) <= h)


# ------------------------------------------------------------------ open3d meshes
def part_mesh(kind: str, p: dict, color):
    """An open3d TriangleMesh for one object part."""
    import open3d as o3d

    s = p["size"]
    if kind == "cube":
        m = o3d.geometry.TriangleMesh.create_box(s, s, s).translate(np.asarray(p["center"]) - s / 2)
    elif kind == "sphere":
        m = o3d.geometry.TriangleMesh.create_sphere(s / 2, resolution=16).translate(p["center"])
    elif kind == "cylinder":
        m = o3d.geometry.TriangleMesh.create_cylinder(s / 2, s, resolution=24).translate(p["center"])
    else:
        raise ValueError(f"kind: unknown {kind!r}")
    m.paint_uniform_color(np.asarray(color, float))
    m.compute_triangle_normals()
    m.compute_vertex_normals()
    return m


def room_meshes(floor, wall):
    """Floor and four walls of the room, facing inwards."""
    import open3d as o3d

    h, H = ROOM_HALF, ROOM_HEIGHT
    c = [(-h, -h), (h, -h), (h, h), (-h, h)]
    quads = [([(x, y, 0) for x, y in c], floor)]
    for k in range(4):
        (x0, y0), (x1, y1) = c[k], c[(k + 1) % 4]
        quads.append(([(x1, y1, 0), (x0, y0, 0), (x0, y0, H), (x1, y1, H)], wall))
    out = []
    for verts, col in quads:
        m = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.array(verts, float)),
                                      o3d.utility.Vector3iVector(np.array([[0, 1, 2], [0, 2, 3]])))
        m.paint_uniform_color(col)
        m.compute_triangle_normals()
        m.compute_vertex_normals()
        out.append(m)
    return out


def render_pytorch3d(meshes: list, cams: Camera, background, specular: float = 0.0,
                     shininess: float = 32.0) -> np.ndarray:
    """Rasterise open3d meshes (vertex colours) with PyTorch3D's hard flat shader: (V, H, W, 3) uint8.

    ``specular > 0``: PyTorch3D's hard Phong shader instead (per-pixel normals interpolated from the
    vertex normals), with a white specular highlight of that strength and ``shininess``: view-dependent
    appearance, for testing radiance fields.
    """
    from pytorch3d.renderer import (
        BlendParams,
        DirectionalLights,
        HardFlatShader,
        HardPhongShader,
        Materials,
        MeshRasterizer,
        MeshRenderer,
        RasterizationSettings,
        TexturesVertex,
    )
    from pytorch3d.structures import Meshes

    verts, faces, cols, off = [], [], [], 0
    for m in meshes:
        v = np.asarray(m.vertices)
        verts.append(v)
        faces.append(np.asarray(m.triangles) + off)
        cols.append(np.asarray(m.vertex_colors))
        off += len(v)
    f32 = lambda a: torch.tensor(np.concatenate(a), dtype=torch.float32)
    mesh = Meshes([f32(verts)], [torch.tensor(np.concatenate(faces))], TexturesVertex([f32(cols)])).extend(len(cams))
    pc = cams.to(dtype=torch.float32).to_pytorch3d()
    lights = DirectionalLights(direction=[[0.4, 0.6, 0.7]], ambient_color=[[0.45] * 3], diffuse_color=[[0.55] * 3],
                               specular_color=[[float(specular)] * 3])
    H, W = cams.image_size
    raster = MeshRasterizer(pc, RasterizationSettings(image_size=(H, W), faces_per_pixel=1))
    blend = BlendParams(background_color=tuple(background))
    if specular > 0:
        shader = HardPhongShader(cameras=pc, lights=lights, blend_params=blend,
                                 materials=Materials(shininess=float(shininess)))
    else:
        shader = HardFlatShader(cameras=pc, lights=lights, blend_params=blend)
    with torch.no_grad():
        img = MeshRenderer(raster, shader)(mesh)[..., :3]
    return (img.clamp(0, 1) * 255).round().byte().numpy()


def _downsample(images: np.ndarray, size: int) -> np.ndarray:
    """(V, S, S, 3) uint8 -> (V, size, size, 3) by box filtering (S a multiple of size)."""
    f = images.shape[1] // size
    if f * size != images.shape[1]:
        raise UserError(f"--size {size}: must divide the render size {RENDER}")
    x = images.reshape(len(images), size, f, size, f, 3).astype(np.float32).mean((2, 4))
    return np.round(x).astype(np.uint8)


# open3d renders in a watched child process (_WatchedRenderer): on a 2-core machine with Mesa's llvmpipe Vulkan
# driver, a renderer hung inside render_to_image after 45-300 views (2026-12-07), spinning one core. Opening a new
# renderer every 2 scenes did not stop the hangs and made them more frequent (2026-12-08). A healthy 15-view 64² scene
# takes 0.23-0.5 s; a process that falls into the slow state takes 17 s or more for every later scene and does not
# recover. So the limit follows the scenes' own pace: 60 scenes beside a training run took 48 s with a 3 s limit
# (6 restarts) against 334 s with a fixed 30 s limit (5 restarts; 2026-12-08).
STALL_MIN_S = 3.0  # seconds a scene's render may always take before its process is killed and restarted
STALL_PACE = 10.0  # ... or this many times the median of the last scenes, if longer (a slow or busy machine)
START_S = 180.0  # seconds the first render process may take to start and render its first scene
RETRIES = 6  # restarts per scene before generation gives up; each retry doubles the scene's time limit


def _scene(kind: str, seed: int, i: int, views: int, n_cubes: int):
    """Scene ``i``: (room meshes, object meshes, cameras at RENDER px, factors, occupancy)."""
    rng = np.random.default_rng([seed, i])
    room = []
    if kind == "shepard-metzler":
        parts, factors, occ = shepard_metzler_scene(rng, n_cubes)
        cams = sphere_cameras(views, rng, SM_DIST, SM_FOV, RENDER)
    else:
        parts, factors, occ, (floor, wall) = room_scene(rng)
        cams = ring_cameras(views, rng, RENDER)
        room = room_meshes(floor, wall)
    return room, [part_mesh(*p) for p in parts], cams, factors, occ


def _render_child(fd: int) -> None:
    """Child process of :class:`_WatchedRenderer`, on the socket ``fd``: receives (kind, seed, views, n_cubes,
    background), then scene indices, and sends back each scene's (V, 64, 64, 3) uint8 images."""
    import os
    import time
    from multiprocessing.connection import Connection

    from scene3d.viz import Offscreen

    conn = Connection(fd)
    kind, seed, views, n_cubes, bg = conn.recv()
    r, done = None, 0
    while (i := conn.recv()) is not None:
        stall = os.environ.get("PLATO_TEST_STALL_ONCE")  # tests: a file whose presence makes one render hang
        if stall and done and os.path.exists(stall):  # not a fresh process's first scene
            os.remove(stall)
            time.sleep(3600)
        if r is None:
            r = Offscreen(RENDER, RENDER, background=bg)
        room, objs, cams = _scene(kind, seed, i, views, n_cubes)[:3]
        r.clear()
        for k, m in enumerate(room + objs):
            r.add_geometry(f"m{k}", m)
        conn.send(r.render(cams))
        done += 1


class _WatchedRenderer:
    """open3d renders in a child process that is killed and restarted when a scene stalls.

    A scene stalls when it takes longer than ``stall_s`` (default: the larger of ``STALL_MIN_S`` and ``STALL_PACE``
    times the median of the last 20 scenes); a fresh process's first scene may take ``start_s`` the first time and
    4× the first start-up (at least 20 s) afterwards. Each retry of one scene doubles its limit. Scenes are rebuilt
    in the child from ``(seed, i)``, so a restart renders exactly what the hung process would have. The child is a
    fresh interpreter (not multiprocessing's, which re-imports the caller's main script) talking over a socket; its
    stdout, where Filament logs each engine it creates, is discarded. Raises UserError after ``RETRIES`` restarts
    on one scene.
    """

    def __init__(self, kind: str, seed: int, views: int, n_cubes: int, bg, stall_s: float | None = None,
                 start_s: float = START_S):
        self.args, self.stall_s, self.start_s = (kind, seed, views, n_cubes, tuple(bg)), stall_s, start_s
        self.proc, self.conn, self.fresh = None, None, True
        self.paces: list[float] = []  # seconds per scene of the last healthy scenes
        self.first, self.restarts = True, 0

    def _start(self) -> None:
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        code = "import sys; from scene3d.generators import _render_child; _render_child(int(sys.argv[1]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send(self.args)
        self.fresh = True

    def _limit(self, attempt: int) -> float:
        """Seconds the next scene may take on this attempt (0-based)."""
        if self.fresh:
            base = self.start_s
        elif self.stall_s is not None:
            base = self.stall_s
        else:
            base = max(STALL_MIN_S, STALL_PACE * float(np.median(self.paces))) if self.paces else self.start_s
        return base * 2 ** attempt

    def render(self, i: int, log=print) -> np.ndarray:
        import time

        for attempt in range(RETRIES + 1):
            if self.proc is None:
                self._start()
            limit, t0 = self._limit(attempt), time.perf_counter()
            try:
                self.conn.send(i)
                if self.conn.poll(limit):
                    images = self.conn.recv()
                    took = time.perf_counter() - t0
                    if self.first:  # later fresh starts may take 4x this one, at least 20 s
                        self.first, self.start_s = False, max(20.0, 4 * took)
                    elif not self.fresh:
                        self.paces = (self.paces + [took])[-20:]
                    self.fresh = False
                    return images
            except (EOFError, OSError):
                pass  # the child died; restart it below
            self.restarts += 1
            if attempt:  # the first restart of a scene is routine (see STALL_MIN_S); a repeat is worth a line
                log(f"open3d render of scene {i} stalled or failed again (attempt {attempt + 1}, "
                    f"limit {limit:.0f} s); restarting its process")
            self.close(kill=True)
        raise UserError(f"open3d could not render scene {i} in {RETRIES + 1} attempts (it stalls on some machines); "
                        "try --renderer pytorch3d")

    def close(self, kill: bool = False) -> None:
        import subprocess

        if self.proc is None:
            return
        if not kill:
            try:
                self.conn.send(None)
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self.proc = self.conn = None


def _warn(message: str) -> None:
    import sys

    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def generate(kind: str, out: str | Path, scenes: int, views: int | None = None, size: int = 64, seed: int = 0,
             n_cubes: int = 7, shard_size: int = 500, meshes: bool = True, progress: bool = True,
             renderer: str = "open3d", specular: float = 0.0, stall_s: float | None = None) -> Path:
    """Render ``scenes`` procedural scenes of ``kind`` ('shepard-metzler' | 'rooms') into the folder ``out``.

    ``renderer``: 'open3d' (headless Filament in a watched child process, the default) or 'pytorch3d' (see the
    module docstring). ``specular`` (pytorch3d only): Phong shading with a highlight of that strength
    (:func:`render_pytorch3d`). ``stall_s``: seconds an open3d scene may take before its process is restarted
    (default: from the scenes' own pace, :class:`_WatchedRenderer`).
    """
    import open3d as o3d
    from tqdm import tqdm

    if kind not in ("shepard-metzler", "rooms"):
        raise UserError(f"kind: expected shepard-metzler or rooms, got {kind!r}")
    if kind == "shepard-metzler" and n_cubes not in (5, 7):
        raise UserError(f"--cubes {n_cubes}: Shepard-Metzler objects have 5 or 7 cubes")
    if size > RENDER or RENDER % size:
        raise UserError(f"--size {size}: expected a divisor of {RENDER} (64, 32, 16)")
    if renderer not in ("open3d", "pytorch3d"):
        raise UserError(f"--renderer: expected open3d or pytorch3d, got {renderer!r}")
    if scenes < 1:
        raise UserError(f"--scenes {scenes}: expected at least 1")
    if specular < 0 or (specular > 0 and renderer != "pytorch3d"):
        raise UserError(f"--specular {specular}: expected a value >= 0, and only with --renderer pytorch3d")
    views = views or (15 if kind == "shepard-metzler" else 10)
    out = Path(out)
    if (out / "meta.json").exists():
        raise UserError(f"{out}: already holds a dataset; choose a new --out")
    bg = (0.0, 0.0, 0.0) if kind == "shepard-metzler" else (1.0, 1.0, 1.0)
    fov = SM_FOV if kind == "shepard-metzler" else ROOM_FOV
    settings = {"kind": kind, "scenes": scenes, "views": views, "size": size, "seed": seed, "n_cubes": n_cubes,
                "renderer": renderer, **({"specular": specular} if specular else {})}
    writer = ShardWriter(out, shard_size)
    if meshes:
        (out / "meshes").mkdir(parents=True, exist_ok=True)
    r = _WatchedRenderer(kind, seed, views, n_cubes, bg, stall_s) if renderer == "open3d" else None
    try:
        for i in tqdm(range(scenes), desc=f"rendering {kind}", disable=not progress, unit="scene"):
            room, objs, cams, factors, occ = _scene(kind, seed, i, views, n_cubes)
            images = render_pytorch3d(room + objs, cams, bg, specular) if r is None else r.render(i, log=_warn)
            if size != RENDER:
                images = _downsample(images, size)
            cams_out = Camera.create(cams.R, cams.t, (size, size), fov=fov)
            writer.add(images, camera_arrays(cams_out), factors, occ)
            if meshes:
                merged = objs[0]
                for m in objs[1:]:
                    merged += m
                with atomic_path(out / "meshes" / f"scene-{i:06d}.ply") as tmp:
                    o3d.io.write_triangle_mesh(str(tmp), merged)
    finally:
        if r is not None:
            r.close()
            if r.restarts:
                _warn(f"open3d: restarted the render process {r.restarts} times after stalls (the images are exact)")
    bounds = SM_BOUNDS if kind == "shepard-metzler" else ROOM_BOUNDS
    meta = {"generator": kind, "settings": settings, "background": list(bg), "world_up": [0, 0, 1],
            "fov": fov,
            "occupancy": {"resolution": GRID, "bounds": [bounds[0]] * 3 + [bounds[1]] * 3, "index_order": "xyz"},
            "meshes": "meshes/scene-XXXXXX.ply" if meshes else None}
    write_config(out, settings)
    return writer.close(meta)
