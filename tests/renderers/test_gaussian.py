"""Gaussian projector: quadrature, mass, map/projection consistency, gradients, the two backends, bad input."""

import math

import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import Tensor

from renderers import gaussian
from renderers.cameras import Camera, euler_zyz_to_matrix
from renderers.gaussian import (
    AffineUnits,
    GaussianProjector,
    gaussian_density_map,
    gaussian_projection,
    merge_units,
    pixel_integrals,
)


def random_rotations(B, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, 4, generator=g, dtype=dtype), dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def quadrature_image(centers, amps, sigmas, R, shift, apix, box, sub=6, nz=81):
    """Brute force: sample the 3D density on sub x sub points per pixel and nz depths, sum."""
    c = box // 2 + 0.5
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub
    pix = torch.arange(box, dtype=torch.float64)
    u = (pix[:, None] + off).reshape(-1)  # fine pixel coordinates
    x = (u - c) * apix - shift[0]
    y = (u - c) * apix - shift[1]
    z = torch.linspace(-25, 25, nz, dtype=torch.float64)
    X, Y, Z = torch.meshgrid(x, y, z, indexing="xy")  # (fine_y, fine_x, z)
    view_pts = torch.stack([X, Y, Z], -1)
    world = view_pts @ R  # x_world = R^T x_view
    dens = 0
    for cn, a, s in zip(centers, amps, sigmas):
        r2 = ((world - cn) ** 2).sum(-1)
        dens = dens + a * torch.exp(-r2 / (2 * s * s)) / (2 * math.pi * s * s) ** 1.5
    line = torch.trapezoid(dens, z, dim=-1)  # (fine_y, fine_x)
    return line.reshape(box, sub, box, sub).mean((1, 3))


def test_matches_numerical_quadrature():
    torch.manual_seed(0)
    centers = torch.randn(3, 3, dtype=torch.float64) * 3
    amps = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    sigmas = torch.tensor([1.5, 2.0, 2.5], dtype=torch.float64)
    R = random_rotations(1)[0]
    shift = torch.tensor([1.3, -0.7], dtype=torch.float64)
    cam = Camera.from_pose(R[None], shift[None], 1.0, 16)
    img = gaussian_projection(centers, amps, sigmas, cam)[0, 0]
    ref = quadrature_image(centers, amps, sigmas, R, shift, 1.0, 16)
    assert (img - ref).abs().max() < 1e-3 * ref.max()


def test_point_lands_where_the_camera_projects_it():
    center = torch.tensor([[4.0, -6.0, 3.0]], dtype=torch.float64)
    R = euler_zyz_to_matrix(*torch.tensor([[0.3], [1.1], [-0.4]], dtype=torch.float64))
    cam = Camera.from_pose(R, torch.tensor([[2.0, 1.0]], dtype=torch.float64), 2.0, 32)
    img = gaussian_projection(center, 1.0, 3.0, cam)[0, 0]
    v, u = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    w = img / img.sum()
    uv, _ = cam.project(center[None])
    assert torch.allclose(torch.stack([(w * u).sum(), (w * v).sum()]), uv[0, 0], atol=1e-6)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 6.0])
def test_mass_is_preserved(sigma):
    torch.manual_seed(1)
    centers = torch.randn(50, 3, dtype=torch.float64) * 4
    amps = torch.rand(50, dtype=torch.float64)
    cam = Camera.from_pose(random_rotations(5), torch.zeros(5, 2, dtype=torch.float64), 1.5, 64)
    img = gaussian_projection(centers, amps, sigma, cam)
    assert torch.allclose(img.sum((1, 2, 3)) * 1.5**2, amps.sum().expand(5), rtol=1e-7)
    vol = gaussian_density_map(centers, amps, sigma, 48, 1.5)
    assert torch.allclose(vol.sum() * 1.5**3, amps.sum(), rtol=1e-4 if sigma > 5 else 1e-9)


def test_map_summed_along_z_equals_projection_at_identity():
    torch.manual_seed(2)
    centers = torch.randn(20, 3, dtype=torch.float64) * 5
    sig = torch.rand(20, dtype=torch.float64) + 0.5
    cam = Camera.from_pose(torch.eye(3, dtype=torch.float64)[None], torch.zeros(1, 2, dtype=torch.float64), 2.0, 33)
    img = gaussian_projection(centers, 1.0, sig, cam)[0, 0]
    vol = gaussian_density_map(centers, 1.0, sig, 33, 2.0)
    assert torch.allclose(vol.sum(0) * 2.0, img, atol=1e-10)


