"""Explicit-3D scene autoencoders: voxel, mesh and NeRF decoders, amortised or fitted to one scene.

One training step (``SceneAE.loss``, driven by the shared :class:`plato_core.trainer.Trainer`)::

    k context views + cameras --ContextEncoder--> q(z) --z--> decoder --> 3D state --render(query cameras)--> images
    loss = -log N(query images; rendered, sigma^2) + beta KL(q(z) || N(0, I)) + shape regularisers

* **amortised** (``encoder`` given): items are scenes of V views; each step draws k contexts from
  ``contexts`` and ``queries`` other views of every scene.
* **per-scene fit** (``encoder=None``, decoder built with ``latent_dim=0``): the decoder *is* the scene's
  3D representation (a free voxel grid, free vertex offsets, or an unconditioned NeRF MLP); items are
  single views of that scene and every view in the batch is a query.

Decoders (one interface, :class:`SceneDecoder`: ``forward(z) -> state``, ``render``, ``occupancy``, ``surface``,
``regularisers``):

* :class:`VoxelDecoder`: z -> 3D transposed convolutions -> density + colour at ``res^3``
  -> ``renderers.voxel.VoxelRenderer`` (emission-absorption, with the opacity as a 4th, silhouette channel)
  (Rezende et al. 2016). With ``lift`` (the default), a :class:`PixelLifter` also gives every cell the
  context images' features at its projection, so the grid starts from the views' silhouettes and the
  global latent only has to add what the views do not show (the cell-wise view of pixelNeRF, in voxels).
* :class:`VoxelMeshDecoder` (the amortised mesh's default): a voxel branch (the VoxelAE's decoder and lifter,
  trained on its own images) whose iso-surface, refined per vertex from the context views, is each scene's mesh
  -> ``renderers.mesh.MeshRenderer`` (soft silhouette + shaded), with PyTorch3D's Laplacian, edge and
  normal-consistency regularisers (Mesh R-CNN's design).
* :class:`MeshDecoder`: z -> offsets + colours of an ico-sphere template -> the same renderer and regularisers
  (the per-scene mesh fit, and ``--mesh-template sphere``).
* :class:`FieldDecoder`: a latent-conditioned ``renderers.nerf.RadianceMLP`` (CodeNeRF-style conditioning)
  -> ``renderers.nerf.NeRFRenderer`` on random rays clipped to the scene box. Fitted to one scene it is an
  MLP or a ``renderers.gridfield.FeatureGridField``, with a ``renderers.occupancy.OccupancyGrid`` that
  starts from the views' visual hull and skips empty space.

World box: every decoder covers ``[lo, hi]^3`` (Shepard–Metzler: the generator's occupancy bounds
(-4, 4)); grids follow ``renderers.voxel`` ([z, y, x], values at cell centres).
Images are (B, 3, H, W) in [0, 1] over the dataset's background colour.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plato_core.encoders import ConvEncoder
from plato_core.objective import gaussian_kl, gaussian_log_likelihood, reparameterize
from plato_core.runinfo import UserError
from plato_core.settings import setting
from plato_core.trainer import load_checkpoint
from renderers.cameras import Camera
from renderers.gridfield import FeatureGridField
from renderers.mesh import MeshRenderer, ico_sphere
from renderers.nerf import NeRFOutput, NeRFRenderer, RadianceMLP
from renderers.occupancy import OccupancyGrid
from renderers.voxel import VoxelRenderer, ray_box, sample_grid
from scene3d.data import CAMERA_KEYS, batch_cameras
from scene3d.export import density_to_mesh, marching_cubes
from scene3d.geometry_metrics import mesh_occupancy, voxel_centers
from scene3d.metrics import foreground_mask
from scene3d.pixelnerf import PixelField
from scene3d.views import (
    ContextViews,
    ViewFeatures,
    camera_axes,
    colour_maps,
    context_views,
    object_colour_logit,
    sample_views,
)

CALIBRATION = "calibration.json"  # RUN/calibration.json: the occupancy level chosen by ``scene3d calibrate``

KINDS = ("voxel", "mesh", "nerf")
CAMERA_CODE = 12  # rotation (9) + centre / box half-size (3)


# ------------------------------------------------------------------ views and cameras
def resize_views(images: Tensor, cameras: Camera, size: int) -> tuple[Tensor, Camera]:
    """Box-filter (N, 3, H, W) images to ``size``^2 and scale the cameras' intrinsics to match."""
    H, W = images.shape[-2:]
    if (H, W) == (size, size):
        return images, cameras
    if H != W or H % size:
        raise ValueError(f"size: {size} must divide the square image size {H}")
    f = H // size
    cam = Camera(cameras.R, cameras.t, cameras.focal / f, cameras.principal / f, (size, size), cameras.orthographic)
    return F.avg_pool2d(images, f), cam


def camera_code(cameras: Camera, scale: float) -> Tensor:
    """(N, 12) encoder input describing each camera: its rotation and its centre in box half-sizes."""
    return torch.cat([cameras.R.reshape(-1, 9), cameras.center / scale], -1)


def batch_views(batch: dict, size: int | None) -> tuple[Tensor, Camera]:
    """A collated batch -> images (B, V, 3, S, S) and B * V cameras (scene-major), resized to ``size``."""
    images = batch["images"]
    B, V = images.shape[:2]
    H, W = images.shape[-2:]
    cams = batch_cameras(batch, (H, W))
    imgs, cams = resize_views(images.reshape(B * V, 3, H, W), cams, size or H)
    return imgs.reshape(B, V, 3, *imgs.shape[-2:]), cams


def view_index(B: int, V: int, views: Tensor) -> Tensor:
    """(B * n,) indices of ``views`` (n,) in each of B scenes of V views, scene-major, for ``Camera.__getitem__``
    on the B * V cameras of :func:`batch_views`."""
    return (torch.arange(B, device=views.device)[:, None] * V + views[None]).reshape(-1)


# ------------------------------------------------------------------------- encoder
class ContextEncoder(nn.Module):
    """k context views with their cameras -> q(z) = N(mu, exp(logvar)), (B, L) each.

    Each view goes through the shared ``plato_core.encoders.ConvEncoder`` with its camera code broadcast as
    12 extra input planes; the k per-view Gaussians are fused as a product of experts (precisions add),
    so more views give a sharper posterior and any k works.
    """

    def __init__(self, image_size: int, latent_dim: int, scale: float, width: int = 32):
        super().__init__()
        self.net = ConvEncoder(3 + CAMERA_CODE, image_size, latent_dim, width)
        self.scale, self.latent_dim = scale, latent_dim

    def forward(self, images: Tensor, cameras: Camera) -> tuple[Tensor, Tensor]:
        """images (B, k, 3, H, W), B * k cameras (scene-major) -> mu, logvar (B, L)."""
        B, k, _, H, W = images.shape
        code = camera_code(cameras, self.scale).to(images.dtype)[:, :, None, None].expand(-1, -1, H, W)
        mu, logvar = self.net(torch.cat([images.reshape(B * k, 3, H, W), code], 1))
        prec = torch.exp(-logvar).reshape(B, k, -1)
        mu = (mu.reshape(B, k, -1) * prec).sum(1) / prec.sum(1)
        return mu, -torch.log(prec.sum(1))


