"""Empty-space skipping: an occupancy grid over a world box, updated from any field's density.

Instant-NGP (Müller et al. 2022, sec. 4) and nerfacc keep a coarse grid that says where a radiance field
has any density; the renderer then evaluates the field only at samples in occupied cells. Here:

* the grid has ``res^3`` cells tiling the box ``[lo, hi]^3`` (world units), indexed ``[z, y, x]`` as in
  :mod:`renderers.voxel`;
* ``density`` (buffer, ``(res, res, res)``, 1 / world units) is a running estimate per cell:
  :meth:`OccupancyGrid.update` evaluates the field at one random point in each of a random subset of
  cells and keeps ``max(decay * old, new)`` there, so a cell empties only after its density stayed low
  over several updates;
* a cell is occupied when its estimate makes a sample step of one cell at least ``alpha`` opaque,
  ``1 - exp(-density * cell) >= alpha``; the mask is then dilated by one cell, because a field sampled
  trilinearly (or an MLP) has density a little beyond the cells where it was measured.

A grid is *conservative* for a field when the field has zero density at every point of the unoccupied
cells; rendering with skipping then equals rendering without it, sample for sample
(``tests/renderers/test_occupancy.py``). A new grid starts fully occupied.

Before training, :meth:`OccupancyGrid.carve` can rule cells out for good from the training views'
silhouettes (a visual hull, Laurentini 1994): a cell stays possible only if its centre projects inside
every silhouette (dilated by ``pad`` pixels) that sees it; the hull is then dilated by one cell. The
density estimates can only mark cells inside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.cameras import Camera

__all__ = ["OccupancyGrid"]


class OccupancyGrid(nn.Module):
    """A ``res^3`` occupancy grid over ``[lo, hi]^3``.

    Args:
        lo, hi: the box, world units.
        res: cells per side.
        alpha: opacity over one cell below which a cell counts as empty (0.01, as nerfacc).
        decay: factor applied to a cell's old estimate at each of its updates (0.95, as Instant-NGP).
    """

    def __init__(self, lo: float, hi: float, res: int = 64, alpha: float = 0.01, decay: float = 0.95):
        super().__init__()
        if not hi > lo or res < 1 or not 0 < alpha < 1:
            raise ValueError(f"OccupancyGrid: expected lo < hi, res >= 1, 0 < alpha < 1; got {lo}, {hi}, {res}, "
                             f"{alpha}")
        self.lo, self.hi, self.res, self.decay = float(lo), float(hi), int(res), float(decay)
        self.cell = (self.hi - self.lo) / self.res
        self.threshold = -math.log(1 - alpha) / self.cell  # density, 1 / world units
        self.register_buffer("density", torch.full((res,) * 3, math.inf))
        self.register_buffer("mask", torch.ones((res,) * 3, dtype=torch.bool))
        self.register_buffer("allowed", torch.ones((res,) * 3, dtype=torch.bool))  # the carved hull

    def cell_index(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(..., 3) world points -> flat cell index (...) long, and whether the point is inside the box (...)."""
        g = ((points - self.lo) / self.cell).floor().long()
        inside = ((g >= 0) & (g < self.res)).all(-1)
        g = g.clamp(0, self.res - 1)
        return (g[..., 2] * self.res + g[..., 1]) * self.res + g[..., 0], inside

    def occupied(self, points: Tensor) -> Tensor:
        """(..., 3) world points -> (...) bool: inside the box and in an occupied cell."""
        idx, inside = self.cell_index(points)
        return self.mask.reshape(-1)[idx] & inside

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], fraction: float = 1.0, chunk: int = 65_536) -> None:
        """Re-estimate ``fraction`` of the cells (chosen at random) from ``density_fn``.

        ``density_fn`` maps (N, 3) world points to (N,) densities in 1 / world units. Each chosen cell is
        measured at one uniformly random point inside it.
        """
        n = self.res**3
        idx = torch.randperm(n, device=self.density.device)[:max(1, round(fraction * n))] if fraction < 1 else \
            torch.arange(n, device=self.density.device)
        z, y, x = idx // self.res**2, (idx // self.res) % self.res, idx % self.res
        ijk = torch.stack([x, y, z], -1).to(self.density.dtype)
        pts = self.lo + (ijk + torch.rand_like(ijk)) * self.cell
        new = torch.cat([density_fn(pts[i:i + chunk]).reshape(-1) for i in range(0, len(pts), chunk)]).to(pts.dtype)
        flat = self.density.view(-1)
        old = flat[idx]
        flat[idx] = torch.maximum(torch.where(torch.isinf(old), new, old * self.decay), new)
        self.refresh()

    def refresh(self) -> None:
        """Recompute ``mask`` from ``density``: above the threshold, dilated by one cell, inside the hull."""
        self.mask.copy_(_dilate(self.density > self.threshold) & self.allowed)

    @torch.no_grad()
    def carve(self, masks: Tensor, cameras: Camera, pad: int = 2) -> float:
        """Keep only the visual hull of ``masks`` (V, H, W) bool silhouettes seen by V ``cameras``.

        A cell is carved when its centre lies in front of some camera, inside its image, on a background
        pixel of that view's silhouette dilated by ``pad`` pixels; the kept cells are dilated by one cell.
        Returns the fraction of cells kept.
        """
        V, H, W = masks.shape
        if len(cameras) != V or tuple(cameras.image_size) != (H, W):
            raise ValueError(f"cameras: expected {V} cameras of image size {(H, W)}, got {len(cameras)} of "
                             f"{tuple(cameras.image_size)}")
        grown = F.max_pool2d(masks[:, None].float(), 2 * pad + 1, stride=1, padding=pad)[:, 0] > 0
        c = self.lo + (torch.arange(self.res, dtype=cameras.dtype, device=cameras.device) + 0.5) * self.cell
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        pts = torch.stack([x, y, z], -1).reshape(-1, 3)
        keep = torch.ones(len(pts), dtype=torch.bool, device=pts.device)
        for v in range(V):  # one view at a time bounds the memory
            uv, depth = cameras[v:v + 1].project(pts[None])
            col, row = uv[0, :, 0].floor().long(), uv[0, :, 1].floor().long()
            seen = (col >= 0) & (col < W) & (row >= 0) & (row < H) & (cameras.orthographic or (depth[0] > 0))
            fg = grown[v].reshape(-1)[row.clamp(0, H - 1) * W + col.clamp(0, W - 1)]
            keep &= fg | ~seen
        self.allowed.copy_(_dilate(keep.reshape((self.res,) * 3)))
        self.refresh()
        return float(self.allowed.float().mean())

    def occupied_fraction(self) -> float:
        return float(self.mask.float().mean())


def _dilate(cells: Tensor) -> Tensor:
    """(R, R, R) bool -> itself grown by one cell in every direction (26-neighbourhood)."""
    return F.max_pool3d(cells.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
