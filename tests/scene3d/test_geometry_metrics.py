"""Voxel IoU, Chamfer and the visual hull against analytic values on known shapes."""

import math

import pytest
import torch

from renderers.cameras import Camera, look_at
from scene3d.geometry_metrics import (
    chamfer,
    mesh_chamfer,
    sample_surface,
    visual_hull,
    voxel_centers,
    voxel_iou,
)


def ico_sphere(level: int, radius: float = 1.0):
    from pytorch3d.utils import ico_sphere as p3d_ico

    m = p3d_ico(level)
    return m.verts_packed().double() * radius, m.faces_packed()


def test_voxel_centers_convention():
    c = voxel_centers((2, 3, 4), lo=-1, hi=1)
    assert c.shape == (2, 3, 4, 3)
    # last axis is x; cell centres at lo + (i + 0.5) * size / n
    assert torch.allclose(c[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(c[0, :, 0, 1], torch.tensor([-2 / 3, 0.0, 2 / 3]))
    assert torch.allclose(c[:, 0, 0, 2], torch.tensor([-0.5, 0.5]))


def test_voxel_iou_shifted_boxes():
    # two 10-cell cubes shifted by 3 cells along x: IoU = 7 / 13 exactly
    a = torch.zeros(2, 32, 32, 32)
    b = torch.zeros(2, 32, 32, 32)
    a[:, 5:15, 5:15, 5:15] = 1
    b[:, 5:15, 5:15, 8:18] = 1
    b[1] = a[1]
    iou = voxel_iou(a, b)
    assert iou[0].item() == pytest.approx(7 / 13)
    assert iou[1].item() == 1.0
    assert voxel_iou(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8)).item() == 1.0
    with pytest.raises(ValueError, match="shape"):
        voxel_iou(a, b[0])


def test_sample_surface_uniform_by_area():
    # two triangles with areas 1/2 and 3/2: a quarter of the samples fall on the first
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 1, 1]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    p = sample_surface(verts, faces, 20_000)
    assert p.shape == (20_000, 3)
    on_first = p[:, 2] == 0
    assert on_first.float().mean().item() == pytest.approx(0.25, abs=0.015)
    q = p[on_first]
    assert (q[:, 0] >= 0).all() and (q[:, 1] >= 0).all() and (q[:, 0] + q[:, 1] <= 1 + 1e-6).all()
    # area-uniform on the triangle: the centroid of the samples is the triangle's centroid
    assert q[:, :2].mean(0).tolist() == pytest.approx([1 / 3, 1 / 3], abs=0.01)


def test_chamfer_concentric_spheres():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(10_000, 3, generator=g, dtype=torch.float64), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(10_000, 3, generator=g, dtype=torch.float64), dim=-1)
    assert chamfer(d, d).item() == 0.0
    # nearest points of concentric spheres are radial: distance |r1 - r2| (+ a small sampling gap)
    c = chamfer(d, 1.5 * e).item()
    assert 0.5 <= c < 0.51
    # symmetric
    assert chamfer(d, 1.5 * e).item() == pytest.approx(chamfer(1.5 * e, d).item())


def test_mesh_chamfer_ico_spheres():
    va, fa = ico_sphere(4, 1.0)
    vb, fb = ico_sphere(4, 1.3)
    assert mesh_chamfer(va, fa, vb, fb).item() == pytest.approx(0.3, abs=0.02)
    assert mesh_chamfer(va, fa, va, fa).item() < 0.02


def orthographic_axis_cameras(size: int, radius: float = 1.0) -> Camera:
    """Three orthographic cameras looking along -x, -y and -z at the origin, spanning [-r, r]."""
    eye = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]], dtype=torch.float64)
    R = torch.cat([look_at(eye[i:i + 1], torch.zeros(1, 3, dtype=torch.float64),
                           up=(0.0, 0.0, 1.0) if i < 2 else (0.0, 1.0, 0.0))[0] for i in range(3)])
    t = torch.zeros(3, 3, dtype=torch.float64)
    return Camera.create(R, t, (size, size), pixel_size=2 * radius / size)


def sphere_silhouettes(cameras: Camera, r: float) -> torch.Tensor:
    o, d = cameras.rays()
    # squared distance of the ray from the origin: |o|^2 - (o . d)^2
    dist2 = (o * o).sum(-1) - (o * d).sum(-1) ** 2
    return dist2 < r * r


def test_visual_hull_of_sphere_is_tricylinder():
    # orthographic views along the three axes carve a ball into the Steinmetz tricylinder,
    # of volume 8 (2 - sqrt 2) r^3; the ball fills 4/3 pi / (8 (2 - sqrt 2)) = 0.8939 of it
    cams = orthographic_axis_cameras(128)
    r = 0.8
    hull = visual_hull(sphere_silhouettes(cams, r), cams, res=64)
    cell = (2 / 64) ** 3
    assert hull.sum().item() * cell == pytest.approx(8 * (2 - math.sqrt(2)) * r**3, rel=0.03)
    ball = voxel_centers(64, dtype=torch.float64).norm(dim=-1) < r
    # the hull contains the object, up to cells whose pixel's centre falls just outside the disc
    assert (ball & ~hull).sum().item() < 0.01 * ball.sum().item()
    assert (voxel_centers(64)[ball & ~hull].norm(dim=-1) > r - 2 / 64).all()
    assert voxel_iou(hull, ball).item() == pytest.approx(4 / 3 * math.pi / (8 * (2 - math.sqrt(2))), abs=0.015)


def test_visual_hull_perspective_frames_out_of_view_cells():
    eye = torch.tensor([[0.0, -4.0, 0.0]])
    R, t = look_at(eye, torch.zeros(1, 3), up=(0.0, 0.0, 1.0))
    cam = Camera.create(R, t, (32, 32), fov=0.3)  # sees a square pyramid around the y axis
    hull = visual_hull(torch.ones(1, 32, 32, dtype=torch.bool), cam, res=64)
    assert hull[32, 32, 32] and not hull[32, 32, 0]
    # the pyramid's frustum between depths 3 and 5: volume 4 tan^2(fov / 2) (5^3 - 3^3) / 3, of the box's 8
    frac = 4 * math.tan(0.15) ** 2 * (5**3 - 3**3) / 3 / 8
    assert hull.float().mean().item() == pytest.approx(frac, rel=0.03)


def test_mesh_occupancy_of_ico_sphere_matches_ball():
    from scene3d.geometry_metrics import mesh_occupancy

    verts, faces = ico_sphere(3, 0.7)
    pts = voxel_centers(24, dtype=torch.float64).reshape(-1, 3)
    inside = mesh_occupancy(verts, faces, pts)
    ball = pts.norm(dim=-1) < 0.7
    assert voxel_iou(inside.reshape(24, 24, 24), ball.reshape(24, 24, 24)).item() > 0.95
    assert not mesh_occupancy(verts, faces, torch.tensor([[0.0, 0.0, 0.9]])).item()
    assert mesh_occupancy(verts, faces, torch.tensor([[0.1, 0.2, -0.3]])).item()
