"""Mesh renderer: PyTorch3D's rasterizer and shading, driven by Plato's ``Camera``.

* ``"silhouette"``: SoftRas-style soft silhouette (Liu et al. 2019): a face at squared NDC distance ``d`` from a
  pixel centre covers it with probability ``sigmoid(-d / sigma)`` (``d < 0`` inside), and the pixel's opacity is
  ``1 - prod_k (1 - p_k)`` over its ``faces_per_pixel`` nearest faces. ``soft=False`` gives the hard coverage mask.
* ``"shaded"``: per-vertex colours lit by one directional light with Phong (per-pixel normals) or flat (per-face)
  shading, blended over the background with SoftRas' softmax over depth (``gamma``), or hard z-buffering.

Conventions: vertices in world units, faces index vertices and are counter-clockwise seen from outside (outward
normals); the light ``direction`` is a world-space vector pointing *towards* the light. Distances ``d`` are in
PyTorch3D NDC units, where the shorter image side spans [-1, 1], so ``sigma`` is in NDC units squared: one pixel
of a 64-pixel image is ``(2 / 64) ** 2 ~ 1e-3``. PyTorch3D rasterizes in float32 only: float64 inputs are rendered
in float32 and the images returned in float64 (gradients flow through the casts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from renderers._validate import check_tensor
from renderers.cameras import Camera

__all__ = ["MeshRenderer", "ico_sphere"]


def ico_sphere(subdivisions: int = 3, radius: float = 1.0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Vertices (V, 3) and faces (F, 3) of a subdivided icosahedron inscribed in a sphere at the origin.

    ``subdivisions`` 3 has 642 vertices and 1,280 faces; faces are counter-clockwise seen from outside.
    """
    from pytorch3d.utils import ico_sphere as p3d_ico_sphere

    mesh = p3d_ico_sphere(subdivisions)
    return (mesh.verts_packed() * radius).to(dtype=dtype, device=device), mesh.faces_packed().to(device)


