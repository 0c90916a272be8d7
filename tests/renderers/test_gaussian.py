"""Gaussian projector: quadrature, mass, map/projection consistency, gradients, bad input."""

import math

import pytest
import torch

from renderers.cameras import Camera, euler_zyz_to_matrix
from renderers.gaussian import GaussianProjector, gaussian_density_map, gaussian_projection, pixel_integrals


def random_rotations(B, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, 4, generator=g, dtype=dtype), dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def quadrature_image(centers, amps, sigmas, R, shift, apix, box, sub=6, nz=81):
    """Brute force: sample the 3D density on sub x sub points per pixel and nz depths, sum."""
    c = box // 2 + 0.5
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub
    pix = torch.arange(box, dtype=torch.float64)
    u = (pix[:, None] + off).reshape(-1)  # fine pixel coordinates
    x = (u - c) * apix - shift[0]
    y = (u - c) * apix - shift[1]
    z = torch.linspace(-25, 25, nz, dtype=torch.float64)
    X, Y, Z = torch.meshgrid(x, y, z, indexing="xy")  # (fine_y, fine_x, z)
    view_pts = torch.stack([X, Y, Z], -1)
    world = view_pts @ R  # x_world = R^T x_view
    dens = 0
    for cn, a, s in zip(centers, amps, sigmas):
        r2 = ((world - cn) ** 2).sum(-1)
        dens = dens + a * torch.exp(-r2 / (2 * s * s)) / (2 * math.pi * s * s) ** 1.5
    line = torch.trapezoid(dens, z, dim=-1)  # (fine_y, fine_x)
    return line.reshape(box, sub, box, sub).mean((1, 3))


def test_matches_numerical_quadrature():
    torch.manual_seed(0)
    centers = torch.randn(3, 3, dtype=torch.float64) * 3
    amps = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    sigmas = torch.tensor([1.5, 2.0, 2.5], dtype=torch.float64)
    R = random_rotations(1)[0]
    shift = torch.tensor([1.3, -0.7], dtype=torch.float64)
    cam = Camera.from_pose(R[None], shift[None], 1.0, 16)
    img = gaussian_projection(centers, amps, sigmas, cam)[0, 0]
    ref = quadrature_image(centers, amps, sigmas, R, shift, 1.0, 16)
    assert (img - ref).abs().max() < 1e-3 * ref.max()


def test_point_lands_where_the_camera_projects_it():
    center = torch.tensor([[4.0, -6.0, 3.0]], dtype=torch.float64)
    R = euler_zyz_to_matrix(*torch.tensor([[0.3], [1.1], [-0.4]], dtype=torch.float64))
    cam = Camera.from_pose(R, torch.tensor([[2.0, 1.0]], dtype=torch.float64), 2.0, 32)
    img = gaussian_projection(center, 1.0, 3.0, cam)[0, 0]
    v, u = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    w = img / img.sum()
    uv, _ = cam.project(center[None])
    assert torch.allclose(torch.stack([(w * u).sum(), (w * v).sum()]), uv[0, 0], atol=1e-6)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 6.0])
def test_mass_is_preserved(sigma):
    torch.manual_seed(1)
    centers = torch.randn(50, 3, dtype=torch.float64) * 4
    amps = torch.rand(50, dtype=torch.float64)
    cam = Camera.from_pose(random_rotations(5), torch.zeros(5, 2, dtype=torch.float64), 1.5, 64)
    img = gaussian_projection(centers, amps, sigma, cam)
    assert torch.allclose(img.sum((1, 2, 3)) * 1.5**2, amps.sum().expand(5), rtol=1e-7)
    vol = gaussian_density_map(centers, amps, sigma, 48, 1.5)
    assert torch.allclose(vol.sum() * 1.5**3, amps.sum(), rtol=1e-4 if sigma > 5 else 1e-9)


