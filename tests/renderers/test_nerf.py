"""NeRF renderer: analytic fields, importance sampling, grid field vs voxel renderer, MLP field, bad input."""

import math

import pytest
import torch

from renderers.cameras import Camera, look_at
from renderers.nerf import GridField, NeRFRenderer, PositionalEncoding, RadianceMLP, sample_pdf
from renderers.voxel import VoxelRenderer, ray_box
from tests.renderers.test_voxel import blobs, orbit_cameras


def gaussian_layer(amplitude, z0, width, colour=(0.8, 0.3, 0.1)):
    """Density amplitude * exp(-(z - z0)^2 / (2 width^2)), constant colour: optical depth along a unit ray
    with direction cosine c to the z axis is amplitude * width * sqrt(2 pi) / c."""
    col = torch.tensor(colour, dtype=torch.float64)

    def field(points, directions):
        density = amplitude * torch.exp(-((points[..., 2] - z0) ** 2) / (2 * width**2))
        return density, col.expand(*points.shape[:-1], 3)

    return field


def rays(n=5):
    """Rays from the origin plane z = 0 at various angles to +z (unnormalised directions on purpose)."""
    tilt = torch.linspace(0.0, 0.6, n, dtype=torch.float64)
    dirs = torch.stack([torch.sin(tilt), 0.3 * torch.sin(tilt), torch.cos(tilt)], -1) * 3.0
    origins = torch.stack([torch.linspace(-1, 1, n), torch.zeros(n), torch.zeros(n)], -1).double()
    cos = dirs[:, 2] / dirs.norm(dim=-1)
    return origins[None], dirs[None], cos


@pytest.mark.parametrize("background", ["white", "black"])
def test_smooth_layer_matches_analytic_colour_and_opacity(background):
    amplitude, z0, width = 2.0, 2.0, 0.15
    o, d, cos = rays()
    r = NeRFRenderer(n_coarse=64, n_fine=128, near=0.5, far=5.0, background=background).eval()
    out = r.render_rays(gaussian_layer(amplitude, z0, width), o, d)
    tau = amplitude * width * math.sqrt(2 * math.pi) / cos
    opacity = 1 - torch.exp(-tau)
    bg = 1.0 if background == "white" else 0.0
    want = torch.tensor([0.8, 0.3, 0.1], dtype=torch.float64) * opacity[:, None] + bg * (1 - opacity[:, None])
    # mixed coarse + fine samples make a non-uniform trapezoid rule: O(h^2), 7.6e-4 measured (1.8e-4 at 2x samples)
    torch.testing.assert_close(out.opacity[0], opacity, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.rgb[0], want, atol=1e-3, rtol=0)


def expected_depth(field, o, d, near, far, n=200_001):
    """Reference depth by dense quadrature: integral of t sigma T dt / integral of sigma T dt."""
    d = d / d.norm(dim=-1, keepdim=True)
    t = torch.linspace(near, far, n, dtype=torch.float64)
    sigma, _ = field(o[0, :, None] + t[:, None] * d[0, :, None], None)
    tau = torch.cat([torch.zeros(sigma.shape[0], 1, dtype=torch.float64),
                     torch.cumulative_trapezoid(sigma, t, dim=-1)], -1)
    p = sigma * torch.exp(-tau)
    return torch.trapezoid(t * p, t, dim=-1) / torch.trapezoid(p, t, dim=-1)


def test_dense_wall_depth_matches_quadrature():
    o, d, cos = rays()
    field = gaussian_layer(60.0, 3.0, 0.05)  # optical depth 7.5 / cos: nearly opaque
    out = NeRFRenderer(n_coarse=32, n_fine=64, near=0.5, far=5.0).eval().render_rays(field, o, d)
    assert (out.opacity > 0.999).all()
    want = expected_depth(field, o, d, 0.5, 5.0)
    assert ((want * cos < 3.0) & (want * cos > 2.9)).all()  # the ray stops in the wall's front half
    torch.testing.assert_close(out.depth[0], want, atol=5e-3, rtol=0)


