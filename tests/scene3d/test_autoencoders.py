"""Voxel / mesh / NeRF autoencoders: shapes, the product-of-experts encoder, a per-scene fit that recovers
a known cube, and the CLI end to end (fit -> export -> view -> render) on a tiny NeRF-Blender folder."""

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from renderers.cameras import Camera, look_at
from renderers.voxel import VoxelRenderer
from scene3d.ae_eval import calibrate_level, carved_hull, turntable_cameras
from scene3d.autoencoders import (
    KINDS,
    AEConfig,
    ContextEncoder,
    SceneAE,
    SceneDecoder,
    SceneViews,
    make_decoder,
    occupancy_level,
    predicted_occupancy,
    resize_views,
    smooth_modes,
    view_index,
)
from scene3d.data import MultiViewDataset, camera_arrays
from scene3d.geometry_metrics import voxel_centers, voxel_iou


def ring_cameras(n: int, size: int, dist: float = 8.0, elev: float = 0.4) -> Camera:
    az = torch.arange(n) * (2 * math.pi / n) + 0.3
    eye = dist * torch.stack([math.cos(elev) * torch.cos(az), math.cos(elev) * torch.sin(az),
                              torch.full_like(az, math.sin(elev))], -1)
    R, t = look_at(eye, torch.zeros(n, 3), up=(0.0, 0.0, 1.0))
    return Camera.create(R, t, (size, size), fov=0.8)


def cube_grid(res: int = 16, half: float = 1.5, lo: float = -4, hi: float = 4) -> torch.Tensor:
    """(res, res, res) bool: a cube of half-side ``half`` at the origin, [z, y, x]."""
    return (voxel_centers(res, lo, hi).abs().amax(-1) < half)


def cube_views(n: int = 8, size: int = 16) -> tuple[torch.Tensor, Camera, torch.Tensor]:
    """Images (n, 3, S, S) of an opaque orange cube on black, rendered by the voxel renderer."""
    occ = cube_grid()
    density = occ.float()[None, None] * 20.0
    rgb = torch.tensor([1.0, 0.5, 0.1]).reshape(1, 3, 1, 1, 1).expand(1, 3, *occ.shape)
    cams = ring_cameras(n, size)
    r = VoxelRenderer("emission_absorption", 64, size=8.0, background=0.0).eval()
    with torch.no_grad():
        return r(density, cams, rgb).clamp(0, 1), cams, occ


def tiny_batch(B: int = 2, V: int = 5, size: int = 16) -> dict:
    imgs, cams, _ = cube_views(V, size)
    arr = {k: torch.from_numpy(v) for k, v in camera_arrays(cams).items()}
    return {"images": imgs[None].expand(B, -1, -1, -1, -1).clone(),
            **{k: v[None].expand(B, *v.shape).clone() for k, v in arr.items()}}


def test_resize_views_keeps_projection():
    cams = ring_cameras(3, 32)
    imgs = torch.rand(3, 3, 32, 32)
    small, c2 = resize_views(imgs, cams, 16)
    assert small.shape == (3, 3, 16, 16) and c2.image_size == (16, 16)
    assert torch.allclose(small[0, 0, 0, 0], imgs[0, 0, :2, :2].mean())
    p = torch.tensor([[[0.7, -0.4, 1.1]]]).expand(3, 1, 3)
    assert torch.allclose(c2.project(p)[0], cams.project(p)[0] / 2, atol=1e-5)


def test_view_index_takes_the_same_views_of_every_scene():
    cams = ring_cameras(6, 8)  # 2 scenes of 3 views, scene-major
    sub = cams[view_index(2, 3, torch.tensor([2, 0]))]
    torch.testing.assert_close(sub.R, cams.R[[2, 0, 5, 3]])
    torch.testing.assert_close(sub.t, cams.t[[2, 0, 5, 3]])


