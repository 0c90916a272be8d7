"""A radiance field conditioned on the context views' pixel-aligned features (pixelNeRF, Yu et al. 2021) and on
the scene's global latent: the NeRF-AE's decoder field (``scene3d.autoencoders.FieldDecoder`` with ``lift``).

For a sample point p seen along direction d, each context view contributes an MLP of
    [its features at p's projection (``scene3d.views``), its colour and foreground mask there,
     gamma(p in that camera's axes, box half-sizes), d in that camera's axes];
the views' outputs are averaged (any k), joined with the latent z and gamma(p), and a second MLP gives the
density (1 / world units) and the colour. The colour's logit also adds, with a learned gain ``view_colour`` (1 at
the start; runs from before it load with 0), the object's colour in the context views at p
(``scene3d.views.object_colour_logit``). Why: see ``scene3d.autoencoders.MeshDecoder``; the MLP, although it
reads each view's colour, gave every sample the mean colour.

Empty space is skipped per scene: a point that lands on the background of any context view that sees it lies
outside the views' visual hull, has no density, and the MLPs are not evaluated there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.cameras import Camera
from renderers.nerf import PositionalEncoding
from scene3d.views import ContextViews, ViewFeatures, context_views, object_colour_logit, sample_views

HULL_LEVEL = 0.5  # a point with a bilinear foreground reading below this in a view that sees it is carved away


class PixelField(nn.Module):
    """See the module docstring. ``latent_dim``: z's size; ``lo, hi``: the world box; ``channels``: features per
    pyramid level (3 levels); ``width``: hidden units of both MLPs."""

    def __init__(self, latent_dim: int, lo: float, hi: float, background, channels: int = 16, width: int = 64,
                 pos_freqs: int = 6, dir_freqs: int = 2):
        super().__init__()
        self.features = ViewFeatures(channels)
        self.pos_enc, self.dir_enc = PositionalEncoding(pos_freqs), PositionalEncoding(dir_freqs)
        view_in = 3 * channels + 4 + self.pos_enc.out_dim + self.dir_enc.out_dim
        self.per_view = nn.Sequential(nn.Linear(view_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(width + latent_dim + self.pos_enc.out_dim, width), nn.ReLU(),
                                  nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
        self.view_colour = nn.Parameter(torch.ones(()))
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32), persistent=False)
        self.center, self.scale = (lo + hi) / 2, (hi - lo) / 2
        # density = softplus(raw - 4) * 2 / (a 32^3 cell): a raw 0 is a faint fog (about 0.45 opacity across the hull
        # of a Shepard-Metzler object), a raw 4 makes a cell opaque, as the VoxelDecoder's scale does
        self.density_unit = 2 / ((hi - lo) / 32)

    def context(self, images: Tensor, cameras: Camera) -> ContextViews:
        """images (B, k, 3, H, W) over the background, B * k cameras (scene-major) -> :class:`ContextViews`."""
        return context_views(self.features, images, cameras, self.background, rgb=True)

    def forward(self, points: Tensor, dirs: Tensor, z: Tensor, views: ContextViews) -> tuple[Tensor, Tensor]:
        """World points and unit directions (B, N, 3), latents z (B, L) -> density (B, N) in 1 / world units and
        rgb (B, N, 3); zero density and colour outside the context views' visual hull."""
        B, N, _ = points.shape
        k = views.k
        pts = points.repeat_interleave(k, 0)  # (B k, N, 3)
        feats, seen = sample_views(views.maps, views.cameras, pts)  # (B k, 3C + 4, N), (B k, 1, N)
        fg = feats[:, -1:]
        carved = ((fg < HULL_LEVEL) & (seen > 0)).view(B, k, N).any(1)  # (B, N)
        keep = ~carved
        sigma = points.new_zeros(B, N)
        rgb = points.new_zeros(B, N, 3)
        if not bool(keep.any()):
            return sigma, rgb
        b_idx, n_idx = keep.nonzero(as_tuple=True)  # the points inside the hull, scene by scene
        M = len(b_idx)
        v_rows = (b_idx[:, None] * k + torch.arange(k, device=points.device)).reshape(-1)  # (M k,) view of each
        f = feats.transpose(1, 2)[v_rows, n_idx.repeat_interleave(k)]  # (M k, 3C + 4)
        p = points[b_idx, n_idx]  # (M, 3)
        R = views.cameras.R[v_rows]  # (M k, 3, 3)
        local = (R @ p.repeat_interleave(k, 0)[:, :, None])[..., 0] / self.scale
        d_local = (R @ dirs[b_idx, n_idx].repeat_interleave(k, 0)[:, :, None])[..., 0]
        h = self.per_view(torch.cat([f, self.pos_enc(local), self.dir_enc(d_local)], -1)).view(M, k, -1).mean(1)
        out = self.head(torch.cat([h, z[b_idx], self.pos_enc((p - self.center) / self.scale)], -1))
        sigma = sigma.index_put((b_idx, n_idx), F.softplus(out[:, 0] - 4.0) * self.density_unit)
        seen_colour = object_colour_logit(views.maps[-2:], views.cameras, k, points, self.background)  # (B, N, 3)
        rgb = rgb.index_put((b_idx, n_idx), torch.sigmoid(out[:, 1:] + self.view_colour * seen_colour[b_idx, n_idx]))
        return sigma, rgb

