"""CPU timings of Plato's renderers next to PyTorch3D's equivalents, run in the same process.

The "splat" case compares the two backends of ``gaussian_projection`` (numba against torch) instead, and the
"jvp" case ``gaussian_projection_jvp`` (image and K derivatives in one pass) against K + 1 renderings. The "mesh"
case renders with ``MeshRenderer``'s CPU default (Plato's numba rasterizer) against PyTorch3D's CPU renderer and
ends the output with one ``speedup`` line per mesh mode; "mesh-scale" times the numba path alone, with its peak
memory, at larger images and meshes.

The "nerf-fast" case times the per-scene NeRF paths (MLP, MLP with empty-space skipping, feature grid with and
without skipping) per 4,096 rays against PyTorch3D's ``ImplicitRenderer`` on the same MLP.

``python -m renderers.bench [--repeats N] [--only voxel,mesh,mesh-scale,nerf,nerf-fast,gaussian,splat,jvp]`` prints
one table.
Times are the
best of ``--repeats`` runs, alternating ours and theirs after a warm-up: "fwd" runs under ``torch.no_grad()``,
"fwd+bwd" builds the graph and back-propagates ``image.sum()`` to the 3D parameters. A ratio is ours / theirs
(below 1: we are faster).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from collections.abc import Callable

import torch

from renderers.cameras import Camera, look_at

ROWS: list[dict] = []
SCALE_ROWS: list[dict] = []


def compare(ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor], params: list[torch.Tensor],
            repeats: int, bwd_repeats: int | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best-of-``repeats`` seconds of (forward, forward + backward) for two closures returning images.

    Runs alternate between the two after one untimed forward each, so that load from other processes on a
    shared machine hits both alike; the minimum is the least disturbed run. ``bwd_repeats`` overrides the
    count for forward + backward.
    """

    def fwd(fn):
        with torch.no_grad():
            fn()

    def fwd_bwd(fn):
        for p in params:
            p.grad = None
        fn().sum().backward()

    best = {}
    for fn in (ours, theirs):
        fwd(fn)
    for step, n in ((fwd, repeats), (fwd_bwd, bwd_repeats or repeats)):
        for _ in range(n):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                step(fn)
                best[name, step] = min(best.get((name, step), math.inf), time.perf_counter() - t0)
    return (best["ours", fwd], best["ours", fwd_bwd]), (best["theirs", fwd], best["theirs", fwd_bwd])


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one untimed call (the least disturbed run)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def record(case: str, settings: str, ours: tuple[float, float], theirs: tuple[float, float], ref: str,
           note: str = "", images: int = 0, speedup: str = "") -> None:
    """Keep one table row; ``images`` > 0 adds an images/s line; ``speedup`` names the row's closing speedup line."""
    ROWS.append(dict(case=case, settings=settings, ours=ours, theirs=theirs, ref=ref, note=note, images=images,
                     speedup=speedup))
    print(f"  done: {case} {settings}", flush=True)


def orbit(B: int, size: int, dist: float = 4.0, fov_deg: float = 40.0) -> Camera:
    ang = torch.linspace(0.0, 2 * math.pi, B + 1)[:B]
    eye = torch.stack([dist * torch.cos(ang), 0.6 * torch.ones(B), dist * torch.sin(ang)], -1)
    R, t = look_at(eye, torch.zeros_like(eye))
    return Camera.create(R, t, (size, size), fov=math.radians(fov_deg))


