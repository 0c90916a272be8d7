"""CUDA smoke check: every renderer and the atom VAE run on CUDA in float32 and float64 and agree with CPU.

Run on a machine with a GPU: ``python scripts/cuda_check.py``. Prints one row per check
(max relative difference to the CPU float64 result, and whether backward ran), then a
short GPU timing of the Gaussian projector. The mesh renderer needs PyTorch3D's CUDA
build and is checked only when ``pytorch3d`` imports.
"""

from __future__ import annotations

import time

import torch

from renderers.cameras import Camera, look_at
from renderers.gaussian import gaussian_projection
from renderers.gqn import ConvDRAW
from renderers.nerf import NeRFRenderer, RadianceMLP
from renderers.voxel import VoxelRenderer

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script itself


def cameras(B: int, dtype, device, ortho=False, size=(24, 24)) -> Camera:
    g = torch.Generator().manual_seed(0)
    eye = torch.nn.functional.normalize(torch.randn(B, 3, generator=g, dtype=torch.float64), dim=-1) * 4
    R, t = look_at(eye, torch.zeros(B, 3, dtype=torch.float64), up=(0, 0, 1))
    cam = Camera.create(R, t, size, pixel_size=0.1) if ortho else Camera.create(R, t, size, fov=0.7)
    return cam.to(device, dtype)


def check(name: str, fn, params_fn) -> None:
    """fn(dtype, device, params) -> Tensor; compares CUDA float32/64 with CPU float64, runs backward on CUDA."""
    ref = fn(torch.float64, "cpu", params_fn(torch.float64, "cpu")).detach()
    for dt in (torch.float32, torch.float64):
        p = params_fn(dt, DEV)
        out = fn(dt, DEV, p)
        out.float().square().mean().backward()
        grads = all(x.grad is not None and torch.isfinite(x.grad).all() for x in p if x.requires_grad)
        rel = ((out.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        print(f"{name:28s} {str(dt):14s} rel diff to CPU fp64 {rel:9.2e}   backward ok: {grads}")


def main() -> None:
    torch.manual_seed(0)
    grid = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    feat = torch.rand(1, 3, 16, 16, 16, dtype=torch.float64)
    leaf = lambda x, dt, dev: x.to(dev, dt).detach().clone().requires_grad_()  # noqa: E731
    vol = lambda dt, dev: [leaf(grid, dt, dev), leaf(feat, dt, dev)]  # noqa: E731
    ea = VoxelRenderer("emission_absorption", n_samples=48, jitter=False).eval()
    check("voxel emission-absorption", lambda dt, dev, p: ea(p[0].expand(2, -1, -1, -1, -1), cameras(2, dt, dev),
                                                             p[1].expand(2, -1, -1, -1, -1)), vol)
    pr = VoxelRenderer("projection", n_samples=48, jitter=False).eval()
    check("voxel projection (ortho)", lambda dt, dev, p: pr(p[0], cameras(2, dt, dev, ortho=True)), vol)

    mlp64 = RadianceMLP(depth=4, width=64, skips=(), pos_freqs=6, dir_freqs=2).double()
    nerf = NeRFRenderer(n_coarse=16, n_fine=16, near=2.0, far=6.0, jitter=False).eval()

    def nerf_fn(dt, dev, p):
        field = mlp64.to(dev, dt)
        return nerf(field, cameras(1, dt, dev, size=(12, 12))).rgb

    check("NeRF (MLP field)", nerf_fn, lambda dt, dev: list(mlp64.to(dev, dt).parameters()))

    atoms = torch.randn(500, 3, dtype=torch.float64) * 10
    g_params = lambda dt, dev: [atoms.to(dev, dt).detach().clone().requires_grad_()]  # noqa: E731
    g_cam = lambda dt, dev: Camera.from_pose(cameras(4, dt, dev).R, torch.zeros(4, 2, dtype=dt, device=dev),  # noqa: E731
                                            1.0, 48)
    check("Gaussian projector", lambda dt, dev, p: gaussian_projection(p[0], 1.0, 1.5, g_cam(dt, dev)), g_params)

    gqn = ConvDRAW(image_channels=3, image_size=32, r_channels=16, hidden=16, z_channels=2, canvas_channels=8,
                   steps=3).double()
    x, v, r = torch.rand(2, 3, 32, 32), torch.randn(2, 7), torch.randn(2, 16, 1, 1)

    print("GQN: CUDA and CPU draw different random numbers, so only shapes, finiteness and backward are checked")
    for dt in (torch.float32, torch.float64):
        m = gqn.to(DEV, dt)
        mean, kl = m(x.to(DEV, dt), v.to(DEV, dt), r.to(DEV, dt))
        (mean.mean() + kl.mean()).backward()
        ok = all(torch.isfinite(q.grad).all() for q in m.parameters() if q.grad is not None)
        print(f"{'GQN ConvDRAW':28s} {str(dt):14s} mean {tuple(mean.shape)} finite grads: {ok}")

    try:
        from renderers.mesh import MeshRenderer, ico_sphere

        verts, faces = ico_sphere(2)
        mesh = MeshRenderer("silhouette")
        check("mesh soft silhouette", lambda dt, dev, p: mesh(p[0][None], faces.to(dev)[None], cameras(1, dt, dev)),
              lambda dt, dev: [verts.to(dev, dt).detach().clone().requires_grad_()])
    except ImportError as e:
        print(f"mesh renderer skipped: {e}")

    for N, D in ((2000, 64), (2000, 128)):
        B = 256
        x = torch.randn(N, 3, device=DEV) * 15
        cam = Camera.from_pose(cameras(B, torch.float32, DEV).R, torch.zeros(B, 2, device=DEV), 2.0, D)
        gaussian_projection(x, 1.0, 1.5, cam)
        torch.cuda.synchronize() if DEV == "cuda" else None
        t = time.time()
        for _ in range(10):
            gaussian_projection(x, 1.0, 1.5, cam)
        torch.cuda.synchronize() if DEV == "cuda" else None
        where = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
        print(f"Gaussian projector on {where}: {N} atoms, {D}^2, B={B}: {10 * B / (time.time() - t):,.0f} images/s")


if __name__ == "__main__":
    main()
