"""Round trips (hypothesis) and projection meaning for every camera convention."""

import math

import numpy as np
import pytest
import starfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from renderers.cameras import (
    Camera,
    axis_angle_to_matrix,
    euler_zyz_to_matrix,
    look_at,
    matrix_to_axis_angle,
    matrix_to_euler_zyz,
    rotation_6d_to_matrix,
)

DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

angles = st.floats(-math.pi, math.pi, allow_nan=False)
coords = st.floats(-5, 5, allow_nan=False)


def random_rotation(seed: int, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return axis_angle_to_matrix(_quat_to_rotvec(q / q.norm(dim=-1, keepdim=True)))


def _quat_to_rotvec(q):
    w, v = q[:, :1], q[:, 1:]
    s = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v / s * 2 * torch.atan2(s, w)


def random_camera(seed: int, n: int = 4, ortho: bool = False) -> Camera:
    g = torch.Generator().manual_seed(seed + 1)
    R = random_rotation(seed, n)
    t = torch.randn(n, 3, generator=g, dtype=torch.float64)
    focal = 20 + 50 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    principal = 10 + 20 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return Camera(R, t, focal, principal, (40, 48), orthographic=ortho)


def assert_same_camera(a: Camera, b: Camera, atol=1e-8):
    for k in ("R", "t", "focal", "principal"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), atol=atol, rtol=0)
    assert a.image_size == b.image_size and a.orthographic == b.orthographic


