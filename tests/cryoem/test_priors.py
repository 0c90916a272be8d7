"""Structural priors: zero at the starting model, analytic values under known deformations."""

import math

import pytest
import torch

from cryoem.priors import StructuralPrior, bond_loss, clash_loss, local_pairs, pair_loss


def helix(n=40):
    t = torch.arange(n, dtype=torch.float64)
    return torch.stack([2.3 * torch.cos(t * 100 / 180 * math.pi), 2.3 * torch.sin(t * 100 / 180 * math.pi),
                        1.5 * t], -1)


def test_zero_at_start_and_rigid_motion():
    x0 = helix()
    bonds = torch.stack([torch.arange(39), torch.arange(1, 40)], 1)
    prior = StructuralPrior.from_model(x0, bonds)
    terms = prior(x0[None])
    assert all(v.abs().item() < 1e-12 for v in terms.values())
    c, s = math.cos(0.7), math.sin(0.7)
    Rz = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]], dtype=torch.float64)
    moved = (x0 @ Rz.T + torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64))[None]
    assert all(v.abs().item() < 1e-10 for v in prior(moved).values())


def test_uniform_scaling_bond_loss_is_analytic():
    x0 = helix()
    bonds = torch.stack([torch.arange(39), torch.arange(1, 40)], 1)
    d0 = (x0[1:] - x0[:-1]).norm(dim=-1)
    # scaling by 1.1 stretches every bond by 0.1 * d0: loss = mean((0.1 d0)^2)
    expect = ((0.1 * d0) ** 2).mean()
    torch.testing.assert_close(bond_loss(1.1 * x0[None], bonds, d0), expect)


def test_local_pairs_within_radius_excluding_bonds():
    x0 = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [2.5, 0, 0], [10.0, 0, 0]])
    pairs = local_pairs(x0, radius=3.0, exclude=torch.tensor([[1, 0]]))
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (1, 2)]


def test_clash_penalty_counts_only_close_pairs():
    x = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0], [10.0, 0, 0]]])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    # only pair (0, 1) is closer than 3 Å: (3 - 2)^2 = 1
    torch.testing.assert_close(clash_loss(x, pairs, 3.0), torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["harmonic", "clash"])
def test_compiled_and_torch_pair_losses_agree_with_the_direct_formula(kind):
    """Both backends of pair_loss give the value and gradient of the formula written out over all pairs."""
    g = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(3, 50, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    pairs = torch.randint(0, 50, (400, 2), generator=g)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    d0 = 6 * torch.rand(len(pairs), generator=g, dtype=torch.float64) if kind == "harmonic" else None
    d = (x[:, pairs[:, 0]] - x[:, pairs[:, 1]]).norm(dim=-1)
    direct = ((d - d0) ** 2).mean() if kind == "harmonic" else (torch.relu(3.0 - d) ** 2).sum(1).mean()
    assert direct.item() > 0.1  # the clash case has close pairs
    (expect,) = torch.autograd.grad(direct, x)
    for backend in ("torch", "numba"):
        value = pair_loss(x, pairs, d0, 3.0, backend=backend)
        (grad,) = torch.autograd.grad(value, x)
        torch.testing.assert_close(value, direct, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-12)
