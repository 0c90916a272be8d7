"""NeRF renderer: the renderer owns sampling and compositing, a *field* only answers queries.

Field interface
---------------
A field is any callable ``field(points, directions, latent=None) -> (density, rgb)`` with

* ``points``: (B, N, 3) world coordinates; ``directions``: (B, N, 3) unit ray directions (world);
* ``latent``: (B, Z) per-scene code, or None;
* ``density``: (B, N) non-negative, in 1 / world units; ``rgb``: (B, N, 3) in [0, 1].

Rendering (Mildenhall et al. 2020, sec. 4-5)
--------------------------------------------
Each ray ``o + t d`` (``d`` unit length) is cut into ``n_coarse`` equal bins of ``[near, far]`` with one sample per
bin (its centre; uniform within the bin when training). The coarse weights define a piecewise-constant PDF over
those bins from which ``n_fine`` more samples are drawn by inverse transform sampling (evenly spaced quantiles
when not training). All samples are sorted and composited with ``renderers.voxel.alpha_composite``, each sample
owning the interval between the midpoints to its neighbours (``near`` and ``far`` at the ends).
Outputs: colour over the background, opacity ``1 - exp(-integral of density)``, and depth, the expected
distance along the ray to where it terminates, given that it does (0 where nothing is hit).

Empty-space skipping
--------------------
Given an ``occupancy`` grid (:class:`renderers.occupancy.OccupancyGrid`), each ray instead gets
``n_coarse + n_fine`` stratified samples and no importance pass, and the field is evaluated only at the
samples in occupied cells (all rays' occupied samples in one field call); the others count as empty
(density 0). Where the grid is conservative this is the same image as ``n_fine=0`` with that many
coarse samples, at the cost of the occupied samples only.

A field that also has ``density_at(points (1, N, 3)) -> (1, N)`` (cheap density without colour, e.g.
:class:`renderers.gridfield.FeatureGridField`) is then asked for colour only where a sample's weight
``T_k alpha_k`` exceeds ``min_weight`` (DVGO's ``fast_color_thres``): the colour that is dropped is at
most ``min_weight`` per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers._validate import check_tensor
from renderers.cameras import Camera
from renderers.occupancy import OccupancyGrid
from renderers.voxel import alpha_composite, sample_grid, stratified_depths

__all__ = ["NeRFRenderer", "NeRFOutput", "RadianceMLP", "GridField", "PositionalEncoding", "sample_pdf"]

Field = Callable[..., tuple[Tensor, Tensor]]


class PositionalEncoding(nn.Module):
    """``gamma(x) = [x, sin(2^k pi x), cos(2^k pi x)]`` for ``k = 0 .. n_freqs - 1`` (NeRF eq. 4).

    Maps (..., dim) to (..., out_dim) with ``out_dim = dim * (include_input + 2 * n_freqs)``.
    """

    def __init__(self, n_freqs: int = 10, dim: int = 3, include_input: bool = True):
        super().__init__()
        self.dim, self.n_freqs, self.include_input = dim, int(n_freqs), include_input

    @property
    def out_dim(self) -> int:
        return self.dim * (int(self.include_input) + 2 * self.n_freqs)

    def forward(self, x: Tensor) -> Tensor:
        freqs = math.pi * 2.0 ** torch.arange(self.n_freqs, dtype=x.dtype, device=x.device)
        arg = (x[..., None] * freqs).flatten(-2)
        parts = [x, torch.sin(arg), torch.cos(arg)] if self.include_input else [torch.sin(arg), torch.cos(arg)]
        return torch.cat(parts, -1)


class RadianceMLP(nn.Module):
    """NeRF's MLP radiance field, optionally conditioned on a per-scene latent code.

    ``gamma(x)`` (and the latent, if ``latent_dim > 0``) feed ``depth`` ReLU layers of ``width`` units, re-injected
    after the layers listed in ``skips``. Density is ``softplus`` of a linear head (smooth and non-negative);
    colour comes from a ``width // 2`` layer on [features, ``gamma(d)``] and a sigmoid (view-dependent), or from
    the features alone with ``view_dependent=False``.
    """

    def __init__(self, depth: int = 8, width: int = 256, skips: Sequence[int] = (4,), pos_freqs: int = 10,
                 dir_freqs: int = 4, latent_dim: int = 0, view_dependent: bool = True):
        super().__init__()
        self.pos_enc, self.dir_enc = PositionalEncoding(pos_freqs), PositionalEncoding(dir_freqs)
        self.latent_dim, self.skips, self.view_dependent = latent_dim, set(skips), view_dependent
        d_in = self.pos_enc.out_dim + latent_dim
        dims = [d_in] + [width + (d_in if i in self.skips else 0) for i in range(1, depth)]
        self.layers = nn.ModuleList(nn.Linear(dims[i], width) for i in range(depth))
        self.density = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)
        d_rgb = width + (self.dir_enc.out_dim if view_dependent else 0)
        self.rgb = nn.Sequential(nn.Linear(d_rgb, width // 2), nn.ReLU(), nn.Linear(width // 2, 3))

    def forward(self, points: Tensor, directions: Tensor, latent: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, N, 3) points and unit directions, (B, Z) latent -> density (B, N), rgb (B, N, 3)."""
        x = self.pos_enc(points)
        if self.latent_dim:
            if latent is None or latent.shape != (points.shape[0], self.latent_dim):
                got = None if latent is None else tuple(latent.shape)
                raise ValueError(f"latent: expected shape ({points.shape[0]}, {self.latent_dim}), got {got}")
            x = torch.cat([x, latent[:, None].expand(-1, points.shape[1], -1)], -1)
        h = x
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(torch.cat([h, x], -1) if i in self.skips else h))
        density = F.softplus(self.density(h)[..., 0])
        feat = self.feature(h)
        if self.view_dependent:
            feat = torch.cat([feat, self.dir_enc(directions)], -1)
        return density, torch.sigmoid(self.rgb(feat))


