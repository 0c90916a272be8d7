"""An explicit-grid radiance field (after DVGO, Sun et al. 2022), for per-scene fits on a CPU.

Design
------
* A density grid ``(1, 1, R, R, R)`` and a feature grid ``(1, C, R, R, R)`` tile the box ``[lo, hi]^3``
  (world units) in :mod:`renderers.voxel`'s grid convention (values at cell centres, indexed ``[z, y, x]``,
  trilinear, zero outside the box).
* Density, 1 / world units: ``softplus(v + shift) / cell0`` with ``v`` the interpolated grid value,
  ``cell0`` the cell size of the final resolution and ``shift`` chosen so that an empty grid lets
  ``1 - exp(-0.01) ~ 1 %`` of the light through per final cell (DVGO's ``act_shift``): the field starts
  faintly present everywhere, so gradients reach every cell and the occupancy grid starts full.
  Trilinear interpolation *before* the activation gives sharp surfaces inside a cell (DVGO, sec. 4.1).
* Colour: a small MLP on ``[features, gamma(d)]`` (``dir_freqs`` frequencies of the unit view direction)
  with a sigmoid: view-dependent appearance (highlights) at the cost of a 2-layer MLP per sample.
* Coarse to fine: :meth:`FeatureGridField.upsample` resamples both grids to a finer resolution
  (trilinear, cell-centre aligned), keeping the field (up to interpolation) and the parameters' identity.
* Regulariser: :meth:`FeatureGridField.total_variation`, the mean squared difference between
  neighbouring cells (Plenoxels, Fridovich-Keil et al. 2022, eq. 3), on the density grid and, weighted
  ``feature_tv``, the feature grid. As in Plenoxels it can be estimated on a random subset of cells: on
  the whole 96³ grid its forward and backward cost as much as the rest of a training step.
* Learning rates: grids want ~100x the MLP's learning rate under Adam (DVGO: 0.1 vs 1e-3). The grids are
  stored divided by ``grid_lr_scale``, so one Adam learning rate serves both.

The field obeys :mod:`renderers.nerf`'s interface: ``field(points (B, N, 3), directions (B, N, 3)) ->
(density (B, N), rgb (B, N, 3))``; the grids are one scene's (B = 1 serves every batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.nerf import PositionalEncoding
from renderers.voxel import sample_grid

__all__ = ["FeatureGridField"]


class FeatureGridField(nn.Module):
    """Density grid + feature grid + small colour MLP (module docstring).

    Args:
        lo, hi: the box ``[lo, hi]^3``, world units.
        res: initial cells per side; ``final_res``: the finest resolution coarse-to-fine will reach (sets
            the density scale ``1 / cell0``).
        features: channels of the feature grid; ``width``: hidden units of the colour MLP.
        dir_freqs: frequencies of the direction encoding (0: view-independent colour).
        grid_lr_scale: the grids' learning rate as a multiple of the MLP's.
    """

    def __init__(self, lo: float, hi: float, res: int = 32, final_res: int = 96, features: int = 12,
                 width: int = 64, dir_freqs: int = 2, grid_lr_scale: float = 100.0):
        super().__init__()
        self.lo, self.hi, self.scale = float(lo), float(hi), float(grid_lr_scale)
        self.cell0 = (self.hi - self.lo) / final_res
        self.shift = math.log(math.expm1(0.01))  # softplus(shift) = 0.01: 1 % opacity per final cell
        self.density = nn.Parameter(torch.zeros(1, 1, res, res, res))
        self.features = nn.Parameter(torch.zeros(1, features, res, res, res))
        self.dir_enc = PositionalEncoding(dir_freqs) if dir_freqs > 0 else None
        d_in = features + (self.dir_enc.out_dim if self.dir_enc else 0)
        self.rgb = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 3))

    @property
    def res(self) -> int:
        return self.density.shape[-1]

    def _box(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = torch.full((3,), (self.lo + self.hi) / 2, dtype=like.dtype, device=like.device)
        return c, torch.full((3,), self.hi - self.lo, dtype=like.dtype, device=like.device)

    def density_at(self, points: Tensor) -> Tensor:
        """(B, N, 3) world points -> (B, N) density, 1 / world units (0 outside the box)."""
        c, s = self._box(points)
        v = sample_grid(self.density * self.scale, points, c, s, outside_zero=False)[:, 0]
        inside = ((points - c).abs() <= s / 2).all(-1)
        return F.softplus(v + self.shift) / self.cell0 * inside.to(v.dtype)

    def forward(self, points: Tensor, directions: Tensor, latent: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, N, 3) world points and unit directions -> density (B, N), rgb (B, N, 3)."""
        c, s = self._box(points)
        grid = torch.cat([self.density, self.features], 1) * self.scale
        v = sample_grid(grid, points, c, s, outside_zero=False).transpose(1, 2)  # (B, N, 1 + C)
        inside = ((points - c).abs() <= s / 2).all(-1)
        density = F.softplus(v[..., 0] + self.shift) / self.cell0 * inside.to(v.dtype)
        h = v[..., 1:]
        if self.dir_enc is not None:
            h = torch.cat([h, self.dir_enc(directions)], -1)
        return density, torch.sigmoid(self.rgb(h))

    @torch.no_grad()
    def upsample(self, res: int) -> list[nn.Parameter]:
        """Resample both grids to ``res`` cells per side in place; returns the parameters changed (their
        optimiser state no longer fits)."""
        for p in (self.density, self.features):
            p.data = F.interpolate(p.data, size=(res,) * 3, mode="trilinear", align_corners=False)
        return [self.density, self.features]

    def total_variation(self, feature_tv: float = 0.1, cells: int | None = None) -> Tensor:
        """Mean over cells and axes of squared neighbour differences of the (scaled) grids: a scalar.

        ``cells``: estimate it from that many random cells (each with its +x, +y, +z neighbours; unbiased)
        instead of the whole grid.
        """
        R = self.res
        if cells is None or cells >= (R - 1) ** 3:
            tv = lambda g: sum(g.diff(dim=k).pow(2).mean() for k in (2, 3, 4)) / 3  # noqa: E731
        else:
            ijk = torch.randint(0, R - 1, (3, cells), device=self.density.device)  # cells with all 3 neighbours
            idx = (ijk[0] * R + ijk[1]) * R + ijk[2]

            def tv(g: Tensor) -> Tensor:
                flat = g[0].reshape(len(g[0]), -1)
                here = flat[:, idx]
                return sum((flat[:, idx + step] - here).pow(2).mean() for step in (R * R, R, 1)) / 3

        return (tv(self.density) + feature_tv * tv(self.features)) * self.scale**2

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint written after upsampling holds finer grids than a new field: take their size first
        for name in ("density", "features"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                getattr(self, name).data = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
