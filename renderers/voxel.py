"""Voxel renderer: ray marching a density grid, with an optional feature grid, in a world-space box.

Grid convention
---------------
``density`` is ``(B, 1, D, H, W)`` and ``features`` ``(B, C, D, H, W)``, indexed ``[z, y, x]``: W runs along
world +X, H along +Y, D along +Z. The ``D x H x W`` cells tile the axis-aligned box
``[center - size / 2, center + size / 2]`` (world units; Å in cryo-EM). Values sit at cell centres
(``grid_sample`` with ``align_corners=False``) and are interpolated trilinearly, clamped to the outer cells'
values within the half-cell rim of the box, and zero outside the box. Rays are clipped to the box, so a
constant grid integrates to exactly ``value x chord length`` and the integral of the field over the box is
``sum(values) x cell volume``. Maps centred cryo-EM style, with voxel ``n // 2`` on the origin (as
``renderers.gaussian.gaussian_density_map`` writes them), tile the box centred at ``(n / 2 - n // 2 - 0.5) * voxel``
on each axis: half a voxel below the origin for even ``n``.

Volume rendering (Max 1995; Mildenhall et al. 2020, eq. 3)
---------------------------------------------------------
``sigma`` is a density in 1 / world units. With samples ``t_k`` along a unit-speed ray and interval lengths
``delta_k``: ``tau_k = sigma_k delta_k``, ``alpha_k = 1 - exp(-tau_k)``, ``T_k = exp(-sum_{j<k} tau_j)`` and
weights ``w_k = T_k alpha_k``. Then

* ``"emission_absorption"``: ``image = sum_k w_k c_k + (1 - sum_k w_k) * background``;
* ``"absorption"``: opacity (silhouette) ``1 - exp(-sum_k tau_k)``;
* ``"projection"``: the line integral ``sum_k tau_k ~ integral of sigma dt`` (X-ray, cryo-EM).

PyTorch3D's ``EmissionAbsorptionRaymarcher`` takes per-sample *opacities* in [0, 1] instead of densities; the
same image results from feeding it ``alpha = 1 - exp(-sigma * delta)`` with ``delta`` the world distance between
its samples (which, for a perspective camera, differs from pixel to pixel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers._validate import check_tensor
from renderers.cameras import Camera

__all__ = ["VoxelRenderer", "sample_grid", "ray_box", "stratified_depths", "alpha_composite", "emission_absorption",
           "MODES"]

MODES = ("emission_absorption", "absorption", "projection")


def _vec3(x: float | Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """A (3,) tensor with ``like``'s dtype and device from a scalar or 3 values."""
    v = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return v.expand(3) if v.dim() == 0 else v.reshape(3)


def sample_grid(grid: Tensor, points: Tensor, center: Tensor, size: Tensor, outside_zero: bool = True) -> Tensor:
    """Trilinearly sample a grid tiling a world box at world points (the module's grid convention).

    Args:
        grid: (B, C, D, H, W) values at cell centres, indexed [z, y, x].
        points: (B, ..., 3) world coordinates (x, y, z). A grid with B = 1 serves every point batch.
        center, size: (3,) box centre and side lengths (x, y, z) in world units.
        outside_zero: zero the values at points outside the box (skip only for points known to be inside).
    Returns:
        (B, C, ...) sampled values (channels first).
    """
    return _sample_box_coords(grid, (points - center) * (2 / size), outside_zero)


def _sample_box_coords(grid: Tensor, g: Tensor, outside_zero: bool) -> Tensor:
    """``sample_grid`` at box coordinates ``g`` (B, ..., 3), where the box is [-1, 1]^3 -> (B, C, ...)."""
    B, C, rest = g.shape[0], grid.shape[1], g.shape[1:-1]
    n = B if grid.shape[0] == B else 1
    out = F.grid_sample(grid, g.reshape(n, -1, 1, 1, 3), padding_mode="border", align_corners=False)
    out = out.reshape(B, C, *rest) if n == B else out.reshape(C, B, *rest).transpose(0, 1)
    if outside_zero:
        out = out * (g.abs() <= 1).all(-1).unsqueeze(1).to(out.dtype)
    return out