class GridField(nn.Module):
    """A dense voxel grid as a field, sampled with ``renderers.voxel.sample_grid`` (zero outside the box).

    Args:
        density: (B, 1, D, H, W) density in 1 / world units, in the voxel renderer's grid convention.
        rgb: (B, 3, D, H, W) colours.
        center, size: the box the grid tiles, world units (scalars or 3 values).
    Directions and latents are ignored (the grid is view-independent and already per scene).
    """

    def __init__(self, density: Tensor, rgb: Tensor, center: float | Sequence[float] = 0.0,
                 size: float | Sequence[float] = 2.0):
        super().__init__()
        sizes = check_tensor("density", density, ("B", 1, "D", "H", "W"))
        check_tensor("rgb", rgb, ("B", 3, "D", "H", "W"), sizes, like=density, like_name="density")
        self.density, self.rgb, self.center, self.size = density, rgb, center, size

    def forward(self, points: Tensor, directions: Tensor, latent: Tensor | None = None) -> tuple[Tensor, Tensor]:
        center = torch.as_tensor(self.center, dtype=points.dtype, device=points.device).expand(3)
        size = torch.as_tensor(self.size, dtype=points.dtype, device=points.device).expand(3)
        values = sample_grid(torch.cat([self.density, self.rgb], 1), points, center, size)  # (B, 4, N)
        return values[:, 0], values[:, 1:].transpose(1, 2)


def sample_pdf(edges: Tensor, weights: Tensor, n: int, jitter: bool) -> Tensor:
    """Inverse-transform samples from the piecewise-constant PDF ``weights`` over bins ``edges``.

    Args:
        edges: (..., K + 1) increasing bin edges; weights: (..., K) non-negative bin weights.
        n: samples per ray; ``jitter``: random quantiles, else ``n`` evenly spaced ones.
    Returns:
        (..., n) sorted samples, detached (gradients do not flow through the sample positions).
    """
    edges, weights = edges.detach(), weights.detach() + 1e-5  # a floor keeps empty rays sampled uniformly
    cdf = torch.cumsum(weights / weights.sum(-1, keepdim=True), -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], -1)
    if jitter:
        u = torch.rand(*cdf.shape[:-1], n, dtype=cdf.dtype, device=cdf.device)
    else:
        u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=cdf.dtype, device=cdf.device).expand(*cdf.shape[:-1], n)
    u = u.contiguous()
    hi = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    lo = hi - 1
    c0, c1 = cdf.gather(-1, lo), cdf.gather(-1, hi)
    e0, e1 = edges.gather(-1, lo), edges.gather(-1, hi)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-12)).clamp(0, 1)
    return torch.sort(e0 + frac * (e1 - e0), -1).values


class NeRFOutput(NamedTuple):
    """Rendered maps: images (B, C, H, W) from ``NeRFRenderer.forward``, (B, R, C) / (B, R) from ``render_rays``."""

    rgb: Tensor
    depth: Tensor
    opacity: Tensor
    rgb_coarse: Tensor


