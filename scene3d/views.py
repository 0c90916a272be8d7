"""Pixel-aligned features of context views: the one home of "project points into the views and read their
features there", used by the VoxelAE's ``PixelLifter`` (cell centres), the NeRF-AE's ``PixelField`` (ray
samples) and GQN's ``Epipolar`` representation (points on the query's rays).

Conventions: cameras are ``renderers.cameras.Camera`` (world -> view ``R p + t``, pixel centres at +0.5);
feature maps of any resolution cover the camera's whole image, so a point is read at the same place in each
(``grid_sample``, ``align_corners=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.cameras import Camera
from scene3d.metrics import foreground_mask

OUTSIDE = 2.0  # a grid_sample coordinate outside [-1, 1]: reads zero with padding "zeros"


def sample_views(maps: list[Tensor], cameras: Camera, points: Tensor) -> tuple[Tensor, Tensor]:
    """Features of V views at world points, channel-first.

    Args:
        maps: feature maps of the V views, each (V, C_i, h_i, w_i), covering each camera's image.
        cameras: the V cameras (``image_size`` (H, W) in pixels).
        points: (V, P, 3) world points, one set per view (``expand`` a shared set: no copy).
    Returns:
        feats (V, sum C_i, P): bilinear samples, zero-padded (they fade to zero over the half pixel outside the
        image); zero behind the camera (those points are sent outside the grid, so nothing is multiplied by a
        mask).
        seen (V, 1, P): 1.0 where the point projects into the image in front of the camera, else 0.0.
    """
    H, W = cameras.image_size
    uv, depth = cameras.project(points)
    grid = uv / uv.new_tensor([W, H]) * 2 - 1  # (V, P, 2) in grid_sample's [-1, 1]
    front = depth > 0
    inside = (grid.abs() <= 1).all(-1) & front
    grid = torch.where(front[..., None], grid, grid.new_full((), OUTSIDE))[:, :, None]  # (V, P, 1, 2)
    feats = [F.grid_sample(m, grid, align_corners=False)[..., 0] for m in maps]
    return (feats[0] if len(feats) == 1 else torch.cat(feats, 1)), inside[:, None].to(points.dtype)


def camera_axes(cameras: Camera, vectors: Tensor) -> Tensor:
    """World vectors (V, P, 3) expressed in each camera's axes, ``R v`` (V, P, 3): a point's position about the
    world origin with the view's depth as its third coordinate, or a ray direction as that camera sees it."""
    return vectors @ cameras.R.transpose(1, 2)


class ViewFeatures(nn.Module):
    """A small 2D ConvNet: images (V, 3, H, W) -> ``channels`` features at 1, 1/2 and 1/4 of the image size
    (a list of three maps; :func:`sample_views` reads all three at a point, 3 * ``channels`` features)."""

    def __init__(self, channels: int = 16, width: int = 32):
        super().__init__()
        conv = lambda a, b, s=1: nn.Sequential(nn.Conv2d(a, b, 3, s, 1), nn.ReLU())  # noqa: E731
        self.levels = nn.ModuleList([nn.Sequential(conv(3, width), conv(width, width)),
                                     nn.Sequential(conv(width, 2 * width, 2), conv(2 * width, 2 * width)),
                                     nn.Sequential(conv(2 * width, 2 * width, 2), conv(2 * width, 2 * width))])
        self.reduce = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in (width, 2 * width, 2 * width)])
        self.channels = channels

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """(V, 3, H, W) -> [(V, C, H, W), (V, C, H/2, W/2), (V, C, H/4, W/4)]."""
        x, maps = images, []
        for level, reduce in zip(self.levels, self.reduce):
            x = level(x)
            maps.append(reduce(x))
        return maps


@dataclass
class ContextViews:
    """The context views of B scenes, ready to be read: ``maps`` (B*k, C, h, w) each (ViewFeatures' maps, then
    the foreground mask as the last one), ``cameras`` (B*k, scene-major), ``k`` views per scene."""

    maps: list[Tensor]
    cameras: Camera
    k: int

    def repeat(self, n: int) -> "ContextViews":
        """Each scene's views ``n`` times in a row (for B * n query cameras, scene-major)."""
        B = len(self.cameras) // self.k
        scene = torch.arange(B, device=self.maps[0].device).repeat_interleave(n)
        idx = (scene[:, None] * self.k + torch.arange(self.k, device=scene.device)).reshape(-1)
        return ContextViews([m[idx] for m in self.maps], self.cameras[idx], self.k)


def context_views(features: ViewFeatures, images: Tensor, cameras: Camera, background: Tensor,
                  rgb: bool = False) -> ContextViews:
    """images (B, k, 3, H, W) over ``background`` (3,), B * k cameras (scene-major) -> :class:`ContextViews`:
    the views' feature maps, with ``rgb`` the images themselves (3 channels), and, last, their foreground masks
    (1 where a pixel differs from the background)."""
    flat, mask = colour_maps(images, background)
    return ContextViews([*features.feature_maps(flat), *([flat] if rgb else []), mask], cameras, images.shape[1])


def object_colour_logit(maps: list[Tensor], cameras: Camera, k: int, points: Tensor, background: Tensor) -> Tensor:
    """The logit of the object's colour in the context views at world ``points`` (B, P, 3) -> (B, P, 3).

    ``maps``: each view's image (B k, 3, H, W) and its foreground mask (B k, 1, H, W), views scene-major, with
    B * k ``cameras``. The colour is averaged over the views that show the object at the point's projection; the
    logit is 0 (colour 0.5) where none does. A pixel mixes the object's colour with the ``background`` bg (3,),
    p = m rgb + (1 - m) bg, so p - bg = m (rgb - bg): bilinear reads d of p - bg and m of the mask (both zero
    outside the image and behind the camera, that is, background) give rgb = bg + sum of d / sum of m over the
    views. Occlusion is not modelled: a point takes the colour of whatever the views show in front of it.
    """
    B, P, _ = points.shape
    bg = background.to(maps[0].dtype)
    read, _ = sample_views([maps[0] - bg[:, None, None], maps[1]], cameras, points.repeat_interleave(k, 0))
    read = read.view(B, k, 4, P).sum(1)  # (B, 4, P): sum of d, sum of m
    m = read[:, 3:]
    logit = torch.logit((bg[:, None] + read[:, :3] / m.clamp_min(1e-6)).clamp(0.02, 0.98))
    return torch.where(m > 1e-3, logit, torch.zeros_like(logit)).transpose(1, 2)


def colour_maps(images: Tensor, background: Tensor) -> list[Tensor]:
    """images (B, k, 3, H, W) over ``background`` (3,) -> [images (B k, 3, H, W), foreground masks
    (B k, 1, H, W)], the ``maps`` of :func:`object_colour_logit`."""
    flat = images.flatten(0, 1)
    return [flat, foreground_mask(flat, background.to(flat.dtype)).to(flat.dtype)]