def test_windowed_and_dense_pixel_integrals_agree():
    torch.manual_seed(3)
    u = torch.rand(4, 30, dtype=torch.float64) * 80 - 8  # some centres outside [0, 64)
    w = torch.full_like(u, 0.7)
    windowed = pixel_integrals(u, w, 64)
    dense = pixel_integrals(u, w, 64, tail=100.0)
    assert torch.allclose(windowed, dense, atol=1e-12)


def test_batched_centers_and_gradients():
    torch.manual_seed(4)
    centers = (torch.randn(2, 4, 3, dtype=torch.float64) * 2).requires_grad_()
    amps = torch.rand(4, dtype=torch.float64).requires_grad_()
    sig = (torch.rand(4, dtype=torch.float64) + 0.8).requires_grad_()
    R = random_rotations(2).requires_grad_()
    cam = Camera.from_pose(R, torch.zeros(2, 2, dtype=torch.float64), 1.0, 8)
    f = lambda c, a, s: GaussianProjector()(c, a, s, cam)  # noqa: E731
    assert torch.autograd.gradcheck(f, (centers, amps, sig))
    f(centers, amps, sig).sum().backward()
    assert R.grad is not None and torch.isfinite(R.grad).all()


def test_float32_matches_float64():
    torch.manual_seed(5)
    centers = torch.randn(100, 3) * 8
    cam = Camera.from_pose(random_rotations(3, torch.float32), torch.zeros(3, 2), 2.0, 32)
    img32 = gaussian_projection(centers, 1.0, 1.0, cam)
    img64 = gaussian_projection(centers.double(), 1.0, 1.0, cam.to(dtype=torch.float64))
    assert img32.dtype == torch.float32
    assert torch.allclose(img32.double(), img64, atol=1e-5 * img64.max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    centers = torch.randn(100, 3) * 8
    cam = Camera.from_pose(random_rotations(3, torch.float32), torch.zeros(3, 2), 2.0, 32)
    cpu = gaussian_projection(centers, 1.0, 1.0, cam)
    gpu = gaussian_projection(centers.cuda(), 1.0, 1.0, cam.to(device="cuda"))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_bad_input_raises_value_error():
    cam = Camera.from_pose(random_rotations(2), torch.zeros(2, 2, dtype=torch.float64), 1.0, 8)
    c = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="centers"):
        gaussian_projection(torch.zeros(5, 2, dtype=torch.float64), 1.0, 1.0, cam)
    with pytest.raises(ValueError, match="centers"):
        gaussian_projection(torch.zeros(3, 5, 3, dtype=torch.float64), 1.0, 1.0, cam)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_projection(torch.full((5, 3), float("nan"), dtype=torch.float64), 1.0, 1.0, cam)
    with pytest.raises(ValueError, match="amplitudes"):
        gaussian_projection(c, torch.ones(4, dtype=torch.float64), 1.0, cam)
    with pytest.raises(ValueError, match="sigmas"):
        gaussian_projection(c, 1.0, -1.0, cam)
    with pytest.raises(ValueError, match="dtype"):
        gaussian_projection(c.float(), 1.0, 1.0, cam)
    persp = Camera.create(random_rotations(2), torch.zeros(2, 3, dtype=torch.float64), (8, 8), focal=8.0)
    with pytest.raises(ValueError, match="orthographic"):
        gaussian_projection(c, 1.0, 1.0, persp)
    with pytest.raises(ValueError, match="shape"):
        gaussian_density_map(c, 1.0, 1.0, 0, 1.0)


# ------------------------------------------------------------------ the numba backend (compiled windowed splat)
def splat_scene(B=3, N=40, size=(20, 28), dtype=torch.float64, per_view=False, seed=7):
    """Atoms with varied widths spread past every border of a non-square image; focal lengths differ in x and y.

    Returns centres ((B, N, 3) if ``per_view`` else (N, 3)), amplitudes (N,), sigmas (N,) and the camera.
    """
    g = torch.Generator().manual_seed(seed)
    H, W = size
    half = 0.6 * max(H, W)  # Å at ~1 px/Å: many atoms project near or past the borders
    centers = (2 * torch.rand(*((B,) if per_view else ()), N, 3, generator=g, dtype=dtype) - 1) * half
    amps = torch.rand(N, generator=g, dtype=dtype) + 0.5
    sigmas = 0.4 + 1.6 * torch.rand(N, generator=g, dtype=dtype)  # 0.4 .. 2.2 px
    R = random_rotations(B, dtype, seed)
    t = torch.randn(B, 3, generator=g, dtype=dtype)
    focal = torch.tensor([[1.1, 0.9]], dtype=dtype).expand(B, 2)  # pixels per Å along x, y
    principal = torch.tensor([[W / 2, H / 2]], dtype=dtype).expand(B, 2)
    return centers, amps, sigmas, Camera(R, t, focal.clone(), principal.clone(), size, orthographic=True)


