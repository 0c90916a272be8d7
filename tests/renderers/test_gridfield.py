"""Explicit-grid field: its density formula at cell centres, coarse-to-fine growth that keeps the field,
total variation on a ramp, checkpoints across growth, and rendering through NeRFRenderer with and without
an occupancy grid measured from it."""

import math

import torch
import torch.nn.functional as F

from renderers.gridfield import FeatureGridField
from renderers.nerf import NeRFRenderer
from renderers.occupancy import OccupancyGrid
from tests.renderers.test_voxel import orbit_cameras


def centres(res: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """(res, res, res, 3) world coordinates (x, y, z) of the cell centres, indexed [z, y, x]."""
    c = lo + (torch.arange(res, dtype=torch.float64) + 0.5) * (hi - lo) / res
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1)


def test_density_at_cell_centres_is_the_activated_grid_value():
    f = FeatureGridField(-1.0, 1.0, res=6, final_res=12).double()
    torch.manual_seed(0)
    with torch.no_grad():
        f.density.normal_(0, 0.05)  # stored / grid_lr_scale: values of order 5
    p = centres(6).reshape(1, -1, 3)
    v = f.density[0, 0].reshape(-1) * f.scale
    want = F.softplus(v - 0.0 + math.log(math.expm1(0.01))) / (2.0 / 12)
    torch.testing.assert_close(f.density_at(p)[0], want)
    dens, rgb = f(p, F.normalize(torch.randn_like(p), dim=-1))
    torch.testing.assert_close(dens, f.density_at(p))
    assert rgb.shape == (1, 216, 3) and ((rgb > 0) & (rgb < 1)).all()
    outside = torch.tensor([[[1.01, 0.0, 0.0], [0.0, -1.2, 0.3]]], dtype=torch.float64)
    assert (f.density_at(outside) == 0).all()
    empty = FeatureGridField(-1.0, 1.0, res=4, final_res=12).double()  # a new field: 1 % opacity per final cell
    torch.testing.assert_close(empty.density_at(p) * (2.0 / 12), torch.full((1, 216), 0.01, dtype=torch.float64))


def test_growth_keeps_a_linear_field_and_the_parameters():
    """Trilinear resampling is exact for a field linear in the coordinates, away from the half-cell rim."""
    f = FeatureGridField(-1.0, 1.0, res=8, final_res=24, features=2).double()
    with torch.no_grad():
        p = centres(8)
        f.density[0, 0] = (0.3 * p[..., 0] - 0.2 * p[..., 2]) / f.scale
        f.features[0, 1] = (p[..., 1] + 0.5 * p[..., 0]) / f.scale
    ids = [id(q) for q in (f.density, f.features)]
    inner = (torch.rand(1, 500, 3, dtype=torch.float64) * 2 - 1) * (1 - 1.5 / 8)
    before = f.density_at(inner)
    feat = lambda: torch.nn.functional.grid_sample(f.features * f.scale, inner.reshape(1, -1, 1, 1, 3),  # noqa: E731
                                                   align_corners=False).reshape(2, -1)
    feats_before = feat()
    changed = f.upsample(20)
    assert f.res == 20 and [id(q) for q in changed] == ids and f.features.shape == (1, 2, 20, 20, 20)
    torch.testing.assert_close(f.density_at(inner), before)
    torch.testing.assert_close(feat(), feats_before)


def test_total_variation_of_a_ramp():
    """Density values a * i along x (i the cell index), features 0: TV = mean over axes = a^2 / 3."""
    f = FeatureGridField(-1.0, 1.0, res=5, final_res=10, features=3).double()
    a = 0.7
    with torch.no_grad():
        f.density[0, 0] = (a * torch.arange(5, dtype=torch.float64)).expand(5, 5, 5) / f.scale
    torch.testing.assert_close(f.total_variation(), torch.tensor(a**2 / 3, dtype=torch.float64))
    with torch.no_grad():
        f.features[0, 2] = f.density[0, 0]
    torch.testing.assert_close(f.total_variation(feature_tv=0.5), torch.tensor(a**2 / 3 * (1 + 0.5 / 3),
                                                                               dtype=torch.float64))


def test_a_grown_checkpoint_loads_into_a_new_field():
    f = FeatureGridField(-1.0, 1.0, res=4, final_res=8)
    with torch.no_grad():
        f.density.normal_()
    f.upsample(8)
    g = FeatureGridField(-1.0, 1.0, res=4, final_res=8)
    g.load_state_dict(f.state_dict())
    p = torch.rand(1, 50, 3) * 2 - 1
    d = F.normalize(torch.randn(1, 50, 3), dim=-1)
    for a, b in zip(f(p, d), g(p, d)):
        torch.testing.assert_close(a, b)