class MeshRenderer(nn.Module):
    """Render batches of triangle meshes with any ``Camera`` into (B, C, H, W) images.

    Args:
        mode: ``"silhouette"`` (B, 1, H, W) opacity or ``"shaded"`` (B, 3, H, W) colour.
        soft: SoftRas blending (differentiable in the vertices) or hard rasterization (one face per pixel).
        sigma: silhouette edge width, NDC units squared (see the module docstring).
        gamma: depth-softmax temperature of soft shaded blending; smaller is closer to z-buffering.
        faces_per_pixel: nearest faces kept per pixel by the soft rasterizer.
        shading: ``"phong"`` or ``"flat"``.
        light_direction: world-space vector towards the directional light.
        ambient, diffuse, specular: light intensities (grey); ``shininess`` the Phong exponent.
        background: RGB background of the shaded image.
        alpha: in shaded mode, append the opacity as a fourth channel.
        znear, zfar: depth range used to normalise depths in the softmax blend (world units along view z).
    """

    def __init__(self, mode: str = "silhouette", soft: bool = True, sigma: float = 1e-4, gamma: float = 1e-4,
                 faces_per_pixel: int = 20, shading: str = "phong",
                 light_direction: Sequence[float] = (0.0, -1.0, -1.0), ambient: float = 0.3,
                 diffuse: float = 0.7, specular: float = 0.2, shininess: float = 32.0,
                 background: Sequence[float] = (1.0, 1.0, 1.0), alpha: bool = False,
                 znear: float = 0.1, zfar: float = 100.0):
        super().__init__()
        if mode not in ("silhouette", "shaded"):
            raise ValueError(f"mode: expected 'silhouette' or 'shaded', got {mode!r}")
        if shading not in ("phong", "flat"):
            raise ValueError(f"shading: expected 'phong' or 'flat', got {shading!r}")
        if not (sigma > 0 and gamma > 0 and int(faces_per_pixel) >= 1):
            raise ValueError("sigma, gamma, faces_per_pixel: expected positive values")
        if len(background) != 3 or len(light_direction) != 3:
            raise ValueError("background, light_direction: expected 3 values each")
        self.mode, self.soft, self.sigma, self.gamma = mode, soft, float(sigma), float(gamma)
        self.faces_per_pixel, self.shading, self.alpha = int(faces_per_pixel), shading, alpha
        self.light = dict(direction=tuple(light_direction), ambient=ambient, diffuse=diffuse, specular=specular)
        self.shininess, self.background = shininess, tuple(background)
        self.znear, self.zfar = znear, zfar

    def extra_repr(self) -> str:
        return f"mode={self.mode}, soft={self.soft}, sigma={self.sigma}, faces_per_pixel={self.faces_per_pixel}"

    def forward(self, verts: Tensor, faces: Tensor, camera: Camera, colors: Tensor | None = None) -> Tensor:
        """Render one image per camera.

        Args:
            verts: (B, V, 3) world-space vertices (or (1, V, 3), shared by every camera).
            faces: (F, 3) or (B, F, 3) integer vertex indices.
            camera: B cameras; their dtype and device must match ``verts``.
            colors: (B, V, 3) per-vertex RGB in [0, 1]; shaded mode only (default white).
        Returns:
            silhouette (B, 1, H, W), or shaded colour (B, 3, H, W) / RGBA (B, 4, H, W) with ``alpha``.
        """
        verts, faces, colors = self._validate(verts, faces, camera, colors)
        from pytorch3d.structures import Meshes

        textures = None
        if colors is not None:
            from pytorch3d.renderer import TexturesVertex

            textures = TexturesVertex(colors.float())
        meshes = Meshes(verts=verts.float(), faces=faces, textures=textures)
        cameras = camera.to(dtype=torch.float32).to_pytorch3d()
        fragments = self._rasterize(meshes, cameras, camera.image_size)
        if self.mode == "silhouette":
            image = self._silhouette(fragments)[:, None]
        else:
            image = self._shade(meshes, fragments, cameras)
        return image.to(verts.dtype)

    def _rasterize(self, meshes, cameras, image_size):
        from pytorch3d.renderer import MeshRasterizer, RasterizationSettings

        blur = math.log(1.0 / 1e-4 - 1.0) * self.sigma if self.soft else 0.0  # where sigmoid(-d/sigma) = 1e-4
        settings = RasterizationSettings(image_size=image_size, blur_radius=blur,
                                         faces_per_pixel=self.faces_per_pixel if self.soft else 1)
        return MeshRasterizer(cameras=cameras, raster_settings=settings)(meshes)

    def _silhouette(self, fragments) -> Tensor:
        """(B, H, W) opacity from the rasterizer's fragments."""
        if not self.soft:
            return (fragments.pix_to_face[..., 0] >= 0).float()
        from pytorch3d.renderer import BlendParams
        from pytorch3d.renderer.blending import sigmoid_alpha_blend

        colors = fragments.dists[..., None].expand(*fragments.dists.shape, 3)  # unused by the alpha channel
        return sigmoid_alpha_blend(colors, fragments, BlendParams(sigma=self.sigma))[..., 3]

    def _shade(self, meshes, fragments, cameras) -> Tensor:
        """(B, 3 or 4, H, W) lit, blended colours."""
        from pytorch3d.renderer import BlendParams, DirectionalLights, Materials
        from pytorch3d.renderer.blending import hard_rgb_blend, softmax_rgb_blend
        from pytorch3d.renderer.mesh.shading import flat_shading, phong_shading

        dev = meshes.device
        grey = lambda s: ((float(s),) * 3,)  # noqa: E731
        lights = DirectionalLights(direction=(self.light["direction"],), ambient_color=grey(self.light["ambient"]),
                                   diffuse_color=grey(self.light["diffuse"]),
                                   specular_color=grey(self.light["specular"]), device=dev)
        materials = Materials(shininess=self.shininess, device=dev)
        texels = meshes.sample_textures(fragments)
        shade = phong_shading if self.shading == "phong" else flat_shading
        colors = shade(meshes=meshes, fragments=fragments, texels=texels, lights=lights, cameras=cameras,
                       materials=materials)
        blend = BlendParams(sigma=self.sigma, gamma=self.gamma, background_color=self.background)
        if self.soft:
            rgba = softmax_rgb_blend(colors, fragments, blend, znear=self.znear, zfar=self.zfar)
        else:
            rgba = hard_rgb_blend(colors, fragments, blend)
            rgba[..., 3] = (fragments.pix_to_face[..., 0] >= 0).to(rgba.dtype)
        rgba = rgba.permute(0, 3, 1, 2)
        return rgba if self.alpha else rgba[:, :3]

    def _validate(self, verts, faces, camera, colors) -> tuple[Tensor, Tensor, Tensor | None]:
        """Check shapes, dtypes and devices; broadcast shared vertices / faces over the B cameras."""
        if not isinstance(camera, Camera):
            raise ValueError(f"camera: expected a renderers.cameras.Camera, got {type(camera).__name__}")
        B = len(camera)
        sizes = check_tensor("verts", verts, ("B", "V", 3), like=camera.R)
        if sizes["B"] not in (1, B):
            raise ValueError(f"verts: expected batch size 1 or {B} (the cameras), got {sizes['B']}")
        V = sizes["V"]
        if not isinstance(faces, Tensor) or faces.dim() not in (2, 3) or faces.shape[-1] != 3 \
                or (faces.dim() == 3 and faces.shape[0] not in (1, B)):
            got = tuple(faces.shape) if isinstance(faces, Tensor) else type(faces).__name__
            raise ValueError(f"faces: expected shape (F, 3) or (B, F, 3) with B={B}, got {got}")
        if faces.dtype not in (torch.int32, torch.int64) or faces.device != verts.device:
            raise ValueError(f"faces: expected an integer tensor on {verts.device}, "
                             f"got {faces.dtype} on {faces.device}")
        if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= V):
            raise ValueError(f"faces: expected vertex indices in [0, {V}), "
                             f"got [{int(faces.min())}, {int(faces.max())}]")
        faces = faces.expand(B, -1, 3) if faces.dim() == 3 else faces.expand(B, -1, -1)
        verts = verts.expand(B, -1, -1)
        if self.mode == "silhouette":
            if colors is not None:
                raise ValueError("colors: only used in shaded mode")
            return verts, faces, None
        if colors is None:
            colors = verts.new_ones(B, V, 3)
        check_tensor("colors", colors, ("B", "V", 3), {"V": V}, like=camera.R)
        if colors.shape[0] not in (1, B):
            raise ValueError(f"colors: expected batch size 1 or {B} (the cameras), got {colors.shape[0]}")
        return verts, faces, colors.expand(B, -1, -1)
