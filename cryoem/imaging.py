"""Cryo-EM image formation as a composition of small parts (each tested on its own).

    atoms (Å) --project--> clean projection --shift--> --CTF--> --noise--> particle image

* ``project``: orthographic line integral of the atoms' Gaussian potentials through
  ``renderers.gaussian`` (pose R = RELION's ``A``, map frame -> projection frame).
* ``fourier_filter``: in-plane sub-pixel shift (a phase ramp) and the CTF, applied
  together in one rfft2 / irfft2 pass.
* ``add_noise``: white Gaussian noise at a given SNR = var(signal) / var(noise) over
  each image's box.

Shifts follow ``renderers.cameras``: the particle centre appears at pixel
``box // 2 + shift_A / pixel_size`` (x = column, y = row).
Images are (B, 1, D, D) float tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryoem.ctf import CTFParams, ctf_2d
from renderers.cameras import Camera
from renderers.gaussian import gaussian_density_map, gaussian_projection, gaussian_projection_jvp

__all__ = ["project", "project_jvp", "shift_phase", "fourier_filter", "add_noise", "ImageFormation", "structure_map"]


def project(coords: Tensor, amplitudes: Tensor, sigmas: Tensor, R: Tensor, pixel_size: float, box: int,
            shift_A: Tensor | None = None) -> Tensor:
    """Noise-free projections (B, 1, box, box) of atoms at poses R (B, 3, 3).

    Args:
        coords: (N, 3) or (B, N, 3) Å, relative to the rotation centre, or ``renderers.gaussian.AffineUnits``.
        amplitudes, sigmas: (N,) or (B, N): Gaussian masses and widths (Å).
        shift_A: optional (B, 2) exact in-plane shift (Å); ``None`` renders centred.
    Returns:
        Projected potential per unit area (mass / Å^2).
    """
    if shift_A is None:
        shift_A = R.new_zeros(R.shape[0], 2)
    cam = Camera.from_pose(R, shift_A, pixel_size, box)
    return gaussian_projection(coords, amplitudes, sigmas, cam)


def project_jvp(coords: Tensor, tangents: Tensor, amplitudes: Tensor, sigmas: Tensor, R: Tensor, pixel_size: float,
                box: int, shift_A: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`project` (B, 1, box, box) and its derivatives (B, K, box, box) along ``tangents`` (B, K, N, 3) Å per
    unit (``renderers.gaussian.gaussian_projection_jvp``); coords (B, N, 3) Å, or ``AffineUnits`` with tangent maps
    (B, K, U, 3, 4). No gradients."""
    if shift_A is None:
        shift_A = R.new_zeros(R.shape[0], 2)
    cam = Camera.from_pose(R, shift_A, pixel_size, box)
    return gaussian_projection_jvp(coords, tangents, amplitudes, sigmas, cam)


def shift_phase(shift_A: Tensor, box: int, pixel_size: float) -> Tensor:
    """rfft2 phase ramp (B, box, box//2+1) complex that moves image content by ``shift_A`` (B, 2) Å.

    Separable: ``exp(-2 pi i (kx sx + ky sy)) = exp(-2 pi i kx sx) exp(-2 pi i ky sy)``.
    """
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=shift_A.dtype, device=shift_A.device)
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=shift_A.dtype, device=shift_A.device)
    ax = -2 * math.pi * kx * shift_A[:, :1]  # (B, box//2+1)
    ay = -2 * math.pi * ky * shift_A[:, 1:]  # (B, box)
    px = torch.polar(torch.ones_like(ax), ax)
    py = torch.polar(torch.ones_like(ay), ay)
    return py[:, :, None] * px[:, None, :]


def fourier_filter(images: Tensor, pixel_size: float, shift_A: Tensor | None = None,
                   ctf: CTFParams | Tensor | None = None) -> Tensor:
    """Shift (Fourier phase ramp, periodic) and/or multiply by the CTF, in one FFT pass.

    Args:
        images: (B, 1, D, D).
        shift_A: optional (B, 2) shift in Å (x = columns, y = rows).
        ctf: optional ``CTFParams`` of B particles, or a precomputed (B, D, D//2+1) CTF.
    """
    B, _, D, _ = images.shape
    F = torch.fft.rfft2(images[:, 0])
    if shift_A is not None:
        F = F * shift_phase(shift_A.to(images.dtype), D, pixel_size)
    if ctf is not None:
        c = ctf if isinstance(ctf, Tensor) else ctf_2d(ctf, D, pixel_size, dtype=images.dtype, device=images.device)
        F = F * c
    return torch.fft.irfft2(F, s=(D, D))[:, None]


def add_noise(images: Tensor, snr: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Add white Gaussian noise with variance ``var(image) / snr`` per image.

    Returns:
        noisy images (B, 1, D, D) and the noise standard deviation per image (B,).
    """
    if not snr > 0:
        raise ValueError(f"snr: expected a positive number, got {snr}")
    sigma = (images.var(dim=(1, 2, 3)) / snr).sqrt()
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return images + noise * sigma[:, None, None, None], sigma


class ImageFormation(torch.nn.Module):
    """Differentiable atoms -> CTF-modulated particle images (no noise).

    ``forward(coords (B,N,3) or (N,3) Å, amplitudes, sigmas, R (B,3,3), shift_A (B,2), ctf)``
    returns (B, 1, box, box). Shifts are applied in Fourier space with the CTF.
    """

    def __init__(self, box: int, pixel_size: float):
        super().__init__()
        self.box, self.pixel_size = int(box), float(pixel_size)

    def forward(self, coords: Tensor, amplitudes: Tensor, sigmas: Tensor, R: Tensor,
                shift_A: Tensor | None = None, ctf: CTFParams | Tensor | None = None) -> Tensor:
        img = project(coords, amplitudes, sigmas, R, self.pixel_size, self.box)
        if shift_A is None and ctf is None:
            return img
        return fourier_filter(img, self.pixel_size, shift_A, ctf)


def structure_map(structure, box: int, voxel_size: float, bfactor: float = 0.0, model: int = 0,
                  center=None) -> tuple[Tensor, tuple[float, float, float]]:
    """Density map (box^3, float32, Peng potential per Å^3) of one model of a ``cryoem.structure.Structure``.

    The map is centred on ``center`` (x, y, z) Å (default: the model's centroid), placed at voxel
    ``box // 2``. Returns the map (arrays indexed [z, y, x]) and the MRC origin (x, y, z) Å of voxel 0,
    so ``cryoem.formats.mrc.write_mrc(path, vol, voxel_size, origin)`` overlays the map on the model.
    """
    from cryoem.structure import scattering_gaussians

    _, amp, sig = scattering_gaussians(structure, bfactor=bfactor)
    xyz = torch.as_tensor(structure.coords[model], dtype=torch.float64)
    c = xyz.mean(0) if center is None else torch.as_tensor(center, dtype=torch.float64)
    vol = gaussian_density_map(xyz, torch.as_tensor(amp), torch.as_tensor(sig), box, voxel_size, center=c)
    origin = tuple(float(v) for v in c - (box // 2) * voxel_size)
    return vol.float(), origin