# ------------------------------------------------------------------ round trips
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_roundtrip_opengl(seed):
    cam = random_camera(seed)
    back = Camera.from_opengl_c2w(cam.to_opengl_c2w(), cam.image_size, focal=cam.focal, principal=cam.principal)
    assert_same_camera(cam, back)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_roundtrip_opencv(seed):
    cam = random_camera(seed)
    assert_same_camera(cam, Camera.from_opencv(*cam.to_opencv(), cam.image_size))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_roundtrip_pytorch3d(seed, ortho):
    cam = random_camera(seed, ortho=ortho)
    assert_same_camera(cam, Camera.from_pytorch3d(cam.to_pytorch3d(), cam.image_size), atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(coords, coords, coords, st.floats(-math.pi, math.pi, exclude_min=True), st.floats(-1.5, 1.5),
       st.sampled_from(["deepmind", "torch"]))
def test_roundtrip_gqn(x, y, z, yaw, pitch, order):  # yaw in (-pi, pi], the range to_gqn returns
    v5 = torch.tensor([[x, y, z, yaw, pitch]])
    cam = Camera.from_gqn(v5, (32, 32))
    torch.testing.assert_close(cam.to_gqn(), v5, atol=1e-9, rtol=0)
    v7 = cam.to_gqn(order=order)
    assert_same_camera(cam, Camera.from_gqn(v7, (32, 32), order=order))


def test_gqn_yaw_minus_pi_comes_back_as_pi():
    v5 = torch.tensor([[0.0, 2.0, 0.0, -math.pi, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(Camera.from_gqn(v5, (32, 32)).to_gqn(), v5 + torch.tensor([0, 0, 0, 2 * math.pi, 0]),
                               atol=1e-9, rtol=0)


def test_gqn_orders_differ():
    v5 = torch.tensor([[1.0, 2.0, 3.0, 0.3, -0.2]])
    dm, pt = Camera.from_gqn(v5, (8, 8)).to_gqn("deepmind"), Camera.from_gqn(v5, (8, 8)).to_gqn("torch")
    torch.testing.assert_close(dm[0, 3:], torch.tensor([math.sin(0.3), math.cos(0.3), math.sin(-0.2), math.cos(-0.2)]))
    torch.testing.assert_close(pt[0, 3:], torch.tensor([math.cos(0.3), math.sin(0.3), math.cos(-0.2), math.sin(-0.2)]))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_roundtrip_relion(seed):
    g = torch.Generator().manual_seed(seed)
    R = random_rotation(seed, 8)
    origin = torch.randn(8, 2, generator=g, dtype=torch.float64) * 5
    cam = Camera.from_pose(R, origin, 1.3, 64)
    rot, tilt, psi, o = cam.to_relion()
    back = Camera.from_relion(rot, tilt, psi, o, 1.3, 64)
    assert_same_camera(cam, back, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_roundtrip_axis_angle(seed):
    R = random_rotation(seed, 8)
    torch.testing.assert_close(axis_angle_to_matrix(matrix_to_axis_angle(R)), R, atol=1e-7, rtol=0)


def test_axis_angle_near_pi():
    v = torch.tensor([[math.pi, 0, 0], [0, math.pi - 1e-7, 0], [1e-9, 0, 0]])
    R = axis_angle_to_matrix(v)
    torch.testing.assert_close(axis_angle_to_matrix(matrix_to_axis_angle(R)), R, atol=1e-6, rtol=0)


@pytest.mark.parametrize("angle", [1e-12, 1e-6, 1.0, math.pi / 2, math.pi - 1e-3, math.pi - 1e-5, math.pi])
def test_axis_angle_recovers_the_rotation_vector(angle):
    axis = torch.nn.functional.normalize(torch.tensor([[0.3, -0.8, 0.5]], dtype=torch.float64), dim=-1)
    v = axis * angle
    torch.testing.assert_close(matrix_to_axis_angle(axis_angle_to_matrix(v)), v, atol=1e-9, rtol=0)


def test_euler_gimbal_lock():
    rot, tilt, psi = torch.tensor([0.7, 0.2]), torch.tensor([0.0, math.pi]), torch.tensor([0.4, -0.3])
    A = euler_zyz_to_matrix(rot, tilt, psi)
    torch.testing.assert_close(euler_zyz_to_matrix(*matrix_to_euler_zyz(A)), A, atol=1e-9, rtol=0)


# ------------------------------------------------------------------ projection meaning
def test_projection_plato_perspective_analytic():
    # camera at origin looking along +Z: a point right and below the axis lands right and below the centre
    cam = Camera.create(torch.eye(3)[None], torch.zeros(1, 3), (64, 80), focal=100.0)
    uv, z = cam.project(torch.tensor([[[0.1, 0.2, 2.0]]]))
    torch.testing.assert_close(uv, torch.tensor([[[40 + 100 * 0.05, 32 + 100 * 0.1]]]))
    torch.testing.assert_close(z, torch.tensor([[2.0]]))


def test_projection_opengl_meaning():
    # Blender camera at (0, 0, 5) with identity rotation looks down -Z at the origin; +X world is image right,
    # +Y world is image up.
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = 5
    cam = Camera.from_opengl_c2w(c2w, (64, 64), fov=math.radians(60))
    f = 32 / math.tan(math.radians(30))
    uv, z = cam.project(torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))
    torch.testing.assert_close(z, torch.tensor([[5.0, 5.0, 5.0]]))
    torch.testing.assert_close(uv, torch.tensor([[[32, 32], [32 + f / 5, 32], [32, 32 - f / 5]]]))


def test_projection_opencv_meaning():
    # OpenCV K uses integer pixel centres: the principal point (cx, cy) is the centre of pixel (cx, cy)
    K = torch.tensor([[[50.0, 0, 10], [0, 50.0, 20], [0, 0, 1]]])
    cam = Camera.from_opencv(torch.eye(3)[None], torch.tensor([[0.0, 0, 1]]), K, (40, 40))
    uv, _ = cam.project(torch.tensor([[[0.0, 0.0, 1.0], [0.2, -0.2, 1.0]]]))
    pix = (uv - 0.5)  # our continuous coords -> OpenCV integer-centred coords
    torch.testing.assert_close(pix, torch.tensor([[[10.0, 20.0], [10 + 50 * 0.1, 20 - 50 * 0.1]]]))


def test_projection_gqn_meaning():
    # camera at (-3, 0, 0), yaw 0, pitch 0 looks along +X in a z-up world: +Z is up in the image, +Y is left
    cam = Camera.from_gqn(torch.tensor([[-3.0, 0, 0, 0, 0]]), (32, 32), fov=math.radians(90))
    uv, z = cam.project(torch.tensor([[[0.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]]))
    torch.testing.assert_close(z, torch.tensor([[3.0, 3.0, 3.0]]))
    f = 16.0
    torch.testing.assert_close(uv, torch.tensor([[[16, 16], [16, 16 - f / 3], [16 - f / 3, 16]]]))
    # and looking at the origin from anywhere puts the origin at the image centre
    cam = Camera.from_gqn(torch.tensor([[1.0, 2.0, 1.5, math.atan2(-2, -1), -math.atan2(1.5, math.sqrt(5))]]), (32, 32))
    uv, _ = cam.project(torch.zeros(1, 1, 3))
    torch.testing.assert_close(uv, torch.tensor([[[16.0, 16.0]]]))


def test_projection_pytorch3d_meaning():
    # PyTorch3D's own projection (screen space, +X left / +Y up views) lands on the same pixel as ours
    from pytorch3d.renderer import FoVPerspectiveCameras, look_at_view_transform

    torch.set_default_dtype(torch.float32)  # PyTorch3D's transforms mix float32 constants in
    R, T = look_at_view_transform(dist=4.0, elev=25.0, azim=40.0)
    p3d = FoVPerspectiveCameras(R=R, T=T, fov=50.0)
    cam = Camera.from_pytorch3d(p3d, (64, 64))
    pts = torch.tensor([[[0.3, -0.2, 0.5], [-0.5, 0.4, 0.1], [0.0, 0.0, 0.0]]])
    uv, _ = cam.project(pts)
    scr = p3d.transform_points_screen(pts, image_size=((64, 64),))[..., :2]
    torch.testing.assert_close(uv, scr, atol=1e-4, rtol=0)
    torch.testing.assert_close(cam.focal[0], torch.full((2,), 32 / math.tan(math.radians(25))), atol=1e-4, rtol=0)


def relion_matrix_independent(rot, tilt, psi):
    """R = Rz(psi) Ry(tilt) Rz(rot) as products of elementary passive rotations (Heymann et al. 2005)."""
    def rz(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    return rz(psi) @ ry(tilt) @ rz(rot)


def test_projection_relion_from_star():
    star = DATA / "relion31.star"
    df = starfile.read(star)["particles"]
    row = df.iloc[0]
    rot, tilt, psi = (float(row[k]) for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    ox, oy = float(row["rlnOriginXAngst"]), float(row["rlnOriginYAngst"])
    cam = Camera.from_relion(torch.tensor([rot]), torch.tensor([tilt]), torch.tensor([psi]),
                             torch.tensor([[ox, oy]]), 2.0, 64)
    A = relion_matrix_independent(*np.radians([rot, tilt, psi]))
    np.testing.assert_allclose(cam.R[0].numpy(), A, atol=1e-12)
    # a map point p projects to pixel centre box//2 + (A p - origin)_xy / apix (x = column, y = row):
    # RELION's predictObservation shifts the reference projection by -origin
    p = torch.tensor([[[4.0, -6.0, 10.0]]])
    uv, _ = cam.project(p)
    expect = 32 + (A @ p[0, 0].numpy())[:2] / 2.0 - np.array([ox, oy]) / 2.0 + 0.5
    np.testing.assert_allclose(uv[0, 0].numpy(), expect, atol=1e-9)


def test_rays_hit_their_pixels():
    cam = random_camera(3)
    o, d = cam.rays()
    p = o + 2.5 * d
    uv, z = cam.project(p.reshape(len(cam), -1, 3))
    torch.testing.assert_close(uv, cam.pixel_grid().reshape(1, -1, 2).expand_as(uv), atol=1e-8, rtol=0)
    ocam = random_camera(4, ortho=True)
    o, d = ocam.rays()
    uv, z = ocam.project((o + 1.7 * d).reshape(len(ocam), -1, 3))
    torch.testing.assert_close(z, torch.full_like(z, 1.7))
    torch.testing.assert_close(uv, ocam.pixel_grid().reshape(1, -1, 2).expand_as(uv), atol=1e-8, rtol=0)


def test_look_at_centres_target():
    eye = torch.tensor([[3.0, 1.0, 2.0], [-1.0, -4.0, 0.5]])
    R, t = look_at(eye, torch.zeros(2, 3), up=(0, 0, 1))
    cam = Camera.create(R, t, (32, 32), fov=0.8)
    uv, _ = cam.project(torch.zeros(2, 1, 3))
    torch.testing.assert_close(uv, torch.full((2, 1, 2), 16.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(R=torch.eye(3), t=torch.zeros(1, 3)), "R: expected shape"),
    (dict(R=torch.eye(3)[None], t=torch.zeros(2, 3)), "t: expected shape"),
    (dict(R=torch.eye(3)[None] * float("nan"), t=torch.zeros(1, 3)), "R: contains NaN"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Camera.create(image_size=(8, 8), fov=1.0, **kwargs)


@given(st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_rotation_6d(seed):
    """The first two rows of a rotation give it back; any 6-vector gives a proper rotation."""
    R = random_rotation(seed)
    torch.testing.assert_close(rotation_6d_to_matrix(R[:, :2].reshape(-1, 6)), R)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    Q = rotation_6d_to_matrix(x)
    torch.testing.assert_close(Q @ Q.transpose(1, 2), torch.eye(3).expand(4, 3, 3))
    torch.testing.assert_close(torch.linalg.det(Q), torch.ones(4))