@pytest.mark.parametrize("kind", KINDS)
def test_every_decoder_satisfies_the_scene_decoder_protocol(kind):
    """Each decoder has SceneDecoder's attributes and methods, takes their arguments in their order (extras only
    with defaults), and returns what the Protocol's docstrings promise."""
    torch.manual_seed(0)
    dec = make_decoder(AEConfig(kind=kind), per_scene=True)
    assert isinstance(dec, SceneDecoder) and dec.kind == kind and dec.latent_dim == 0
    for name in ("forward", "render", "occupancy", "surface", "regularisers"):
        want = list(inspect.signature(getattr(SceneDecoder, name)).parameters)[1:]  # without self
        have = list(inspect.signature(getattr(dec, name)).parameters.values())
        assert [p.name for p in have[:len(want)]] == want, (kind, name)
        assert all(p.default is not inspect.Parameter.empty for p in have[len(want):]), (kind, name)
    with torch.no_grad():
        state = dec(None)
        images = dec.render(state, ring_cameras(2, 8), per_scene=2)
        occ = dec.occupancy(state, torch.zeros(5, 3), occupancy_level(AEConfig(kind=kind)))
        verts, faces, colors = dec.surface(state, 0, 0.0)
    assert images.shape[0] == 2 and images.shape[1] in (3, 4) and images.shape[2:] == (8, 8)
    assert occ.shape == (1, 5) and occ.dtype == torch.bool
    assert verts.shape[-1] == faces.shape[-1] == colors.shape[-1] == 3 and len(colors) == len(verts)
    assert all(v.dim() == 0 for v in dec.regularisers(state).values())


def test_encoder_product_of_experts_sharpens_with_views():
    torch.manual_seed(0)
    enc = ContextEncoder(16, 8, scale=4.0, width=8)
    imgs, cams, _ = cube_views(1, 16)
    mu1, lv1 = enc(imgs[None], cams)
    k = 3
    mu3, lv3 = enc(imgs[None].expand(1, k, -1, -1, -1), Camera.cat([cams] * k))
    # k identical experts: same mean, precision times k
    assert torch.allclose(mu3, mu1, atol=1e-5)
    assert torch.allclose(lv3, lv1 - math.log(k), atol=1e-5)


@pytest.mark.parametrize("kind", ["voxel", "mesh", "nerf"])
def test_amortised_loss_trains_every_part(kind):
    torch.manual_seed(0)
    cfg = AEConfig(kind=kind, latent_dim=8, image_size=16, contexts=(1, 2), queries=2, rays=64, encoder_width=8)
    model = SceneAE(cfg)
    batch = tiny_batch()
    model.check_batch(batch)
    out = model.loss(batch, 0)
    assert torch.isfinite(out["loss"]) and out["kl"] >= 0
    out["loss"].backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches the {kind} {part}"