def blob_grid(B: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth density (B, 1, n, n, n) and colour (B, 3, n, n, n) grids that vanish at the box faces."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1 + 1 / n, 1 - 1 / n, n)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    c = (torch.rand(B, 4, 3, generator=g) - 0.5) * 0.8
    r2 = (x - c[..., 0, None, None, None]) ** 2 + (y - c[..., 1, None, None, None]) ** 2 \
        + (z - c[..., 2, None, None, None]) ** 2
    density = (4.0 * torch.exp(-r2 / 0.05)).sum(1, keepdim=True)
    colour = torch.stack([0.5 + 0.4 * torch.sin(3 * x + k) for k in range(3)]).expand(B, 3, n, n, n).contiguous()
    return density, colour


# --------------------------------------------------------------------------- voxel
def bench_voxel(repeats: int) -> None:
    from pytorch3d.renderer import EmissionAbsorptionRaymarcher, NDCMultinomialRaysampler, VolumeRenderer
    from pytorch3d.structures import Volumes

    from renderers.voxel import VoxelRenderer

    B, size, n, S = 8, 64, 64, 128
    density, colour = blob_grid(B, n)
    density.requires_grad_(), colour.requires_grad_()
    cam = orbit(B, size)
    ours = VoxelRenderer(n_samples=S, size=2.0, alpha=True).eval()

    class DensityToOpacity(torch.nn.Module):
        """PyTorch3D's EA raymarcher takes opacities: alpha = 1 - exp(-sigma * delta) per ray."""

        def __init__(self):
            super().__init__()
            self.ea = EmissionAbsorptionRaymarcher()

        def forward(self, rays_densities, rays_features, ray_bundle, **kw):
            delta = (ray_bundle.lengths[..., 1] - ray_bundle.lengths[..., 0]) * ray_bundle.directions.norm(dim=-1)
            return self.ea(-torch.expm1(-rays_densities * delta[..., None, None]), rays_features)

    sampler = NDCMultinomialRaysampler(image_width=size, image_height=size, n_pts_per_ray=S,
                                       min_depth=4.0 - math.sqrt(3), max_depth=4.0 + math.sqrt(3))
    theirs = VolumeRenderer(sampler, DensityToOpacity())
    p3d_cam = cam.to_pytorch3d()

    def p3d():
        vols = Volumes(densities=density, features=colour, voxel_size=2.0 / (n - 1), align_corners=False)
        return theirs(cameras=p3d_cam, volumes=vols)[0].permute(0, 3, 1, 2)

    with torch.no_grad():
        diff = (ours(density, cam, colour) - p3d()).abs().max().item()
    record("voxel EA", f"B={B} {size}^2 {n}^3 grid RGB {S} samples/ray",
           *compare(lambda: ours(density, cam, colour), p3d, [density, colour], repeats),
           "PyTorch3D VolumeRenderer + EA raymarcher", f"max |RGBA diff| {diff:.1e}")


# ---------------------------------------------------------------------------- mesh
def _mesh_scene(B: int, size: int, level: int):
    """ico_sphere(level) vertices (B, V, 3) requiring grad, faces (F, 3), colours (B, V, 3), and B FoV cameras
    orbiting it at distance 2.7 (PyTorch3D's and Plato's equivalents)."""
    from pytorch3d.renderer import FoVPerspectiveCameras, look_at_view_transform

    from renderers.mesh import ico_sphere

    verts, faces = ico_sphere(level)
    colors = (0.5 + 0.5 * verts).expand(B, -1, -1).contiguous()
    verts = verts.expand(B, -1, -1).clone().requires_grad_()
    R, T = look_at_view_transform(2.7, torch.linspace(-30, 30, B), torch.linspace(0, 330, B))
    p3d_cam = FoVPerspectiveCameras(R=R, T=T, fov=40.0)
    return verts, faces, colors, p3d_cam, Camera.from_pytorch3d(p3d_cam, (size, size))


def bench_mesh(repeats: int) -> None:
    """Soft silhouette and soft Phong shading: ``MeshRenderer``'s CPU default (numba) against PyTorch3D's."""
    from pytorch3d.renderer import (
        BlendParams,
        DirectionalLights,
        Materials,
        MeshRasterizer,
        RasterizationSettings,
        SoftPhongShader,
        SoftSilhouetteShader,
    )

    B, size, K, sigma, gamma = 16, 64, 20, 1e-4, 1e-4
    scene = _mesh_scene(B, size, 3)
    settings = RasterizationSettings(image_size=size, blur_radius=math.log(1 / 1e-4 - 1) * sigma, faces_per_pixel=K)
    rasterizer = MeshRasterizer(cameras=scene[3], raster_settings=settings)
    lights = DirectionalLights(direction=((0.0, -1.0, -1.0),), ambient_color=((0.3,) * 3,),
                               diffuse_color=((0.7,) * 3,), specular_color=((0.2,) * 3,))
    blend = BlendParams(sigma=sigma, gamma=gamma)
    _bench_mesh_mode("silhouette", SoftSilhouetteShader(blend), rasterizer, scene, K, repeats)
    shader = SoftPhongShader(cameras=scene[3], lights=lights, materials=Materials(shininess=32.0), blend_params=blend)
    _bench_mesh_mode("shaded", shader, rasterizer, scene, K, repeats)


def _bench_mesh_mode(mode: str, shader, rasterizer, scene, K: int, repeats: int) -> None:
    """One row: ``MeshRenderer(mode)`` on the CPU (numba) against PyTorch3D's renderer with ``shader``."""
    from pytorch3d.renderer import MeshRenderer as P3DMeshRenderer
    from pytorch3d.renderer import TexturesVertex
    from pytorch3d.structures import Meshes

    from renderers.mesh import MeshRenderer

    verts, faces, colors, _, cam = scene
    B, (size, _) = len(cam), cam.image_size
    sigma, gamma = shader.blend_params.sigma, shader.blend_params.gamma
    ours = MeshRenderer(mode, sigma=sigma, gamma=gamma, faces_per_pixel=K)
    assert ours.backend == "auto"  # numba on the CPU
    theirs = P3DMeshRenderer(rasterizer, shader)
    c = colors if mode == "shaded" else None
    textures = TexturesVertex(colors) if mode == "shaded" else None

    def p3d():
        meshes = Meshes(verts=verts, faces=faces.expand(B, -1, -1), textures=textures)
        image = theirs(meshes, znear=ours.znear, zfar=ours.zfar).permute(0, 3, 1, 2)
        return image[:, 3:] if mode == "silhouette" else image[:, :3]

    with torch.no_grad():
        diff = (ours(verts, faces, cam, c) - p3d()).abs()
    # values beyond 1e-4: faces at the blur radius kept by one side only (float32 against float64 distances)
    note = f"ours: numba; max |diff| {diff.max():.1e}, {int((diff > 1e-4).sum())} of {diff.numel()} > 1e-4"
    record(f"mesh soft {mode}", f"B={B} {size}^2 {faces.shape[0]} faces {K} faces/px",
           *compare(lambda: ours(verts, faces, cam, c), p3d, [verts], repeats),
           f"PyTorch3D rasterizer + {type(shader).__name__}", note, speedup=f"mesh-soft-{mode}")


def bench_mesh_scale(repeats: int) -> None:
    """The numba soft silhouette and Phong shading at larger images and meshes: seconds, and the peak resident
    memory of one forward + backward above the start, each point in a fresh process (after a one-image warm-up)."""
    points = [(16, 64, 3), (16, 128, 3), (16, 256, 3), (16, 64, 4), (16, 64, 5), (16, 128, 5)]
    ctx = multiprocessing.get_context("spawn")
    for mode in ("silhouette", "shaded"):
        for B, size, level in points:
            with ctx.Pool(1) as pool:
                row = pool.apply(_mesh_scale_point, (mode, B, size, level, repeats, torch.get_num_threads()))
            SCALE_ROWS.append(row)
            print(f"  done: mesh-scale {mode} B={B} {size}^2 {row['faces']} faces", flush=True)


def _mesh_scale_point(mode: str, B: int, size: int, level: int, repeats: int, threads: int) -> dict:
    from renderers.mesh import MeshRenderer

    torch.set_num_threads(threads)
    verts, faces, colors, _, cam = _mesh_scene(B, size, level)
    ours = MeshRenderer(mode, sigma=1e-4, gamma=1e-4, faces_per_pixel=20)
    c = colors if mode == "shaded" else None
    ours(verts[:1], faces, cam[:1], None if c is None else c[:1]).sum().backward()  # compile / load the kernels

    def fwd():
        with torch.no_grad():
            ours(verts, faces, cam, c)

    def fwd_bwd():
        verts.grad = None
        ours(verts, faces, cam, c).sum().backward()

    peak = _peak_memory_mb(fwd_bwd)
    return dict(mode=mode, B=B, size=size, faces=faces.shape[0], fwd=best_of(fwd, repeats),
                fwd_bwd=best_of(fwd_bwd, repeats), peak_mb=peak)


def _peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory (MiB) above the start while ``fn`` runs, sampled every 0.2 ms from /proc (Linux;
    NaN elsewhere): torch's tensors and the kernels' own arrays alike."""
    import threading

    if not os.path.exists("/proc/self/statm"):
        fn()
        return math.nan

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(2e-4)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return (max(peak[0], rss()) - start) / 2**20


# ---------------------------------------------------------------------------- NeRF
def bench_nerf(repeats: int) -> None:
    from pytorch3d.renderer import EmissionAbsorptionRaymarcher
    from pytorch3d.renderer.implicit.sample_pdf import sample_pdf

    from renderers.nerf import NeRFRenderer, RadianceMLP

    torch.manual_seed(0)
    mlp = RadianceMLP(depth=4, width=128, skips=())
    cam = orbit(1, 64)  # 4,096 rays
    nc, nf, near, far = 64, 128, 2.0, 6.0
    ours = NeRFRenderer(n_coarse=nc, n_fine=nf, near=near, far=far, chunk=4096).eval()
    o, d = (x.reshape(1, -1, 3) for x in cam.rays())
    ea = EmissionAbsorptionRaymarcher()

    def query(t):
        pts = o[:, :, None] + t[..., None] * d[:, :, None]
        sigma, rgb = mlp(pts.reshape(1, -1, 3), d[:, :, None].expand_as(pts).reshape(1, -1, 3))
        return sigma.reshape(t.shape), rgb.reshape(*t.shape, 3)

    def p3d():
        """The same NeRF from PyTorch3D parts: EA raymarcher on opacities, its C++ sample_pdf."""
        delta = (far - near) / nc
        t = near + (torch.arange(nc) + 0.5) * delta
        t = t.expand(1, o.shape[1], nc)
        sigma, rgb = query(t)
        alpha = -torch.expm1(-sigma * delta)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], -1), -1)
        edges = near + torch.arange(nc + 1) * delta
        t_f = sample_pdf(edges.expand(1, o.shape[1], nc + 1), (alpha * trans).detach(), nf, det=True)
        t_all = torch.sort(torch.cat([t, t_f], -1), -1).values
        mids = (t_all[..., 1:] + t_all[..., :-1]) / 2
        deltas = torch.diff(torch.cat([torch.full_like(t_all[..., :1], near), mids,
                                       torch.full_like(t_all[..., :1], far)], -1), dim=-1)
        sigma, rgb = query(t_all)
        return ea((-torch.expm1(-sigma * deltas))[..., None], rgb)

    params = list(mlp.parameters())
    with torch.no_grad():
        rgba = p3d()
        diff = (ours.render_rays(mlp, o, d).rgb - (rgba[..., :3] + 1 - rgba[..., 3:])).abs().max().item()
    record("NeRF", f"{o.shape[1]} rays x ({nc}+{nf}) samples, 4x128 MLP",
           *compare(lambda: ours(mlp, cam).rgb, p3d, params, repeats),
           "same MLP, PyTorch3D EA raymarcher + sample_pdf", f"max |RGB diff| {diff:.1e}")


def bench_nerf_fast(repeats: int, rays: int = 4096) -> None:
    """The per-scene fit's renderers on 4,096 rays (one 64² view) of an object filling ~3 % of its box: the MLP
    with 32 + 32 samples (the old fit path), with empty-space skipping, the feature-grid field with and without
    skipping, each against PyTorch3D's ``ImplicitRenderer`` (NDC grid raysampler, 64 samples per ray, EA
    raymarcher) on the same 4x128 MLP. Gradients go to the field's parameters."""
    from pytorch3d.renderer import EmissionAbsorptionRaymarcher, ImplicitRenderer, NDCMultinomialRaysampler

    from renderers.gridfield import FeatureGridField
    from renderers.nerf import NeRFRenderer, RadianceMLP
    from renderers.occupancy import OccupancyGrid
    from renderers.voxel import ray_box

    torch.manual_seed(0)
    size = int(math.isqrt(rays))
    cam = orbit(1, size)
    o, d = (x.reshape(1, -1, 3) for x in cam.rays())
    d = d / d.norm(dim=-1, keepdim=True)
    near, far = ray_box(o, d, -torch.ones(3), torch.ones(3))
    near, far = near.clamp_min(0), torch.maximum(far, near.clamp_min(0) + 1e-6)
    mlp = RadianceMLP(depth=4, width=128, skips=(2,), pos_freqs=6, dir_freqs=2)
    occ = OccupancyGrid(-1.0, 1.0, 64)
    c = (torch.arange(64) + 0.5) / 32 - 1
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    inside = (torch.stack([xx, yy, zz], -1).abs() < 0.3).all(-1)  # a cube of side 0.6: 2.7 % of the box
    occ.density.copy_(torch.where(inside, 1e3, 0.0))
    occ.refresh()
    grid = FeatureGridField(-1.0, 1.0, res=96, final_res=96)
    with torch.no_grad():
        gc = (torch.arange(96) + 0.5) / 48 - 1
        gz, gy, gx = torch.meshgrid(gc, gc, gc, indexing="ij")
        solid = (torch.stack([gx, gy, gz], -1).abs() < 0.28).all(-1)
        grid.density[0, 0] = torch.where(solid, 5.0, -10.0) / grid.scale  # an opaque cube, empty around it
        grid.features.normal_(0, 0.01)

    class P3DField(torch.nn.Module):
        """The same MLP as a PyTorch3D volumetric function: per-sample opacities 1 - exp(-sigma delta)."""

        def forward(self, ray_bundle, **kw):
            from pytorch3d.renderer import ray_bundle_to_ray_points

            pts = ray_bundle_to_ray_points(ray_bundle)
            dirs = torch.nn.functional.normalize(ray_bundle.directions, dim=-1)[..., None, :].expand_as(pts)
            sigma, rgb = mlp(pts.reshape(1, -1, 3), dirs.reshape(1, -1, 3))
            ln = ray_bundle.lengths
            delta = torch.cat([ln[..., 1:] - ln[..., :-1], torch.full_like(ln[..., :1], 1e10)], -1)
            delta = delta * ray_bundle.directions.norm(dim=-1, keepdim=True)
            alpha = -torch.expm1(-sigma.reshape(ln.shape) * delta)
            return alpha[..., None], rgb.reshape(*ln.shape, 3)

    dist = 4.0 * math.sqrt(1 + 0.15**2)  # orbit's camera distance
    sampler = NDCMultinomialRaysampler(image_width=size, image_height=size, n_pts_per_ray=64,
                                       min_depth=dist - math.sqrt(3), max_depth=dist + math.sqrt(3))
    p3d_renderer = ImplicitRenderer(sampler, EmissionAbsorptionRaymarcher())
    p3d_cam, p3d_fn = cam.to_pytorch3d(), P3DField()

    def p3d():
        return p3d_renderer(cameras=p3d_cam, volumetric_function=p3d_fn)[0]

    old = NeRFRenderer(32, 32, chunk=rays)
    march_mlp = NeRFRenderer(128, 0, chunk=rays)
    march_grid = NeRFRenderer(192, 0, chunk=rays)
    cases = [
        ("NeRF MLP 32+32", "4x128 MLP, 32 coarse + 32 importance", lambda: old.render_rays(mlp, o, d, near=near,
                                                                                            far=far).rgb, mlp),
        ("NeRF MLP + skip", "4x128 MLP, 128 samples, 64³ occupancy", lambda: march_mlp.render_rays(
            mlp, o, d, near=near, far=far, occupancy=occ).rgb, mlp),
        ("NeRF grid", "96³ grid + 12 feat, 192 samples", lambda: march_grid.render_rays(
            lambda p, dd: grid(p, dd), o, d, near=near, far=far).rgb, grid),
        ("NeRF grid + skip", "96³ grid + 12 feat, 192 samples, 64³ occ", lambda: march_grid.render_rays(
            grid, o, d, near=near, far=far, occupancy=occ).rgb, grid),
    ]
    for case, settings, fn, module in cases:
        params = list(module.parameters()) + list(mlp.parameters())
        skip = "skip" in case
        note = f"{100 * occ.occupied_fraction():.1f} % cells occupied" if skip else ""
        record(case, f"{rays} rays, {settings}", *compare(fn, p3d, params, repeats),
               "ImplicitRenderer, 4x128 MLP, 64 samples", note,
               speedup=f"nerf-{case.split()[1].lower()}-{'skip' if skip else 'all'}")