def test_map_summed_along_z_equals_projection_at_identity():
    torch.manual_seed(2)
    centers = torch.randn(20, 3, dtype=torch.float64) * 5
    sig = torch.rand(20, dtype=torch.float64) + 0.5
    cam = Camera.from_pose(torch.eye(3, dtype=torch.float64)[None], torch.zeros(1, 2, dtype=torch.float64), 2.0, 33)
    img = gaussian_projection(centers, 1.0, sig, cam)[0, 0]
    vol = gaussian_density_map(centers, 1.0, sig, 33, 2.0)
    assert torch.allclose(vol.sum(0) * 2.0, img, atol=1e-10)


def test_windowed_and_dense_pixel_integrals_agree():
    torch.manual_seed(3)
    u = torch.rand(4, 30, dtype=torch.float64) * 80 - 8  # some centres outside [0, 64)
    w = torch.full_like(u, 0.7)
    windowed = pixel_integrals(u, w, 64)
    dense = pixel_integrals(u, w, 64, tail=100.0)
    assert torch.allclose(windowed, dense, atol=1e-12)


def test_batched_centers_and_gradients():
    torch.manual_seed(4)
    centers = (torch.randn(2, 4, 3, dtype=torch.float64) * 2).requires_grad_()
    amps = torch.rand(4, dtype=torch.float64).requires_grad_()
    sig = (torch.rand(4, dtype=torch.float64) + 0.8).requires_grad_()
    R = random_rotations(2).requires_grad_()
    cam = Camera.from_pose(R, torch.zeros(2, 2, dtype=torch.float64), 1.0, 8)
    f = lambda c, a, s: GaussianProjector()(c, a, s, cam)  # noqa: E731
    assert torch.autograd.gradcheck(f, (centers, amps, sig))
    f(centers, amps, sig).sum().backward()
    assert R.grad is not None and torch.isfinite(R.grad).all()


def test_float32_matches_float64():
    torch.manual_seed(5)
    centers = torch.randn(100, 3) * 8
    cam = Camera.from_pose(random_rotations(3, torch.float32), torch.zeros(3, 2), 2.0, 32)
    img32 = gaussian_projection(centers, 1.0, 1.0, cam)
    img64 = gaussian_projection(centers.double(), 1.0, 1.0, cam.to(dtype=torch.float64))
    assert img32.dtype == torch.float32
    assert torch.allclose(img32.double(), img64, atol=1e-5 * img64.max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    centers = torch.randn(100, 3) * 8
    cam = Camera.from_pose(random_rotations(3, torch.float32), torch.zeros(3, 2), 2.0, 32)
    cpu = gaussian_projection(centers, 1.0, 1.0, cam)
    gpu = gaussian_projection(centers.cuda(), 1.0, 1.0, cam.to(device="cuda"))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_bad_input_raises_value_error():
    cam = Camera.from_pose(random_rotations(2), torch.zeros(2, 2, dtype=torch.float64), 1.0, 8)
    c = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="centers"):
        gaussian_projection(torch.zeros(5, 2, dtype=torch.float64), 1.0, 1.0, cam)
    with pytest.raises(ValueError, match="centers"):
        gaussian_projection(torch.zeros(3, 5, 3, dtype=torch.float64), 1.0, 1.0, cam)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_projection(torch.full((5, 3), float("nan"), dtype=torch.float64), 1.0, 1.0, cam)
    with pytest.raises(ValueError, match="amplitudes"):
        gaussian_projection(c, torch.ones(4, dtype=torch.float64), 1.0, cam)
    with pytest.raises(ValueError, match="sigmas"):
        gaussian_projection(c, 1.0, -1.0, cam)
    with pytest.raises(ValueError, match="dtype"):
        gaussian_projection(c.float(), 1.0, 1.0, cam)
    persp = Camera.create(random_rotations(2), torch.zeros(2, 3, dtype=torch.float64), (8, 8), focal=8.0)
    with pytest.raises(ValueError, match="orthographic"):
        gaussian_projection(c, 1.0, 1.0, persp)
    with pytest.raises(ValueError, match="shape"):
        gaussian_density_map(c, 1.0, 1.0, 0, 1.0)