class NeRFRenderer(nn.Module):
    """Volume-render any field along camera rays with coarse stratified and fine importance samples.

    Args:
        n_coarse: stratified samples per ray; n_fine: importance samples per ray (0: coarse only).
        near, far: ray distance range (world units), unless given per ray to :meth:`render_rays`.
        background: ``"white"``, ``"black"``, a grey level or an RGB triple.
        chunk: rays evaluated per field call (over the whole batch), bounding the memory of a call.
        jitter: in training mode, randomise sample positions within bins and the importance quantiles.
        min_weight: with an occupancy grid and a field with ``density_at``, the sample weight below which
            no colour is computed (module docstring).
    """

    def __init__(self, n_coarse: int = 64, n_fine: int = 128, near: float = 2.0, far: float = 6.0,
                 background: str | float | Sequence[float] = "white", chunk: int = 4096, jitter: bool = True,
                 min_weight: float = 1e-4):
        super().__init__()
        if int(n_coarse) < 1 or int(n_fine) < 0 or int(chunk) < 1:
            raise ValueError("n_coarse, chunk: expected >= 1; n_fine: expected >= 0")
        if not 0 <= near < far:
            raise ValueError(f"near, far: expected 0 <= near < far, got {near}, {far}")
        named = {"white": 1.0, "black": 0.0}
        if isinstance(background, str) and background not in named:
            raise ValueError(f"background: expected 'white', 'black' or RGB values, got {background!r}")
        self.background = named.get(background, background) if isinstance(background, str) else background
        if torch.as_tensor(self.background).numel() not in (1, 3):
            raise ValueError(f"background: expected 1 or 3 values, got {background}")
        self.n_coarse, self.n_fine, self.chunk, self.jitter = int(n_coarse), int(n_fine), int(chunk), jitter
        self.near, self.far, self.min_weight = float(near), float(far), float(min_weight)

    def forward(self, field: Field, camera: Camera, latent: Tensor | None = None,
                fine_field: Field | None = None, occupancy: OccupancyGrid | None = None) -> NeRFOutput:
        """Render every pixel of B cameras: rgb (B, 3, H, W), depth and opacity (B, 1, H, W)."""
        if not isinstance(camera, Camera):
            raise ValueError(f"camera: expected a renderers.cameras.Camera, got {type(camera).__name__}")
        origins, dirs = camera.rays()
        B, (H, W) = len(camera), camera.image_size
        out = self.render_rays(field, origins.reshape(B, -1, 3), dirs.reshape(B, -1, 3), latent, fine_field,
                               occupancy=occupancy)
        img = lambda x: x.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # noqa: E731
        return NeRFOutput(img(out.rgb), img(out.depth), img(out.opacity), img(out.rgb_coarse))

    def render_rays(self, field: Field, origins: Tensor, directions: Tensor, latent: Tensor | None = None,
                    fine_field: Field | None = None, near: Tensor | None = None,
                    far: Tensor | None = None, occupancy: OccupancyGrid | None = None,
                    background: Tensor | None = None) -> NeRFOutput:
        """Render a batch of rays.

        Args:
            field: coarse field (see the module docstring); ``fine_field`` for the combined samples
                (defaults to ``field``).
            origins, directions: (B, R, 3) world rays; directions are normalised here.
            latent: (B, Z) passed to the fields.
            near, far: optional (B, R) per-ray distance ranges replacing the scalars.
            occupancy: skip empty space (module docstring); ``field`` answers every sample.
            background: optional (3,) colour replacing the renderer's (e.g. a learned one).
        Returns:
            ``NeRFOutput`` with rgb (B, R, 3), depth (B, R), opacity (B, R), rgb_coarse (B, R, 3).
        """
        sizes = check_tensor("origins", origins, ("B", "R", 3))
        check_tensor("directions", directions, ("B", "R", 3), sizes, like=origins, like_name="origins")
        if latent is not None:
            check_tensor("latent", latent, ("B", "Z"), sizes, like=origins, like_name="origins")
        B, R = sizes["B"], sizes["R"]
        near = origins.new_full((B, R), self.near) if near is None else near
        far = origins.new_full((B, R), self.far) if far is None else far
        check_tensor("near", near, ("B", "R"), sizes, like=origins, like_name="origins")
        check_tensor("far", far, ("B", "R"), sizes, like=origins, like_name="origins")
        if bool((far < near).any()):
            raise ValueError("near, far: expected far >= near for every ray")
        directions = F.normalize(directions, dim=-1)
        step = max(1, self.chunk // B)
        fine = field if fine_field is None else fine_field
        bg = torch.as_tensor(self.background if background is None else background, dtype=origins.dtype,
                             device=origins.device)
        render = self._render_chunk if occupancy is None else self._march_chunk
        extra = fine if occupancy is None else occupancy
        parts = [render(field, extra, origins[:, i:i + step], directions[:, i:i + step], near[:, i:i + step],
                        far[:, i:i + step], latent, bg) for i in range(0, R, step)]
        return NeRFOutput(*(torch.cat(p, 1) for p in zip(*parts)))

    def _march_chunk(self, field, occupancy, o, d, near, far, latent, bg) -> NeRFOutput:
        """Stratified samples, the field evaluated only in occupied cells (module docstring)."""
        t, delta = stratified_depths(near, far, self.n_coarse + self.n_fine, self.jitter and self.training)
        points = o[:, :, None] + t[..., None] * d[:, :, None]  # (B, r, S, 3)
        keep = occupancy.occupied(points)  # (B, r, S)
        dirs = d[:, :, None].expand_as(points)
        if latent is None and hasattr(field, "density_at"):  # density first, colour where it shows
            sigma = points.new_zeros(t.shape).masked_scatter(keep, field.density_at(points[keep][None])[0])
            w, opacity = alpha_composite(sigma, delta)
            shown = keep & (w.detach() > self.min_weight)
            colour = self._call(field, points[shown][None], dirs[shown][None], None)[1][0]
            rgb = points.new_zeros(*t.shape, 3).masked_scatter(shown[..., None], colour)
            out = (w[..., None] * rgb).sum(-2) + (1 - opacity[..., None]) * bg
            return NeRFOutput(out, self._depth(w, t, opacity), opacity, out)
        if latent is None:  # one field for every batch item: one call over all occupied samples
            density, colour = self._call(field, points[keep][None], dirs[keep][None], None)
            density, colour = density[0], colour[0]
        else:  # a field per latent: one call per batch item
            outs = [self._call(field, points[b][keep[b]][None], dirs[b][keep[b]][None], latent[b:b + 1])
                    for b in range(len(points))]
            density, colour = torch.cat([x[0][0] for x in outs]), torch.cat([x[1][0] for x in outs])
        sigma = points.new_zeros(t.shape).masked_scatter(keep, density)
        rgb = points.new_zeros(*t.shape, 3).masked_scatter(keep[..., None], colour)
        w, opacity = alpha_composite(sigma, delta)
        colour = (w[..., None] * rgb).sum(-2) + (1 - opacity[..., None]) * bg
        return NeRFOutput(colour, self._depth(w, t, opacity), opacity, colour)

    def _render_chunk(self, field, fine_field, o, d, near, far, latent, bg) -> NeRFOutput:
        jitter = self.jitter and self.training
        t, delta = stratified_depths(near, far, self.n_coarse, jitter)
        sigma, rgb = self._query(field, o, d, t, latent)
        w, opacity = alpha_composite(sigma, delta)
        rgb_coarse = (w[..., None] * rgb).sum(-2) + (1 - opacity[..., None]) * bg
        if self.n_fine == 0:
            return NeRFOutput(rgb_coarse, self._depth(w, t, opacity), opacity, rgb_coarse)
        k = torch.arange(self.n_coarse + 1, dtype=t.dtype, device=t.device)
        edges = near[..., None] + k * delta
        t = torch.sort(torch.cat([t, sample_pdf(edges, w, self.n_fine, jitter)], -1), -1).values
        mids = (t[..., 1:] + t[..., :-1]) / 2
        deltas = torch.diff(torch.cat([near[..., None], mids, far[..., None]], -1), dim=-1)
        sigma, rgb = self._query(fine_field, o, d, t, latent)
        w, opacity = alpha_composite(sigma, deltas)
        return NeRFOutput((w[..., None] * rgb).sum(-2) + (1 - opacity[..., None]) * bg,
                          self._depth(w, t, opacity), opacity, rgb_coarse)

    def _query(self, field, o, d, t, latent) -> tuple[Tensor, Tensor]:
        """Evaluate the field at (B, r, S) ray distances -> density (B, r, S), rgb (B, r, S, 3)."""
        B, r, S = t.shape
        points = (o[:, :, None] + t[..., None] * d[:, :, None]).reshape(B, r * S, 3)
        dirs = d[:, :, None].expand(B, r, S, 3).reshape(B, r * S, 3)
        density, rgb = self._call(field, points, dirs, latent)
        return density.reshape(B, r, S), rgb.reshape(B, r, S, 3)

    @staticmethod
    def _call(field, points: Tensor, dirs: Tensor, latent) -> tuple[Tensor, Tensor]:
        """``field`` at (B, N, 3) points and directions, its answer checked: density (B, N), rgb (B, N, 3)."""
        out = field(points, dirs, latent) if latent is not None else field(points, dirs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("field: expected to return a tuple (density (B, N), rgb (B, N, 3))")
        density, rgb = out
        sizes = {"B": points.shape[0], "N": points.shape[1]}
        check_tensor("field density", density, ("B", "N"), sizes, like=points, like_name="the sample points")
        check_tensor("field rgb", rgb, ("B", "N", 3), sizes, like=points, like_name="the sample points")
        return density, rgb

    @staticmethod
    def _depth(w: Tensor, t: Tensor, opacity: Tensor) -> Tensor:
        return (w * t).sum(-1) / opacity.clamp_min(1e-10)