def test_importance_samples_fix_what_coarse_samples_miss():
    amplitude, z0, width = 5.0, 2.03, 0.03  # narrow: coarse bins are 0.125 long
    o, d, cos = rays()
    exact = 1 - torch.exp(-amplitude * width * math.sqrt(2 * math.pi) / cos)
    field = gaussian_layer(amplitude, z0, width)
    coarse = NeRFRenderer(n_coarse=16, n_fine=0, near=1.0, far=3.0).eval().render_rays(field, o, d)
    fine = NeRFRenderer(n_coarse=16, n_fine=48, near=1.0, far=3.0).eval().render_rays(field, o, d)
    err_coarse = (coarse.opacity[0] - exact).abs().max()
    err_fine = (fine.opacity[0] - exact).abs().max()
    assert err_coarse > 0.1 and err_fine < 0.03, (err_coarse, err_fine)  # 0.15 and 0.022 measured
    torch.testing.assert_close(fine.rgb_coarse, coarse.rgb)


def test_sample_pdf_follows_the_weights():
    edges = torch.linspace(0, 8, 9, dtype=torch.float64).expand(2, 9)
    w = torch.zeros(2, 8, dtype=torch.float64)
    w[0, 5] = 1.0
    w[1] = 1.0
    s = sample_pdf(edges, w, 10, jitter=False)
    assert ((s[0] >= 5) & (s[0] <= 6)).all()
    torch.testing.assert_close(s[1], torch.linspace(0.4, 7.6, 10, dtype=torch.float64))
    sj = sample_pdf(edges, w, 1000, jitter=True)
    assert ((sj[0] >= 5) & (sj[0] <= 6)).float().mean() > 0.99
    assert (sj.diff(dim=-1) >= 0).all()