class PixelLifter(ViewFeatures):
    """k context views + cameras -> a (B, C, G, G, G) feature volume over the box ``[lo, hi]^3``.

    The views' feature maps (:class:`scene3d.views.ViewFeatures`) are read at every cell centre's projection
    (:func:`scene3d.views.sample_views`); with the cell's position in that camera's axes (``R p`` in box
    half-sizes, so depth along the view is explicit) a per-cell MLP makes C features per view, and the views
    are averaged (any k).
    """

    def __init__(self, res: int, lo: float, hi: float, channels: int = 16, width: int = 32):
        super().__init__(channels, width)
        self.mlp = nn.Sequential(nn.Linear(3 * channels + 3, 2 * channels), nn.ReLU(),
                                 nn.Linear(2 * channels, channels))
        self.register_buffer("cells", voxel_centers(res, lo, hi).reshape(-1, 3), persistent=False)  # [z, y, x] order
        self.res, self.scale = res, (hi - lo) / 2

    def forward(self, images: Tensor, cameras: Camera) -> Tensor:
        """images (B, k, 3, H, W), B * k cameras (scene-major) -> (B, C, G, G, G)."""
        B, k, _, H, W = images.shape
        return self.lift(self.feature_maps(images.reshape(B * k, 3, H, W)), cameras, k)

    def lift(self, maps: list[Tensor], cameras: Camera, k: int) -> Tensor:
        """The views' feature maps (``feature_maps``: each (B k, C, h, w)), B * k cameras -> (B, C, G, G, G)."""
        pts = self.cells.to(maps[0].dtype)[None].expand(len(cameras), -1, -1)
        feats, _ = sample_views(maps, cameras, pts)  # (B k, 3C, N)
        local = camera_axes(cameras, pts) / self.scale
        h = self.mlp(torch.cat([feats, local.transpose(1, 2)], 1).transpose(1, 2))  # (B k, N, C)
        G = self.res
        return h.reshape(-1, k, G, G, G, self.channels).mean(1).permute(0, 4, 1, 2, 3)


# ------------------------------------------------------------------------ decoders
@runtime_checkable
class SceneDecoder(Protocol):
    """What :class:`SceneAE`, :mod:`scene3d.ae_eval` and the CLI need of a decoder; :class:`VoxelDecoder`,
    :class:`MeshDecoder` and :class:`FieldDecoder` (``torch.nn.Module`` s) all have it.

    A decoder turns latents into a 3D *state*, a dict of tensors with one row per scene, and answers
    questions about that state in world units over the box ``[lo, hi]^3``.
    """

    kind: str  # "voxel" | "mesh" | "nerf", the AEConfig.kind that builds it
    latent_dim: int  # L; 0 makes a free per-scene representation, decoded by forward(None)
    lo: float  # the world box [lo, hi]^3, world units
    hi: float

    def forward(self, z: Tensor | None) -> dict:
        """z (B, L), or None when ``latent_dim == 0`` -> the state of B scenes (one scene for None)."""

    def render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """``per_scene`` cameras of each scene, scene-major (B * per_scene cameras) -> (B * per_scene, C, H, W):
        colour in [0, 1] over the background (C = 3), then the opacity, the soft silhouette, where the decoder
        renders one (C = 4: voxel, mesh)."""

    def occupancy(self, state: dict, points: Tensor, level: float) -> Tensor:
        """(B, N) bool: which world ``points`` (N, 3) are inside each scene; ``level`` is the density threshold
        in 1 / world units (a mesh ignores it and tests the inside of its closed surface)."""

    def surface(self, state: dict, i: int, level: float) -> tuple[Tensor, Tensor, Tensor]:
        """Scene ``i`` as a coloured mesh at ``level`` (as in :meth:`occupancy`): verts (V, 3) in world units,
        faces (F, 3) long, vertex colours (V, 3) in [0, 1]."""

    def regularisers(self, state: dict) -> dict[str, Tensor]:
        """Name -> scalar shape prior; :meth:`SceneAE.loss` adds ``AEConfig.<name>_weight`` times each."""


