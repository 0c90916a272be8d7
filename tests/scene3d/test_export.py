"""Marching cubes against analytic shapes, and mesh / point-cloud files round-tripped through open3d."""

import math

import numpy as np
import pytest
import torch

from plato_core.runinfo import UserError
from scene3d.export import (
    density_to_mesh,
    evaluate_grid,
    marching_cubes,
    read_geometry,
    write_mesh,
    write_points,
)
from scene3d.geometry_metrics import voxel_centers


def area_and_volume(verts, faces):
    v = verts.double()
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1).sum() / 2
    volume = (a * torch.linalg.cross(b, c)).sum() / 6  # divergence theorem; > 0 for outward faces
    return area.item(), volume.item()


def test_marching_cubes_sphere_radius_area_volume():
    r, centre = 0.6, torch.tensor([0.1, -0.2, 0.15])
    density = 1 - (voxel_centers(64) - centre).norm(dim=-1) / r  # > 0 inside, 0 on the sphere
    verts, faces = marching_cubes(density, 0.0)
    radii = (verts - centre).norm(dim=-1)
    assert radii.mean().item() == pytest.approx(r, abs=2e-3)
    assert (radii - r).abs().max().item() < 0.01  # a cell is 2 / 64 = 0.031
    area, volume = area_and_volume(verts, faces)
    assert area == pytest.approx(4 * math.pi * r**2, rel=0.02)
    assert volume == pytest.approx(4 / 3 * math.pi * r**3, rel=0.01)  # positive: faces wind outwards
    # closed 2-manifold of genus 0: V - E + F = 2
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values.unique(dim=0)
    assert len(verts) - len(edges) + len(faces) == 2


def test_marching_cubes_box_touching_the_grid_is_closed():
    # a grid full of ones, zero outside: the 0.5 level lies half a cell outside the outer centres, on the box
    verts, faces = marching_cubes(torch.ones(8, 10, 12), 0.5, lo=-2, hi=2)
    assert verts.min(0).values.tolist() == pytest.approx([-2, -2, -2], abs=1e-5)
    assert verts.max(0).values.tolist() == pytest.approx([2, 2, 2], abs=1e-5)
    assert area_and_volume(verts, faces)[1] > 0
    v, f = marching_cubes(torch.zeros(4, 4, 4), 0.5)
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_density_to_mesh_axis_order():
    # an ellipsoid with semi-axes (0.8, 0.4, 0.2) along (x, y, z): the mesh's extent shows the axis order
    def density(p):
        return 20 * (1 - ((p / torch.tensor([0.8, 0.4, 0.2])) ** 2).sum(-1)).clamp_min(0)

    verts, faces = density_to_mesh(density, res=48, level=10.0)
    half = (verts.max(0).values - verts.min(0).values) / 2
    s = math.sqrt(0.5)  # density 10 where the quadratic form equals 1/2
    assert half.tolist() == pytest.approx([0.8 * s, 0.4 * s, 0.2 * s], abs=0.03)
    assert evaluate_grid(lambda p: p, 4).shape == (3, 4, 4, 4)


def test_write_and_read_mesh_and_points(tmp_path):
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    colors = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    for name in ("t.ply", "t.obj"):
        write_mesh(tmp_path / name, verts, faces, colors)
        m = read_geometry(tmp_path / name)
        assert len(m.triangles) == 4
        np.testing.assert_allclose(np.sort(np.asarray(m.vertices), 0), np.sort(verts.numpy(), 0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(read_geometry(tmp_path / "t.ply").vertex_colors), colors.numpy(), atol=1e-2)
    write_points(tmp_path / "p.ply", verts, colors)
    pc = read_geometry(tmp_path / "p.ply")
    assert len(pc.points) == 4 and not hasattr(pc, "triangles")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.ply", "t.obj", "t.ply"]  # no temporary files left


def test_export_user_errors(tmp_path):
    verts, faces = torch.zeros(3, 3), torch.tensor([[0, 1, 2]])
    with pytest.raises(UserError, match="expected a .ply or .obj"):
        write_mesh(tmp_path / "m.stl", verts, faces)
    with pytest.raises(UserError, match="empty"):
        write_mesh(tmp_path / "m.ply", verts, faces[:0])
    with pytest.raises(UserError, match="no such file"):
        read_geometry(tmp_path / "missing.ply")