def test_grid_field_agrees_with_voxel_renderer():
    density, features = blobs(batch=2)
    cam = orbit_cameras(2, (10, 10))
    voxel = VoxelRenderer(n_samples=64, alpha=True, background=1.0).eval()(density, cam, features)
    field = GridField(density, features, size=2.0)
    # same samples: per-ray box entry/exit as near/far, coarse samples only
    o, d = (x.reshape(2, -1, 3) for x in cam.rays())
    near, far = ray_box(o, d, -torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    far = torch.maximum(far, near)
    same = NeRFRenderer(n_coarse=64, n_fine=0).eval().render_rays(field, o, d, near=near, far=far)
    img = same.rgb.reshape(2, 10, 10, 3).permute(0, 3, 1, 2)
    # identical up to rays grazing the box, where the field's inside test and round-off differ (1.7e-7 seen)
    torch.testing.assert_close(img, voxel[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(same.opacity.reshape(2, 10, 10), voxel[:, 3], atol=1e-6, rtol=0)
    # the standard path: fixed near/far around the box, 64 stratified + 128 importance samples
    ref = VoxelRenderer(n_samples=2048, background=1.0).eval()(density, cam, features)
    out = NeRFRenderer(n_coarse=64, n_fine=128, near=4.0 - 1.9, far=4.0 + 1.9).eval()(field, cam)
    assert out.rgb.shape == (2, 3, 10, 10) and out.depth.shape == out.opacity.shape == (2, 1, 10, 10)
    torch.testing.assert_close(out.rgb, ref, atol=1e-3, rtol=0)


def test_positional_encoding_values_and_nerf_sizes():
    x = torch.tensor([[0.25, -0.5, 1.0]], dtype=torch.float64)
    enc = PositionalEncoding(2)
    f = torch.tensor([math.pi, 2 * math.pi], dtype=torch.float64)
    arg = (x[0][:, None] * f).reshape(-1)  # per coordinate, every frequency
    torch.testing.assert_close(enc(x)[0], torch.cat([x[0], torch.sin(arg), torch.cos(arg)]))
    assert PositionalEncoding(10).out_dim == 63 and PositionalEncoding(4).out_dim == 27
    assert PositionalEncoding(10)(torch.zeros(5, 7, 3)).shape == (5, 7, 63)


def test_mlp_latent_conditioning_chunking_and_gradients():
    torch.manual_seed(0)
    mlp = RadianceMLP(depth=4, width=32, skips=(2,), latent_dim=5).double()
    cam = orbit_cameras(2, (5, 6))
    z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    r = NeRFRenderer(n_coarse=8, n_fine=8, near=2.0, far=6.0).eval()
    big = r(mlp, cam, z)
    r.chunk = 7
    small = r(mlp, cam, z)
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b)
    assert (big.rgb >= 0).all() and (big.rgb <= 1).all()
    other = r(mlp, cam, z.flip(0))
    assert not torch.allclose(other.rgb, big.rgb)
    big.rgb.sum().backward()
    assert z.grad.abs().sum() > 0 and mlp.layers[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"latent: expected shape \(2, 5\)"):
        r(mlp, cam)


def test_jitter_only_in_training():
    cam = orbit_cameras(1, (3, 3))
    field = GridField(*blobs(batch=1), size=2.0)
    r = NeRFRenderer(n_coarse=8, n_fine=8, near=2.0, far=6.0)
    assert not torch.equal(r(field, cam).rgb, r(field, cam).rgb)
    r.eval()
    assert torch.equal(r(field, cam).rgb, r(field, cam).rgb)


def test_empty_field_shows_the_background():
    field = lambda p, d: (torch.zeros(p.shape[:-1], dtype=p.dtype), torch.zeros_like(p))  # noqa: E731
    cam = orbit_cameras(1, (2, 2))
    for bg, want in (("white", 1.0), ("black", 0.0), ((0.2, 0.4, 0.6), [0.2, 0.4, 0.6])):
        out = NeRFRenderer(background=bg).eval()(field, cam)
        torch.testing.assert_close(out.rgb[0, :, 0, 0], torch.tensor(want, dtype=torch.float64).expand(3))
        assert (out.opacity == 0).all() and (out.depth == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    mlp = RadianceMLP(depth=2, width=16)
    cam = orbit_cameras(1, (4, 4), dtype=torch.float32)
    r = NeRFRenderer(n_coarse=8, n_fine=8).eval()
    torch.testing.assert_close(r(mlp.cuda(), cam.to("cuda")).rgb.cpu(), r(mlp.cpu(), cam).rgb, atol=1e-5, rtol=0)


def _look(n=1):
    eye = torch.tensor([[0.0, 0.0, -4.0]] * n, dtype=torch.float64)
    R, t = look_at(eye, torch.zeros_like(eye))
    return Camera.create(R, t, (2, 2), fov=0.5)


@pytest.mark.parametrize("case, match", [
    ("origins", r"origins: expected shape \(B, R, 3\)"),
    ("directions", r"directions: expected shape \(B, R, 3\) with B=1, R=4"),
    ("dtype", r"directions: expected dtype torch.float64"),
    ("nan", r"origins: contains NaN or inf"),
    ("latent", r"latent: expected shape \(B, Z\) with B=1"),
    ("near", r"near, far: expected far >= near"),
    ("field_shape", r"field density: expected shape \(B, N\) with B=1, N=16"),
    ("field_nan", r"field rgb: contains NaN or inf"),
    ("field_tuple", r"field: expected to return a tuple"),
    ("camera", r"camera: expected a renderers.cameras.Camera"),
    ("background", r"background: expected"),
    ("grid", r"rgb: expected shape \(B, 3, D, H, W\)"),
])
def test_bad_input_raises_value_error(case, match):
    o, d = (x.reshape(1, -1, 3) for x in _look().rays())
    ok = lambda p, v: (torch.ones(p.shape[:-1], dtype=p.dtype), torch.ones_like(p) / 2)  # noqa: E731
    r = NeRFRenderer(n_coarse=4, n_fine=4).eval()
    calls = {
        "origins": lambda: r.render_rays(ok, o[0], d),
        "directions": lambda: r.render_rays(ok, o, d[:, :2]),
        "dtype": lambda: r.render_rays(ok, o, d.float()),
        "nan": lambda: r.render_rays(ok, o * float("nan"), d),
        "latent": lambda: r.render_rays(ok, o, d, latent=torch.zeros(2, 3, dtype=torch.float64)),
        "near": lambda: r.render_rays(ok, o, d, near=torch.full((1, 4), 3.0).double(),
                                      far=torch.full((1, 4), 2.0).double()),
        "field_shape": lambda: r.render_rays(lambda p, v: (torch.ones(*p.shape[:-1], 1).double(), p), o, d),
        "field_nan": lambda: r.render_rays(lambda p, v: (torch.ones(p.shape[:-1]).double(), p / 0), o, d),
        "field_tuple": lambda: r.render_rays(lambda p, v: p, o, d),
        "camera": lambda: r(ok, None),
        "background": lambda: NeRFRenderer(background="grey"),
        "grid": lambda: GridField(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 4, 3, 3, 3)),
    }
    with pytest.raises(ValueError, match=match):
        calls[case]()
