"""Structural priors on decoded atom coordinates, relative to the starting model.

All take decoded coordinates ``x`` of shape (B, N, 3) in Å and return a scalar
(mean over the batch). Reference distances come from the starting model, so a
decoder that outputs the starting model pays exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def pair_distances(x: Tensor, pairs: Tensor) -> Tensor:
    """(B, N, 3) coordinates, (P, 2) atom index pairs -> (B, P) distances in Å."""
    return (x[:, pairs[:, 0]] - x[:, pairs[:, 1]]).norm(dim=-1)


def bond_loss(x: Tensor, bonds: Tensor, d0: Tensor) -> Tensor:
    """Mean squared deviation (Å²) of bonded-pair lengths from the starting model's ``d0`` (E,)."""
    return pair_loss(x, bonds, d0)


def pair_loss(x: Tensor, pairs: Tensor, d0: Tensor | None = None, threshold: float = 0.0,
              backend: str = "auto") -> Tensor:
    """A scalar penalty on the distances d (B, P) of atom ``pairs`` (P, 2) in ``x`` (B, N, 3) Å.

    * harmonic (``d0`` (P,) given): mean over batch and pairs of (d - d0)² (Å²);
    * clash (``d0`` None): sum over pairs of relu(``threshold`` - d)², mean over the batch (Å²).

    ``backend``: "torch" (autograd; the clash term differentiates only the pairs found closer than the
    threshold, which gives the same value and gradient); "numba" (one compiled CPU pass that computes
    the value and the gradient together, ~10x faster on 200,000 pairs); "auto": numba for CPU tensors
    when it is installed, else torch.
    """
    if len(pairs) == 0:
        return x.new_zeros(())
    if backend == "auto":
        backend = "numba" if x.device.type == "cpu" and _numba_kernel() is not None else "torch"
    if backend == "numba":
        return _NumbaPairLoss.apply(x, pairs, d0, float(threshold))
    if d0 is not None:
        return ((pair_distances(x, pairs) - d0) ** 2).mean()
    with torch.no_grad():
        b, p = (pair_distances(x, pairs) < threshold).nonzero(as_tuple=True)
    d = (x[b, pairs[p, 0]] - x[b, pairs[p, 1]]).norm(dim=-1)
    return (torch.relu(threshold - d) ** 2).sum() / len(x)


def _numba_kernel():
    """The compiled kernel (value, gradient) of ``pair_loss``, or None without numba (compiled once, cached)."""
    global _KERNEL
    if _KERNEL is False:
        try:
            import numba
        except ImportError:
            _KERNEL = None
            return None

        @numba.njit(cache=True, nogil=True, fastmath=False)
        def kernel(x, pairs, d0, threshold, harmonic, grad):  # x, grad (B, N, 3); pairs (P, 2); d0 (P,)
            total = 0.0
            for b in range(x.shape[0]):
                for p in range(pairs.shape[0]):
                    i, j = pairs[p, 0], pairs[p, 1]
                    v0, v1, v2 = x[b, i, 0] - x[b, j, 0], x[b, i, 1] - x[b, j, 1], x[b, i, 2] - x[b, j, 2]
                    d = np.sqrt(v0 * v0 + v1 * v1 + v2 * v2)
                    if harmonic:
                        e = d - d0[p]
                    elif d < threshold:
                        e = -(threshold - d)  # d relu(t - d)^2 / dd = -2 (t - d)
                    else:
                        continue
                    total += e * e
                    g = 2.0 * e / max(d, 1e-12)
                    grad[b, i, 0] += g * v0
                    grad[b, i, 1] += g * v1
                    grad[b, i, 2] += g * v2
                    grad[b, j, 0] -= g * v0
                    grad[b, j, 1] -= g * v1
                    grad[b, j, 2] -= g * v2
            return total

        _KERNEL = kernel
    return _KERNEL


_KERNEL = False  # not yet compiled