# ------------------------------------------------------------------------ Gaussian
def _atoms_in_a_ball(N: int, B: int, box: int, ps: float, seed: int) -> tuple[torch.Tensor, Camera]:
    """N atom centres (N, 3) uniform in a ball of radius 0.3 box (world units, requiring grad) and B random
    cryo-EM cameras of ``box`` px at ``ps`` world units per px."""
    from renderers.cameras import axis_angle_to_matrix

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, 3, generator=g)
    centers = u / u.norm(dim=-1, keepdim=True) * torch.rand(N, 1, generator=g) ** (1 / 3) * 0.3 * box * ps
    cam = Camera.from_pose(axis_angle_to_matrix(torch.randn(B, 3, generator=g)), torch.zeros(B, 2), ps, box)
    return centers.requires_grad_(), cam


def bench_gaussian(repeats: int) -> None:
    for box in (64, 128):
        bench_gaussian_box(box, repeats)


def bench_gaussian_box(box: int, repeats: int, N: int = 2000, B: int = 64, ps: float = 1.0,
                       sigma: float = 2.0) -> None:
    from renderers.gaussian import gaussian_density_map, gaussian_projection
    from renderers.voxel import VoxelRenderer

    centers, cam = _atoms_in_a_ball(N, B, box, ps, seed=box)
    voxel = VoxelRenderer("projection", n_samples=box, size=box * ps, center=(box / 2 - box // 2 - 0.5) * ps)

    def gauss():
        return gaussian_projection(centers, 1.0, sigma, cam)

    def via_voxels():
        m = gaussian_density_map(centers, 1.0, sigma, box, ps)
        return voxel(m[None, None], cam)

    with torch.no_grad():
        a, b = gauss(), via_voxels()
        rel = ((b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).max().item()
    record("Gaussian projector", f"{N} atoms B={B} {box}^2 (sigma {sigma / ps:.0f} px)",
           *compare(gauss, via_voxels, [centers], repeats if box <= 64 else 1),
           f"voxel path: {box}^3 density map + projection ({box} samples/ray)",
           f"rel L2 vs voxel path {rel:.1%}", images=B)


# ------------------------------------------------------------- Gaussian backends
def bench_splat(repeats: int) -> None:
    """The numba backend of the Gaussian projector against its torch backend, in the atom VAE's regime:
    B=64 with gradients (training step), B=576 (Gauss-Newton finite-difference renders, forward only)."""
    for B, bwd_repeats in ((64, repeats), (576, 1)):
        bench_splat_case(B, repeats, bwd_repeats)


def bench_splat_case(B: int, repeats: int, bwd_repeats: int, N: int = 5892, box: int = 64, ps: float = 2.0,
                     sigma: float = 1.0) -> None:
    from renderers.gaussian import gaussian_projection

    centers, cam = _atoms_in_a_ball(N, B, box, ps, seed=B)

    def numba():
        return gaussian_projection(centers, 1.0, sigma, cam, backend="numba")

    def dense():
        return gaussian_projection(centers, 1.0, sigma, cam, backend="torch")

    with torch.no_grad():
        a, b = numba(), dense()
        rel = ((a - b).abs().max() / b.abs().max()).item()
    record("Gaussian numba splat", f"{N} atoms B={B} {box}^2 (sigma {sigma / ps:.1f} px) f32",
           *compare(numba, dense, [centers], repeats, bwd_repeats),
           "same projector, backend='torch' (dense product)", f"max |diff| / max {rel:.1e}", images=B)


def bench_jvp(repeats: int, B: int = 64, K: int = 8, N: int = 5892, box: int = 64, ps: float = 2.0,
              sigma: float = 1.0) -> None:
    """The atom VAE's Gauss-Newton step: one image and its K derivatives along directions of the atoms, by
    ``gaussian_projection_jvp`` against K + 1 renderings (the image and K finite-difference neighbours). Forward
    only (the step needs no gradient); the f+b columns repeat the forward times."""
    from renderers.gaussian import gaussian_projection, gaussian_projection_jvp

    centers, cam = _atoms_in_a_ball(N, B, box, ps, seed=K)
    centers = centers.detach()
    tangents = torch.randn(B, K, N, 3, generator=torch.Generator().manual_seed(1))
    cams = Camera.from_pose(cam.R.repeat_interleave(K + 1, 0), torch.zeros(B * (K + 1), 2), ps, box)
    moved = torch.cat([centers.expand(B, 1, N, 3), centers + 1e-2 * tangents], 1).reshape(-1, N, 3)

    with torch.no_grad():
        ours = best_of(lambda: gaussian_projection_jvp(centers, tangents, 1.0, sigma, cam), repeats)
        theirs = best_of(lambda: gaussian_projection(moved, 1.0, sigma, cams), repeats)
    record("Gaussian jvp", f"{N} atoms B={B} K={K} {box}^2 (sigma {sigma / ps:.1f} px) f32", (ours, ours),
           (theirs, theirs), f"{K + 1} renderings per image (finite differences)", "forward only", images=B)


def print_table() -> None:
    head = (f"{'case':<21} {'settings':<44} {'fwd ours':>9} {'fwd ref':>9} {'ratio':>6} "
            f"{'f+b ours':>9} {'f+b ref':>9} {'ratio':>6}  reference; note")
    print("\n" + head + "\n" + "-" * len(head))
    ms = lambda s: f"{1e3 * s:8.1f}ms"  # noqa: E731
    for r in ROWS:
        (fo, bo), (ft, bt) = r["ours"], r["theirs"]
        print(f"{r['case']:<21} {r['settings']:<44} {ms(fo)} {ms(ft)} {fo / ft:6.2f} {ms(bo)} {ms(bt)} "
              f"{bo / bt:6.2f}  {r['ref']}; {r['note']}")
        if r["images"]:
            n = r["images"]
            print(f"{'':<21} {'  images/s':<44} {n / fo:9.0f} {n / ft:9.0f} {'':>6} {n / bo:9.0f} {n / bt:9.0f}")


def print_scale_table() -> None:
    if not SCALE_ROWS:
        return
    head = f"{'mesh-scale (numba, ours only)':<32} {'fwd':>9} {'f+b':>9} {'f+b/image':>10} {'peak mem':>10}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in SCALE_ROWS:
        name = f"{r['mode']} B={r['B']} {r['size']}^2 {r['faces']} faces"
        print(f"{name:<32} {1e3 * r['fwd']:7.1f}ms {1e3 * r['fwd_bwd']:7.1f}ms {1e3 * r['fwd_bwd'] / r['B']:8.1f}ms "
              f"{r['peak_mb']:7.0f} MB")


def print_speedups() -> None:
    """One line per row that names a speedup: reference time / our time (above 1: we are faster)."""
    for r in ROWS:
        if r["speedup"]:
            (fo, bo), (ft, bt) = r["ours"], r["theirs"]
            print(f"speedup {r['speedup']}: forward {ft / fo:.1f}x, forward+backward {bt / bo:.1f}x vs PyTorch3D CPU")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m renderers.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best of)")
    parser.add_argument("--only", default="voxel,mesh,nerf,nerf-fast,gaussian,splat,jvp",
                        help="comma-separated cases (also: mesh-scale)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's choice); 1 is steadier on an oversubscribed machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import pytorch3d

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, pytorch3d {pytorch3d.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs{load}; float32 on CPU")
    cases = {"voxel": bench_voxel, "mesh": bench_mesh, "mesh-scale": bench_mesh_scale, "nerf": bench_nerf,
             "nerf-fast": bench_nerf_fast,
             "gaussian": bench_gaussian, "splat": bench_splat, "jvp": bench_jvp}
    for name in args.only.split(","):
        if name not in cases:
            parser.error(f"--only: unknown case {name!r}; expected some of {','.join(cases)}")
        cases[name](args.repeats)
    if ROWS:
        print_table()
    print_scale_table()
    print_speedups()


if __name__ == "__main__":
    main()
