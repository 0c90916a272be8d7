"""Structural priors on decoded atom coordinates, relative to the starting model.

All take decoded coordinates ``x`` of shape (B, N, 3) in Å and return a scalar
(mean over the batch). Reference distances come from the starting model, so a
decoder that outputs the starting model pays exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def pair_distances(x: Tensor, pairs: Tensor) -> Tensor:
    """(B, N, 3) coordinates, (P, 2) atom index pairs -> (B, P) distances in Å."""
    return (x[:, pairs[:, 0]] - x[:, pairs[:, 1]]).norm(dim=-1)


def bond_loss(x: Tensor, bonds: Tensor, d0: Tensor) -> Tensor:
    """Mean squared deviation (Å²) of bonded-pair lengths from the starting model's ``d0`` (E,)."""
    if len(bonds) == 0:
        return x.new_zeros(())
    return ((pair_distances(x, bonds) - d0) ** 2).mean()


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
    return bond_loss(x, pairs, d0)


def clash_loss(x: Tensor, candidates: Tensor, threshold: float) -> Tensor:
    """Mean over the batch of the summed ``relu(threshold - d)²`` over candidate non-bonded pairs (P, 2).

    Candidates are pairs that are not bonded; only those that come closer than
    ``threshold`` Å contribute.
    """
    if len(candidates) == 0:
        return x.new_zeros(())
    d = pair_distances(x, candidates)
    return (torch.relu(threshold - d) ** 2).sum(-1).mean()


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
