"""Occupancy grid: cell lookup, the decay rule, and skipping that leaves the image unchanged where the grid is
conservative (same samples, same colours, same gradients)."""

import math

import pytest
import torch

from renderers.nerf import NeRFRenderer
from renderers.occupancy import OccupancyGrid
from tests.renderers.test_voxel import orbit_cameras

CENTRE, RADIUS = torch.tensor([0.2, -0.1, 0.15], dtype=torch.float64), 0.45


def ball_field(amplitude: torch.Tensor):
    """Density amplitude * (1 - r^2 / R^2)^2 inside a ball of radius R, exactly 0 outside; colour varies
    with position and direction (so a wrongly placed sample would show)."""

    def field(points, directions):
        r2 = ((points - CENTRE) ** 2).sum(-1) / RADIUS**2
        density = amplitude * (1 - r2).clamp_min(0) ** 2
        rgb = torch.sigmoid(torch.cat([points[..., :2] * 3, directions[..., 2:]], -1))
        return density, rgb

    return field


def conservative_grid(res: int = 16) -> OccupancyGrid:
    """Every cell whose box meets the ball is occupied (measured analytically, not from samples)."""
    g = OccupancyGrid(-1.0, 1.0, res).double()
    idx = torch.arange(res, dtype=torch.float64)
    lo = -1.0 + idx * g.cell
    z, y, x = torch.meshgrid(lo, lo, lo, indexing="ij")
    corner = torch.stack([x, y, z], -1)
    nearest = torch.maximum(torch.minimum(CENTRE, corner + g.cell), corner)  # closest point of each cell
    meets = ((nearest - CENTRE) ** 2).sum(-1) < RADIUS**2
    g.density.copy_(torch.where(meets, math.inf, 0.0))
    g.mask.copy_(meets)  # exactly the cells that meet the ball: no dilation needed here
    return g


def test_cell_lookup_and_outside_points():
    g = OccupancyGrid(-2.0, 2.0, 4)  # cells of 1 unit
    g.mask.zero_()
    g.mask[3, 0, 1] = True  # [z, y, x]: x in [-1, 0), y in [-2, -1), z in [1, 2)
    pts = torch.tensor([[-0.5, -1.5, 1.5], [0.5, -1.5, 1.5], [-0.5, -1.5, 2.5], [-0.5, -2.5, 1.5]])
    assert g.occupied(pts).tolist() == [True, False, False, False]
    idx, inside = g.cell_index(pts[:1])
    assert idx.item() == (3 * 4 + 0) * 4 + 1 and inside.item()


def test_cells_empty_after_the_decay_predicts():
    """A field at 10x the threshold everywhere, then zero: a cell's estimate decays by 0.95 per update, so it
    stays occupied while 0.95^k * 10 >= 1, i.e. for k < ln 10 / -ln 0.95 = 44.9 updates."""
    g = OccupancyGrid(-1.0, 1.0, 4, alpha=0.01, decay=0.95)
    assert g.mask.all()  # a new grid is full
    assert g.threshold == pytest.approx(-math.log(0.99) / 0.5)
    g.update(lambda p: torch.full((len(p),), 10 * g.threshold))
    k_empty = math.ceil(math.log(10) / -math.log(0.95))
    for k in range(1, k_empty + 1):
        g.update(lambda p: torch.zeros(len(p)))
        assert bool(g.mask.all()) == (k < k_empty), k
    assert not g.mask.any()


def test_update_marks_the_field_and_dilates_one_cell():
    field = ball_field(torch.tensor(50.0, dtype=torch.float64))
    density = lambda p: field(p.double(), p.double())[0]  # noqa: E731
    g = OccupancyGrid(-1.0, 1.0, 8)
    g.update(density, fraction=1.0)
    c = (torch.arange(8) + 0.5) * g.cell - 1.0
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    dist = ((torch.stack([x, y, z], -1).double() - CENTRE) ** 2).sum(-1).sqrt()
    assert g.mask[dist < RADIUS - g.cell].all()  # every cell well inside the ball
    assert not g.mask[dist > RADIUS + 3 * g.cell].any()  # nothing two cells beyond its dilated rim
    half = OccupancyGrid(-1.0, 1.0, 8)
    half.update(density, fraction=0.5)
    assert torch.isinf(half.density).sum() == 8**3 // 2  # the other half is not yet measured: still occupied


@pytest.mark.parametrize("train", [False, True])
def test_skipping_equals_full_rendering_where_the_grid_is_conservative(train):
    amplitude = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    field = ball_field(amplitude)
    grid = conservative_grid()
    assert grid.mask.float().mean() < 0.1  # most of the box is skipped
    cam = orbit_cameras(2, (12, 12))
    o, d = (x.reshape(2, -1, 3) for x in cam.rays())
    results = []
    for occ in (None, grid):
        r = NeRFRenderer(n_coarse=96, n_fine=0, near=2.0, far=6.0).train(train)
        torch.manual_seed(1)  # the same jittered samples in both
        out = r.render_rays(field, o, d, occupancy=occ)
        (g,) = torch.autograd.grad(out.rgb.sum() + out.depth.sum(), amplitude)
        results.append((out, g))
    (full, g_full), (skip, g_skip) = results
    assert full.opacity.max() > 0.5 and full.opacity.min() < 1e-9  # the ball is hit and missed
    for a, b in zip(full[:3], skip[:3]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_full, g_skip, atol=1e-9, rtol=1e-9)
    empty = OccupancyGrid(-1.0, 1.0, 4).double()
    empty.mask.zero_()  # a grid that is not conservative loses the object: the check above can fail
    assert NeRFRenderer(96, 0, near=2.0, far=6.0).eval().render_rays(field, o, d, occupancy=empty).opacity.max() == 0


def test_carving_keeps_every_cell_of_the_object():
    """Silhouettes of the ball computed analytically (a pixel is foreground iff its ray passes within R of the
    centre): every cell that meets the ball survives carving, and most of the box does not."""
    cam = orbit_cameras(6, (24, 24), dist=3.0)
    o, d = cam.rays()
    d = d / d.norm(dim=-1, keepdim=True)
    along = ((CENTRE - o) * d).sum(-1, keepdim=True)
    miss = (o + along * d - CENTRE).norm(dim=-1)
    masks = miss < RADIUS
    g = OccupancyGrid(-1.0, 1.0, 16).double()
    kept = g.carve(masks, cam)
    must = conservative_grid(16).mask
    assert g.allowed[must].all() and g.mask[must].all()
    assert kept == pytest.approx(g.allowed.double().mean().item()) and kept < 0.35
    g.update(lambda p: torch.full((len(p),), 1e3, dtype=p.dtype))  # a field dense everywhere
    assert torch.equal(g.mask, g.allowed)  # stays inside the hull
