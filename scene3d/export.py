"""Explicit 3D out of Plato's models: marching cubes on voxel grids and NeRF densities, and mesh / point files.

Grids follow :mod:`renderers.voxel` (and :mod:`scene3d.geometry_metrics`): ``(D, H, W)`` indexed
``[z, y, x]``, values at the centres of the cells tiling the world box ``[lo, hi]^3``.
Meshes are ``verts (V, 3)`` float world coordinates and ``faces (F, 3)`` long, counter-clockwise
seen from outside (normals point out of the dense region). Colours are ``(V, 3)`` in [0, 1].
Files: ``.ply`` or ``.obj`` meshes and ``.ply`` point clouds, written by open3d, atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plato_core.runinfo import UserError, atomic_path
from scene3d.geometry_metrics import voxel_centers

MESH_SUFFIXES = (".ply", ".obj")


def marching_cubes(volume: Tensor, level: float, lo: float = -1.0, hi: float = 1.0) -> tuple[Tensor, Tensor]:
    """The ``level`` iso-surface of a ``(D, H, W)`` grid, as a closed mesh in world coordinates.

    The grid is padded by one cell of zeros (as the voxel renderer's field outside the box), or of
    ``level - 1`` when ``level <= 0``, so a surface that reaches the box is closed there.
    Returns ``verts (V, 3)`` float32 and ``faces (F, 3)`` long; both empty when the grid never
    crosses ``level``.
    """
    from pytorch3d.ops.marching_cubes import marching_cubes as p3d_marching_cubes

    if volume.dim() != 3:
        raise ValueError(f"volume: expected shape (D, H, W), got {tuple(volume.shape)}")
    vol = volume.detach().float().cpu()
    pad = torch.nn.functional.pad(vol[None], (1, 1) * 3, value=0.0 if level > 0 else level - 1.0)
    verts, faces = p3d_marching_cubes(pad, float(level), return_local_coords=False)
    v, f = verts[0], faces[0]
    if len(f) == 0:
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    size = torch.tensor(vol.shape[::-1], dtype=torch.float32)  # (W, H, D) cells along (x, y, z)
    world = lo + (v - 1 + 0.5) * (hi - lo) / size  # pytorch3d gives (x, y, z) index coordinates of the padded grid
    return world, f[:, [0, 2, 1]].long()  # pytorch3d winds faces towards higher values; flip to point outwards


def evaluate_grid(fn: Callable[[Tensor], Tensor], res: int, lo: float = -1.0, hi: float = 1.0,
                  chunk: int = 65_536) -> Tensor:
    """Evaluate ``fn: (N, 3) world points -> (N, C)`` at the cell centres of a ``res^3`` grid: (C, res, res, res)."""
    pts = voxel_centers(res, lo, hi).reshape(-1, 3)
    with torch.no_grad():
        vals = torch.cat([fn(pts[i:i + chunk]).reshape(min(chunk, len(pts) - i), -1).float().cpu()
                          for i in range(0, len(pts), chunk)])
    return vals.T.reshape(-1, res, res, res)


def density_to_mesh(density_fn: Callable[[Tensor], Tensor], res: int = 96, level: float = 10.0,
                    lo: float = -1.0, hi: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mesh the ``level`` set of a density field (e.g. a NeRF's sigma, in 1 / world units).

    ``density_fn`` maps (N, 3) world points to (N,) or (N, 1) densities. A density of ``level`` stops
    1 - exp(-level * d) of the light over a depth d, so 10 / world unit is opaque over ~0.3 units.
    """
    grid = evaluate_grid(density_fn, res, lo, hi)[0]
    return marching_cubes(grid, level, lo, hi)


def mesh_to_open3d(verts: Tensor, faces: Tensor, colors: Tensor | None = None):
    """An ``open3d.geometry.TriangleMesh`` with vertex normals (and colours)."""
    import open3d as o3d

    m = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(_np(verts, np.float64)),
                                  o3d.utility.Vector3iVector(_np(faces, np.int32)))
    if colors is not None:
        m.vertex_colors = o3d.utility.Vector3dVector(_np(colors, np.float64).clip(0, 1))
    m.compute_vertex_normals()
    return m


def points_to_open3d(points: Tensor, colors: Tensor | None = None):
    """An ``open3d.geometry.PointCloud`` from ``points (N, 3)`` and optional ``colors (N, 3)``."""
    import open3d as o3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(_np(points, np.float64)))
    if colors is not None:
        pc.colors = o3d.utility.Vector3dVector(_np(colors, np.float64).clip(0, 1))
    return pc


def write_mesh(path: str | os.PathLike, verts: Tensor, faces: Tensor, colors: Tensor | None = None) -> Path:
    """Write a ``.ply`` or ``.obj`` mesh (with vertex colours where the format holds them)."""
    import open3d as o3d

    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise UserError(f"{path}: expected a .ply or .obj mesh file name")
    if len(faces) == 0:
        raise UserError(f"{path}: the mesh is empty (no surface at this threshold); try another --level")
    with atomic_path(path) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh_to_open3d(verts, faces, colors), write_ascii=False):
            raise UserError(f"{path}: open3d could not write the mesh")
    return path


def write_points(path: str | os.PathLike, points: Tensor, colors: Tensor | None = None) -> Path:
    """Write a ``.ply`` point cloud."""
    import open3d as o3d

    path = Path(path)
    if path.suffix.lower() != ".ply":
        raise UserError(f"{path}: expected a .ply point-cloud file name")
    with atomic_path(path) as tmp:
        if not o3d.io.write_point_cloud(str(tmp), points_to_open3d(points, colors)):
            raise UserError(f"{path}: open3d could not write the point cloud")
    return path


def read_geometry(path: str | os.PathLike):
    """Read a ``.ply`` / ``.obj`` file as an open3d mesh, or as a point cloud when it has no triangles."""
    import open3d as o3d

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise UserError(f"{path}: expected a .ply or .obj file")
    mesh = o3d.io.read_triangle_mesh(str(path))
    if len(mesh.triangles) > 0:
        mesh.compute_vertex_normals()
        return mesh
    pc = o3d.io.read_point_cloud(str(path))
    if len(pc.points) == 0:
        raise UserError(f"{path}: no triangles or points could be read")
    return pc


def _np(x, dtype) -> np.ndarray:
    return np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=dtype)