@pytest.mark.slow  # ~20 s on an idle 2-core machine, minutes on a busy one
def test_per_scene_voxel_fit_recovers_the_cube():
    torch.manual_seed(0)
    imgs, cams, occ = cube_views(8, 16)
    arr = camera_arrays(cams)
    ds = MultiViewDataset((imgs.permute(0, 2, 3, 1)[None].numpy() * 255).round().astype(np.uint8),
                          *(arr[k][None] for k in ("R", "t", "focal", "principal")))
    views = SceneViews(ds, 0)
    cfg = AEConfig(kind="voxel", image_size=16)
    model = SceneAE(cfg, per_scene=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    batch = {k: torch.stack([views[i][k] for i in range(len(views))]) for k in ("images", "R", "t", "focal",
                                                                                  "principal")}
    first = None
    for step in range(60):
        loss = model.loss(batch, step)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        pred = predicted_occupancy(model, model.decoder(None), res=16)[0]
    # 8 views of 16 px see the cube's 6-cell sides as ~4 px: a coarse but clear recovery (empty grid: IoU 0)
    assert voxel_iou(pred, occ).item() > 0.5


def test_predicted_occupancy_fills_a_hollow_shell():
    cfg = AEConfig(kind="voxel")
    model = SceneAE(cfg, per_scene=True)
    solid = cube_grid(32, 2.0)
    shell = solid & ~cube_grid(32, 1.5)
    state = {"density": shell.float()[None, None] * 100.0, "rgb": torch.zeros(1, 3, 32, 32, 32)}
    assert voxel_iou(predicted_occupancy(model, state, 32, fill=False)[0], solid) < 0.7
    assert voxel_iou(predicted_occupancy(model, state, 32)[0], solid).item() == 1.0


def test_calibrated_level_finds_a_faint_solid():
    # a fitted scene whose cube holds density at 0.2x the half-opaque level: the default threshold sees
    # nothing; calibration against the hull carved from the views must pick a level that keeps the cube
    imgs, cams, _ = cube_views(8, 32)
    arr = camera_arrays(cams)
    ds = MultiViewDataset((imgs.permute(0, 2, 3, 1)[None].numpy() * 255).round().astype(np.uint8),
                          *(arr[k][None] for k in ("R", "t", "focal", "principal")),
                          meta={"background": [0.0, 0.0, 0.0], "occupancy": {"bounds": [-4.0] * 3 + [4.0] * 3}})
    cfg = AEConfig(kind="voxel", image_size=32)
    model = SceneAE(cfg, per_scene=True)
    dec = model.decoder
    solid = cube_grid(32, 1.5)
    faint = 0.2 * occupancy_level(cfg) * dec.cell / dec.density_scale  # softplus(raw - 2) at the cube
    with torch.no_grad():
        dec.grid[0, 0] = torch.where(solid, math.log(math.expm1(faint)) + 2.0, -30.0)
    report = calibrate_level(model, ds, scenes=1, progress=False)
    hull_iou = voxel_iou(carved_hull(ds, 0), solid).item()
    assert report["iou_vs_hull"]["1"] == 0.0
    assert report["level_scale"] <= 0.2
    assert report["iou_vs_hull"][f"{report['level_scale']:g}"] == pytest.approx(hull_iou)
    assert 0.3 < hull_iou < 1.0  # 8 ring views carve a hull larger than the cube


def test_mesh_template_occupancy_is_its_ball():
    model = SceneAE(AEConfig(kind="mesh"), per_scene=True)
    occ = predicted_occupancy(model, model.decoder(None), 24)[0]
    ball = voxel_centers(24, -4, 4).norm(dim=-1) < 0.3 * 8
    assert voxel_iou(occ, ball).item() > 0.9


def test_turntable_cameras_look_at_the_target():
    cams = turntable_cameras(6, 32, distance=8.0, fov=0.8, target=(0.5, 0.0, 0.2))
    uv, depth = cams.project(torch.tensor([[[0.5, 0.0, 0.2]]]).expand(6, 1, 3))
    assert torch.allclose(uv, torch.full_like(uv, 16.0), atol=1e-4) and (depth > 0).all()
    assert torch.allclose(cams.center[:, 2], torch.full((6,), 0.2 + 8 * math.sin(0.5)), atol=1e-4)


def write_nerf_folder(root: Path, n_train: int = 6, n_test: int = 2, size: int = 16) -> None:
    imgs, cams, _ = cube_views(n_train + n_test, size)
    for split, idx in (("train", range(n_train)), ("test", range(n_train, n_train + n_test))):
        frames = []
        for i in idx:
            name = f"{split}_{i}.png"
            Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / name)
            frames.append({"file_path": name, "transform_matrix": cams[i].to_opengl_c2w()[0].tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.8, "frames": frames}))


def scene3d(*args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "scene3d"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_fit_export_view_render(tmp_path):
    write_nerf_folder(tmp_path)
    run = tmp_path / "run"
    r = scene3d("fit", "voxel", "--data", tmp_path / "transforms_train.json", "--out", run, "--steps", 3,
                "--background", 0, 0, 0)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_views"] == 2 and "psnr" in metrics["test"][0]
    assert scene3d("export", run, "--out", tmp_path / "m.ply", "--level", 0.01).returncode == 0
    r = scene3d("view", tmp_path / "m.ply", "--out", tmp_path / "snap.png", "--size", 64)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "snap.png").size == (64, 64)
    r = scene3d("render", run, "--turntable", "--frames", 3, "--out", tmp_path / "spin.gif")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "spin.gif").n_frames == 3


