"""Particle simulator: atomic models -> noisy CTF-modulated particle stacks with ground truth.

Conformations come from an ensemble (one model per particle, drawn with ``weights``),
from a morph between two matched, superposed states (coordinate ``t`` in [0, 1]), or from
rigid domains swinging about hinges (a non-linear motion; one ``t`` in [0, 1] per hinge).
Atoms are one Gaussian each, or Peng's five (``potential="peng5"``).
Poses are uniform on SO(3); shifts small and random; defocus uniform in a range.
Image formation is ``cryoem.imaging``: Gaussian projection, Fourier shift + CTF, noise.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryoem.ctf import CTF_FIELDS, CTFParams
from cryoem.imaging import add_noise, fourier_filter, project
from cryoem.structure import Structure, kabsch, match_atoms, scattering_gaussians
from plato_core.runinfo import UserError
from renderers.cameras import axis_angle_to_matrix

__all__ = ["Conformations", "Hinge", "ensemble_conformations", "hinge_conformations", "morph_conformations",
           "random_rotations", "simulate", "SimulationResult"]


@dataclass
class Conformations:
    """Where each particle's coordinates come from.

    ``states`` (K, N, 3) Å (centred); ``mode`` is ``"ensemble"`` (particle k uses
    ``states[label]``) or ``"morph"`` (``(1 - t) states[0] + t states[1]``).
    ``structure`` carries the atom annotations; ``amplitudes``/``sigmas`` (N,) the Gaussians.
    """

    states: Tensor
    mode: str
    structure: Structure
    amplitudes: Tensor
    sigmas: Tensor
    weights: Tensor | None = None
    morph_dist: str = "uniform"
    hinges: list[Hinge] | None = None
    atom_index: Tensor | None = None  # (K,) atom of each Gaussian, when atoms have several (Peng's 5)

    def sample_labels(self, n: int, g: torch.Generator) -> Tensor:
        """(n,) model indices (int64) for an ensemble; morph coordinates t in [0, 1] (n,);
        or, for hinges, one t in [0, 1] per hinge (n, H), each drawn independently."""
        if self.mode == "ensemble":
            w = self.weights if self.weights is not None else torch.ones(self.states.shape[0], dtype=torch.float64)
            return torch.multinomial(w, n, replacement=True, generator=g)
        shape = (n, len(self.hinges)) if self.mode == "hinge" else (n,)
        if self.morph_dist == "uniform":
            return torch.rand(shape, generator=g, dtype=torch.float64)
        mode = torch.rand(shape, generator=g, dtype=torch.float64) < 0.5  # bimodal: N(0.15, 0.08) + N(0.85, 0.08)
        t = torch.where(mode, 0.15, 0.85) + 0.08 * torch.randn(shape, generator=g, dtype=torch.float64)
        return t.clamp(0, 1)

    def atom_coords(self, labels: Tensor) -> Tensor:
        """(B, N, 3) float32 atom coordinates for labels from :meth:`sample_labels`."""
        if self.mode == "ensemble":
            return self.states[labels]
        if self.mode == "hinge":
            x = self.states[0].double().expand(len(labels), -1, -1)
            for h, hinge in enumerate(self.hinges):
                x = hinge.apply(x, labels[:, h])
            return x.float()
        t = labels.to(self.states.dtype)[:, None, None]
        return (1 - t) * self.states[0] + t * self.states[1]

    def coords(self, labels: Tensor) -> Tensor:
        """(B, K, 3) float32 centres of the Gaussians (one per atom, or several) for ``labels``."""
        x = self.atom_coords(labels)
        return x if self.atom_index is None else x[:, self.atom_index]

    def output_labels(self, n_frames: int = 11) -> Tensor:
        """Labels of the models written to ``gt_models.pdb``: every ensemble model; ``n_frames`` t values of
        a morph or a single hinge; a 5 x 5 grid for two hinges (t1 slowest)."""
        if self.mode == "ensemble":
            return torch.arange(self.states.shape[0])
        t = torch.linspace(0, 1, n_frames if self.mode != "hinge" or len(self.hinges) == 1 else 5,
                           dtype=torch.float64)
        if self.mode != "hinge":
            return t
        return torch.cartesian_prod(*[t] * len(self.hinges)).reshape(-1, len(self.hinges))

    def models_for_output(self, n_frames: int = 11) -> Structure:
        """The conformations as a multi-model Structure (at :meth:`output_labels`)."""
        xyz = self.atom_coords(self.output_labels(n_frames))
        return self.structure.with_coords(xyz.double().numpy())


@dataclass
class Hinge:
    """A rigid rotation of the atoms ``mask`` (N,) bool by ``t * angle`` radians about the axis through
    ``pivot`` (3,) Å along the unit vector ``axis`` (3,). ``clash`` (Å²): the summed squared overlap of the
    domain with the rest at t = 1 (pairs that come closer than :data:`CLASH_A`; 0 for a clear path)."""

    mask: Tensor
    pivot: Tensor
    axis: Tensor
    angle: float
    clash: float = 0.0

    def apply(self, x: Tensor, t: Tensor) -> Tensor:
        """Coordinates (B, N, 3) float64 with the hinge opened to ``t`` (B,) in [0, 1]."""
        R = axis_angle_to_matrix((t[:, None] * self.angle) * self.axis.to(x)[None])  # (B, 3, 3)
        moved = (x - self.pivot.to(x)) @ R.transpose(1, 2) + self.pivot.to(x)
        return torch.where(self.mask.to(x.device)[None, :, None], moved, x)


CLASH_A = 3.0  # Å: a domain atom and an atom of the rest closer than this overlap (4 Å for C-alpha-only models)
AXIS_CANDIDATES = 256  # directions tried for a domain joined to the rest at one end


def parse_hinge(spec: str, s: Structure, coords: Tensor) -> Hinge:
    """A :class:`Hinge` from ``CHAIN:FIRST-LAST:DEGREES`` (residue numbers of ``s``; coords (N, 3) Å).

    The residues FIRST..LAST of CHAIN turn as a rigid domain about the C-alpha of the residue that joins it to
    the rest of its chain (FIRST, or LAST for an N-terminal domain), so the chain stays connected there. The
    axis is chosen so that the domain's path does not run through the rest of the protein, as no real motion
    does: of :data:`AXIS_CANDIDATES` directions, the one whose path (t = 1/4, 1/2, 3/4, 1) has the least
    overlap with the rest (:func:`path_clash`), then the one that moves the domain furthest from the rest.
    A domain joined at both ends turns about the line through both joints, in the sign with less overlap.
    Why: about the old fixed axis (perpendicular to the hinge and the two centroids), 6FLR's A:290-381 at 40
    degrees brought up to 332 new atom pairs closer than 3 Å, the closest 0.26 Å apart, and the atom VAE's clash
    prior, rightly, fought the truth (11.7 nats per image, more than the truth gained in the images).
    """
    try:
        chain, span, deg = spec.split(":")
        first, last = (int(v) for v in span.split("-"))
        angle = math.radians(float(deg))
    except ValueError:
        raise UserError(f"--hinge {spec!r}: expected CHAIN:FIRST-LAST:DEGREES, e.g. A:120-250:25") from None
    mask = torch.as_tensor((s.chain == chain) & (s.resnum >= first) & (s.resnum <= last))
    if not mask.any() or mask.all():
        raise UserError(f"--hinge {spec!r}: residues {first}-{last} of chain {chain} select "
                        f"{int(mask.sum())} of {s.n_atoms} atoms; the domain must be part of the model")
    in_chain = s.chain == chain
    before, after = bool((in_chain & (s.resnum < first)).any()), bool((in_chain & (s.resnum > last)).any())
    joint = first if before or not after else last
    pivot = _residue_centre(s, coords, chain, joint)
    x = coords.double()
    if before and after:  # joined at both ends: turn about the line through both joints
        line = _residue_centre(s, coords, chain, last) - pivot
        if line.norm() < 1e-6:
            raise UserError(f"--hinge {spec!r}: residues {first} and {last} are at the same place; choose others")
        candidates = torch.stack([line, -line]) / line.norm()
    else:
        candidates = _sphere(AXIS_CANDIDATES)
    scores = [(round(path_clash(x, mask, pivot, a, angle), 1), -_opening(x, mask, pivot, a, angle), i)
              for i, a in enumerate(candidates)]
    best = min(scores)
    axis = candidates[best[2]]
    clash = path_clash(x, mask, pivot, axis, angle, ts=(1.0,))
    return Hinge(mask, pivot, axis, angle, clash)


def _residue_centre(s: Structure, coords: Tensor, chain: str, resnum: int) -> Tensor:
    """(3,) float64: the C-alpha of a residue, or the mean of its atoms when it has none."""
    atoms = torch.as_tensor((s.chain == chain) & (s.resnum == resnum))
    ca = atoms & torch.as_tensor(s.name == "CA")
    return coords[ca if ca.any() else atoms].double().mean(0)


def _sphere(n: int) -> Tensor:
    """(n, 3) float64 unit vectors spread evenly over the sphere (Fibonacci lattice; deterministic)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    zc = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = (1 - zc**2).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), zc], 1)


