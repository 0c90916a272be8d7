"""The one camera convention of Plato, and every conversion to and from it.

Plato's ``Camera`` (this module is its only home)
-------------------------------------------------
* **View axes (OpenCV-like):** +X right, +Y down, +Z forward (into the scene).
* **Extrinsics:** world-to-view, column vectors: ``x_view = R @ x_world + t``,
  ``R`` is ``(B, 3, 3)``, ``t`` is ``(B, 3)``. The camera centre is ``-R^T t``.
* **Pixels:** images are ``(B, C, H, W)``. Continuous pixel coordinates
  ``(u, v)`` put pixel ``(row i, col j)`` on the square ``[j, j+1) x [i, i+1)``,
  so its centre is ``(j + 0.5, i + 0.5)`` (the PyTorch3D / OpenGL / nerfstudio
  convention; OpenCV's integer-centred ``K`` is shifted by 0.5 on conversion).
* **Perspective:** ``u = fx * x / z + cx``, ``v = fy * y / z + cy``, focal
  lengths and principal point in pixels.
* **Orthographic:** ``u = fx * x + cx``, ``v = fy * y + cy``; ``fx`` is pixels
  per world unit (``1 / pixel_size``; cryo-EM: 1 / (Å/px)).

External conventions (converted here and nowhere else)
------------------------------------------------------
* PyTorch3D: row vectors ``X_view = X_world @ R + T``; +X left, +Y up, +Z forward;
  NDC scaled so the shorter image side spans [-1, 1].
* OpenGL / Blender / nerfstudio: 4x4 camera-to-world, +X right, +Y up, looking
  along -Z.
* OpenCV: ``R, t`` world-to-camera, +X right, +Y down, +Z forward, ``K`` with
  integer pixel centres.
* GQN viewpoint ``(x, y, z, yaw, pitch)``: camera position in a **z-up** world,
  yaw about +Z measured from +X, pitch = elevation above the XY plane, no roll.
  The forward direction is ``(cos p cos y, cos p sin y, sin p)``. Its 7-vector is
  ``[x, y, z, sin yaw, cos yaw, sin pitch, cos pitch]`` in DeepMind's reader
  (``order="deepmind"``, the default) and ``[x, y, z, cos yaw, sin yaw,
  cos pitch, sin pitch]`` in the PyTorch ports (``order="torch"``).
* RELION: ZYZ Euler angles (rot, tilt, psi) in **degrees** at the file boundary;
  the matrix ``A(rot, tilt, psi)`` maps the map frame to the projection frame
  (image x = column, y = row), projection along +Z. Origin shifts in Å: RELION's
  origin shifts the observed image onto the centred reference projection
  (``ObservationModel::predictObservation`` shifts the prediction by ``-origin``), so
  the particle centre appears at ``box // 2 - origin / pixel_size`` (pixel indices)
  and the camera's in-plane translation is ``t_xy = -origin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from renderers._validate import check_tensor

__all__ = [
    "Camera",
    "look_at",
    "euler_zyz_to_matrix",
    "matrix_to_euler_zyz",
    "axis_angle_to_matrix",
    "rotation_6d_to_matrix",
    "matrix_to_axis_angle",
]

_P3D_FLIP = (-1.0, -1.0, 1.0)  # PyTorch3D view axes = diag(-1, -1, 1) @ ours
_GL_FLIP = (1.0, -1.0, -1.0)  # OpenGL camera axes = diag(1, -1, -1) @ ours


@dataclass
class Camera:
    """A batch of B pinhole or orthographic cameras in Plato's convention.

    Attributes:
        R: (B, 3, 3) world-to-view rotation.
        t: (B, 3) world-to-view translation (world units; Å in cryo-EM).
        focal: (B, 2) ``(fx, fy)``: pixels (perspective) or pixels per world
            unit (orthographic).
        principal: (B, 2) ``(cx, cy)`` in pixels, centre-of-pixel at +0.5.
        image_size: ``(H, W)`` in pixels.
        orthographic: True for an orthographic projection.
    """

    R: Tensor
    t: Tensor
    focal: Tensor
    principal: Tensor
    image_size: tuple[int, int]
    orthographic: bool = False

    def __post_init__(self) -> None:
        sizes = check_tensor("R", self.R, ("B", 3, 3))
        for name, n in (("t", 3), ("focal", 2), ("principal", 2)):
            check_tensor(name, getattr(self, name), ("B", n), sizes)
        H, W = self.image_size
        if int(H) <= 0 or int(W) <= 0:
            raise ValueError(f"image_size: expected positive (H, W), got {self.image_size}")
        self.image_size = (int(H), int(W))
        if (self.focal <= 0).any():
            raise ValueError("focal: expected positive focal lengths / scales")

    # ------------------------------------------------------------------ basics
    @classmethod
    def create(
        cls,
        R: Tensor,
        t: Tensor,
        image_size: tuple[int, int],
        *,
        fov: float | Tensor | None = None,
        focal: float | Tensor | None = None,
        principal: Tensor | None = None,
        pixel_size: float | Tensor | None = None,
    ) -> "Camera":
        """Build a batch of cameras.

        Give exactly one of ``fov`` (horizontal field of view, radians), ``focal``
        (pixels) for a perspective camera, or ``pixel_size`` (world units per
        pixel) for an orthographic one. ``principal`` defaults to the image centre
        ``(W / 2, H / 2)``.
        """
        B = check_tensor("R", R, ("B", 3, 3))["B"]
        H, W = image_size
        if sum(v is not None for v in (fov, focal, pixel_size)) != 1:
            raise ValueError("Camera.create: give exactly one of fov, focal or pixel_size")
        if fov is not None:
            fov = torch.as_tensor(fov, dtype=R.dtype, device=R.device)
            if (fov <= 0).any() or (fov >= math.pi).any():
                raise ValueError(f"fov: expected radians in (0, pi), got {fov}")
            f = (W / 2) / torch.tan(fov / 2)
        elif focal is not None:
            f = torch.as_tensor(focal, dtype=R.dtype, device=R.device)
        else:
            f = 1.0 / torch.as_tensor(pixel_size, dtype=R.dtype, device=R.device)
        f = f.reshape(-1, 1).expand(B, 2) if f.numel() in (1, B) and f.dim() <= 1 else f
        if principal is None:
            principal = torch.tensor([W / 2, H / 2], dtype=R.dtype, device=R.device).expand(B, 2)
        principal = torch.as_tensor(principal, dtype=R.dtype, device=R.device).expand(B, 2)
        return cls(R, t, f.clone(), principal.clone(), (H, W), orthographic=pixel_size is not None)

    def __len__(self) -> int:
        return self.R.shape[0]

    def __getitem__(self, idx) -> "Camera":
        """The one way to take a subset: ``idx`` is an int, a slice, a (B,) bool mask or an index tensor
        over the B cameras (repeats allowed); an int keeps the batch dimension (one camera)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Camera(self.R[idx], self.t[idx], self.focal[idx], self.principal[idx],
                      self.image_size, self.orthographic)

    def to(self, device=None, dtype=None) -> "Camera":
        f = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        return Camera(f(self.R), f(self.t), f(self.focal), f(self.principal),
                      self.image_size, self.orthographic)

    @staticmethod
    def cat(cameras: list["Camera"]) -> "Camera":
        c0 = cameras[0]
        if any(c.image_size != c0.image_size or c.orthographic != c0.orthographic for c in cameras):
            raise ValueError("Camera.cat: all cameras need the same image_size and projection type")
        return Camera(*(torch.cat([getattr(c, k) for c in cameras]) for k in ("R", "t", "focal", "principal")),
                      c0.image_size, c0.orthographic)

    @property
    def device(self) -> torch.device:
        return self.R.device

    @property
    def dtype(self) -> torch.dtype:
        return self.R.dtype

    @property
    def center(self) -> Tensor:
        """(B, 3) camera centre in world coordinates (perspective) or the view origin."""
        return -(self.R.transpose(1, 2) @ self.t[..., None])[..., 0]

    # ------------------------------------------------------------ projection
    def world_to_view(self, points: Tensor) -> Tensor:
        """(B, N, 3) world points -> (B, N, 3) view points."""
        return points @ self.R.transpose(1, 2) + self.t[:, None, :]

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points.

        Args:
            points: (B, N, 3) world coordinates.
        Returns:
            uv: (B, N, 2) continuous pixel coordinates (column, row), pixel
                centres at +0.5.
            depth: (B, N) view-space z.
        """
        check_tensor("points", points, ("B", "N", 3), {"B": len(self)})
        x = self.world_to_view(points)
        z = x[..., 2]
        xy = x[..., :2] if self.orthographic else x[..., :2] / z[..., None]
        return xy * self.focal[:, None] + self.principal[:, None], z

    def pixel_grid(self) -> Tensor:
        """(H, W, 2) pixel-centre coordinates (u, v)."""
        H, W = self.image_size
        v, u = torch.meshgrid(torch.arange(H, dtype=self.dtype, device=self.device) + 0.5,
                              torch.arange(W, dtype=self.dtype, device=self.device) + 0.5, indexing="ij")
        return torch.stack([u, v], -1)

    def rays(self, uv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """World-space rays through pixels.

        Args:
            uv: optional (B, H, W, 2) or (B, N, 2) pixel coordinates; defaults
                to every pixel centre, shape (B, H, W, 2).
        Returns:
            origins, directions: world tensors of shape ``uv.shape[:-1] + (3,)``.
            Directions have unit length. Perspective rays start at the camera
            centre; orthographic rays start on the view plane z = 0.
        """
        if uv is None:
            uv = self.pixel_grid().expand(len(self), *self.image_size, 2)
        B = len(self)
        shape = uv.shape[:-1]
        uv = uv.reshape(B, -1, 2)
        xy = (uv - self.principal[:, None]) / self.focal[:, None]
        Rt = self.R.transpose(1, 2)
        if self.orthographic:
            p_view = torch.cat([xy, torch.zeros_like(xy[..., :1])], -1)
            origins = (p_view - self.t[:, None]) @ self.R
            dirs = Rt[:, :, 2][:, None].expand_as(origins)
        else:
            d_view = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
            dirs = torch.nn.functional.normalize(d_view @ self.R, dim=-1)
            origins = self.center[:, None].expand_as(dirs)
        return origins.reshape(*shape, 3), dirs.reshape(*shape, 3)

    # ------------------------------------------------------------- PyTorch3D
    def to_pytorch3d(self):
        """Equivalent PyTorch3D ``PerspectiveCameras`` / ``OrthographicCameras`` (NDC)."""
        from pytorch3d.renderer import OrthographicCameras, PerspectiveCameras

        F = self.R.new_tensor(_P3D_FLIP)
        R_p3d = self.R.transpose(1, 2) * F  # (F R)^T = R^T F
        T_p3d = self.t * F
        H, W = self.image_size
        s = min(H, W) / 2
        size = self.R.new_tensor([W / 2, H / 2])
        f_ndc = self.focal / s
        p_ndc = -(self.principal - size) / s
        cls = OrthographicCameras if self.orthographic else PerspectiveCameras
        return cls(focal_length=f_ndc, principal_point=p_ndc, R=R_p3d, T=T_p3d,
                   in_ndc=True, image_size=[[H, W]] * len(self), device=self.device)

    @classmethod
    def from_pytorch3d(cls, cameras, image_size: tuple[int, int]) -> "Camera":
        """Convert any PyTorch3D camera batch (FoV, screen or NDC) rendered at ``image_size``.

        Intrinsics are read off PyTorch3D's own NDC projection, so FoV cameras,
        screen-space cameras and NDC cameras all convert.
        """
        H, W = image_size
        R_p3d, T_p3d = cameras.R, cameras.T
        B = R_p3d.shape[0]
        F = R_p3d.new_tensor(_P3D_FLIP)
        R = F[:, None] * R_p3d.transpose(1, 2)
        t = T_p3d * F
        probe = R_p3d.new_tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).expand(B, 3, 3)
        # PyTorch3D row-vector transforms: view -> (projection) -> (screen to NDC); its NDC matrix is float32
        M = cameras.get_projection_transform().get_matrix().to(R_p3d.dtype)
        M = M @ cameras.get_ndc_camera_transform().get_matrix().to(M.dtype).expand_as(M)
        h = torch.cat([probe, torch.ones_like(probe[..., :1])], -1) @ M
        q = h[..., :2] / h[..., 3:]  # (B, 3, 2) NDC
        p_ndc = q[:, 0]
        f_ndc = torch.stack([q[:, 1, 0] - q[:, 0, 0], q[:, 2, 1] - q[:, 0, 1]], -1)
        s = min(H, W) / 2
        size = R_p3d.new_tensor([W / 2, H / 2])
        return cls(R, t, f_ndc * s, size - p_ndc * s, (H, W), orthographic=not cameras.is_perspective())

    # ---------------------------------------------------------------- OpenGL
    def to_opengl_c2w(self) -> Tensor:
        """(B, 4, 4) OpenGL / Blender / nerfstudio camera-to-world matrices."""
        F = self.R.new_tensor(_GL_FLIP)
        c2w = torch.zeros(len(self), 4, 4, dtype=self.dtype, device=self.device)
        c2w[:, :3, :3] = self.R.transpose(1, 2) * F
        c2w[:, :3, 3] = self.center
        c2w[:, 3, 3] = 1
        return c2w

    @classmethod
    def from_opengl_c2w(cls, c2w: Tensor, image_size: tuple[int, int], *, fov: float | Tensor | None = None,
                        focal: Tensor | float | None = None, principal: Tensor | None = None) -> "Camera":
        """From (B, 4, 4) OpenGL camera-to-world matrices and a horizontal ``fov`` (rad) or ``focal`` (px).

        ``principal`` is in Plato pixels; nerfstudio's ``cx, cy`` already use +0.5 centres.
        """
        check_tensor("c2w", c2w, ("B", 4, 4))
        F = c2w.new_tensor(_GL_FLIP)
        R = F[:, None] * c2w[:, :3, :3].transpose(1, 2)
        t = -(R @ c2w[:, :3, 3:])[..., 0]
        return cls.create(R, t, image_size, fov=fov, focal=focal, principal=principal)

    # ---------------------------------------------------------------- OpenCV
    def to_opencv(self) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``R (B,3,3), t (B,3), K (B,3,3)`` with OpenCV's integer pixel centres."""
        K = torch.zeros(len(self), 3, 3, dtype=self.dtype, device=self.device)
        K[:, 0, 0], K[:, 1, 1] = self.focal[:, 0], self.focal[:, 1]
        K[:, :2, 2] = self.principal - 0.5
        K[:, 2, 2] = 1
        return self.R.clone(), self.t.clone(), K

    @classmethod
    def from_opencv(cls, R: Tensor, t: Tensor, K: Tensor, image_size: tuple[int, int]) -> "Camera":
        """From OpenCV world-to-camera ``R (B,3,3)``, ``t (B,3)`` and intrinsics ``K (B,3,3)``."""
        check_tensor("K", K, ("B", 3, 3))
        if (K[:, 0, 1].abs() > 1e-9).any():
            raise ValueError("K: skewed intrinsics (K[0,1] != 0) are not supported")
        focal = torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)
        return cls(R, t, focal, K[:, :2, 2] + 0.5, image_size)

    # ------------------------------------------------------------------- GQN
    @classmethod
    def from_gqn(cls, viewpoint: Tensor, image_size: tuple[int, int], fov: float = math.radians(45),
                 order: str = "deepmind") -> "Camera":
        """From GQN viewpoints: (B, 5) ``(x, y, z, yaw, pitch)`` or their (B, 7) encoding."""
        if viewpoint.dim() != 2 or viewpoint.shape[1] not in (5, 7):
            raise ValueError(f"viewpoint: expected shape (B, 5) or (B, 7), got {tuple(viewpoint.shape)}")
        if viewpoint.shape[1] == 7:
            yaw, pitch = _gqn_angles(viewpoint, order)
        else:
            yaw, pitch = viewpoint[:, 3], viewpoint[:, 4]
        pos = viewpoint[:, :3]
        fwd = torch.stack([torch.cos(pitch) * torch.cos(yaw), torch.cos(pitch) * torch.sin(yaw),
                           torch.sin(pitch)], -1)
        R = look_at(pos, pos + fwd, up=(0.0, 0.0, 1.0))[0]
        t = -(R @ pos[..., None])[..., 0]
        return cls.create(R, t, image_size, fov=fov)

    def to_gqn(self, order: str | None = None) -> Tensor:
        """(B, 5) ``(x, y, z, yaw, pitch)``; with ``order`` the (B, 7) encoding instead."""
        fwd = self.R[:, 2]
        yaw = torch.atan2(fwd[:, 1], fwd[:, 0])
        pitch = torch.asin(fwd[:, 2].clamp(-1, 1))
        pos = self.center
        if order is None:
            return torch.cat([pos, yaw[:, None], pitch[:, None]], -1)
        return gqn_encode(torch.cat([pos, yaw[:, None], pitch[:, None]], -1), order)

    # ---------------------------------------------------------------- RELION
    @classmethod
    def from_relion(cls, rot: Tensor, tilt: Tensor, psi: Tensor, origin_A: Tensor, pixel_size: float | Tensor,
                    box: int) -> "Camera":
        """Orthographic cryo-EM cameras from RELION metadata.

        Args:
            rot, tilt, psi: (B,) ZYZ Euler angles in **degrees** (as in STAR files).
            origin_A: (B, 2) ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å.
            pixel_size: Å / px, scalar or (B,).
            box: image side in pixels; the rotation centre is pixel ``box // 2``.
        """
        check_tensor("origin_A", origin_A, ("B", 2))
        R = euler_zyz_to_matrix(*(torch.deg2rad(torch.as_tensor(a, dtype=origin_A.dtype)) for a in (rot, tilt, psi)))
        return cls.from_pose(R, -origin_A, pixel_size, box)

    @classmethod
    def from_pose(cls, R: Tensor, shift_A: Tensor, pixel_size: float | Tensor, box: int) -> "Camera":
        """Orthographic cryo-EM camera from a rotation (B,3,3) and in-plane shift (B,2) in Å.

        The particle centre appears at pixel ``box // 2 + shift_A / pixel_size`` (``shift_A``
        is ``-origin`` in RELION's terms).
        """
        check_tensor("shift_A", shift_A, ("B", 2))
        t = torch.cat([shift_A, torch.zeros_like(shift_A[:, :1])], -1)
        c = box // 2 + 0.5
        principal = shift_A.new_tensor([c, c]).expand(len(shift_A), 2)
        return cls.create(R, t, (box, box), pixel_size=pixel_size, principal=principal)

    def to_relion(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``rot, tilt, psi`` (B,) in degrees and ``origin_A`` (B, 2) in Å."""
        if not self.orthographic:
            raise ValueError("to_relion: RELION poses need an orthographic camera")
        rot, tilt, psi = matrix_to_euler_zyz(self.R)
        return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi), -self.t[:, :2]


# --------------------------------------------------------------------------- helpers
def look_at(eye: Tensor, target: Tensor, up=(0.0, 1.0, 0.0)) -> tuple[Tensor, Tensor]:
    """World-to-view ``R (B,3,3), t (B,3)`` for cameras at ``eye`` (B,3) looking at ``target``.

    ``up`` is the world direction that appears upwards in the image (-Y view).
    """
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    fwd = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(fwd, up)
    if (right.norm(dim=-1) < 1e-8).any():
        raise ValueError("look_at: viewing direction is parallel to `up`")
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd], 1)
    return R, -(R @ eye[..., None])[..., 0]


def gqn_encode(v5: Tensor, order: str = "deepmind") -> Tensor:
    """(B, 5) ``(x, y, z, yaw, pitch)`` -> (B, 7) GQN viewpoint vector in ``order``."""
    pos, yaw, pitch = v5[:, :3], v5[:, 3:4], v5[:, 4:5]
    if order == "deepmind":
        parts = [torch.sin(yaw), torch.cos(yaw), torch.sin(pitch), torch.cos(pitch)]
    elif order == "torch":
        parts = [torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)]
    else:
        raise ValueError(f"order: expected 'deepmind' or 'torch', got {order!r}")
    return torch.cat([pos, *parts], -1)


def _gqn_angles(v7: Tensor, order: str) -> tuple[Tensor, Tensor]:
    if order == "deepmind":
        sy, cy, sp, cp = v7[:, 3], v7[:, 4], v7[:, 5], v7[:, 6]
    elif order == "torch":
        cy, sy, cp, sp = v7[:, 3], v7[:, 4], v7[:, 5], v7[:, 6]
    else:
        raise ValueError(f"order: expected 'deepmind' or 'torch', got {order!r}")
    return torch.atan2(sy, cy), torch.atan2(sp, cp)


def euler_zyz_to_matrix(rot: Tensor, tilt: Tensor, psi: Tensor) -> Tensor:
    """RELION's ZYZ Euler angles (radians, (B,)) -> (B, 3, 3) rotation ``A``.

    ``A = Rz(psi) Ry(tilt) Rz(rot)`` with ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]``
    and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]`` (RELION ``Euler_angles2matrix``).
    """
    ca, sa = torch.cos(rot), torch.sin(rot)
    cb, sb = torch.cos(tilt), torch.sin(tilt)
    cg, sg = torch.cos(psi), torch.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return torch.stack([
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ], -2)


def matrix_to_euler_zyz(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`euler_zyz_to_matrix`: (B,3,3) -> rot, tilt, psi (radians).

    tilt is in [0, pi]; at the gimbal lock (tilt = 0 or pi) psi is set to 0.
    """
    tilt = torch.acos(A[:, 2, 2].clamp(-1, 1))
    sb = torch.sin(tilt)
    lock = sb.abs() < 1e-6
    sgn = torch.where(A[:, 2, 2] < 0, -1.0, 1.0).to(A.dtype)
    rot = torch.where(lock, torch.atan2(A[:, 0, 1] * sgn, A[:, 0, 0] * sgn),
                      torch.atan2(A[:, 2, 1], A[:, 2, 0]))
    psi = torch.where(lock, torch.zeros_like(tilt), torch.atan2(A[:, 1, 2], -A[:, 0, 2]))
    return rot, tilt, psi