def test_cli_train_calibrate_eval_beside_gqn(tmp_path):
    from scene3d.ae_eval import LEVEL_SCALES
    from scene3d.cli import main

    d, ae, gqn = tmp_path / "sm", tmp_path / "ae", tmp_path / "gqn"
    assert main(["data", "shepard-metzler", "--scenes", "6", "--views", "4", "--size", "16", "--out", str(d),
                 "--renderer", "pytorch3d", "--quiet"]) == 0
    assert main(["train", "voxel", "--data", str(d), "--out", str(ae), "--steps", "2", "--contexts", "1",
                 "--batch-size", "2", "--image-size", "16"]) == 0
    calib = json.loads((ae / "calibration.json").read_text())  # written by train
    assert calib["level_scale"] in LEVEL_SCALES and calib["scenes"] == 6 and calib["hull_views"] == 4
    assert main(["train", "gqn", "--data", str(d), "--out", str(gqn), "--steps", "2", "--batch-size", "2", "--quiet",
                 "--image-size", "16", "--r-channels", "8", "--hidden", "8", "--canvas-channels", "8",
                 "--gen-steps", "2", "--representation", "epipolar", "--depth-samples", "4"]) == 0
    assert main(["eval", str(ae), "--data", str(d), "--contexts", "1", "2", "--queries", "2",
                 "--with-gqn", str(gqn)]) == 0
    m = json.loads((ae / "metrics.json").read_text())
    assert m["occupancy_level_scale"] == calib["level_scale"] and 0 <= m["1"]["iou"] <= 1
    assert set(m["gqn"]) == {"run", "1", "2"} and m["gqn"]["2"]["scenes"] == 6
    assert {"mse", "psnr", "masked_psnr", "ssim"} <= set(m["gqn"]["1"])


def test_cli_user_errors(tmp_path):
    r = scene3d("fit", "nerf", "--data", tmp_path / "missing", "--out", tmp_path / "run", "--steps", 1)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = scene3d("export", tmp_path, "--out", tmp_path / "m.ply")
    assert r.returncode == 2 and "error:" in r.stderr


def test_binary_regulariser_is_zero_for_empty_or_opaque_cells():
    """alpha * (1 - alpha) per cell: 1/4 when every cell is half opaque, ~0 for empty or opaque cells."""
    from scene3d.autoencoders import VoxelDecoder

    dec = VoxelDecoder(0, -4.0, 4.0, res=8)
    half = torch.full((1, 1, 8, 8, 8), math.log(2) / dec.cell)
    assert abs(dec.regularisers({"density": half})["binary"].item() - 0.25) < 1e-6
    solid = torch.zeros(1, 1, 8, 8, 8)
    solid[..., :4] = 100 / dec.cell
    assert dec.regularisers({"density": solid})["binary"].item() < 1e-6


def test_cli_fit_nerf_by_steps_alone_writes_metrics_and_keeps_its_folder(tmp_path, capsys):
    """`fit nerf --steps N` without --minutes scores the test views and writes metrics.json (it crashed after
    training); a second fit into the same --out is refused without --resume / --overwrite, writing nothing."""
    from scene3d.cli import main

    write_nerf_folder(tmp_path, n_train=4, n_test=1, size=8)
    run = tmp_path / "run"
    args = ["fit", "nerf", "--data", str(tmp_path / "transforms_train.json"), "--out", str(run), "--steps", "2",
            "--rays", "32", "--batch-size", "2"]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["end"]["steps"] == 2 and "psnr" in metrics["test"]["end"]
    assert (run / "test_2steps.png").is_file()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((run / "metrics.json").read_text())["test"]["end"]["steps"] == 2