def _turn(x: Tensor, pivot: Tensor, axis: Tensor, angle: float) -> Tensor:
    """x (M, 3) turned by ``angle`` radians about the axis through pivot (3,) along ``axis`` (3,), float64."""
    R = axis_angle_to_matrix((angle * axis / axis.norm())[None].double())[0]
    return (x - pivot) @ R.T + pivot


def path_clash(x: Tensor, mask: Tensor, pivot: Tensor, axis: Tensor, angle: float,
               ts: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> float:
    """Summed squared overlap (Å²) of the domain ``x[mask]`` with the rest along its path: over the ``ts``,
    pairs (domain atom, other atom) closer than :data:`CLASH_A` Å (4 Å in a C-alpha-only model) that were not
    already that close at t = 0, each adding (CLASH_A - d)². x (N, 3) Å."""
    from scipy.spatial import cKDTree

    xn = x.numpy()
    rest, dom = cKDTree(xn[~mask.numpy()]), xn[mask.numpy()]
    limit = _clash_distance(xn)

    def close_pairs(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # keys (domain * M + rest) and distances
        d = cKDTree(y).sparse_distance_matrix(rest, limit, output_type="coo_matrix")
        return d.row.astype(np.int64) * rest.n + d.col, d.data

    before, _ = close_pairs(dom)
    total = 0.0
    for t in ts:
        key, d = close_pairs(_turn(torch.as_tensor(dom), pivot, axis, t * angle).numpy())
        new = ~np.isin(key, before)
        total += float(((limit - d[new]) ** 2).sum())
    return total


def _clash_distance(x: np.ndarray) -> float:
    """:data:`CLASH_A`, or 4 Å when atoms are sparse (C-alpha-only models: neighbours 3.8 Å apart)."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(x).query(x[: min(len(x), 500)], k=2)
    return CLASH_A if np.median(d[:, 1]) < 3.0 else 4.0


def _opening(x: Tensor, mask: Tensor, pivot: Tensor, axis: Tensor, angle: float) -> float:
    """Å: how far the domain's centroid moves from the centroid of the rest at t = 1."""
    dom, rest = x[mask].mean(0), x[~mask].mean(0)
    return float((_turn(dom[None], pivot, axis, angle)[0] - rest).norm() - (dom - rest).norm())


def hinge_conformations(s: Structure, specs: list[str], dist: str = "uniform", bfactor: float = 30.0,
                        potential: str = "single") -> Conformations:
    """Rigid domains of ``s`` swinging about hinges (one independent coordinate t per hinge)."""
    if dist not in ("uniform", "bimodal"):
        raise UserError(f"--morph-dist: expected 'uniform' or 'bimodal', got {dist!r}")
    x0 = torch.as_tensor(s.coords[0] - s.coords[0].mean(0))
    hinges = [parse_hinge(spec, s, x0) for spec in specs]
    amp, sig, idx = _gaussians(s, bfactor, potential)
    return Conformations(x0[None].float(), "hinge", s.subset(models=0), amp, sig, morph_dist=dist, hinges=hinges,
                         atom_index=idx)


def _gaussians(s: Structure, bfactor: float, potential: str = "single") -> tuple[Tensor, Tensor, Tensor | None]:
    """Masses and widths (K,) of the atoms' Gaussians, and the atom of each (None when K = N)."""
    if potential not in ("single", "peng5"):
        raise UserError(f"--potential: expected single or peng5, got {potential!r}")
    idx, amp, sig = scattering_gaussians(s, bfactor=bfactor, mode=potential)
    atom_index = None if len(idx) == s.n_atoms else torch.as_tensor(idx)
    return torch.as_tensor(amp, dtype=torch.float32), torch.as_tensor(sig, dtype=torch.float32), atom_index


def ensemble_conformations(s: Structure, weights: np.ndarray | None = None, bfactor: float = 30.0,
                           potential: str = "single") -> Conformations:
    """All models of ``s`` (centred on their common centroid), drawn with ``weights`` (M,)."""
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (s.n_models,) or (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"--weights: expected {s.n_models} non-negative numbers (one per model), "
                            f"got {weights.shape[0] if weights.ndim else 1}")
    states = torch.as_tensor(s.coords - s.centroid(), dtype=torch.float32)
    amp, sig, idx = _gaussians(s, bfactor, potential)
    w = None if weights is None else torch.as_tensor(weights)
    return Conformations(states, "ensemble", s, amp, sig, weights=w, atom_index=idx)


def morph_conformations(a: Structure, b: Structure, dist: str = "uniform", bfactor: float = 30.0,
                        potential: str = "single") -> Conformations:
    """Match atoms of ``a`` and ``b`` by (chain, resnum, name), superpose b onto a, centre both."""
    if dist not in ("uniform", "bimodal"):
        raise UserError(f"--morph-dist: expected 'uniform' or 'bimodal', got {dist!r}")
    ia, ib = match_atoms(a, b)
    A = torch.as_tensor(a.coords[0, ia])
    B = torch.as_tensor(b.coords[0, ib])
    R, t = kabsch(B, A)
    B = B @ R.T + t
    c = (A.mean(0) + B.mean(0)) / 2
    states = torch.stack([A - c, B - c]).float()
    sub = a.subset(ia, models=0)
    amp, sig, idx = _gaussians(sub, bfactor, potential)
    return Conformations(states, "morph", sub, amp, sig, morph_dist=dist, atom_index=idx)


def random_rotations(n: int, g: torch.Generator, dtype=torch.float64) -> Tensor:
    """(n, 3, 3) rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
    return R.to(dtype)


def random_ctf(n: int, g: torch.Generator, defocus_um: tuple[float, float], astigmatism_A: float = 200.0,
               voltage: float = 300.0, cs: float = 2.7, amp_contrast: float = 0.1) -> CTFParams:
    """Defocus uniform in ``defocus_um`` (µm), astigmatism up to ``astigmatism_A`` at a random angle."""
    lo, hi = defocus_um
    dfu = (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)) * 1e4
    dfv = dfu - astigmatism_A * torch.rand(n, generator=g, dtype=torch.float64)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    return CTFParams.create(dfu, dfv, ang, voltage, cs, amp_contrast)


@dataclass
class SimulationResult:
    """Images (n, D, D) float32 and per-particle ground truth (labels, R, shift_A, ctf, noise_sigma, and the
    extra B-factor ``bfactor`` (n,) Å²)."""

    images: np.ndarray
    labels: np.ndarray
    R: np.ndarray
    shift_A: np.ndarray
    ctf: CTFParams
    noise_sigma: np.ndarray
    clean: np.ndarray | None = None
    bfactor: np.ndarray | None = None


def simulate(conf: Conformations, n: int, box: int = 64, pixel_size: float = 2.0, snr: float | None = 0.1,
             defocus_um: tuple[float, float] = (1.0, 2.5), shift_std_px: float = 1.0, seed: int = 0,
             batch: int = 256, keep_clean: bool = False, progress: bool = True, shift_dist: str = "gaussian",
             bfactor_range: tuple[float, float] = (0.0, 0.0)) -> SimulationResult:
    """Simulate ``n`` particles; ``snr=None`` gives noise-free images.

    Shifts are Gaussian with ``shift_std_px`` pixels per axis, clipped to 3 sigma (``shift_dist="gaussian"``),
    or uniform within ``± shift_std_px * sqrt(3)`` pixels per axis, the same variance (``"uniform"``).
    Each particle gets an extra B-factor drawn uniformly from ``bfactor_range`` Å² (on top of the atoms'),
    which blurs its Gaussians: sigma² + B / (8 pi²).
    """
    if n <= 0 or box <= 0 or pixel_size <= 0:
        raise UserError(f"--n, --box and --pixel-size must be positive (got {n}, {box}, {pixel_size})")
    lo, hi = defocus_um
    if not 0 <= lo <= hi:
        raise UserError(f"--defocus: expected 0 <= MIN <= MAX µm, got {lo} {hi}")
    if not 0 <= bfactor_range[0] <= bfactor_range[1]:
        raise UserError(f"--particle-bfactor: expected 0 <= MIN <= MAX Å², got {bfactor_range[0]} {bfactor_range[1]}")
    if shift_dist not in ("gaussian", "uniform"):
        raise UserError(f"--shift-dist: expected gaussian or uniform, got {shift_dist!r}")
    g = torch.Generator().manual_seed(seed)
    labels = conf.sample_labels(n, g)
    R = random_rotations(n, g)
    if shift_dist == "gaussian":
        shift_px = (torch.randn(n, 2, generator=g, dtype=torch.float64) * shift_std_px).clamp(-3 * shift_std_px,
                                                                                           3 * shift_std_px)
    else:
        shift_px = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * shift_std_px * math.sqrt(3)
    shift_A = shift_px * pixel_size
    ctf = random_ctf(n, g, defocus_um)
    b_lo, b_hi = bfactor_range
    bfactor = b_lo + (b_hi - b_lo) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    extra_var = bfactor / (8 * math.pi**2)
    images = np.empty((n, box, box), dtype=np.float32)
    clean = np.empty((n, box, box), dtype=np.float32) if keep_clean else None
    sigma = np.zeros(n, dtype=np.float64)
    bar = _progress(n, progress)
    for s in range(0, n, batch):
        sl = slice(s, min(s + batch, n))
        sig = (conf.sigmas.double()[None] ** 2 + extra_var[sl]).sqrt().float()  # (b, K)
        img = project(conf.coords(labels[sl]), conf.amplitudes, sig, R[sl].float(), pixel_size, box)
        img = fourier_filter(img, pixel_size, shift_A[sl].float(), ctf[sl])
        if keep_clean:
            clean[sl] = img[:, 0].numpy()
        if snr is not None:
            img, sd = add_noise(img, snr, g)
            sigma[sl] = sd.double().numpy()
        images[sl] = img[:, 0].numpy()
        bar(sl.stop)
    return SimulationResult(images, labels.numpy(), R.numpy(), shift_A.numpy(), ctf, sigma, clean,
                            bfactor[:, 0].numpy())


def _progress(n: int, enabled: bool):
    """A tqdm bar on stderr (or nothing): returns ``update(done)``."""
    if not enabled:
        return lambda done: None
    from tqdm import tqdm

    bar = tqdm(total=n, unit="particle", file=sys.stderr, dynamic_ncols=True)
    state = {"done": 0, "t0": time.perf_counter()}

    def update(done: int) -> None:
        bar.update(done - state["done"])
        state["done"] = done
        if done >= n:
            bar.close()

    return update


def ground_truth_arrays(res: SimulationResult, conf: Conformations, pixel_size: float, snr: float | None) -> dict:
    """Arrays for ``ground_truth.npz`` (documented in ``cryoem simulate --help``)."""
    out = {"R": res.R, "shift_A": res.shift_A, "ctf": res.ctf.as_tensor().numpy(),
           "ctf_fields": np.array(CTF_FIELDS), "noise_sigma": res.noise_sigma,
           "pixel_size": np.float64(pixel_size), "snr": np.float64(np.nan if snr is None else snr)}
    if res.bfactor is not None:
        out["particle_bfactor"] = res.bfactor
    if conf.mode == "ensemble":
        out["model_index"] = res.labels.astype(np.int64)
    elif conf.mode == "hinge":
        out["hinge_t"] = res.labels.astype(np.float64)  # (N, hinges)
    else:
        out["morph_t"] = res.labels.astype(np.float64)
    out["model_labels"] = conf.output_labels().numpy()  # the label of each model in gt_models.pdb
    return out
