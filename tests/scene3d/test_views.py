"""The shared "project points into context views and read their features" (scene3d.views)."""

import torch

from renderers.cameras import Camera, look_at
from scene3d.views import camera_axes, sample_views


def two_cameras(S: int = 8) -> Camera:
    eye = torch.tensor([[0.0, 0.0, -6.0], [6.0, 0.0, 0.0]])
    R, t = look_at(eye, torch.zeros(2, 3))
    return Camera(R, t, torch.full((2, 2), 10.0), torch.full((2, 2), S / 2), (S, S))


def test_points_on_pixel_centres_read_those_pixels_at_every_level():
    torch.manual_seed(0)
    cams, S = two_cameras(), 8
    maps = [torch.rand(2, 3, S, S), torch.rand(2, 2, S // 2, S // 2)]
    # unproject pixel centres at depth 5: a point there must read exactly that pixel of the full-size map
    uv = torch.stack(torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="xy"), -1).reshape(1, -1, 2)
    o, d = cams.rays(uv.expand(2, -1, -1).float())
    depth = 5.0 / (d @ cams.R.transpose(1, 2))[..., 2:]  # view-space z of 5
    pts = o + depth * d
    feats, seen = sample_views(maps, cams, pts)
    assert feats.shape == (2, 5, S * S) and seen.shape == (2, 1, S * S) and bool(seen.all())
    assert torch.allclose(feats[:, :3], maps[0].reshape(2, 3, -1), atol=1e-5)
    # the half-size map at a full-size pixel centre: bilinear between its 2x2 cells (edges clamp to zero padding)
    coarse = torch.nn.functional.interpolate(maps[1], size=(S, S), mode="bilinear", align_corners=False)
    inner = torch.zeros(S, S, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    assert torch.allclose(feats[:, 3:].reshape(2, 2, S, S)[..., inner], coarse[..., inner], atol=1e-5)


def test_points_behind_a_camera_or_outside_its_image_read_zero_and_are_not_seen():
    cams = two_cameras()
    maps = [torch.ones(2, 4, 8, 8)]
    behind = torch.tensor([[[0.0, 0.0, -12.0]], [[12.0, 0.0, 0.0]]])  # on each camera's axis, behind it
    aside = torch.tensor([[[30.0, 0.0, 0.0]], [[0.0, 0.0, 30.0]]])  # far outside each image
    for pts in (behind, aside):
        feats, seen = sample_views(maps, cams, pts)
        assert feats.abs().max() == 0 and seen.max() == 0
    centre, seen = sample_views(maps, cams, torch.zeros(2, 1, 3))
    assert torch.allclose(centre, torch.ones(2, 4, 1)) and bool(seen.all())


def test_camera_axes_put_the_view_direction_last():
    cams = two_cameras()
    towards = torch.tensor([[[0.0, 0.0, 1.0]], [[-1.0, 0.0, 0.0]]])  # each camera's viewing direction, world
    assert torch.allclose(camera_axes(cams, towards), torch.tensor([0.0, 0.0, 1.0]).expand(2, 1, 3), atol=1e-6)