class _NumbaPairLoss(torch.autograd.Function):
    """``pair_loss`` on CPU: the value and the gradient (B, N, 3) in one compiled pass."""

    @staticmethod
    def forward(ctx, x: Tensor, pairs: Tensor, d0: Tensor | None, threshold: float) -> Tensor:
        xn = x.detach().contiguous().numpy()
        grad = np.zeros_like(xn)
        d0n = np.zeros(1, xn.dtype) if d0 is None else d0.detach().to(x.dtype).numpy()
        total = _numba_kernel()(xn, pairs.contiguous().numpy(), d0n, threshold, d0 is not None, grad)
        norm = x.shape[0] * (pairs.shape[0] if d0 is not None else 1)
        ctx.save_for_backward(torch.from_numpy(grad / norm))
        return x.new_tensor(total / norm)

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None, None


def local_pairs(x0: Tensor, radius: float, exclude: Tensor | None = None, max_pairs: int = 200_000) -> Tensor:
    """(P, 2) pairs of atoms i < j closer than ``radius`` Å in the starting model ``x0`` (N, 3).

    ``exclude`` (E, 2) pairs (the bonds) are left out. When there are more than
    ``max_pairs``, an evenly spaced subset is kept so memory stays bounded.
    """
    d = torch.cdist(x0[None], x0[None])[0]
    i, j = torch.triu_indices(len(x0), len(x0), offset=1, device=x0.device)
    keep = d[i, j] < radius
    pairs = torch.stack([i[keep], j[keep]], 1)
    if exclude is not None and len(exclude):
        n = len(x0)
        key = pairs[:, 0] * n + pairs[:, 1]
        ex = torch.sort(exclude, dim=1).values
        pairs = pairs[~torch.isin(key, ex[:, 0] * n + ex[:, 1])]
    if len(pairs) > max_pairs:
        pairs = pairs[torch.linspace(0, len(pairs) - 1, max_pairs, device=x0.device).long()]
    return pairs


def local_distance_loss(x: Tensor, pairs: Tensor, d0: Tensor) -> Tensor:
    """Mean squared change (Å²) of local pair distances, as cryoSTAR's structural prior."""
    return pair_loss(x, pairs, d0)


def clash_loss(x: Tensor, candidates: Tensor, threshold: float) -> Tensor:
    """Mean over the batch of the summed ``relu(threshold - d)²`` over candidate non-bonded pairs (P, 2).

    Candidates are pairs that are not bonded; only those that come closer than
    ``threshold`` Å contribute.
    """
    return pair_loss(x, candidates, None, threshold)


@dataclass
class StructuralPrior:
    """Bonded, local and clash terms of one starting model, ready to evaluate on decoded batches.

    Attributes:
        bonds, bond_d0: (E, 2) bonded pairs and their starting lengths (Å).
        local, local_d0: (P, 2) non-bonded pairs within ``radius`` and their starting distances (Å).
        clash_pairs: (Q, 2) non-bonded pairs within ``radius + margin`` that may come too close.
        clash_threshold: Å.
    """

    bonds: Tensor
    bond_d0: Tensor
    local: Tensor
    local_d0: Tensor
    clash_pairs: Tensor
    clash_threshold: float

    @classmethod
    def from_model(cls, x0: Tensor, bonds: Tensor, radius: float = 10.0, clash_threshold: float = 3.0,
                   margin: float = 4.0) -> "StructuralPrior":
        """Build from starting coordinates ``x0`` (N, 3) in Å and bonded pairs (E, 2)."""
        bonds = bonds.long().to(x0.device)
        local = local_pairs(x0, radius, exclude=bonds)
        near = local_pairs(x0, radius + margin, exclude=bonds)
        d_near = pair_distances(x0[None], near)[0]
        # pairs already closer than the threshold in the start (e.g. angle partners) are not clashes
        clash = near[d_near >= clash_threshold]
        return cls(bonds, pair_distances(x0[None], bonds)[0], local, pair_distances(x0[None], local)[0],
                   clash, clash_threshold)

    def to(self, device) -> "StructuralPrior":
        return StructuralPrior(self.bonds.to(device), self.bond_d0.to(device), self.local.to(device),
                               self.local_d0.to(device), self.clash_pairs.to(device), self.clash_threshold)

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """Evaluate on (B, N, 3) coordinates: {'bond', 'local', 'clash'} scalars."""
        return {"bond": bond_loss(x, self.bonds, self.bond_d0.to(x.dtype)),
                "local": local_distance_loss(x, self.local, self.local_d0.to(x.dtype)),
                "clash": clash_loss(x, self.clash_pairs, self.clash_threshold)}
