"""Map and model metrics: FSC (0.5 / 0.143 resolution, AU-FSC), map correlation, RMSD.

FSC shells are one Fourier voxel wide, from DC to Nyquist: shell ``i`` holds the
frequencies with ``i - 0.5 <= |k| * D < i + 0.5`` and is reported at ``i / (D * apix)`` 1/Å.
AU-FSC is the area under the FSC curve against frequency normalised to Nyquist (so 1.0
is perfect agreement at every frequency), computed with the trapezoid rule, as in
CryoBench (Jeon et al. 2024).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryoem.structure import rmsd

__all__ = ["fsc", "resolution_at", "au_fsc", "map_correlation", "rmsd", "fsc_report"]


def fsc(a: np.ndarray | Tensor, b: np.ndarray | Tensor, apix: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two cubic maps (D, D, D).

    Returns:
        freq (D//2 + 1,) in 1/Å, and the FSC per shell.
    Raises ValueError for maps of different shapes or with NaN / infinite voxels.
    """
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (a, b))
    if a.shape != b.shape or a.dim() != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"fsc: expected two cubic maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("fsc: the maps hold NaN or infinite voxels")
    D = a.shape[0]
    Fa, Fb = torch.fft.fftn(a), torch.fft.fftn(b)
    k = torch.fft.fftfreq(D, dtype=torch.float64) * D
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    shell = torch.round(torch.sqrt(kx**2 + ky**2 + kz**2)).long().reshape(-1)
    n = D // 2 + 1
    keep = shell < n
    s = shell[keep]
    num = torch.zeros(n, dtype=torch.float64).index_add_(0, s, (Fa * Fb.conj()).real.reshape(-1)[keep])
    pa = torch.zeros(n, dtype=torch.float64).index_add_(0, s, (Fa.abs() ** 2).reshape(-1)[keep])
    pb = torch.zeros(n, dtype=torch.float64).index_add_(0, s, (Fb.abs() ** 2).reshape(-1)[keep])
    curve = num / torch.sqrt(pa * pb).clamp_min(1e-30)
    return (np.arange(n) / (D * apix)), curve.numpy()


def resolution_at(freq: np.ndarray, curve: np.ndarray, threshold: float) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution when it never drops, and ``inf`` if it starts below.
    """
    below = np.flatnonzero(curve[1:] < threshold) + 1
    if len(below) == 0:
        return float(1 / freq[-1])
    i = below[0]
    f0, f1, c0, c1 = freq[i - 1], freq[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return float(1 / f) if f > 0 else float("inf")


def au_fsc(freq: np.ndarray, curve: np.ndarray) -> float:
    """Area under the FSC curve up to Nyquist, with frequency normalised to [0, 1]."""
    x = freq / freq[-1]
    return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(x)))


def map_correlation(a: np.ndarray | Tensor, b: np.ndarray | Tensor, mask: np.ndarray | None = None) -> float:
    """Real-space Pearson correlation of two maps (optionally within a boolean mask)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"map_correlation: shapes differ, {a.shape} vs {b.shape}")
    if mask is not None:
        a, b = a[mask], b[mask]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def fsc_report(a: np.ndarray, b: np.ndarray, apix: float) -> dict:
    """FSC curve, resolutions at 0.5 and 0.143 (Å), AU-FSC and real-space correlation."""
    freq, curve = fsc(a, b, apix)
    return {"freq": freq, "fsc": curve, "res_0.5": resolution_at(freq, curve, 0.5),
            "res_0.143": resolution_at(freq, curve, 0.143), "au_fsc": au_fsc(freq, curve),
            "map_corr": map_correlation(a, b)}
