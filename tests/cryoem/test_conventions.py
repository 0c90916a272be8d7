"""Pose conventions proved on data: reconstruction by backprojection, and cryoDRGN's own files."""

from pathlib import Path

import numpy as np
import torch

from cryoem.formats.mrc import read_mrc
from cryoem.particles import load_particles
from cryoem.structure import read_structure, scattering_gaussians
from renderers.cameras import Camera, euler_zyz_to_matrix
from renderers.gaussian import gaussian_density_map, gaussian_projection

DATA = Path(__file__).resolve().parents[1] / "data"


def corr(a, b, dims):
    a = a - a.mean(dims, keepdim=True)
    b = b - b.mean(dims, keepdim=True)
    return (a * b).sum(dims) / ((a * a).sum(dims) * (b * b).sum(dims)).sqrt()


def ramp_filter(images):
    """Weight 2D images by |k| (the backprojection density of uniformly spread views)."""
    D = images.shape[-1]
    k = torch.fft.fftfreq(D, dtype=images.dtype)
    w = torch.sqrt(k[:, None] ** 2 + torch.fft.rfftfreq(D, dtype=images.dtype)[None] ** 2)
    return torch.fft.irfft2(torch.fft.rfft2(images) * w, s=(D, D))


def backproject(images, R, pixel_size):
    """Real-space backprojection of (B, D, D) images into a D^3 map using Plato's camera convention."""
    B, D, _ = images.shape
    c = D // 2
    ax = (torch.arange(D, dtype=images.dtype) - c) * pixel_size
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    world = torch.stack([x, y, z], -1).reshape(-1, 3)
    cam = Camera.from_pose(R, torch.zeros(B, 2, dtype=images.dtype), pixel_size, D)
    uv, _ = cam.project(world.expand(B, -1, 3))
    grid = (uv / D * 2 - 1)[:, :, None]  # align_corners=False: pixel j spans [j, j+1)
    vals = torch.nn.functional.grid_sample(images[:, None], grid, align_corners=False)
    return vals.sum(0).reshape(D, D, D)


def reconstruct(images, R, pixel_size):
    return backproject(ramp_filter(images), R, pixel_size)


def uniform_rotations(n, seed):
    g = torch.Generator().manual_seed(seed)
    rot = torch.rand(n, generator=g, dtype=torch.float64) * 2 * np.pi
    tilt = torch.acos(1 - 2 * torch.rand(n, generator=g, dtype=torch.float64))
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 2 * np.pi
    return euler_zyz_to_matrix(rot, tilt, psi)


def test_backprojection_recovers_the_map_only_with_the_right_convention():
    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    _, amp, sig = scattering_gaussians(s, bfactor=30.0)
    xyz = torch.as_tensor(s.coords[0] - s.centroid())
    D, apix = 32, 2.0
    source = gaussian_density_map(xyz, torch.as_tensor(amp), torch.as_tensor(sig), D, apix)
    R = uniform_rotations(400, seed=0)
    images = gaussian_projection(xyz, torch.as_tensor(amp), torch.as_tensor(sig),
                                 Camera.from_pose(R, torch.zeros(400, 2, dtype=torch.float64), apix, D))[:, 0]
    good = corr(reconstruct(images, R, apix), source, (0, 1, 2))
    transposed = corr(reconstruct(images, R.transpose(1, 2), apix), source, (0, 1, 2))
    assert good >= 0.9, good
    assert transposed < good - 0.15, (good, transposed)


def test_cryodrgn_poses_reproduce_cryodrgn_toy_projections():
    """cryoDRGN's toy volume projected with its own pose .pkl matches its toy projections."""
    vol, _, _ = read_mrc(DATA / "toymodel_small_nocenter.mrc")
    ps = load_particles(DATA / "toy_projections_50.mrcs", poses=DATA / "toy_rot_trans_50.pkl", pixel_size=1.0)
    imgs = ps.images(slice(None))[:, 0].double()
    R = torch.stack([ps[i]["R"] for i in range(len(ps))]).double()
    k, i, j = np.nonzero(vol > 0)
    c = vol.shape[0] // 2
    xyz = torch.as_tensor(np.stack([j - c, i - c, k - c], 1), dtype=torch.float64)
    w = torch.as_tensor(vol[k, i, j], dtype=torch.float64)
    zero = torch.zeros(len(R), 2, dtype=torch.float64)
    proj = lambda RR: gaussian_projection(xyz, w, 0.5, Camera.from_pose(RR, zero, 1.0, 30))[:, 0]  # noqa: E731
    good = corr(proj(R), imgs, (1, 2))
    transposed = corr(proj(R.transpose(1, 2)), imgs, (1, 2))
    rand = corr(proj(uniform_rotations(len(R), seed=1)), imgs, (1, 2))
    assert good.mean() > 0.99 and good.min() > 0.95
    assert transposed.mean() < 0.8 and rand.mean() < 0.8


def test_hand_rotations_are_consistent_with_hand_images():
    """Reconstruct the hand from hand.mrcs with hand_rot.pkl, reproject: per-image correlation
    far above what the transposed convention or random poses give (hand-vol.mrc is not the
    volume these images were made from, see tests/data/README.md)."""
    ps = load_particles(DATA / "hand_32px.mrcs", poses=DATA / "hand_rot.pkl", pixel_size=2.0)
    imgs = ps.images(slice(None))[:, 0].double()
    R = torch.stack([ps[i]["R"] for i in range(len(ps))]).double()

    def self_consistency(RR):
        vol = reconstruct(imgs, RR, 2.0).clamp_min(0)
        k, i, j = torch.nonzero(vol > 0.05 * vol.max(), as_tuple=True)
        xyz = torch.stack([j, i, k], 1).double() * 2.0 - 32.0
        cam = Camera.from_pose(RR, torch.zeros(len(RR), 2, dtype=torch.float64), 2.0, 32)
        return corr(gaussian_projection(xyz, vol[k, i, j], 1.0, cam)[:, 0], imgs, (1, 2))

    good = self_consistency(R)
    transposed = self_consistency(R.transpose(1, 2))
    rand = self_consistency(uniform_rotations(len(R), seed=2))
    assert good.mean() > 0.9, good.mean()
    assert good.mean() > transposed.mean() + 0.1 and good.mean() > rand.mean() + 0.1, (good.mean(),
                                                                                       transposed.mean(), rand.mean())