class VoxelDecoder(nn.Module):
    """z (B, L) -> density (B, 1, G, G, G) in 1 / world units and colour (B, 3, G, G, G) over ``[lo, hi]^3``.

    Amortised: a linear layer to ``width`` channels at (G/8)^3, then three stride-2 transposed 3D
    convolutions (width / 2, width / 4, then the 4 output channels at G^3).

    ``latent_dim=0`` makes a free per-scene grid (B = 1). Densities are ``softplus`` of the network output
    times ``density_scale / cell``, so a raw value of ~1 makes a cell about opaque.

    ``lift > 0``: ``forward(z, lifted, colour)`` also takes a :class:`PixelLifter` volume (B, lift, G/2, G/2, G/2),
    merged by a 3^3 convolution into the features before the last transposed convolution, and the logit of the
    object's colour in the context views at each cell (``context_colour``, (B, 3, G, G, G)), added to the colour's
    logit with a learned gain ``view_colour`` (1 at the start; runs from before it load with 0). Why: see
    :class:`MeshDecoder`.
    """

    kind = "voxel"

    def __init__(self, latent_dim: int, lo: float, hi: float, res: int = 32, width: int = 64, n_samples: int = 64,
                 background=(0.0, 0.0, 0.0), density_scale: float = 2.0, lift: int = 0):
        super().__init__()
        if res % 8:
            raise ValueError(f"res: expected a multiple of 8, got {res}")
        self.latent_dim, self.lo, self.hi, self.res = latent_dim, lo, hi, res
        self.cell = (hi - lo) / res
        self.density_scale = density_scale
        if latent_dim:
            c = [width, width // 2, width // 4]
            self.fc = nn.Linear(latent_dim, c[0] * (res // 8) ** 3)
            ups = []
            for a, b in zip(c[:-1], c[1:]):
                ups += [nn.ConvTranspose3d(a, b, 4, 2, 1), nn.ReLU()]
            self.up = nn.Sequential(*ups, nn.ConvTranspose3d(c[-1], 4, 4, 2, 1))  # the last one is the output
            self.c0 = c[0]
            if lift:  # merges the lifted features into the (res / 2)^3 features before the output layer
                self.mix = nn.Sequential(nn.Conv3d(c[-1] + lift, c[-1], 3, 1, 1), nn.ReLU())
                self.view_colour = nn.Parameter(torch.ones(()))
                self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32),
                                     persistent=False)
                self.register_buffer("cells", voxel_centers(res, lo, hi).reshape(-1, 3), persistent=False)
        else:
            self.grid = nn.Parameter(torch.cat([torch.zeros(1, 1, res, res, res),
                                                torch.zeros(1, 3, res, res, res)], 1))
        self.renderer = VoxelRenderer("emission_absorption", n_samples, center=(lo + hi) / 2, size=hi - lo,
                                      background=background, alpha=True)  # alpha: the silhouette the loss also fits

    def forward(self, z: Tensor | None, lifted: Tensor | None = None, colour: Tensor | None = None) -> dict:
        if self.latent_dim:
            g = self.res // 8
            h = self.up[:-1](self.fc(z).reshape(-1, self.c0, g, g, g))
            if lifted is not None:
                h = self.mix(torch.cat([h, lifted], 1))
            raw = self.up[-1](h)
        else:
            raw = self.grid
        density = F.softplus(raw[:, :1] - 2.0) * (self.density_scale / self.cell)  # -2: start as a faint fog
        logit = raw[:, 1:] if colour is None else raw[:, 1:] + self.view_colour * colour
        return {"density": density, "rgb": torch.sigmoid(logit)}

    def context_colour(self, images: Tensor, cameras: Camera) -> Tensor:
        """Context views (B, k, 3, H, W) and their B * k cameras -> (B, 3, G, G, G): the logit of the object's
        colour in the views at each cell centre (:func:`scene3d.views.object_colour_logit`)."""
        B, k = images.shape[:2]
        cells = self.cells.to(images.dtype)[None].expand(B, -1, -1)
        logit = object_colour_logit(colour_maps(images, self.background), cameras, k, cells, self.background)
        G = self.res
        return logit.reshape(B, G, G, G, 3).permute(0, 4, 1, 2, 3)

    def render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """Render ``per_scene`` cameras of each scene in ``state`` -> (B * per_scene, 4, H, W): colour over the
        background and the opacity (the soft silhouette) as a 4th channel."""
        rep = lambda x: x if x.shape[0] == 1 else x.repeat_interleave(per_scene, 0)  # noqa: E731
        return self.renderer(rep(state["density"]), cameras, rep(state["rgb"]))

    def occupancy(self, state: dict, points: Tensor, level: float) -> Tensor:
        """(B, N) bool: density at world ``points (N, 3)`` above ``level`` (1 / world units)."""
        c, s = self._box(points)
        sig = sample_grid(state["density"], points[None].expand(len(state["density"]), -1, -1), c, s)[:, 0]
        return sig > level

    def surface(self, state: dict, i: int, level: float) -> tuple[Tensor, Tensor, Tensor]:
        """Scene ``i``'s ``level`` iso-surface: verts (V, 3), faces (F, 3), vertex colours (V, 3)."""
        verts, faces = marching_cubes(state["density"][i, 0], level, self.lo, self.hi)
        c, s = self._box(verts)
        rgb = sample_grid(state["rgb"][i:i + 1], verts[None].to(state["rgb"].dtype), c, s)[0].T
        return verts, faces, rgb.clamp(0, 1)

    def regularisers(self, state: dict) -> dict:
        """``binary``: mean alpha * (1 - alpha) of the cells' opacities, which pushes every cell to be empty or
        opaque, so that one occupancy threshold fits both the images and the solid."""
        alpha = 1 - torch.exp(-state["density"] * self.cell)
        return {"binary": (alpha * (1 - alpha)).mean()}

    def _box(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = torch.full((3,), (self.lo + self.hi) / 2, dtype=like.dtype, device=like.device)
        return c, torch.full((3,), self.hi - self.lo, dtype=like.dtype, device=like.device)


def pool_views(per_view: nn.Module, views: ContextViews, points: Tensor, half: float) -> Tensor:
    """What the context views say about each of B scenes' points (B, P, 3): ``per_view`` (an MLP) of each view's
    features and foreground mask at the point's projection, with the point in that camera's axes (in units of
    ``half``, the box's half-size), averaged over the views -> (B, P, per_view's outputs). ``views.maps``: the
    features, the RGB images, then the masks (``context_views(..., rgb=True)``)."""
    B, P, _ = points.shape
    pts = points.repeat_interleave(views.k, 0)  # (B k, P, 3)
    feats, _ = sample_views(views.maps, views.cameras, pts)  # (B k, 3C + 3 + 1, P): features, RGB, mask
    feats = torch.cat([feats[:, :-4], feats[:, -1:]], 1)  # the MLP reads the features and the mask
    local = camera_axes(views.cameras, pts) / half
    return per_view(torch.cat([feats.transpose(1, 2), local], -1)).view(B, views.k, P, -1).mean(1)


def smooth_modes(faces: Tensor, n_verts: int, k: int) -> Tensor:
    """(V, k) the ``k`` smoothest modes of a mesh: eigenvectors of its uniform graph Laplacian (D - W over the
    edges of ``faces`` (F, 3)) with the smallest eigenvalues, each scaled to norm sqrt(V / k), so that k
    coefficients that each change by about 1 move a vertex by about 1 (as a free per-vertex offset would).
    On an ico-sphere these are its spherical harmonics: the first 121 reach degree 10."""
    k = min(k, n_verts)
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).long()
    W = torch.zeros(n_verts, n_verts, dtype=torch.float64)
    W[edges[:, 0], edges[:, 1]] = 1.0
    W = torch.maximum(W, W.T)
    _, vecs = torch.linalg.eigh(torch.diag(W.sum(1)) - W)
    return (vecs[:, :k] * math.sqrt(n_verts / k)).float()


class MeshDecoder(nn.Module):
    """z (B, L) -> verts (B, V, 3) = template + offsets and colours (B, V, 3) of an ico-sphere.

    The template is an ico-sphere of ``subdivisions`` (3: 642 vertices, 1,280 faces) and radius
    ``radius`` world units. ``latent_dim=0`` makes free per-scene offsets (mesh deformation). Rendered
    as a soft silhouette (for the foreground mask) and a shaded image (for the colours).

    ``lift > 0`` (amortised): a second stage reads the context views at each vertex (``scene3d.views``: the
    views' features and foreground mask at the vertex's projection after the first, z-only stage, with the
    vertex in that camera's axes), averages an MLP of them over the views, and adds an offset and a colour
    (``forward(z, views)``): a vertex can move to the silhouette it sees and take the colour under it.
    That colour is also read directly: the context pixels at the final vertex's projection, averaged over the
    views that show the object there, enter the colour's logit with a learned gain ``view_colour`` (1 at the
    start; runs from before it load with 0, their old colours).

    Why the direct read: with the colour left to the MLP, 30 minutes of training gave every vertex the mean
    colour (grey turntables); the features at a vertex's projection carried its cube's hue, but the MLP did
    not learn to pass it through.

    With ``basis`` > 0 (amortised) both stages move the vertices only through the template's ``basis`` smoothest
    modes (:func:`smooth_modes`), and the Laplacian and normal-consistency weights default to 1 (were 0.1 and
    0.01). Why: with a free offset per vertex the decoded meshes crumpled into balls of paper (after 30 minutes on
    Shepard-Metzler scenes, the normals of neighbouring faces differed by 1.56 in 1 - cos on average, and the
    winding number reached -14 to 17 inside: the surface wrapped the same point many times), and their inside,
    by ray parity, missed the object (IoU 0.253 at k = 1). Measured side by side, 30 minutes each (IoU k = 1 /
    k = 3): weights 50x (5 and 0.5) alone 0.260 / 0.280; 128 modes 0.264 / 0.302; 128 modes and weights 1 and 1
    0.290 / 0.313, with SSIM 0.15 -> 0.28 and Chamfer 0.164 -> 0.162. The meshes still fold (normal consistency
    0.44): a sharp surface cannot show the uncertainty of one view, and folding can (a soft, grey silhouette).
    """

    kind = "mesh"

    def __init__(self, latent_dim: int, lo: float, hi: float, subdivisions: int = 3, radius: float | None = None,
                 hidden: int = 256, background=(0.0, 0.0, 0.0), faces_per_pixel: int = 4, sigma: float = 1e-4,
                 light_direction=(0.3, -0.5, 1.0), max_offset: float | None = None, lift: int = 0,
                 basis: int = 0):
        super().__init__()
        self.latent_dim, self.lo, self.hi = latent_dim, lo, hi
        radius = radius or 0.3 * (hi - lo)
        verts, faces = ico_sphere(subdivisions, radius)
        self.register_buffer("template", verts)
        self.register_buffer("faces", faces)
        self.max_offset = max_offset or 0.5 * (hi - lo)
        V = len(verts)
        self.register_buffer("basis", smooth_modes(faces, V, basis) if latent_dim and basis else None)
        if latent_dim:
            outputs = V * 6 if self.basis is None else 3 * self.basis.shape[1] + V * 3
            self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, outputs))
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
        else:
            self.params = nn.Parameter(torch.zeros(1, V, 6))
        self.features = ViewFeatures(lift) if latent_dim and lift else None
        if self.features is not None:
            self.per_view = nn.Sequential(nn.Linear(3 * lift + 4, hidden // 2), nn.ReLU(),
                                          nn.Linear(hidden // 2, hidden // 2), nn.ReLU())
            self.refine = nn.Sequential(nn.Linear(hidden // 2 + 3, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 6))
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
            self.view_colour = nn.Parameter(torch.ones(()))
            self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32), persistent=False)
        # one soft rasterization: shaded RGB plus its SoftRas opacity (the soft silhouette) as alpha
        self.shaded = MeshRenderer("shaded", faces_per_pixel=faces_per_pixel, sigma=sigma, gamma=sigma,
                                   background=tuple(background), light_direction=light_direction, specular=0.0,
                                   alpha=True)

    def context(self, images: Tensor, cameras: Camera) -> ContextViews | None:
        """The context views (B, k, 3, H, W) with B * k cameras, ready for ``forward`` (None without ``lift``)."""
        if self.features is None:
            return None
        return context_views(self.features, images, cameras, self.background, rgb=True)

    def forward(self, z: Tensor | None, views: ContextViews | None = None) -> dict:
        raw = self._raw(z)
        verts = self.template + self.max_offset * torch.tanh(raw[..., :3])
        if views is not None:
            raw = raw + self._smooth(self._refine(verts, views))
            verts = self.template + self.max_offset * torch.tanh(raw[..., :3])
            seen = object_colour_logit(views.maps[-2:], views.cameras, views.k, verts, self.background)
            raw = torch.cat([raw[..., :3], raw[..., 3:] + self.view_colour * seen], -1)
        return {"verts": verts, "rgb": torch.sigmoid(raw[..., 3:])}

    def _raw(self, z: Tensor | None) -> Tensor:
        """(B, V, 6) raw offsets (before the tanh) and colour logits of the first stage."""
        if not self.latent_dim:
            return self.params
        out = self.net(z)
        if self.basis is None:
            return out.reshape(len(z), -1, 6)
        K = self.basis.shape[1]
        offsets = self.basis @ out[:, :3 * K].reshape(len(z), K, 3)  # (B, V, 3): a sum of smooth modes
        return torch.cat([offsets, out[:, 3 * K:].reshape(len(z), -1, 3)], -1)

    def _smooth(self, raw: Tensor) -> Tensor:
        """(B, V, 6) raw offsets and colours with the offsets projected onto the smooth modes (unchanged without)."""
        if self.basis is None:
            return raw
        unit = self.basis / self.basis[:, 0].norm()  # the modes, orthonormal
        return torch.cat([unit @ (unit.T @ raw[..., :3]), raw[..., 3:]], -1)

    def _refine(self, verts: Tensor, views: ContextViews) -> Tensor:
        """(B, V, 6) additions to the raw offsets and colours from the context views at ``verts`` (B, V, 3)."""
        h = pool_views(self.per_view, views, verts, 0.5 * (self.hi - self.lo))
        return self.refine(torch.cat([h, self.template.expand(len(verts), -1, -1) / self.max_offset], -1))

    def render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """(B * per_scene, 4, H, W): shaded RGB and the soft silhouette as a 4th channel."""
        rep = lambda x: x if x.shape[0] == 1 else x.repeat_interleave(per_scene, 0)  # noqa: E731
        return self.shaded(rep(state["verts"]), self.faces, cameras, rep(state["rgb"]))

    def occupancy(self, state: dict, points: Tensor, level: float) -> Tensor:
        return torch.stack([mesh_occupancy(v, self.faces, points) for v in state["verts"]])

    def surface(self, state: dict, i: int, level: float) -> tuple[Tensor, Tensor, Tensor]:
        return state["verts"][i].detach(), self.faces, state["rgb"][i].detach()

    def regularisers(self, state: dict) -> dict:
        return mesh_regularisers(state["verts"], [self.faces] * len(state["verts"]))


ISO_LEVEL = 0.2  # VoxelMeshDecoder's surface: this times the density at which one cell is half opaque. Why: the
# VoxelAE's densities are faint (a ray crosses several cells of an object); calibrated on the training images of
# Shepard-Metzler scenes (``scene3d calibrate``, IoU against 15-view hulls), 0.2 gave 0.625 and 1 gave 0.137.


class VoxelMeshDecoder(nn.Module):
    """z (B, L) and the context views -> a mesh per scene: the iso-surface of a voxel branch, coloured.

    As Mesh R-CNN (Gkioxari et al. 2019): a :class:`VoxelDecoder` with its :class:`PixelLifter` (the VoxelAE,
    trained by its own rendering loss, :meth:`auxiliary_render`) predicts a density grid; its iso-surface at
    ``ISO_LEVEL`` times the half-opaque density (marching cubes, no gradient) gives each scene its own mesh,
    closed and of any topology; a per-vertex MLP of the context views' features at the vertex's projection
    (:func:`pool_views`, on the lifter's feature maps) adds to each vertex's colour logit, which starts from the
    voxel branch's colour there, and with ``reach`` > 0 also moves the vertex by up to ``reach`` cells (then
    regularised by PyTorch3D's Laplacian, edge and normal-consistency losses). The mesh is rendered (soft silhouette
    + shaded) for the image loss. A scene whose grid never crosses the level gets an ico-sphere. Amortised only
    (``latent_dim`` > 0, ``lift`` > 0).

    Why: an ico-sphere deformed into Shepard-Metzler objects folded over itself (normal consistency 0.44 after 30
    minutes even through its 128 smoothest modes; winding numbers -14 to 17 inside with free offsets), and its
    inside, by ray parity, missed the object (IoU 0.290 at k = 1 against the 3-view hull's 0.515): a sphere cannot
    become seven cubes in a chain without folding. An iso-surface has the object's topology from the start and is
    closed by construction. Measured on Shepard-Metzler scenes (30 minutes each, one thread beside another run, 50
    test scenes, IoU at 32^3 k = 1 / k = 3): the ico-sphere 0.290 / 0.313; this decoder with ``reach`` 2 0.402 /
    0.564; with the vertices differentiable in the grid (the mesh's images also training the branch's density, as
    in Deep Marching Cubes) 0.333 / 0.428, its meshes thin fragments. The offsets themselves did harm: on a run
    trained with ``reach`` 2 (3,910 steps, other data), the branch's own iso-surface scored IoU 0.532 / 0.809 and
    Chamfer 0.193 / 0.139, the mesh after its offsets 0.418 / 0.507 and 0.248 / 0.226 (its SSIM and masked PSNR
    fell too). Fitted to a few 32 px views through a soft silhouette, the offsets pushed the surface outside the
    context views' silhouettes. So ``reach`` defaults to 0.
    """

    kind = "mesh"

    def __init__(self, latent_dim: int, lo: float, hi: float, background=(0.0, 0.0, 0.0), lift: int = 16,
                 hidden: int = 256, reach: float = 0.0, faces_per_pixel: int = 4, sigma: float = 1e-4,
                 light_direction=(0.3, -0.5, 1.0)):
        super().__init__()
        if not latent_dim or not lift:
            raise ValueError("VoxelMeshDecoder: amortised only (latent_dim > 0 and lift > 0)")
        self.latent_dim, self.lo, self.hi = latent_dim, lo, hi
        self.voxel = VoxelDecoder(latent_dim, lo, hi, background=background, lift=lift)
        self.res = self.voxel.res
        self.lifter = PixelLifter(self.res // 2, lo, hi, lift)
        self.level = ISO_LEVEL * math.log(2) / self.voxel.cell
        self.reach = reach * self.voxel.cell
        self.per_view = nn.Sequential(nn.Linear(3 * lift + 4, hidden // 2), nn.ReLU(),
                                      nn.Linear(hidden // 2, hidden // 2), nn.ReLU())
        self.refine = nn.Sequential(nn.Linear(hidden // 2 + 3, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 6))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32), persistent=False)
        verts, faces = ico_sphere(2, 0.25 * (hi - lo))
        self.register_buffer("fallback_verts", verts, persistent=False)
        self.register_buffer("fallback_faces", faces, persistent=False)
        self.shaded = MeshRenderer("shaded", faces_per_pixel=faces_per_pixel, sigma=sigma, gamma=sigma,
                                   background=tuple(background), light_direction=light_direction, specular=0.0,
                                   alpha=True)

    def context(self, images: Tensor, cameras: Camera) -> ContextViews:
        """The context views (B, k, 3, H, W) with B * k cameras, read through the lifter's feature maps."""
        return context_views(self.lifter, images, cameras, self.background, rgb=True)

    def forward(self, z: Tensor, views: ContextViews) -> dict:
        B = len(z)
        cells = self.voxel.cells.to(z.dtype)[None].expand(B, -1, -1)
        colour = object_colour_logit(views.maps[-2:], views.cameras, views.k, cells, self.background)
        G = self.res
        colour = colour.reshape(B, G, G, G, 3).permute(0, 4, 1, 2, 3)
        grid = self.voxel(z, self.lifter.lift(views.maps[:3], views.cameras, views.k), colour)
        bases = [self._iso(grid["density"][i, 0]) for i in range(B)]
        P = max(len(v) for v, _ in bases)
        padded = torch.stack([F.pad(v.to(z.dtype), (0, 0, 0, P - len(v))) for v, _ in bases])  # (B, P, 3)
        half = 0.5 * (self.hi - self.lo)
        h = pool_views(self.per_view, views, padded, half)
        raw = self.refine(torch.cat([h, padded / half], -1))  # (B, P, 6)
        verts = padded + self.reach * torch.tanh(raw[..., :3]) if self.reach else padded
        c, s = self.voxel._box(verts)
        base_rgb = sample_grid(grid["rgb"], verts, c, s).transpose(1, 2)  # (B, P, 3)
        rgb = torch.sigmoid(torch.logit(base_rgb.clamp(1e-4, 1 - 1e-4)) + raw[..., 3:])
        n = [len(v) for v, _ in bases]
        return {"grid": grid, "verts": [verts[i, :n[i]] for i in range(B)], "faces": [f for _, f in bases],
                "rgb": [rgb[i, :n[i]] for i in range(B)]}

    def _iso(self, density: Tensor) -> tuple[Tensor, Tensor]:
        """One scene's grid (G, G, G) -> its iso-surface at ``level`` (V, 3), (F, 3), or the fallback sphere."""
        verts, faces = marching_cubes(density.detach(), self.level, self.lo, self.hi)
        if len(faces) == 0:
            return self.fallback_verts, self.fallback_faces
        return verts.to(density.device), faces.to(density.device)

    def render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """(B * per_scene, 4, H, W): each scene's mesh, shaded RGB and the soft silhouette as a 4th channel."""
        out = []
        for i, (v, f, c) in enumerate(zip(state["verts"], state["faces"], state["rgb"])):
            cams = cameras[torch.arange(i * per_scene, (i + 1) * per_scene, device=v.device)]
            out.append(self.shaded(v[None].expand(per_scene, -1, -1), f, cams, c[None].expand(per_scene, -1, -1)))
        return torch.cat(out)

    def auxiliary_render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """The voxel branch's images (B * per_scene, 4, H, W), fitted to the same views (its own training)."""
        return self.voxel.render(state["grid"], cameras, per_scene)

    def occupancy(self, state: dict, points: Tensor, level: float) -> Tensor:
        return torch.stack([mesh_occupancy(v, f, points) for v, f in zip(state["verts"], state["faces"])])

    def surface(self, state: dict, i: int, level: float) -> tuple[Tensor, Tensor, Tensor]:
        return state["verts"][i].detach(), state["faces"][i], state["rgb"][i].detach()

    def regularisers(self, state: dict) -> dict:
        if not self.reach:  # the vertices are the iso-surface's, with no gradient: nothing to regularise
            return {}
        return mesh_regularisers(state["verts"], state["faces"])


def mesh_regularisers(verts: list[Tensor], faces: list[Tensor]) -> dict[str, Tensor]:
    """PyTorch3D's uniform Laplacian smoothing, edge-length and normal-consistency losses of B meshes."""
    from pytorch3d.loss import mesh_edge_loss, mesh_laplacian_smoothing, mesh_normal_consistency
    from pytorch3d.structures import Meshes

    m = Meshes(verts=list(verts), faces=list(faces))
    return {"laplacian": mesh_laplacian_smoothing(m, "uniform"), "edge": mesh_edge_loss(m),
            "normal": mesh_normal_consistency(m)}


class FieldDecoder(nn.Module):
    """A radiance field queried by ``renderers.nerf``: the state is z itself.

    ``latent_dim > 0`` (amortised): with ``lift > 0`` a ``scene3d.pixelnerf.PixelField``, conditioned on the context
    views' pixel-aligned features (``lift`` per pyramid level) and on z, that skips each scene's space outside the
    context views' visual hull (the state is then z and the ``ContextViews``); with ``lift=0`` a latent-conditioned
    ``RadianceMLP`` (CodeNeRF-style). ``latent_dim=0``: one scene, with
    ``field="mlp"`` (a classic NeRF MLP) or ``field="grid"`` (``renderers.gridfield.FeatureGridField``, grown
    coarse to fine at the steps of ``GRID_GROWTH``). Rays are clipped to the box ``[lo, hi]^3``.

    With ``occupancy_res > 0`` a ``renderers.occupancy.OccupancyGrid`` skips empty space: the renderer puts
    ``samples`` stratified samples on each ray and evaluates the field in occupied cells only; the grid is
    re-measured from the field's density every ``OCC_EVERY`` steps (:meth:`after_step`). Without it,
    ``n_coarse`` stratified + ``n_fine`` importance samples.
    """

    kind = "nerf"
    OCC_EVERY = 16  # steps between occupancy updates (Instant-NGP: 16)
    GRID_GROWTH = {250: 48, 500: 64, 1000: 96}  # step -> grid cells per side (coarse to fine; DVGO-style)
    TV_CELLS = 65_536  # cells per step of the grid's total-variation estimate

    def __init__(self, latent_dim: int, lo: float, hi: float, depth: int = 4, width: int = 128,
                 pos_freqs: int = 6, dir_freqs: int = 2, n_coarse: int = 32, n_fine: int = 32,
                 background=(0.0, 0.0, 0.0), chunk: int = 8192, field: str = "mlp", occupancy_res: int = 0,
                 samples: int = 128, lift: int = 0):
        super().__init__()
        if field not in ("mlp", "grid") or (field == "grid" and latent_dim):
            raise ValueError(f"field: expected 'mlp', or 'grid' for one scene (latent_dim 0), got {field!r}")
        self.latent_dim, self.lo, self.hi, self.field_kind = latent_dim, lo, hi, field
        self.pixel = PixelField(latent_dim, lo, hi, background, channels=lift) if latent_dim and lift else None
        if self.pixel is not None:
            self.field = None
        elif field == "grid":
            final = max(self.GRID_GROWTH.values())
            self.field = FeatureGridField(lo, hi, res=32, final_res=final, dir_freqs=dir_freqs)
        else:
            self.field = RadianceMLP(depth, width, skips=(depth // 2,) if depth > 2 else (), pos_freqs=pos_freqs,
                                     dir_freqs=dir_freqs, latent_dim=latent_dim)
        self.occ_grid = OccupancyGrid(lo, hi, occupancy_res) if occupancy_res else None
        coarse, fine = (samples, 0) if occupancy_res else (n_coarse, n_fine)
        self.renderer = NeRFRenderer(coarse, fine, near=0.0, far=1.0, background=tuple(background), chunk=chunk)
        self.scale = (hi - lo) / 2  # the MLP sees points in box units, [-1, 1]^3

    def context(self, images: Tensor, cameras: Camera) -> ContextViews | None:
        """The context views (B, k, 3, H, W) with B * k cameras, ready for ``forward`` (None without ``lift``)."""
        return None if self.pixel is None else self.pixel.context(images, cameras)

    def forward(self, z: Tensor | None, views: ContextViews | None = None) -> dict:
        """The state: z (B, L) and, for a pixel-conditioned field, the context views (``PixelField.context``)."""
        return {"z": z} if views is None else {"z": z, "views": views}

    def query(self, points: Tensor, dirs: Tensor, z: Tensor | None = None,
              views: ContextViews | None = None) -> tuple[Tensor, Tensor]:
        """The field in world units: density (B, N) in 1 / world units, rgb (B, N, 3)."""
        if self.pixel is not None:
            return self.pixel(points, dirs, z, views)
        if self.field_kind == "grid":
            return self.field(points, dirs)
        c = (self.lo + self.hi) / 2
        sigma, rgb = self.field((points - c) / self.scale, dirs, z)
        return sigma / self.scale, rgb

    def render_rays(self, state: dict, origins: Tensor, dirs: Tensor) -> NeRFOutput:
        """(B, R, 3) world rays -> ``renderers.nerf.NeRFOutput`` (rgb (B, R, 3), opacity (B, R), ...), sampled only
        inside the box."""
        lo = origins.new_full((3,), self.lo)
        near, far = ray_box(origins, dirs, lo, lo + (self.hi - self.lo))
        near = near.clamp_min(0)
        far = torch.maximum(far, near + 1e-6)
        z, views = state["z"], state.get("views")
        field = (lambda p, d, zz: self.query(p, d, zz, views)) if z is not None else (lambda p, d: self.query(p, d))
        if self.field_kind == "grid":
            field = self.field  # world units already; its density_at lets the renderer skip hidden colour
        return self.renderer.render_rays(field, origins, dirs, z, near=near, far=far, occupancy=self.occ_grid)

    def density(self, points: Tensor) -> Tensor:
        """(N, 3) world points -> (N,) density of the one-scene field, 1 / world units."""
        if self.field_kind == "grid":
            return self.field.density_at(points[None])[0]
        return self.query(points[None], torch.zeros_like(points)[None])[0][0]

    def carve(self, images: Tensor, cameras: Camera) -> float | None:
        """Restrict the occupancy grid to the visual hull of the training views (V, 3, H, W) over the
        background colour; returns the fraction of the box kept (None without an occupancy grid). A hull of
        under 0.1 % of the box means the background is not uniform: the grid is then left whole."""
        if self.occ_grid is None:
            return None
        kept = self.occ_grid.carve(foreground_mask(images, self.renderer.background)[:, 0], cameras)
        if kept < 1e-3:
            self.occ_grid.allowed.fill_(True)
            self.occ_grid.refresh()
            return 1.0
        return kept

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Trainer hook (one scene): grow the grid field on schedule, and re-measure the occupancy grid."""
        if self.latent_dim:
            return
        if self.field_kind == "grid" and step in self.GRID_GROWTH:
            for p in self.field.upsample(self.GRID_GROWTH[step]):
                optimizer.state.pop(p, None)  # Adam's moments were for the coarser grid
        if self.occ_grid is not None and step % self.OCC_EVERY == 0:
            # the grid's density is cheap everywhere; an MLP re-measures a quarter of the cells each time
            self.occ_grid.update(self.density, fraction=1.0 if self.field_kind == "grid" else 0.25)

    def render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """Full images (B * per_scene, 3, H, W) (evaluation; training uses random rays)."""
        o, d = cameras.rays()
        N, (H, W) = len(cameras), cameras.image_size
        z = state["z"]
        if z is None:  # one scene: all rays in one batch
            rgb = self.render_rays(state, o.reshape(1, -1, 3), d.reshape(1, -1, 3)).rgb
        else:
            views = state.get("views")
            rep = self.forward(z.repeat_interleave(per_scene, 0), None if views is None else views.repeat(per_scene))
            rgb = self.render_rays(rep, o.reshape(N, -1, 3), d.reshape(N, -1, 3)).rgb
        return rgb.reshape(N, H, W, 3).permute(0, 3, 1, 2)

    def occupancy(self, state: dict, points: Tensor, level: float) -> Tensor:
        z, views = state["z"], state.get("views")
        B = 1 if z is None else len(z)
        with torch.no_grad():
            d = torch.zeros_like(points)[None].expand(B, -1, -1)
            sigma = torch.cat([self.query(points[None, i:i + 8192].expand(B, -1, -1), d[:, i:i + 8192], z, views)[0]
                               for i in range(0, len(points), 8192)], 1)
        return sigma > level

    def surface(self, state: dict, i: int, level: float, res: int = 64) -> tuple[Tensor, Tensor, Tensor]:
        z, views = state["z"], state.get("views")
        zi = None if z is None else z[i:i + 1]
        vi = None if views is None else ContextViews([m[i * views.k:(i + 1) * views.k] for m in views.maps],
                                                     views.cameras[slice(i * views.k, (i + 1) * views.k)], views.k)
        up = torch.tensor([[0.0, 0.0, 1.0]])

        def density(p):
            return self.query(p[None], up.expand(len(p), 3)[None], zi, vi)[0][0]

        verts, faces = density_to_mesh(density, res, level, self.lo, self.hi)
        with torch.no_grad():  # colour seen from above the vertex along its outward direction
            rgb = self.query(verts[None], -F.normalize(verts, dim=-1)[None], zi, vi)[1][0] if len(verts) else verts
        return verts, faces, rgb

    def regularisers(self, state: dict) -> dict:
        # TV estimated on 65,536 random cells (Plenoxels): on all of a 96³ grid it costs as much as the rest of a step
        return {"tv": self.field.total_variation(cells=self.TV_CELLS)} if self.field_kind == "grid" else {}


# ---------------------------------------------------------------------------- model
@dataclass
class AEConfig:
    """Settings of a scene autoencoder (written to config.json; fields with a flag are ``scene3d train`` options)."""

    kind: str = setting("voxel", "voxel | mesh | nerf (the subcommand)", cli=False)
    latent_dim: int = setting(128, "latent dimensions", flag="--latent")
    image_size: int = setting(32, "views are box-filtered to this size for the encoder and the losses")
    contexts: tuple[int, ...] = setting((1, 2, 3), "context views k, drawn uniformly from these per step")
    queries: int = setting(2, "query views per scene and step")
    sigma: float = setting(0.1, "pixel noise std of the likelihood")
    beta: float = setting(1.0, "KL weight")
    rays: int = setting(512, "NeRF: rays per scene per step")
    lo: float = setting(-4.0, "world box [lo, hi]^3 (from the data)", cli=False)
    hi: float = setting(4.0, "world box [lo, hi]^3 (from the data)", cli=False)
    background: tuple[float, float, float] = setting((0.0, 0.0, 0.0), "background colour (from the data)",
                                                     cli=False)
    silhouette_weight: float = setting(1.0, "voxel, mesh, amortised NeRF: silhouette loss weight", cli=False)
    laplacian_weight: float = setting(1.0, "mesh regulariser, in units of the per-pixel loss (see MeshDecoder; the "
                                           "three regularisers act on meshes whose vertices move: the sphere "
                                           "template and per-scene fits, not the voxel template's iso-surface)")
    edge_weight: float = setting(0.1, "mesh regulariser, in units of the per-pixel loss")
    normal_weight: float = setting(1.0, "mesh regulariser (normal consistency), in units of the per-pixel loss")
    encoder_width: int = setting(32, "channels of the encoder's first stage", cli=False)
    binary_weight: float = setting(0.0, "voxel: push cells to be empty or opaque (weight, in units of the "
                                        "per-pixel loss)")
    mesh_basis: int = setting(128, "mesh, amortised: the decoder moves the vertices through this many smoothest "
                                   "modes of the template (see MeshDecoder); 0: each vertex on its own")
    mesh_template: str = setting("voxel", "mesh, amortised: voxel (each scene's mesh is the iso-surface of a "
                                          "voxel branch, its colours refined; see VoxelMeshDecoder) | sphere (an "
                                          "ico-sphere deformed through its smooth modes; see MeshDecoder)",
                                 choices=("voxel", "sphere"))
    mesh_reach: float = setting(0.0, "mesh, voxel template: how far (cells) the per-vertex MLP may move each vertex "
                                     "of the iso-surface (see VoxelMeshDecoder; 0: it refines the colours only)",
                                cli=False)
    lift: int = setting(16, "voxel, mesh, nerf: channels of the pixel-aligned context features (per cell, or per "
                            "pyramid level at each NeRF sample; 0: the latent alone)")
    level_scale: float = setting(1.0, "occupancy threshold as a multiple of the half-opaque level (see "
                                      "calibrate_level)", cli=False)
    field: str = setting("mlp", "NeRF, one scene: mlp | grid (renderers.gridfield)", cli=False)
    occupancy_res: int = setting(0, "NeRF, one scene: occupancy-grid cells per side for empty-space skipping "
                                    "(0: off)", cli=False)
    samples: int = setting(128, "NeRF with an occupancy grid: stratified samples per ray", cli=False)
    tv_weight: float = setting(0.0, "NeRF grid field: total-variation weight, in units of the per-pixel loss",
                               cli=False)


def make_decoder(cfg: AEConfig, per_scene: bool = False) -> nn.Module:
    """The :class:`SceneDecoder` of ``cfg.kind`` (an ``nn.Module``); ``per_scene``: a free one, ``latent_dim=0``."""
    L = 0 if per_scene else cfg.latent_dim
    if cfg.kind == "voxel":
        return VoxelDecoder(L, cfg.lo, cfg.hi, background=cfg.background, lift=cfg.lift if L else 0)
    if cfg.kind == "mesh" and L and cfg.lift and cfg.mesh_template == "voxel":
        return VoxelMeshDecoder(L, cfg.lo, cfg.hi, background=cfg.background, lift=cfg.lift, reach=cfg.mesh_reach)
    if cfg.kind == "mesh":
        return MeshDecoder(L, cfg.lo, cfg.hi, background=cfg.background, lift=cfg.lift if L else 0,
                           basis=cfg.mesh_basis)
    if cfg.kind == "nerf":
        return FieldDecoder(L, cfg.lo, cfg.hi, background=cfg.background, field=cfg.field,
                            occupancy_res=cfg.occupancy_res if per_scene else 0, samples=cfg.samples,
                            lift=cfg.lift if L else 0)
    raise ValueError(f"kind: expected one of {KINDS}, got {cfg.kind!r}")


class SceneAE(nn.Module):
    """A decoder with an optional encoder, trained by image reconstruction (see the module docstring).

    ``loss(batch, step)`` follows the trainer's interface. Batches are collated
    ``scene3d.data.MultiViewDataset`` items: ``images`` (B, V, 3, H, W) and cameras (B, V, ...).
    """

    def __init__(self, cfg: AEConfig, per_scene: bool = False):
        super().__init__()
        self.cfg, self.per_scene = cfg, per_scene
        self.decoder = make_decoder(cfg, per_scene)
        self.encoder = None if per_scene else ContextEncoder(cfg.image_size, cfg.latent_dim, (cfg.hi - cfg.lo) / 2,
                                                             cfg.encoder_width)
        lift = cfg.kind == "voxel" and cfg.lift and not per_scene
        self.lifter = PixelLifter(self.decoder.res // 2, cfg.lo, cfg.hi, cfg.lift) if lift else None

    @property
    def kind(self) -> str:
        """The run kind (config.json): ``voxel``, ``mesh`` or ``nerf``."""
        return self.cfg.kind

    def run_settings(self) -> dict:
        """The settings the trainer records (config.json, checkpoint): the ``AEConfig`` and ``per_scene``."""
        return {"ae": asdict(self.cfg), "per_scene": self.per_scene}

    @classmethod
    def from_run(cls, run, device: str = "cpu") -> tuple["SceneAE", dict]:
        """``plato_core.runinfo.load_run`` for autoencoder runs: (model in eval mode, the run's settings).

        The occupancy level comes from ``RUN/calibration.json`` when ``scene3d calibrate`` wrote one.
        """
        ckpt = load_checkpoint(run)
        settings = ckpt.get("settings", {})
        if "ae" not in settings:
            raise UserError(f"{run}: not a voxel / mesh / NeRF autoencoder run (no 'ae' settings in its checkpoint)")
        known = {f.name for f in fields(AEConfig)}
        ae = {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings["ae"].items() if k in known}
        ae.setdefault("lift", 0)  # runs from before the pixel-aligned features
        ae.setdefault("mesh_basis", 0)  # mesh runs from before the smooth modes: a free offset per vertex
        ae.setdefault("mesh_template", "sphere")  # mesh runs from before the voxel branch
        if ae.get("kind") == "mesh" and ae["mesh_template"] == "voxel":
            ae.setdefault("mesh_reach", 2.0)  # voxel-branch meshes from before the colour-only refinement
        feature_keys = {"nerf": "decoder.pixel.", "mesh": "decoder.features."}
        if ae["mesh_template"] == "voxel":
            feature_keys["mesh"] = "decoder.lifter."
        if ae.get("kind") in feature_keys and not any(k.startswith(feature_keys[ae["kind"]]) for k in ckpt["model"]):
            ae["lift"] = 0  # NeRF and mesh runs from before their pixel features recorded a lift they did not use
        calib = Path(run) / CALIBRATION
        if calib.is_file():
            ae["level_scale"] = float(json.loads(calib.read_text())["level_scale"])
        model = cls(AEConfig(**ae), per_scene=bool(settings.get("per_scene")))
        for name, _ in model.named_parameters():  # runs from before the direct colour read: off
            if name.endswith("view_colour"):
                ckpt["model"].setdefault(name, torch.zeros(()))
        model.load_state_dict(ckpt["model"])
        return model.eval().to(device), settings

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Trainer hook: the decoder's own (a NeRF grows its grid and re-measures its occupancy)."""
        hook = getattr(self.decoder, "after_step", None)
        if hook is not None:
            hook(step, optimizer)

    def check_batch(self, batch: dict) -> None:
        images = batch["images"]
        if images.dim() != 5 or images.shape[2] != 3:
            raise UserError(f"data: expected batches of (B, V, 3, H, W) images, got {tuple(images.shape)}")
        H = images.shape[-1]
        if H % self.cfg.image_size:
            raise UserError(f"--image-size {self.cfg.image_size} must divide the data's image size {H}")
        need = max(self.cfg.contexts) + self.cfg.queries
        if not self.per_scene and images.shape[1] < need:
            raise UserError(f"data: {images.shape[1]} views per scene, need {need} (contexts + queries)")

    def encode(self, images: Tensor, cameras: Camera) -> tuple[Tensor, Tensor]:
        """Context images (B, k, 3, S, S) + B * k cameras -> mu, logvar (B, L)."""
        return self.encoder(images, cameras)

    def infer(self, images: Tensor, cameras: Camera, sample: bool = False) -> dict:
        """The decoded 3D state from context views (posterior mean unless ``sample``)."""
        if self.encoder is None:
            return self.decoder(None)
        mu, logvar = self.encode(images, cameras)
        return self._decode(reparameterize(mu, logvar) if sample else mu, images, cameras)

    def _decode(self, z: Tensor, images: Tensor, cameras: Camera) -> dict:
        """z (B, L) and the context views (B, k, 3, S, S) it came from -> the decoder's 3D state."""
        if self.lifter is not None:
            return self.decoder(z, self.lifter(images, cameras), self.decoder.context_colour(images, cameras))
        context = getattr(self.decoder, "context", None)  # NeRF and mesh decoders with pixel-aligned features
        views = None if context is None else context(images, cameras)
        return self.decoder(z) if views is None else self.decoder(z, views)

    def loss(self, batch: dict, step: int) -> dict:
        images, cams = batch_views(batch, self.cfg.image_size)
        if self.encoder is None:  # B single views of one scene: one scene with B query views
            images = images.transpose(0, 1)
        B, V = images.shape[:2]
        if self.encoder is None:
            state, kl = self.decoder(None), images.new_zeros(B)
            q_idx = torch.arange(V, device=images.device)
        else:
            k = self.cfg.contexts[int(torch.randint(len(self.cfg.contexts), ()))]
            perm = torch.randperm(V, device=images.device)
            c_idx, q_idx = perm[:k], perm[k:k + self.cfg.queries]
            c_imgs, c_cams = images[:, c_idx], cams[view_index(B, V, c_idx)]
            mu, logvar = self.encode(c_imgs, c_cams)
            state = self._decode(reparameterize(mu, logvar), c_imgs, c_cams)
            kl = gaussian_kl(mu, logvar)
        target = images[:, q_idx]
        q_cams = cams[view_index(B, V, q_idx)]
        terms = self._reconstruction(state, target, q_cams)
        n = target[0].numel()  # per-scene terms are in nats per scene; report per pixel channel
        total = (terms.pop("nll") + self.cfg.beta * kl).mean() / n
        out = {"kl": kl.mean().detach() / n}
        for name, value in self.decoder.regularisers(state).items():
            total = total + getattr(self.cfg, f"{name}_weight") * value
            out[name] = value.detach()
        for name, value in terms.items():
            total = total + value
            out[name] = value.detach()
        return {"loss": total, **out}

    def _reconstruction(self, state: dict, target: Tensor, cams: Camera) -> dict:
        """Negative log-likelihood (B,) of the query views (and, from the rendered alpha, a silhouette loss)."""
        B, Q = target.shape[:2]
        sigma = self.cfg.sigma
        if self.kind == "nerf":
            scale = Q * target.shape[-1] * target.shape[-2] / self.cfg.rays  # rays -> all query pixels
            colors, out = self._ray_batch(state, target, cams)
            terms = {"nll": -gaussian_log_likelihood(colors, out.rgb, sigma) * scale}
            if self.encoder is not None:  # amortised: the rays' opacity fits the query views' foreground too
                mask = foreground_mask(colors.transpose(1, 2)[..., None], self.cfg.background)[:, 0, :, 0]
                terms["silhouette"] = (self.cfg.silhouette_weight * F.mse_loss(out.opacity, mask.to(colors.dtype))
                                       / (2 * sigma**2))
            return terms
        flat = target.reshape(B * Q, *target.shape[2:])
        preds = [self.decoder.render(state, cams, Q)]
        auxiliary = getattr(self.decoder, "auxiliary_render", None)  # a second branch fitted to the same views
        if auxiliary is not None:
            preds.append(auxiliary(state, cams, Q))
        nll = sum(-gaussian_log_likelihood(flat, pred[:, :3], sigma).reshape(B, Q).sum(1) for pred in preds)
        if preds[0].shape[1] < 4:
            return {"nll": nll}
        mask = foreground_mask(flat, self.cfg.background)[:, 0].to(flat.dtype)
        sil = sum(F.mse_loss(pred[:, 3], mask) for pred in preds)
        return {"nll": nll, "silhouette": self.cfg.silhouette_weight * sil / (2 * sigma**2)}  # per pixel, as nll

    def _ray_batch(self, state: dict, target: Tensor, cams: Camera) -> tuple[Tensor, NeRFOutput]:
        """Random rays of the query views: target colours (B, R, 3) and the rendered rays (``NeRFOutput``)."""
        B, Q, _, H, W = target.shape
        o, d = cams.rays()
        o, d = o.reshape(B, Q * H * W, 3), d.reshape(B, Q * H * W, 3)
        colors = target.permute(0, 1, 3, 4, 2).reshape(B, Q * H * W, 3)
        idx = torch.randint(Q * H * W, (B, self.cfg.rays), device=target.device)
        g = lambda x: x.gather(1, idx[..., None].expand(-1, -1, 3))  # noqa: E731
        return g(colors), self.decoder.render_rays(state, g(o), g(d))

    def render(self, state: dict, cameras: Camera, per_scene: int) -> Tensor:
        """(B * per_scene, 3, H, W) colour images of the decoded scenes."""
        return self.decoder.render(state, cameras, per_scene)[:, :3]


class SceneViews(torch.utils.data.Dataset):
    """The V views of scene ``index`` of a MultiViewDataset as V items of one view each (per-scene fits)."""

    def __init__(self, dataset, index: int = 0):
        self.item = dataset[index]

    def __len__(self) -> int:
        return self.item["images"].shape[0]

    def __getitem__(self, v: int) -> dict:
        return {k: self.item[k][v:v + 1] for k in ("images", *CAMERA_KEYS)} | {"index": v}


def occupancy_level(cfg: AEConfig, res: int = 32) -> float:
    """Density (1 / world units) above which a cell of a ``res^3`` grid over the box counts as occupied:
    ``cfg.level_scale`` times the one that makes a cell's opacity 1/2 (sigma * cell = ln 2)."""
    return cfg.level_scale * math.log(2) / ((cfg.hi - cfg.lo) / res)


def predicted_occupancy(model: SceneAE, state: dict, res: int = 32, fill: bool = True,
                        level: float | None = None) -> Tensor:
    """(B, res, res, res) bool occupancy of decoded scenes on the box grid ([z, y, x]).

    Images constrain only the visible surface, so with ``fill`` interior cavities are filled
    (``scipy.ndimage.binary_fill_holes``) before comparing with solid ground truth. ``level``: density
    threshold in 1 / world units (default ``occupancy_level(cfg, res)``).
    """
    from scipy.ndimage import binary_fill_holes

    cfg = model.cfg
    pts = voxel_centers(res, cfg.lo, cfg.hi).reshape(-1, 3)
    level = occupancy_level(cfg, res) if level is None else level
    occ = model.decoder.occupancy(state, pts, level).reshape(-1, res, res, res).cpu()
    if fill:
        occ = torch.stack([torch.from_numpy(binary_fill_holes(o.numpy())) for o in occ])
    return occ
