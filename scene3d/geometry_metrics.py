"""3D metrics against a generator's ground truth: voxel IoU, symmetric Chamfer, and a visual-hull baseline.

Grid convention (shared with :mod:`scene3d.export`)
---------------------------------------------------
A voxel grid is a ``(D, H, W)`` tensor over the axis-aligned world box ``[lo, hi]^3``.
Index ``[k, j, i]`` is the cell centred at ``x = lo + (i + 0.5) * s``, ``y = lo + (j + 0.5) * s``,
``z = lo + (k + 0.5) * s`` with ``s = (hi - lo) / W``: the last axis is world x, as in
``torch.nn.functional.grid_sample`` with ``align_corners=False``.

Chamfer distance
----------------
``chamfer(a, b) = 0.5 * (mean_{p in a} min_{q in b} |p - q| + mean_{q in b} min_{p in a} |p - q|)``,
unsquared, in world units (the "Chamfer-L2 / 2" of Occupancy Networks). Two concentric spheres of
radii r1, r2 are at Chamfer distance ``|r1 - r2|``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from renderers.cameras import Camera


def voxel_centers(res: int | tuple[int, int, int], lo: float = -1.0, hi: float = 1.0,
                  dtype=torch.float32, device=None) -> Tensor:
    """(D, H, W, 3) world ``(x, y, z)`` of the cell centres of a grid over ``[lo, hi]^3``."""
    D, H, W = (res,) * 3 if isinstance(res, int) else res
    axes = [lo + (torch.arange(n, dtype=dtype, device=device) + 0.5) * (hi - lo) / n for n in (D, H, W)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], -1)


def voxel_iou(pred: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """Intersection over union of occupancy grids.

    Args:
        pred, target: (B, D, H, W) or (D, H, W) occupancies or probabilities; a cell
            is occupied where its value is > ``threshold`` (bool grids are used as they are).
    Returns:
        (B,) or scalar IoU in [0, 1]; 1 where both grids are empty.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    p = pred if pred.dtype == torch.bool else pred > threshold
    t = target if target.dtype == torch.bool else target > threshold
    dims = tuple(range(p.dim() - 3, p.dim()))
    inter = (p & t).sum(dims).double()
    union = (p | t).sum(dims).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def sample_surface(verts: Tensor, faces: Tensor, n: int = 10_000, seed: int | None = 0) -> Tensor:
    """(n, 3) points drawn uniformly by area from the triangle mesh ``verts (V, 3)``, ``faces (F, 3)``."""
    if faces.numel() == 0:
        raise ValueError("faces: the mesh has no triangles to sample")
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    v = verts.double()
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1) / 2
    idx = torch.multinomial(area.cpu().float(), n, replacement=True, generator=g).to(verts.device)
    u, w = torch.rand(2, n, 1, generator=g, dtype=torch.float64).to(verts.device)
    flip = (u + w) > 1  # reflect into the triangle
    u, w = torch.where(flip, 1 - u, u), torch.where(flip, 1 - w, w)
    p = a[idx] + u * (b[idx] - a[idx]) + w * (c[idx] - a[idx])
    return p.to(verts.dtype)


def nearest_distances(a: Tensor, b: Tensor) -> Tensor:
    """(N,) exact distance from each point of ``a (N, 3)`` to its nearest neighbour in ``b (M, 3)`` (k-d tree)."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(b.detach().double().cpu().numpy()).query(a.detach().double().cpu().numpy())
    return torch.as_tensor(d, dtype=a.dtype, device=a.device)


def chamfer(a: Tensor, b: Tensor) -> Tensor:
    """Symmetric unsquared Chamfer distance between point sets ``a (N, 3)`` and ``b (M, 3)`` (world units)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("chamfer: both point sets need at least one point")
    return 0.5 * (nearest_distances(a, b).mean() + nearest_distances(b, a).mean())


def mesh_chamfer(verts_a: Tensor, faces_a: Tensor, verts_b: Tensor, faces_b: Tensor, n: int = 10_000,
                 seed: int = 0) -> Tensor:
    """Chamfer distance between two meshes on ``n`` area-uniform surface samples each."""
    return chamfer(sample_surface(verts_a, faces_a, n, seed), sample_surface(verts_b, faces_b, n, seed + 1))


def visual_hull(masks: Tensor, cameras: Camera, res: int = 32, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    """Carve a ``res^3`` grid: a cell is kept iff its centre projects inside every silhouette.

    Args:
        masks: (V, H, W) bool silhouettes, one per camera.
        cameras: V cameras in Plato's convention, image size (H, W).
        res, lo, hi: the grid (see the module docstring).
    Returns:
        (res, res, res) bool occupancy. Centres behind a camera or outside its image are carved away.
    """
    V, H, W = masks.shape
    if len(cameras) != V or tuple(cameras.image_size) != (H, W):
        raise ValueError(f"cameras: expected {V} cameras of image size {(H, W)}, "
                         f"got {len(cameras)} of {tuple(cameras.image_size)}")
    pts = voxel_centers(res, lo, hi, cameras.dtype, cameras.device).reshape(1, -1, 3).expand(V, -1, 3)
    uv, depth = cameras.project(pts)
    col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H) & (cameras.orthographic or (depth > 0))
    flat = (row.clamp(0, H - 1) * W + col.clamp(0, W - 1))
    hit = torch.gather(masks.reshape(V, -1), 1, flat) & inside
    return hit.all(0).reshape(res, res, res)


def mesh_occupancy(verts: Tensor, faces: Tensor, points: Tensor) -> Tensor:
    """(N,) bool: which of ``points (N, 3)`` lie inside the closed mesh ``verts (V, 3)``, ``faces (F, 3)``.

    Counts ray crossings with open3d's ``RaycastingScene.compute_occupancy`` (C++, fast on CPU).
    """
    import numpy as np
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(verts.detach().cpu().numpy().astype(np.float32)),
                        o3d.core.Tensor(faces.detach().cpu().numpy().astype(np.uint32)))
    occ = scene.compute_occupancy(o3d.core.Tensor(points.detach().cpu().numpy().astype(np.float32))).numpy()
    return torch.from_numpy(occ > 0.5).to(points.device)