@pytest.mark.parametrize("field", ["grid", "mlp"])
def test_cli_fit_nerf_eval_at_keys_the_scores_by_minutes(tmp_path, field):
    """`fit nerf --eval-at A B` scores the test views after A and after B minutes of training (one run that
    continues): metrics.json maps "A" and "B" to PSNR, masked PSNR and SSIM, with the minutes trained."""
    from scene3d.cli import main

    write_nerf_folder(tmp_path, n_train=4, n_test=2, size=8)
    run = tmp_path / "run"
    assert main(["fit", "nerf", "--data", str(tmp_path), "--out", str(run), "--eval-at", "0.01", "0.02",
                 "--rays", "16", "--samples", "16", "--batch-size", "2", "--field", field]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert list(m["test"]) == ["0.01", "0.02"] and m["test_views"] == 2
    first, second = m["test"]["0.01"], m["test"]["0.02"]
    assert 0.01 <= first["minutes"] < second["minutes"] and first["steps"] < second["steps"]
    assert {"psnr", "masked_psnr", "ssim"} <= set(second)
    assert m["background"] == [0.0, 0.0, 0.0]  # estimated from the views: an orange cube on black
    assert (run / "test_0.01min.png").is_file() and (run / "test_0.02min.png").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--eval-at", "2", "1"], "--eval-at 2 1: expected increasing positive minutes"),
    (["--eval-at", "1", "--minutes", "2"], "--eval-at and --minutes"),
    (["--steps", "1", "--box", "4", "-4"], "--box 4 -4: expected LO < HI"),
    (["--steps", "1", "--background", "2", "0", "0"], "--background 2 0 0: expected three values in [0, 1]"),
    (["--steps", "1", "--samples", "0"], "--samples: expected a positive number"),
    ([], "give a budget"),
])
def test_cli_fit_bad_flags_one_line_exit_2(tmp_path, capsys, flags, message):
    from scene3d.cli import main

    write_nerf_folder(tmp_path, n_train=2, n_test=1, size=8)
    assert main(["fit", "nerf", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_fit_grid_grows_and_resumes(tmp_path, monkeypatch):
    """The grid field grows on schedule during a fit, and a run whose grid grew resumes in a fresh model."""
    from scene3d.autoencoders import FieldDecoder
    from scene3d.cli import main

    monkeypatch.setattr(FieldDecoder, "GRID_GROWTH", {2: 40})
    write_nerf_folder(tmp_path, n_train=4, n_test=1, size=8)
    run = tmp_path / "run"
    args = ["fit", "nerf", "--data", str(tmp_path), "--out", str(run), "--rays", "16", "--samples", "16",
            "--batch-size", "2"]
    assert main([*args, "--steps", "3"]) == 0
    assert main([*args, "--steps", "4", "--resume"]) == 0
    model, _ = SceneAE.from_run(run)
    assert model.decoder.field.res == 40 and model.cfg.field == "grid"
    assert json.loads((run / "metrics.json").read_text())["test"]["end"]["steps"] == 4


def test_estimate_background_reads_the_border():
    from scene3d.data import estimate_background

    imgs = torch.zeros(3, 3, 10, 10)
    imgs[:, 0], imgs[:, 1], imgs[:, 2] = 0.2, 0.6, 1.0
    imgs[:, :, 2:8, 2:8] = torch.rand(3, 3, 6, 6)  # objects inside the frame
    imgs[0, :, 0, :3] = 0.0  # a few border pixels of another colour do not move the median
    assert estimate_background(imgs) == tuple(round(c * 255) / 255 for c in (0.2, 0.6, 1.0))


def test_cli_binary_weight_scales_the_binary_term_in_the_loss(tmp_path):
    """`train voxel --binary-weight W` adds W x the binary regulariser to the loss: from the same seed, the first
    step's logged terms agree and the totals differ by exactly (W1 - W0) x binary."""
    import csv

    from scene3d.cli import main

    d = tmp_path / "sm"
    assert main(["data", "shepard-metzler", "--scenes", "4", "--views", "4", "--size", "16", "--out", str(d),
                 "--renderer", "pytorch3d", "--quiet"]) == 0
    first = {}
    for w in ("0", "3"):
        run = tmp_path / f"w{w}"
        torch.manual_seed(0)  # the same initial model: `train voxel` builds it before the trainer seeds from --seed
        assert main(["train", "voxel", "--data", str(d), "--out", str(run), "--steps", "1", "--contexts", "1",
                     "--batch-size", "2", "--image-size", "16", "--latent", "8", "--lift", "0",
                     "--binary-weight", w]) == 0
        with open(run / "log.csv") as f:
            first[w] = {k: float(v) for k, v in next(csv.DictReader(f)).items() if k in ("loss", "binary", "kl")}
    assert first["3"]["binary"] == first["0"]["binary"] > 0 and first["3"]["kl"] == first["0"]["kl"]
    assert first["3"]["loss"] - first["0"]["loss"] == pytest.approx(3 * first["0"]["binary"], rel=1e-4)


def half_coloured_views(S: int = 16):
    """Two cameras 6 units from the origin, and their views: the first shows the left half of its image in
    (0.8, 0.2, 0.1) on a grey background, the second only the background."""
    bg, colour = torch.tensor([0.3, 0.3, 0.3]), torch.tensor([0.8, 0.2, 0.1])
    R, t = look_at(torch.tensor([[0.0, 0.0, -6.0], [6.0, 0.0, 0.0]]), torch.zeros(2, 3))
    cams = Camera(R, t, torch.full((2, 2), 10.0), torch.full((2, 2), S / 2), (S, S))
    images = bg[None, None, :, None, None].expand(1, 2, 3, S, S).clone()
    images[0, 0, :, :, : S // 2] = colour[:, None, None]
    return images, cams, bg, colour


def assert_half_coloured(points, rgb, cams, colour):
    """Points (P, 3) over the coloured half of view 0 have ``colour`` exactly (also where the bilinear read mixes
    it with the background), points over the background the neutral 0.5."""
    uv = cams.project(points.expand(2, -1, -1))[0][0]  # each point's pixel in view 0
    inside = ((uv > 0.5) & (uv < 15.5)).all(-1)  # away from the image's zero-padded border
    rgb, u = rgb[inside], uv[inside, 0]
    assert (u < 7.5).sum() > 50 and (u > 8.5).sum() > 50
    torch.testing.assert_close(rgb[u < 7.5], colour.expand(int((u < 7.5).sum()), 3), atol=1e-5, rtol=0)
    mixed = (u > 7.6) & (u < 8.4)
    torch.testing.assert_close(rgb[mixed], colour.expand(int(mixed.sum()), 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(rgb[u > 8.5], torch.full((int((u > 8.5).sum()), 3), 0.5))


def test_amortised_mesh_vertices_take_the_colour_of_the_context_pixels_under_them():
    """Before any training (the colour MLPs start at zero) each vertex's colour is the object's colour in the
    context views at its projection (see half_coloured_views). With the gain at 0 (runs from before it) every
    vertex is neutral."""
    from scene3d.autoencoders import MeshDecoder

    torch.manual_seed(0)
    images, cams, bg, colour = half_coloured_views()
    dec = MeshDecoder(4, -4.0, 4.0, lift=4, background=tuple(bg.tolist()))
    out = dec(torch.randn(1, 4), dec.context(images, cams))
    assert_half_coloured(out["verts"], out["rgb"][0].detach(), cams, colour)
    with torch.no_grad():
        dec.view_colour.zero_()
    neutral = dec(torch.randn(1, 4), dec.context(images, cams))["rgb"]
    torch.testing.assert_close(neutral, torch.full_like(neutral, 0.5))


def test_amortised_voxel_cells_add_the_colour_of_the_context_pixels_to_their_colour_logit():
    """The VoxelAE's cells read the same colour (see half_coloured_views), and the decoder adds its logit with
    the gain: the output colour's logit moves by exactly gain * that logit."""
    from scene3d.autoencoders import VoxelDecoder
    from scene3d.geometry_metrics import voxel_centers

    torch.manual_seed(0)
    images, cams, bg, colour = half_coloured_views()
    dec = VoxelDecoder(4, -4.0, 4.0, res=16, lift=4, background=tuple(bg.tolist()))
    logit = dec.context_colour(images, cams)
    cells = voxel_centers(16, -4.0, 4.0).reshape(1, -1, 3)
    assert_half_coloured(cells, torch.sigmoid(logit).permute(0, 2, 3, 4, 1).reshape(-1, 3), cams, colour)
    z, lifted = torch.randn(1, 4), torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        dec.view_colour.fill_(0.7)
        plain, read = dec(z, lifted)["rgb"], dec(z, lifted, logit)["rgb"]
    torch.testing.assert_close(torch.logit(read) - torch.logit(plain), 0.7 * logit, atol=2e-4, rtol=0)


def test_amortised_nerf_samples_add_the_colour_of_the_context_pixels_to_their_colour_logit():
    """The NeRF-AE's field reads the same colour at each ray sample (one context view, the half-coloured one of
    half_coloured_views). With its head's last layer at zero, samples over the coloured half have exactly that
    colour; samples over the background are carved (no density, no colour); with the gain at 0, 0.5."""
    from scene3d.pixelnerf import PixelField

    torch.manual_seed(0)
    images, cams, bg, colour = half_coloured_views()
    images, cams = images[:, :1], cams[torch.tensor([0])]
    field = PixelField(4, -4.0, 4.0, tuple(bg.tolist()), channels=4)
    with torch.no_grad():
        field.head[-1].weight.zero_()
        field.head[-1].bias.zero_()
    pts = torch.rand(1, 3000, 3) * 6 - 3
    dirs = F.normalize(torch.randn(1, 3000, 3), dim=-1)
    views = field.context(images, cams)
    sigma, rgb = field(pts, dirs, torch.randn(1, 4), views)
    uv = cams.project(pts)[0][0]
    inside = ((uv > 0.5) & (uv < 15.5)).all(-1)
    left, right = inside & (uv[:, 0] < 7.5), inside & (uv[:, 0] > 8.5)
    assert left.sum() > 300 and right.sum() > 300
    torch.testing.assert_close(rgb[0, left].detach(), colour.expand(int(left.sum()), 3), atol=1e-5, rtol=0)
    assert sigma[0, right].max() == 0 and rgb[0, right].abs().max() == 0
    with torch.no_grad():
        field.view_colour.zero_()
    torch.testing.assert_close(field(pts, dirs, torch.randn(1, 4), views)[1][0, left],
                               torch.full((int(left.sum()), 3), 0.5))


def test_smooth_modes_of_the_ico_sphere_are_its_spherical_harmonics():
    """The graph Laplacian's smoothest modes on an ico-sphere: mode 0 is constant, modes 1-3 span the coordinate
    functions x, y, z (degree 1) up to the graph's unequal edges (2 % of their norm: the subdivided icosahedron's edges
    differ in length, which the uniform Laplacian ignores), and the modes are orthogonal with norm sqrt(V / k).
    An amortised MeshDecoder's first-stage offsets lie in their span."""
    from renderers.mesh import ico_sphere
    from scene3d.autoencoders import MeshDecoder

    verts, faces = ico_sphere(3)
    V, k = len(verts), 16
    modes = smooth_modes(faces, V, k).double()
    unit = modes / math.sqrt(V / k)
    torch.testing.assert_close(unit.T @ unit, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
    assert modes[:, 0].std() < 1e-6
    x = verts.double()
    fit = unit[:, 1:4] @ (unit[:, 1:4].T @ x)
    assert (fit - x).norm() / x.norm() < 0.03
    assert (unit[:, 4:].T @ x).norm() / x.norm() < 0.03  # and the higher modes hardly hold them
    dec = MeshDecoder(4, -4.0, 4.0, basis=k)
    with torch.no_grad():
        dec.net[-1].weight.normal_(std=0.01)
        raw = dec._raw(torch.randn(3, 4))
    offsets = raw[..., :3].double()
    torch.testing.assert_close(unit @ (unit.T @ offsets), offsets, atol=1e-5, rtol=0)
    assert offsets.abs().max() > 1e-3


class _BallBranch(torch.nn.Module):
    """A stand-in voxel branch: a ball of ``radius`` in one colour, whatever the latent and the views. Its density
    falls linearly through ``level`` at the radius (by one level per cell, clamped at 0), so that
    marching cubes, which interpolates linearly along the grid's edges, puts the surface at the radius."""

    def __init__(self, res: int, radius: float, colour, level: float):
        super().__init__()
        cells = voxel_centers(res, -4.0, 4.0)
        cell = 8.0 / res
        self.density = (level * (1 + (radius - cells.norm(dim=-1)) / cell).clamp_min(0))[None, None]
        self.rgb = torch.tensor(colour)[None, :, None, None, None].expand(1, 3, res, res, res)

    def forward(self, z, lifted, colour):
        return {"density": self.density.expand(len(z), -1, -1, -1, -1), "rgb": self.rgb.expand(len(z), -1, -1, -1, -1)}


def test_voxel_mesh_decoder_is_the_closed_iso_surface_of_its_voxel_branch():
    """The mesh is the voxel branch's iso-surface: for a branch predicting a ball of radius 2.5, the mesh is
    closed, its inside by ray parity is the ball (IoU > 0.95 against |p| < 2.5 at 24^3), its vertices lie within a
    tenth of a cell (0.025) of radius 2.5 (the sphere's curvature between grid edges), and before any training (the
    refinement's last layer is zero) each vertex has the branch's colour. With the default reach (0) a trained
    refinement changes the colours only: with random weights in its last layer the vertices stay on the ball."""
    from scene3d.autoencoders import VoxelMeshDecoder

    torch.manual_seed(0)
    images, cams, bg, _ = half_coloured_views()
    dec = VoxelMeshDecoder(4, -4.0, 4.0, background=tuple(bg.tolist()), lift=4)
    dec.voxel.forward = _BallBranch(dec.res, 2.5, (0.2, 0.6, 0.9), dec.level).forward
    with torch.no_grad():
        state = dec(torch.randn(1, 4), dec.context(images, cams))
        occ = dec.occupancy(state, voxel_centers(24, -4, 4).reshape(-1, 3), 0.0).reshape(24, 24, 24)
    verts, faces, rgb = dec.surface(state, 0, 0.0)
    assert voxel_iou(occ, voxel_centers(24, -4, 4).norm(dim=-1) < 2.5).item() > 0.95
    assert (verts.norm(dim=-1) - 2.5).abs().max() < 0.025
    torch.testing.assert_close(rgb, torch.tensor([[0.2, 0.6, 0.9]]).expand(len(verts), 3), atol=1e-4, rtol=0)
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    assert (torch.unique(edges, dim=0, return_counts=True)[1] == 2).all()  # closed: two faces at every edge
    torch.nn.init.normal_(dec.refine[-1].weight)
    with torch.no_grad():
        state = dec(torch.randn(1, 4), dec.context(images, cams))
    moved, _, rgb = dec.surface(state, 0, 0.0)
    assert (moved.norm(dim=-1) - 2.5).abs().max() < 0.025
    assert (rgb - torch.tensor([0.2, 0.6, 0.9])).abs().max() > 0.01  # the colours did change


def test_amortised_mesh_trains_its_voxel_branch_on_the_same_views():
    """The amortised mesh's loss fits the query views with the mesh and with the voxel branch it comes from: the
    refinement and the branch get gradients, and the branch's density (whose iso-surface has no gradient) learns
    from the branch's own images alone: without them its output layer's density weights get none."""
    torch.manual_seed(0)
    cfg = AEConfig(kind="mesh", latent_dim=8, image_size=16, contexts=(1,), queries=2, encoder_width=8)
    model = SceneAE(cfg)
    batch = tiny_batch()
    model.loss(batch, 0)["loss"].backward()
    for part in (model.decoder.voxel, model.decoder.refine):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    density_weights = lambda: model.decoder.voxel.up[-1].weight.grad[:, 0]  # noqa: E731 (in, out, k, k, k)
    assert density_weights().abs().sum() > 0
    model.zero_grad()
    model.decoder.auxiliary_render = None
    model.loss(batch, 0)["loss"].backward()
    assert density_weights().abs().sum() == 0


def test_mesh_runs_load_with_the_template_they_were_trained_with(tmp_path):
    """A mesh run loads as the decoder it was trained as, with its weights: the voxel-branch mesh (the default),
    and, when its settings have no ``mesh_template`` (runs from before the voxel branch), the ico-sphere."""
    from dataclasses import asdict

    from scene3d.autoencoders import MeshDecoder, VoxelMeshDecoder

    def round_trip(cfg: AEConfig, drop: str | None = None) -> tuple[SceneAE, SceneAE]:
        model = SceneAE(cfg)
        ae = {k: v for k, v in asdict(cfg).items() if k != drop}
        run = tmp_path / cfg.mesh_template
        run.mkdir()
        torch.save({"settings": {"ae": ae, "per_scene": False}, "model": model.state_dict()}, run / "checkpoint.pt")
        return model, SceneAE.from_run(run)[0]

    base = dict(kind="mesh", latent_dim=8, image_size=16, encoder_width=8)
    model, loaded = round_trip(AEConfig(**base))
    assert isinstance(loaded.decoder, VoxelMeshDecoder) and loaded.cfg.mesh_template == "voxel"
    assert loaded.decoder.reach == 0  # the default: colours refined, vertices where the iso-surface puts them
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"settings": {"ae": {k: v for k, v in asdict(AEConfig(**base)).items() if k != "mesh_reach"},
                             "per_scene": False}, "model": model.state_dict()}, old / "checkpoint.pt")
    assert SceneAE.from_run(old)[0].decoder.reach == 2 * loaded.decoder.voxel.cell  # as it was trained
    torch.testing.assert_close(loaded.decoder.per_view[0].weight, model.decoder.per_view[0].weight)
    model, loaded = round_trip(AEConfig(**base, mesh_template="sphere"), drop="mesh_template")
    assert isinstance(loaded.decoder, MeshDecoder) and loaded.cfg.mesh_template == "sphere"
    torch.testing.assert_close(loaded.decoder.net[-1].weight, model.decoder.net[-1].weight)