def axis_angle_to_matrix(v: Tensor) -> Tensor:
    """(..., 3) rotation vectors (axis * angle, radians) -> (..., 3, 3) by Rodrigues' formula,
    R = I + sin(t)/t W + (1 - cos(t))/t^2 W^2 with W the cross-product matrix of v and t = |v|.
    Finite, with finite gradients, at v = 0 (the two coefficients by their Taylor series below 1e-3 rad)."""
    t2 = (v * v).sum(-1)[..., None, None]
    small = t2 < 1e-6
    t = torch.where(small, torch.ones_like(t2), t2).sqrt()  # no sqrt(0): its gradient is infinite
    a = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / t**2)
    W = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)
    W[..., 0, 1], W[..., 0, 2], W[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    W = W - W.transpose(-1, -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(W)
    return eye + a * W + b * (W @ W)


def rotation_6d_to_matrix(x: Tensor) -> Tensor:
    """(..., 6) -> (..., 3, 3): Gram-Schmidt of two 3-vectors into the first two rows of a rotation
    (the continuous 6-D representation of Zhou et al. 2019, for networks that output rotations)."""
    a = torch.nn.functional.normalize(x[..., :3], dim=-1)
    b = torch.nn.functional.normalize(x[..., 3:] - (a * x[..., 3:]).sum(-1, keepdim=True) * a, dim=-1)
    return torch.stack([a, b, torch.cross(a, b, dim=-1)], -2)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """(B, 3, 3) rotations -> (B, 3) rotation vectors (angle in [0, pi]).

    The angle is atan2(sin, cos), accurate at every angle. The axis is the normalised skew part
    where cos >= 0, and otherwise the largest column of k k^T = ((R + R^T) / 2 - cos I) / (1 - cos),
    signed by the skew part, which stays accurate up to a half turn.
    """
    w = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    theta = torch.atan2(w.norm(dim=-1) / 2, cos)
    axis_w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300 if R.dtype == torch.float64 else 1e-30)
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    kk = ((R + R.transpose(-1, -2)) / 2 - cos[..., None, None] * eye) / (1 - cos).clamp_min(1e-12)[..., None, None]
    i = kk.diagonal(dim1=-2, dim2=-1).argmax(-1)
    col = kk.gather(-1, i[..., None, None].expand(*i.shape, 3, 1))[..., 0]
    k = col / col.gather(-1, i[..., None]).clamp_min(1e-12).sqrt()
    k = k * torch.where((k * w).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(R.dtype)
    return torch.where((cos < 0)[..., None], k, axis_w) * theta[..., None]