def ray_box(origins: Tensor, directions: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Slab intersection of rays with the box ``[lo, hi]``.

    Args:
        origins, directions: (..., 3) world rays (directions need not be unit length).
        lo, hi: (3,) box corners.
    Returns:
        near, far: (...,) ray parameters of entry and exit; ``far < near`` where the ray misses.
    """
    tiny = torch.where(directions < 0, -1e-12, 1e-12).to(directions.dtype)
    d = torch.where(directions.abs() < 1e-12, tiny, directions)
    t0, t1 = (lo - origins) / d, (hi - origins) / d
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


def stratified_depths(near: Tensor, far: Tensor, n: int, jitter: bool) -> tuple[Tensor, Tensor]:
    """``n`` samples per ray in equal bins of ``[near, far]``: bin centres, or uniform within each bin if ``jitter``.

    Args:
        near, far: (...,) ray parameter ranges (``far >= near``).
    Returns:
        t: (..., n) sample parameters; delta: (..., 1) the bin width, the weight each sample carries.
    """
    delta = ((far - near) / n)[..., None]
    k = torch.arange(n, dtype=near.dtype, device=near.device)
    u = torch.rand(*near.shape, n, dtype=near.dtype, device=near.device) if jitter else 0.5
    return torch.addcmul(near[..., None], k + u, delta), delta


def alpha_composite(sigma: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Emission-absorption weights ``w_k = exp(-sum_{j<k} sigma_j delta_j) (1 - exp(-sigma_k delta_k))``.

    Args:
        sigma: (..., S) non-negative densities (1 / world units).
        delta: (..., S) or broadcastable interval lengths (world units).
    Returns:
        weights: (..., S); opacity: (...,) ``1 - exp(-sum_k sigma_k delta_k)`` (= sum of the weights).
    """
    weights, neg_acc = _weights(sigma, delta)
    return weights, -torch.expm1(neg_acc[..., -1])


def _weights(sigma: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``T_k alpha_k`` and the running ``-sum_{j<=k} tau_j``, computed without cancellation."""
    neg_tau = sigma * -delta
    neg_acc = torch.cumsum(neg_tau, -1)
    return torch.exp(neg_acc - neg_tau) * -torch.expm1(neg_tau), neg_acc


class _EmissionAbsorption(torch.autograd.Function):
    """Fused ``sum_k w_k c_k + T_final * background`` and opacity with a hand-derived backward.

    With ``T_k = exp(-sum_{j<k} tau_j)`` and ``A_k`` the output gradient projected on colour ``c_k``:
    ``d rgb / d tau_k = T_{k+1} A_k - sum_{j>k} w_j A_j - T_final A_background`` and
    ``d opacity / d tau_k = T_final``. Saves only the weights and the transmittances.
    """

    @staticmethod
    def forward(ctx, sigma, colour, delta, background):
        weights, neg_acc = _weights(sigma, delta)
        t_next = torch.exp(neg_acc)  # transmittance after each sample
        rgb = torch.einsum("bcms,bms->bcm", colour, weights) + t_next[:, None, :, -1] * background[:, None]
        ctx.save_for_backward(sigma, colour, delta, background, weights, t_next)
        return rgb, -torch.expm1(neg_acc[..., -1])

    @staticmethod
    def backward(ctx, grad_rgb, grad_opacity):
        sigma, colour, delta, background, weights, t_next = ctx.saved_tensors
        proj = torch.einsum("bcm,bcms->bms", grad_rgb, colour)
        grad_colour = grad_rgb[..., None] * weights[:, None] if ctx.needs_input_grad[1] else None
        u = weights * proj
        later = torch.cumsum(u.flip(-1), -1).flip(-1) - u  # sum over j > k
        t_final = t_next[..., -1:]
        grad_bg = (grad_rgb * t_final[:, None, :, 0]).sum((0, 2)) if ctx.needs_input_grad[3] else None
        bg_proj = (grad_rgb * background[..., None]).sum(1, keepdim=True)[:, 0, :, None]
        grad_tau = t_next * proj - later + t_final * (grad_opacity[..., None] - bg_proj)
        grad_sigma = grad_tau * delta if ctx.needs_input_grad[0] else None
        grad_delta = None
        if ctx.needs_input_grad[2]:
            grad_delta = grad_tau * sigma
            grad_delta = grad_delta.sum(-1, keepdim=True) if delta.shape[-1] == 1 else grad_delta
        return grad_sigma, grad_colour, grad_delta, grad_bg


def emission_absorption(sigma: Tensor, colour: Tensor, delta: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Emission-absorption compositing of sampled rays over a background (the module docstring's formulas).

    Args:
        sigma: (B, M, S) densities; colour: (B, C, M, S) colours; delta: (B, M, 1) or (B, M, S) interval lengths;
        background: (C,) colour.
    Returns:
        rgb (B, C, M) and opacity (B, M). Same values as ``alpha_composite``, with a leaner backward.
    """
    return _EmissionAbsorption.apply(sigma, colour, delta, background)


class VoxelRenderer(nn.Module):
    """Render density (and feature) grids in a world box with any ``Camera`` (perspective or orthographic).

    Args:
        mode: ``"emission_absorption"`` (images of ``features`` composited over ``background``),
            ``"absorption"`` (opacity / silhouette) or ``"projection"`` (line integral of the density).
        n_samples: samples per ray, spread over each ray's segment inside the box.
        center: box centre (x, y, z), world units.
        size: box side lengths, a scalar or (x, y, z), world units.
        background: emission-absorption background colour, a scalar or C values.
        jitter: in training mode, jitter each sample uniformly within its bin (stratified sampling).
        alpha: in emission-absorption mode, append the opacity as a last channel (RGBA-style).

    Perspective rays start at the camera centre (samples in front of it only); orthographic rays cover the
    whole line through the box. Each ray's samples span its own segment inside the box, and rays that miss the
    box are not marched (they show the background, or 0).
    """

    def __init__(self, mode: str = "emission_absorption", n_samples: int = 128,
                 center: float | Sequence[float] = 0.0, size: float | Sequence[float] = 2.0,
                 background: float | Sequence[float] = 0.0, jitter: bool = True, alpha: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if int(n_samples) < 1:
            raise ValueError(f"n_samples: expected a positive integer, got {n_samples}")
        probe = torch.zeros(1, dtype=torch.float64)
        if (_vec3(size, probe) <= 0).any():
            raise ValueError(f"size: expected positive box side lengths, got {size}")
        self.mode, self.n_samples, self.jitter, self.alpha = mode, int(n_samples), jitter, alpha
        self.center, self.size, self.background = center, size, background

    def extra_repr(self) -> str:
        return f"mode={self.mode}, n_samples={self.n_samples}, center={self.center}, size={self.size}"

    def forward(self, density: Tensor, camera: Camera, features: Tensor | None = None) -> Tensor:
        """Render one image per camera.

        Args:
            density: (B, 1, D, H, W) or (1, 1, D, H, W) (shared by all cameras) density in 1 / world units;
                non-negative except in projection mode.
            camera: a batch of B cameras; sets the image size, dtype and device.
            features: (B, C, D, H, W) or (1, C, ...) per-voxel colours; emission-absorption mode only.
        Returns:
            (B, C, H, W) colours (``C + 1`` channels with ``alpha``), or (B, 1, H, W) opacity / line integral.
        """
        volume = self._validate(density, camera, features)
        origins, dirs = camera.rays()
        B, (Hi, Wi) = len(camera), camera.image_size
        origins, dirs = origins.reshape(B, -1, 3), dirs.reshape(B, -1, 3)
        scale = 2 / _vec3(self.size, density)  # to box coordinates, [-1, 1]^3; ray parameters t are unchanged
        origins, dirs = (origins - _vec3(self.center, density)) * scale, dirs * scale
        unit = torch.ones(3, dtype=density.dtype, device=density.device)
        near, far = ray_box(origins, dirs, -unit, unit)
        if not camera.orthographic:
            near = near.clamp_min(0)
        far = torch.maximum(far, near)
        out = self._march_hits(volume, origins, dirs, near, far)
        return out.reshape(B, -1, Hi, Wi)

    def _march_hits(self, volume: Tensor, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor) -> Tensor:
        """March only the rays that hit the box (padded to the batch's largest count); misses get the empty value.

        Rays (B, R, 3) in box coordinates with their (B, R) ranges -> (B, C, R).
        """
        hit = far > near
        M = int(hit.sum(1).max())
        miss = self._integrate(volume.new_zeros(1, volume.shape[1], 1, 1), volume.new_zeros(1, 1, 1))
        if M == hit.shape[1]:
            return self._march(volume, origins, dirs, near, far)
        out = miss.expand(hit.shape[0], -1, hit.shape[1])
        if M == 0:
            return out.contiguous()
        order = torch.argsort((~hit).to(torch.uint8), dim=1, stable=True)[:, :M]  # hits first
        pick = lambda x: x.gather(1, order[..., None].expand(-1, -1, 3))  # noqa: E731
        marched = self._march(volume, pick(origins), pick(dirs), near.gather(1, order), far.gather(1, order))
        return out.scatter(2, order[:, None].expand(-1, out.shape[1], -1), marched)

    def _march(self, volume: Tensor, origins: Tensor, dirs: Tensor, near: Tensor, far: Tensor) -> Tensor:
        """Sample ``n_samples`` points per ray in [near, far] and integrate: (B, M) rays -> (B, C, M)."""
        t, delta = stratified_depths(near, far, self.n_samples, self.jitter and self.training)
        g = torch.addcmul(origins[:, :, None], t[..., None], dirs[:, :, None])
        values = _sample_box_coords(volume, g, outside_zero=False)  # (B, C', M, S), all inside the box
        return self._integrate(values, delta)

    def _integrate(self, values: Tensor, delta: Tensor) -> Tensor:
        """(B, C', R, S) sampled [density, features...] and (B, R, 1) bin widths -> (B, C, R)."""
        if self.mode == "projection":
            return values.sum(-1) * delta[..., 0][:, None]
        if self.mode == "absorption":
            return -torch.expm1(-values.sum(-1) * delta[..., 0][:, None])
        sigma, colour = values.split([1, values.shape[1] - 1], 1)  # split, not slices: one cat in backward
        bg = torch.as_tensor(self.background, dtype=values.dtype, device=values.device).expand(colour.shape[1])
        rgb, opacity = emission_absorption(sigma[:, 0], colour, delta, bg)
        return torch.cat([rgb, opacity[:, None]], 1) if self.alpha else rgb

    def _validate(self, density: Tensor, camera: Camera, features: Tensor | None) -> Tensor:
        """Check the inputs against the camera; return the grid to sample (density, then features)."""
        if not isinstance(camera, Camera):
            raise ValueError(f"camera: expected a renderers.cameras.Camera, got {type(camera).__name__}")
        sizes = check_tensor("density", density, ("B", 1, "D", "H", "W"), like=camera.R)
        if sizes["B"] not in (1, len(camera)):
            raise ValueError(f"density: expected batch size 1 or {len(camera)} (the cameras), got {sizes['B']}")
        if self.mode != "projection" and bool(density.min() < 0):
            raise ValueError(f"density: expected non-negative values in {self.mode} mode")
        if self.mode != "emission_absorption":
            if features is not None:
                raise ValueError(f"features: only used in emission_absorption mode, not {self.mode}")
            return density
        if features is None:
            raise ValueError("features: required in emission_absorption mode, shape (B, C, D, H, W)")
        sizes = check_tensor("features", features, ("B", "C", "D", "H", "W"), sizes, like=camera.R)
        n_bg = torch.as_tensor(self.background).numel()
        if n_bg not in (1, sizes["C"]):
            raise ValueError(f"background: expected 1 or C={sizes['C']} values, got {n_bg}")
        return torch.cat([density, features], 1)
