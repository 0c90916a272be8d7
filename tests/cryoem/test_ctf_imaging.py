"""CTF (RELION conventions) and the image-formation parts: shift, noise, composition."""

import math

import numpy as np
import pytest
import torch

from cryoem.ctf import CTFParams, ctf_2d, ctf_at, wavelength
from cryoem.imaging import ImageFormation, add_noise, fourier_filter, project
from renderers.cameras import Camera
from renderers.gaussian import gaussian_projection


def test_relativistic_wavelength():
    assert wavelength(300.0).item() == pytest.approx(0.019687, abs=1e-6)
    assert wavelength(200.0).item() == pytest.approx(0.025079, abs=1e-6)


def test_ctf_at_zero_frequency_is_amplitude_contrast_and_first_lobe_positive():
    p = CTFParams.create(15000.0, amp_contrast=0.07)
    assert ctf_at(p, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(0.07, abs=1e-12)
    assert ctf_at(p, torch.tensor(0.01), torch.tensor(0.0)).item() > 0.07


@pytest.mark.parametrize("phase", [0.0, math.pi / 2])
def test_ctf_zeros_fall_at_the_analytic_frequencies(phase):
    dfu, cs_mm, w, kv = 20000.0, 2.7, 0.1, 300.0
    p = CTFParams.create(dfu, amp_contrast=w, cs=cs_mm, voltage=kv, phase_shift=phase)
    lam = wavelength(kv).item()
    cs = cs_mm * 1e7
    offset = phase + math.atan(w / math.sqrt(1 - w * w))
    # gamma(k) = -pi lam df k^2 + pi/2 Cs lam^3 k^4 - offset = -n pi  ->  quadratic in k^2
    a, b = 0.5 * math.pi * cs * lam**3, -math.pi * lam * dfu
    zeros = []
    for n in range(1, 6):
        c = n * math.pi - offset
        k2 = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a)
        zeros.append(math.sqrt(k2))
    k = torch.tensor(zeros, dtype=torch.float64)
    for direction in (0.0, 1.0, 2.5):
        kx, ky = k * math.cos(direction), k * math.sin(direction)
        assert ctf_at(p, kx, ky).abs().max() < 1e-9
        eps = 1e-4
        before = ctf_at(p, (k - eps) * math.cos(direction), (k - eps) * math.sin(direction))
        after = ctf_at(p, (k + eps) * math.cos(direction), (k + eps) * math.sin(direction))
        assert (before * after < 0).all()


def test_astigmatism_angle_and_bfactor():
    p = CTFParams.create(20000.0, 10000.0, angle=math.radians(30), amp_contrast=0.0, cs=0.0)
    lam = wavelength(300.0).item()
    k = 0.05
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    along_u = ctf_at(p, t(k * math.cos(math.radians(30))), t(k * math.sin(math.radians(30))))
    along_v = ctf_at(p, t(k * math.cos(math.radians(120))), t(k * math.sin(math.radians(120))))
    assert along_u.item() == pytest.approx(math.sin(math.pi * lam * 20000 * k * k), abs=1e-7)
    assert along_v.item() == pytest.approx(math.sin(math.pi * lam * 10000 * k * k), abs=1e-7)
    pb = CTFParams.create(20000.0, bfactor=100.0, amp_contrast=0.0, cs=0.0)
    flat = CTFParams.create(20000.0, amp_contrast=0.0, cs=0.0)
    ratio = ctf_at(pb, t(k), t(0.0)) / ctf_at(flat, t(k), t(0.0))
    assert ratio.item() == pytest.approx(math.exp(-100 * k * k / 4), rel=1e-9)


def test_ctf_grid_matches_pointwise_and_tensor_round_trip():
    p = CTFParams.create(torch.tensor([12000.0, 25000.0]), torch.tensor([11000.0, 24000.0]), angle=0.3)
    grid = ctf_2d(p, 32, 1.5, dtype=torch.float64)
    assert grid.shape == (2, 32, 17)
    ky = torch.fft.fftfreq(32, 1.5, dtype=torch.float64)[5]
    kx = torch.fft.rfftfreq(32, 1.5, dtype=torch.float64)[3]
    assert grid[1, 5, 3].item() == pytest.approx(ctf_at(p[1], kx, ky).item(), abs=1e-12)
    q = CTFParams.from_tensor(p.as_tensor())
    assert torch.equal(q.as_tensor(), p.as_tensor())


def _blob(box=32, apix=1.0):
    xyz = torch.tensor([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0]], dtype=torch.float64)
    return xyz, torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([2.0, 2.5], dtype=torch.float64)


def test_fourier_shift_matches_the_exact_projected_shift():
    xyz, a, s = _blob()
    R = torch.eye(3, dtype=torch.float64)[None]
    shift = torch.tensor([[2.3, -1.6]], dtype=torch.float64)
    exact = project(xyz, a, s, R, 1.0, 32, shift_A=shift)
    fourier = fourier_filter(project(xyz, a, s, R, 1.0, 32), 1.0, shift_A=shift)
    assert torch.allclose(exact, fourier, atol=1e-4 * exact.max().item())  # periodic wrap of the tails


def test_noise_has_the_requested_snr():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(64, 1, 48, 48, generator=g, dtype=torch.float64) * 3
    noisy, sigma = add_noise(clean, 0.1, g)
    snr = clean.var(dim=(1, 2, 3)) / (noisy - clean).var(dim=(1, 2, 3))
    assert snr.mean().item() == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError):
        add_noise(clean, 0.0)


def test_image_formation_composes_the_parts_and_is_differentiable():
    xyz, a, s = _blob()
    xyz = xyz.clone().requires_grad_()
    R = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    ctf = CTFParams.create(torch.tensor([10000.0, 20000.0]))
    shift = torch.tensor([[1.0, 0.0], [0.0, -1.5]], dtype=torch.float64)
    out = ImageFormation(32, 1.0)(xyz, a, s, R, shift, ctf)
    cam = Camera.from_pose(R, torch.zeros(2, 2, dtype=torch.float64), 1.0, 32)
    by_hand = fourier_filter(gaussian_projection(xyz, a, s, cam), 1.0, shift, ctf)
    assert torch.allclose(out, by_hand)
    out.square().sum().backward()
    assert torch.isfinite(xyz.grad).all() and xyz.grad.abs().sum() > 0
    assert np.isfinite(out.detach().numpy()).all()


def test_structure_map_is_centred_and_carries_the_mrc_origin(tmp_path):
    from cryoem.formats.mrc import read_mrc, write_mrc
    from cryoem.imaging import structure_map
    from cryoem.structure import read_structure, scattering_gaussians

    from .test_conventions import DATA

    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    vol, origin = structure_map(s, 48, 1.5, bfactor=20.0)
    _, amp, _ = scattering_gaussians(s)
    assert float(vol.sum()) * 1.5**3 == pytest.approx(amp.sum(), rel=1e-3)
    write_mrc(tmp_path / "u.mrc", vol.numpy(), 1.5, origin)
    data, vs, o = read_mrc(tmp_path / "u.mrc")
    z, y, x = np.meshgrid(*(np.arange(48),) * 3, indexing="ij")
    com = np.array([(data * a).sum() for a in (x, y, z)]) / data.sum() * vs + o  # voxel centres at origin + i*vs
    assert np.allclose(com, s.coords[0].mean(0), atol=0.5)
