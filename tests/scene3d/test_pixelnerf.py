"""The NeRF-AE's pixel-conditioned field (scene3d.pixelnerf): visual-hull skipping, views per query camera, old runs."""

from dataclasses import asdict

import torch

from renderers.cameras import Camera, look_at
from scene3d.autoencoders import AEConfig, SceneAE
from scene3d.pixelnerf import PixelField


def one_view(S: int = 16) -> tuple[torch.Tensor, Camera]:
    """A black image with a white square over its central 8 x 8 pixels, seen from -z at distance 10."""
    img = torch.zeros(1, 1, 3, S, S)
    img[..., 4:12, 4:12] = 1.0
    R, t = look_at(torch.tensor([[0.0, 0.0, -10.0]]), torch.zeros(1, 3))
    return img, Camera(R, t, torch.full((1, 2), 16.0), torch.full((1, 2), S / 2), (S, S))


def test_points_on_a_context_views_background_have_no_density_and_skip_the_mlps():
    torch.manual_seed(0)
    field = PixelField(latent_dim=4, lo=-4.0, hi=4.0, background=(0.0, 0.0, 0.0))
    img, cam = one_view()
    views = field.context(img, cam)
    # the square covers pixels 4-12 of 16 at focal 16 and depth 10: |x|, |y| < 2.5 world units at z = 0
    pts = torch.tensor([[[0.0, 0.0, 0.0], [1.5, -1.5, 2.0], [3.5, 0.0, 0.0], [0.0, 3.5, 0.0],
                         [0.0, 0.0, -12.0]]])  # inside, inside, background, background, behind the camera
    calls = []
    field.head.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    sigma, rgb = field(pts, torch.nn.functional.normalize(torch.ones(1, 5, 3), dim=-1), torch.zeros(1, 4), views)
    assert (sigma[0, [0, 1, 4]] > 0).all() and (sigma[0, 2:4] == 0).all() and (rgb[0, 2:4] == 0).all()
    assert calls == [3]  # the field's MLPs ran on the three points that are not carved only


def test_render_gives_each_query_camera_its_own_scenes_views():
    torch.manual_seed(0)
    cfg = AEConfig(kind="nerf", latent_dim=8, image_size=16, lo=-4.0, hi=4.0)
    model = SceneAE(cfg).eval()
    img, cam = one_view()
    imgs = torch.cat([img, torch.zeros_like(img)])  # scene 1's only view is all background: nothing is left
    cams = Camera(cam.R.repeat(2, 1, 1), cam.t.repeat(2, 1), cam.focal.repeat(2, 1), cam.principal.repeat(2, 1),
                  cam.image_size)
    with torch.no_grad():
        state = model.infer(imgs, cams)
        out = model.render(state, Camera(cams.R.repeat_interleave(2, 0), cams.t.repeat_interleave(2, 0),
                                         cams.focal.repeat_interleave(2, 0), cams.principal.repeat_interleave(2, 0),
                                         cams.image_size), per_scene=2)
    assert out.shape == (4, 3, 16, 16)
    assert out[2:].abs().max() == 0  # scene 1's two renderings: empty space over the black background
    assert out[:2, :, 6:10, 6:10].amax() > 0  # scene 0's: its faint initial fog inside the square
    assert torch.allclose(out[0], out[1])  # the same camera twice


def test_nerf_runs_from_before_the_pixel_field_load_as_latent_only(tmp_path):
    cfg = AEConfig(kind="nerf", latent_dim=8, image_size=16, lift=0)
    old = SceneAE(cfg)
    settings = {"ae": asdict(cfg) | {"lift": 16}, "per_scene": False}  # they recorded the voxel's lift, unused
    torch.save({"settings": settings, "model": old.state_dict()}, tmp_path / "checkpoint.pt")
    model, _ = SceneAE.from_run(tmp_path)
    assert model.decoder.pixel is None and model.cfg.lift == 0


def test_amortised_nerf_fits_the_query_views_foreground_with_its_opacity():
    # a context all background carves every sample, so the opacity is 0; a query view all foreground then costs
    # silhouette_weight * mean((0 - 1)^2) / (2 sigma^2) = 1 / (2 * 0.1^2) = 50 per ray
    torch.manual_seed(0)
    cfg = AEConfig(kind="nerf", latent_dim=8, image_size=16, rays=64, lo=-4.0, hi=4.0)
    model = SceneAE(cfg)
    img, cam = one_view()
    state = model.infer(torch.zeros_like(img), cam)
    terms = model._reconstruction(state, torch.ones_like(img), cam)
    assert float(terms["silhouette"]) == 50.0
    fit = SceneAE(cfg, per_scene=True)  # a per-scene fit has no silhouette term
    assert set(fit._reconstruction(fit.decoder(None), torch.ones_like(img), cam)) == {"nll"}