def test_renders_the_same_with_a_measured_occupancy_grid():
    """A cube of density inside a grid field; the occupancy grid measured from the field (one random point per
    cell, dilated) skips only cells where the field is far below its threshold, so the image barely changes."""
    f = FeatureGridField(-1.0, 1.0, res=16, final_res=16).double()
    with torch.no_grad():
        inside = (centres(16).abs() < 0.4).all(-1)
        f.density[0, 0] = torch.where(inside, 6.0, -30.0) / f.scale  # softplus(-30 - 4.6) ~ 1e-15: empty
        f.features.normal_(0, 0.01)
    occ = OccupancyGrid(-1.0, 1.0, 16).double()
    occ.update(lambda p: f.density_at(p[None])[0])
    assert occ.mask.float().mean() < 0.5
    cam = orbit_cameras(2, (10, 10), dist=3.0)
    r = NeRFRenderer(n_coarse=64, n_fine=0, near=1.0, far=5.0, min_weight=0.0).eval()  # colour everywhere
    full, skip = r(f, cam), r(f, cam, occupancy=occ)
    assert full.opacity.max() > 0.9
    # a skipped cell next to the cube can hold the tail of its trilinear ramp, v ~ -12 + shift: optical depth
    # ~ softplus(-16.6) / cell0 * half a cell ~ 3e-8 (4e-9 measured), far below the 1 % opacity threshold
    torch.testing.assert_close(skip.rgb, full.rgb, atol=1e-7, rtol=0)
    torch.testing.assert_close(skip.opacity, full.opacity, atol=1e-7, rtol=0)


def test_colour_only_where_it_shows():
    """With ``density_at`` the renderer skips colour at samples of weight <= min_weight: exact at 0, and
    within n_samples * min_weight of the full image otherwise."""
    torch.manual_seed(0)
    f = FeatureGridField(-1.0, 1.0, res=8, final_res=8).double()
    with torch.no_grad():
        f.density.normal_(0, 0.03)
        f.features.normal_(0, 0.01)
    occ = OccupancyGrid(-1.0, 1.0, 8).double()  # full: no cell skipped
    cam = orbit_cameras(1, (8, 8), dist=3.0)
    full = NeRFRenderer(48, 0, near=1.0, far=5.0).eval()(lambda p, d: f(p, d), cam)  # a plain callable
    exact = NeRFRenderer(48, 0, near=1.0, far=5.0, min_weight=0.0).eval()(f, cam, occupancy=occ)
    torch.testing.assert_close(exact.rgb, full.rgb, atol=1e-12, rtol=0)
    loose = NeRFRenderer(48, 0, near=1.0, far=5.0, min_weight=1e-3).eval()(f, cam, occupancy=occ)
    assert (loose.rgb - full.rgb).abs().max() <= 48 * 1e-3
    torch.testing.assert_close(loose.opacity, full.opacity, atol=1e-12, rtol=0)


def test_sampled_total_variation_is_unbiased():
    """On a ramp every neighbour difference along x is the same, so a sample of cells gives the exact value;
    on random grids the sampled estimate averages to the full one."""
    f = FeatureGridField(-1.0, 1.0, res=6, final_res=12, features=2).double()
    with torch.no_grad():
        f.density[0, 0] = (0.7 * torch.arange(6, dtype=torch.float64)).expand(6, 6, 6) / f.scale
    torch.testing.assert_close(f.total_variation(cells=7), torch.tensor(0.49 / 3, dtype=torch.float64))
    torch.manual_seed(0)
    f = FeatureGridField(-1.0, 1.0, res=24, final_res=24, features=2).double()
    with torch.no_grad():
        f.density.normal_(0, 0.01)
        f.features.normal_(0, 0.01)
    full = f.total_variation(feature_tv=0.3)
    # the full value averages R^2 differences per axis, the sample (R-1)^3 interior ones: compare with
    # the mean over interior cells, computed directly
    tv = lambda g: sum((g[0].diff(dim=k)[:, :23, :23, :23] * f.scale).pow(2).mean() for k in (1, 2, 3)) / 3  # noqa: E731
    interior = tv(f.density) + 0.3 * tv(f.features)
    est = torch.stack([f.total_variation(feature_tv=0.3, cells=4000) for _ in range(50)]).mean()
    torch.testing.assert_close(est, interior, rtol=0.02, atol=0)
    assert abs(full / interior - 1) < 0.05
