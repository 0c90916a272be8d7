"""Contrast transfer function, in RELION's conventions (``relion/src/ctf.h``).

For a spatial frequency ``k = (kx, ky)`` in 1/Å (kx along image columns, ky along rows):

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))                 (Å, V in volts, relativistic)
    df(k)  = (dfU + dfV) / 2 + (dfU - dfV) / 2 * cos(2 (atan2(ky, kx) - angle))      (Å, underfocus > 0)
    gamma  = -pi lambda df |k|^2 + pi/2 Cs lambda^3 |k|^4 - phase_shift - atan(w / sqrt(1 - w^2))
    CTF    = -sin(gamma) * exp(-B |k|^2 / 4) * scale

so ``CTF(0) = w`` (amplitude contrast) and the first lobe is positive: a projection of
positive density stays positive at low frequency ("white" particles, RELION's
expectation). cryoDRGN's ``compute_ctf`` is the negative of this (it inverts data instead).
Angles are radians here; STAR files hold degrees and are converted at the file boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

__all__ = ["CTFParams", "wavelength", "ctf_at", "ctf_2d", "fft_frequencies", "CTF_FIELDS", "unphysical_ctf",
           "VOLTAGE_RANGE_KV"]

CTF_FIELDS = ("defocus_u", "defocus_v", "angle", "voltage", "cs", "amp_contrast", "phase_shift", "bfactor", "scale")
# Accelerating voltages (kV) a microscope can have; 300000 is 300 kV written in volts.
VOLTAGE_RANGE_KV = (1.0, 1000.0)


def wavelength(voltage_kv: Tensor | float) -> Tensor:
    """Relativistic electron wavelength (Å) for an accelerating voltage in kV."""
    V = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(V * (1 + 0.978466e-6 * V))


@dataclass
class CTFParams:
    """CTF parameters of B particles, each a (B,) tensor.

    Attributes:
        defocus_u, defocus_v: defocus (Å), positive = underfocus (``rlnDefocusU/V``).
        angle: astigmatism angle (radians) of the U axis from image x (``rlnDefocusAngle``, degrees in files).
        voltage: kV. cs: spherical aberration (mm). amp_contrast: fraction ``w`` in [0, 1).
        phase_shift: radians (``rlnPhaseShift``, degrees in files). bfactor: Å^2 (envelope
        ``exp(-B k^2 / 4)``). scale: overall factor (``rlnCtfScalefactor``).
    """

    defocus_u: Tensor
    defocus_v: Tensor
    angle: Tensor
    voltage: Tensor
    cs: Tensor
    amp_contrast: Tensor
    phase_shift: Tensor
    bfactor: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        n = torch.as_tensor(self.defocus_u).reshape(-1).shape[0]
        for f in fields(self):
            v = torch.as_tensor(getattr(self, f.name), dtype=torch.float64)
            v = v.reshape(-1).expand(n) if v.numel() == 1 else v.reshape(-1)
            if v.shape[0] != n:
                raise ValueError(f"CTFParams.{f.name}: expected {n} values, got {v.shape[0]}")
            setattr(self, f.name, v)

    @classmethod
    def create(cls, defocus_u, defocus_v=None, angle=0.0, voltage=300.0, cs=2.7, amp_contrast=0.1,
               phase_shift=0.0, bfactor=0.0, scale=1.0) -> "CTFParams":
        """Convenience constructor; ``defocus_v`` defaults to ``defocus_u`` (no astigmatism)."""
        return cls(defocus_u, defocus_u if defocus_v is None else defocus_v, angle, voltage, cs, amp_contrast,
                   phase_shift, bfactor, scale)

    def __len__(self) -> int:
        return self.defocus_u.shape[0]

    def __getitem__(self, idx) -> "CTFParams":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return CTFParams(*(getattr(self, f.name)[idx] for f in fields(self)))

    def as_tensor(self) -> Tensor:
        """(B, 9) in the order of ``CTF_FIELDS``."""
        return torch.stack([getattr(self, k) for k in CTF_FIELDS], -1)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "CTFParams":
        """Inverse of :meth:`as_tensor`: (B, 9) or (9,)."""
        t = torch.as_tensor(t).reshape(-1, len(CTF_FIELDS))
        return cls(*t.unbind(-1))

    @staticmethod
    def cat(items: list["CTFParams"]) -> "CTFParams":
        return CTFParams(*(torch.cat([getattr(c, f.name) for c in items]) for f in fields(CTFParams)))


def unphysical_ctf(ctf) -> tuple[int, str, str] | None:
    """The first row of ``ctf`` whose values no microscope produces, or None.

    Args:
        ctf: (N, 9) array-like in ``CTF_FIELDS`` order (defocus Å, voltage kV, Cs mm).

    Returns:
        ``(row, field, problem)``: the 0-based row, the ``CTF_FIELDS`` name, and a short phrase
        with the value and its unit. Accepted: ``defocus_u, defocus_v >= 0`` Å (underfocus is
        positive), ``voltage`` within ``VOLTAGE_RANGE_KV``, ``cs >= 0`` mm and
        ``0 <= amp_contrast <= 1``. NaN is left to the callers' finiteness checks.
    """
    c = np.asarray(ctf, dtype=np.float64).reshape(-1, len(CTF_FIELDS))
    col = {k: c[:, i] for i, k in enumerate(CTF_FIELDS)}
    lo, hi = VOLTAGE_RANGE_KV
    kv, w = col["voltage"], col["amp_contrast"]
    checks = (
        ("voltage", kv <= 0, "voltage {:g} kV must be positive"),
        ("voltage", kv > hi, f"voltage {{:g}} kV is above {hi:g} kV (volts?)"),
        ("voltage", (kv > 0) & (kv < lo), f"voltage {{:g}} kV is below {lo:g} kV"),
        ("defocus_u", col["defocus_u"] < 0, "negative defocus {:g} Å (underfocus is positive)"),
        ("defocus_v", col["defocus_v"] < 0, "negative defocus {:g} Å (underfocus is positive)"),
        ("cs", col["cs"] < 0, "negative spherical aberration {:g} mm"),
        ("amp_contrast", (w < 0) | (w > 1), "amplitude contrast {:g} is outside [0, 1]"),
    )
    first = None
    for name, bad, problem in checks:
        if bad.any() and (first is None or int(np.argmax(bad)) < first[0]):
            i = int(np.argmax(bad))
            first = (i, name, problem.format(col[name][i]))
    return first


def fft_frequencies(box: int, pixel_size: float, rfft: bool = True, dtype=torch.float32, device=None
                    ) -> tuple[Tensor, Tensor]:
    """Frequencies (1/Å) of ``torch.fft.rfft2`` (or ``fft2``) bins of a box x box image.

    Returns ``kx`` (along columns) and ``ky`` (along rows), each (box, box//2+1) or (box, box).
    """
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64) if rfft else ky
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    return KX.to(dtype=dtype, device=device), KY.to(dtype=dtype, device=device)


def ctf_at(params: CTFParams, kx: Tensor, ky: Tensor) -> Tensor:
    """CTF of B particles at frequencies ``kx, ky`` (1/Å, any broadcastable shape S): (B, *S) float64."""
    kx, ky = (torch.as_tensor(k, dtype=torch.float64) for k in (kx, ky))
    kx, ky = torch.broadcast_tensors(kx, ky)
    k2 = kx**2 + ky**2
    safe = torch.where(k2 > 0, k2, torch.ones_like(k2))
    cos2, sin2 = (kx**2 - ky**2) / safe, 2 * kx * ky / safe  # cos, sin of 2 atan2(ky, kx)
    shape = (-1,) + (1,) * k2.dim()
    p = {f: getattr(params, f).to(device=k2.device, dtype=torch.float64).reshape(shape) for f in CTF_FIELDS}
    lam = wavelength(p["voltage"]).to(k2.device)
    mean, dev = 0.5 * (p["defocus_u"] + p["defocus_v"]), 0.5 * (p["defocus_u"] - p["defocus_v"])
    df = mean + dev * (cos2 * torch.cos(2 * p["angle"]) + sin2 * torch.sin(2 * p["angle"]))
    w = p["amp_contrast"]
    offset = p["phase_shift"] + torch.atan(w / torch.sqrt(1 - w**2))
    gamma = k2 * (-math.pi * lam * df + 0.5 * math.pi * (p["cs"] * 1e7) * lam**3 * k2) - offset
    ctf = -torch.sin(gamma)
    if (params.bfactor != 0).any():
        ctf = ctf * torch.exp(-p["bfactor"] * k2 / 4)
    return ctf * p["scale"] if (params.scale != 1).any() else ctf


def ctf_2d(params: CTFParams, box: int, pixel_size: float, rfft: bool = True, dtype=torch.float32,
           device=None) -> Tensor:
    """CTF of each particle on the FFT grid: (B, box, box//2+1) for ``rfft`` else (B, box, box).

    Computed in float64 and returned in ``dtype`` (the phase is large at high defocus).
    """
    kx, ky = fft_frequencies(box, pixel_size, rfft, torch.float64, device)
    return ctf_at(params, kx, ky).to(dtype)