def render_and_grads(backend, centers, amps, sigmas, cam, probe):
    """Image and the gradients of ``(image * probe).sum()`` w.r.t. centres, amplitudes and the camera's R, t."""
    leaves = [x.detach().clone().requires_grad_() for x in (centers, amps, cam.R, cam.t)]
    c, a, R, t = leaves
    img = gaussian_projection(c, a, sigmas, Camera(R, t, cam.focal, cam.principal, cam.image_size, True), backend)
    return img.detach(), torch.autograd.grad((img * probe).sum(), leaves)


@pytest.mark.parametrize("per_view", [False, True])
def test_numba_and_torch_backends_agree_float64(per_view):
    centers, amps, sigmas, cam = splat_scene(per_view=per_view)
    probe = torch.rand(3, 1, 20, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    img_t, grads_t = render_and_grads("torch", centers, amps, sigmas, cam, probe)
    img_n, grads_n = render_and_grads("numba", centers, amps, sigmas, cam, probe)
    assert img_t.abs().amax((1, 2, 3)).min() > 0.01  # every view shows atoms
    assert (img_n - img_t).abs().max() <= 1e-12 * img_t.abs().max()
    for name, gt, gn in zip(("centers", "amplitudes", "R", "t"), grads_t, grads_n):
        assert (gn - gt).abs().max() <= 1e-10 * gt.abs().max(), name


def test_numba_and_torch_backends_agree_float32():
    centers, amps, sigmas, cam = splat_scene(B=4, N=300, size=(48, 40), dtype=torch.float32, per_view=True)
    probe = torch.rand(4, 1, 48, 40, generator=torch.Generator().manual_seed(2))
    img_t, grads_t = render_and_grads("torch", centers, amps, sigmas, cam, probe)
    img_n, grads_n = render_and_grads("numba", centers, amps, sigmas, cam, probe)
    assert img_n.dtype == torch.float32
    assert (img_n - img_t).abs().max() <= 1e-5 * img_t.abs().max()
    for name, gt, gn in zip(("centers", "amplitudes", "R", "t"), grads_t, grads_n):
        assert (gn - gt).abs().max() <= 1e-5 * gt.abs().max(), name


def test_numba_image_is_the_sum_of_erf_difference_products():
    """Independent expectation: every pixel of every view from the formula, with scipy's erf over all cells."""
    centers, amps, sigmas, cam = splat_scene(B=2, N=12, size=(9, 13))
    img = gaussian_projection(centers, amps, sigmas, cam, backend="numba")[:, 0].numpy()
    c, a, s = centers.numpy(), amps.numpy(), sigmas.numpy()
    for b in range(2):
        R, t, f, p = (x[b].numpy() for x in (cam.R, cam.t, cam.focal, cam.principal))
        uv = (c @ R[:2].T + t[:2]) * f + p  # (N, 2) continuous pixel coordinates
        cells = [np.arange(n + 1.0) for n in (13, 9)]
        X, Y = (np.diff(erf((e - uv[:, k, None]) / (math.sqrt(2) * s[:, None] * f[k])), axis=1)
                for k, e in enumerate(cells))  # (N, W), (N, H): twice the mass fractions
        expect = np.einsum("n,ni,nj->ij", a * f[0] * f[1] / 4, Y, X)
        assert np.abs(img[b] - expect).max() <= 1e-12 * np.abs(expect).max()


def test_numba_splat_gradcheck():
    g = torch.Generator().manual_seed(3)
    uv = torch.tensor([[[0.2, 3.1], [5.7, 6.9], [2.5, -0.8]], [[-1.2, 2.0], [3.3, 3.6], [7.1, 0.4]]],
                      dtype=torch.float64, requires_grad=True)  # near / across the borders of a (7, 6) image
    width = 0.5 + torch.rand(2, 3, 2, generator=g, dtype=torch.float64)
    weight = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda u, w: gaussian._NumbaSplat.apply(u, width, w, (7, 6), 8.5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (uv, weight))


def test_auto_backend_choice_and_refusals():
    centers, amps, sigmas, cam = splat_scene(B=1, size=(64, 64), dtype=torch.float32)
    c, a = centers[None], amps[None]
    choice = lambda s, backend="auto": gaussian._select_backend(backend, c, a, s, cam)  # noqa: E731
    narrow, wide = torch.full((1, 40), 0.4), torch.full((1, 40), 3.0)  # Å; 1.1 px/Å along x
    assert choice(narrow) == "numba"
    assert choice(wide) == "torch"  # the dense product is cheaper
    assert choice(narrow, "torch") == "torch"
    s = narrow.requires_grad_()
    assert choice(s) == "torch"  # numba does not differentiate widths
    with torch.no_grad():
        assert choice(s) == "numba"
    with pytest.raises(ValueError, match="sigmas"):
        gaussian_projection(centers, amps, s, cam, backend="numba")
    with pytest.raises(ValueError, match="backend"):
        gaussian_projection(centers, amps, sigmas, cam, backend="cuda")
    img = GaussianProjector(backend="numba")(centers, amps, sigmas, cam)
    torch.testing.assert_close(img, gaussian_projection(centers, amps, sigmas, cam, "torch"), rtol=0, atol=1e-6)


def test_fast_erf_of_float32_splats_is_within_its_stated_error():
    """Abramowitz & Stegun 7.1.28, used for float32 images, against scipy's erf: |error| <= 3e-7 everywhere."""
    pytest.importorskip("numba")
    from scipy.special import erf

    from renderers.splat import erf_fast

    x = np.linspace(-8, 8, 20001)
    err = np.abs(np.array([erf_fast(v) for v in x]) - erf(x))
    assert err.max() <= 3e-7 and erf_fast(0.0) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_jvp_matches_finite_differences_on_both_backends(dtype):
    """The image and its derivatives along K directions of the centres: numba's one-pass kernel, torch's forward
    mode and central differences of float64 renderings agree (atoms past the borders, unequal focal lengths)."""
    from renderers.gaussian import gaussian_projection_jvp

    centers, amps, sigmas, cam = splat_scene(B=3, N=60, size=(20, 28), per_view=True)
    tangents = torch.randn(3, 4, 60, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 2e-6
    fd = torch.stack([(gaussian_projection(centers + h * tangents[:, k], amps, sigmas, cam, "torch")
                       - gaussian_projection(centers - h * tangents[:, k], amps, sigmas, cam, "torch"))[:, 0] / (2 * h)
                      for k in range(4)], 1)
    image = gaussian_projection(centers, amps, sigmas, cam, "torch")
    low = lambda x: x.to(dtype)  # noqa: E731
    cam_low = Camera(low(cam.R), low(cam.t), low(cam.focal), low(cam.principal), cam.image_size, True)
    tol = 1e-8 if dtype == torch.float64 else 2e-5  # float64: the differences' own truncation error
    out = {}
    for backend in ("numba", "torch"):
        img, jvp = out[backend] = gaussian_projection_jvp(low(centers), low(tangents), low(amps), low(sigmas),
                                                          cam_low, backend)
        assert img.dtype == jvp.dtype == dtype and jvp.shape == (3, 4, 20, 28)
        assert (img.double() - image).abs().max() <= tol * image.abs().max(), backend
        assert (jvp.double() - fd).abs().max() <= tol * fd.abs().max(), backend
    if dtype == torch.float64:  # the two backends compute the same sums
        assert (out["numba"][1] - out["torch"][1]).abs().max() <= 1e-12 * fd.abs().max()
    with pytest.raises(ValueError, match="tangents"):
        gaussian_projection_jvp(centers, tangents[:, :, :5], amps, sigmas, cam)


def test_numba_kernels_split_over_threads_give_the_one_thread_results():
    """The numba backend renders slices of the batch in parallel threads (one per torch thread): images,
    gradients and Jacobian-vector products are bit for bit those of one thread, also for slices of unequal
    size (5 views on 3 threads), and still equal the torch backend's."""
    from renderers.gaussian import gaussian_projection_jvp

    centers, amps, sigmas, cam = splat_scene(B=5, N=60, per_view=True)
    probe = torch.rand(5, 1, 20, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tangents = torch.randn(5, 3, 60, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out[threads] = (render_and_grads("numba", centers, amps, sigmas, cam, probe),
                            gaussian_projection_jvp(centers, tangents, amps, sigmas, cam, backend="numba"))
    finally:
        torch.set_num_threads(before)
    (img1, g1), jvp1 = out[1]
    (img3, g3), jvp3 = out[3]
    assert torch.equal(img1, img3) and all(torch.equal(a, b) for a, b in zip(g1, g3))
    assert all(torch.equal(a, b) for a, b in zip(jvp1, jvp3))
    img_t, _ = render_and_grads("torch", centers, amps, sigmas, cam, probe)
    jvp_t = gaussian_projection_jvp(centers, tangents, amps, sigmas, cam, backend="torch")
    assert (img3 - img_t).abs().max() <= 1e-12 * img_t.abs().max()
    assert (jvp3[1] - jvp_t[1]).abs().max() <= 1e-10 * jvp_t[1].abs().max()


# ------------------------------------------------------------------ Gaussians that move with affine units
def units_scene(B=3, N=60, U=7, dtype=torch.float64, seed=11):
    """Atoms of ``splat_scene`` grouped into U units, each with an affine map per view near the identity."""
    centers, amps, sigmas, cam = splat_scene(B=B, N=N, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(U, (N,), generator=g)
    lin = torch.eye(3, dtype=dtype) + 0.2 * torch.randn(B, U, 3, 3, generator=g, dtype=dtype)
    maps = torch.cat([lin, 2 * torch.randn(B, U, 3, 1, generator=g, dtype=dtype)], -1)
    return AffineUnits(centers, unit, maps), amps, sigmas, cam


def explicit_centers(units: AffineUnits, maps: Tensor | None = None) -> Tensor:
    """The centres (B, N, 3) by the definition, one atom at a time (the independent expectation)."""
    m = units.maps if maps is None else maps
    return torch.stack([torch.stack([m[b, u, :, :3] @ p + m[b, u, :, 3] for p, u in zip(units.points, units.unit)])
                        for b in range(len(m))])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_affine_units_render_their_centres_with_gradients_to_maps_and_camera(dtype):
    """The numba units kernel places each atom itself; it must give the images of the explicit centres, and the
    gradients of the maps and of the camera's R and t that autograd gives through the explicit centres."""
    units, amps, sigmas, cam = units_scene(dtype=dtype)
    probe = torch.rand(3, 1, 20, 28, generator=torch.Generator().manual_seed(1), dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5

    def run(explicit: bool):
        maps, R, t = (x.detach().clone().requires_grad_() for x in (units.maps, cam.R, cam.t))
        camera = Camera(R, t, cam.focal, cam.principal, cam.image_size, True)
        u = AffineUnits(units.points, units.unit, maps)
        img = (gaussian_projection(explicit_centers(u), amps, sigmas, camera, "torch") if explicit
               else gaussian_projection(u, amps, sigmas, camera, "numba"))
        return img.detach(), torch.autograd.grad((img * probe).sum(), (maps, R, t))

    img_e, grads_e = run(True)
    img_n, grads_n = run(False)
    assert img_e.abs().amax((1, 2, 3)).min() > 0.01 and img_n.dtype == dtype
    assert (img_n - img_e).abs().max() <= tol * img_e.abs().max()
    for name, ge, gn in zip(("maps", "R", "t"), grads_e, grads_n):
        assert (gn - ge).abs().max() <= tol * ge.abs().max(), name
    torch.testing.assert_close(units.centers(), explicit_centers(units), rtol=0, atol=1e-5)


def test_affine_units_jvp_matches_finite_differences_of_the_maps():
    """Derivatives along K directions of the unit maps: the numba units kernel, the torch path (explicit tangents)
    and central differences of renderings at maps +- h * direction agree."""
    from renderers.gaussian import gaussian_projection_jvp

    units, amps, sigmas, cam = units_scene()
    dirs = torch.randn(3, 4, 7, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 2e-6

    def render(maps):
        return gaussian_projection(explicit_centers(units, maps), amps, sigmas, cam, "torch")[:, 0]

    fd = torch.stack([(render(units.maps + h * dirs[:, k]) - render(units.maps - h * dirs[:, k])) / (2 * h)
                      for k in range(4)], 1)
    out = {b: gaussian_projection_jvp(units, dirs, amps, sigmas, cam, b) for b in ("numba", "torch")}
    for backend, (img, jvp) in out.items():
        assert jvp.shape == (3, 4, 20, 28)
        assert (img[:, 0] - render(units.maps)).abs().max() <= 1e-12 * img.abs().max(), backend
        assert (jvp - fd).abs().max() <= 1e-8 * fd.abs().max(), backend
    assert (out["numba"][1] - out["torch"][1]).abs().max() <= 1e-12 * fd.abs().max()
    with pytest.raises(ValueError, match="tangents"):
        gaussian_projection_jvp(units, dirs[:, :, :5], amps, sigmas, cam)


def test_affine_units_refuse_bad_input():
    units, amps, sigmas, cam = units_scene()
    with pytest.raises(ValueError, match="unit"):
        AffineUnits(units.points, units.unit.clone().fill_(7), units.maps)  # 7 units: indices 0..6
    with pytest.raises(ValueError, match="unit"):
        AffineUnits(units.points, units.unit.float(), units.maps)
    with pytest.raises(ValueError, match="maps"):
        AffineUnits(units.points, units.unit, units.maps[..., :3])
    with pytest.raises(ValueError, match="batch size"):
        gaussian_projection(AffineUnits(units.points, units.unit, units.maps[:2]), amps, sigmas, cam)


def image_moments(img: Tensor) -> Tensor:
    """(B, 1, H, W) -> (B, 5): mass, centroid (x, y) and variances (x, y) in pixels, from the pixel values."""
    y, x = torch.meshgrid(*(torch.arange(n, dtype=img.dtype) + 0.5 for n in img.shape[-2:]), indexing="ij")
    m = img[:, 0].sum((1, 2))
    cx, cy = (img[:, 0] * x).sum((1, 2)) / m, (img[:, 0] * y).sum((1, 2)) / m
    vx = (img[:, 0] * (x - cx[:, None, None]) ** 2).sum((1, 2)) / m
    vy = (img[:, 0] * (y - cy[:, None, None]) ** 2).sum((1, 2)) / m
    return torch.stack([m, cx, cy, vx, vy], 1)


def test_merge_units_keeps_each_units_mass_centre_and_spread():
    """Units of six Gaussians at the vertices of an octahedron (radius d, masses equal): the merged Gaussian has the
    unit's mass, its centre and width sqrt(sigma^2 + d^2 / 3) (analytic); moved by random rigid maps, the merged
    images have the atoms' mass, centroid and per-axis variance (an octahedron's spread is the same along every
    axis, whatever the rotation)."""
    g = torch.Generator().manual_seed(3)
    U, d, sigma = 4, 1.5, 0.8
    octa = torch.cat([torch.eye(3), -torch.eye(3)]).double() * d
    centre = 6 * torch.randn(U, 3, generator=g, dtype=torch.float64)
    points = (centre[:, None] + octa).reshape(-1, 3)
    unit = torch.arange(U).repeat_interleave(6)
    amps = torch.linspace(1, 2, U, dtype=torch.float64).repeat_interleave(6)
    c, a, s = merge_units(points, unit, amps, torch.full((6 * U,), sigma, dtype=torch.float64))
    torch.testing.assert_close(c, centre, rtol=0, atol=1e-12)
    torch.testing.assert_close(a, 6 * torch.linspace(1, 2, U, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s, torch.full((U,), math.sqrt(sigma**2 + d**2 / 3), dtype=torch.float64))
    B = 3
    maps = torch.cat([random_rotations(B * U, seed=4).view(B, U, 3, 3),
                      torch.randn(B, U, 3, 1, generator=g, dtype=torch.float64)], -1)
    cam = Camera.from_pose(random_rotations(B, seed=5), torch.zeros(B, 2, dtype=torch.float64), 1.0, 64)
    for u in range(U):  # one unit at a time: its image moments are its own
        keep = unit == u
        fine = gaussian_projection(AffineUnits(points[keep], torch.zeros(6, dtype=torch.long), maps[:, u:u + 1]),
                                   amps[keep], sigma, cam, "numba")
        merged = gaussian_projection(AffineUnits(c[u:u + 1], torch.zeros(1, dtype=torch.long), maps[:, u:u + 1]),
                                     a[u:u + 1], s[u:u + 1], cam, "numba")
        torch.testing.assert_close(image_moments(merged), image_moments(fine), rtol=1e-5, atol=1e-6)  # pixel sampling
    with pytest.raises(ValueError, match="mass"):
        merge_units(points, unit + 1, amps, torch.ones(6 * U, dtype=torch.float64))  # unit 0 has no Gaussian
    with pytest.raises(ValueError, match="expected"):
        merge_units(points, unit, amps[:-1], torch.ones(6 * U, dtype=torch.float64))
