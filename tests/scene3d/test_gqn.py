"""GQN: representation networks, the annealed ELBO, data/model checks, and the CLI end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from plato_core.runinfo import UserError
from scene3d.cli import main
from scene3d.gqn import GQN, SIGMA_SHARE, Epipolar, GQNConfig, Pool, Pyramid, Tower, extended_viewpoints
from scene3d.gqn_eval import nearest_context

TINY = dict(image_size=16, r_channels=8, hidden=8, z_channels=2, canvas_channels=8, gen_steps=2, kernel=3,
            sigma_anneal_steps=10, max_contexts=3)


@pytest.mark.parametrize("net, shape", [(Tower, (2, 16, 8, 8)), (Pool, (2, 16, 1, 1))])
def test_tower_and_pool_shapes(net, shape):
    assert net(3, 16)(torch.rand(2, 3, 32, 32), torch.randn(2, 7)).shape == shape


@pytest.mark.parametrize("size", [32, 64])
def test_pyramid_shape(size):
    assert Pyramid(3, 16, 7, size)(torch.rand(2, 3, size, size), torch.randn(2, 7)).shape == (2, 16, 1, 1)


def fake_batch(B=3, V=4, S=16):
    from renderers.cameras import look_at

    eye = torch.randn(B * V, 3) * 3
    R, t = look_at(eye, torch.zeros(B * V, 3), up=(0.0, 0.0, 1.0))
    return {"images": torch.rand(B, V, 3, S, S), "R": R.view(B, V, 3, 3), "t": t.view(B, V, 3),
            "focal": torch.full((B, V, 2), 20.0), "principal": torch.full((B, V, 2), S / 2)}


def test_epipolar_points_of_a_context_seen_from_itself_read_its_own_pixels():
    # query camera == context camera: every point on the ray through a 2x2 pixel block's centre projects
    # back there, so the sampled image channels are that block's mean at every depth
    torch.manual_seed(0)
    batch = fake_batch(B=2, V=1, S=16)
    v = extended_viewpoints(batch)
    net = Epipolar(3, 8, image_size=16, depth_samples=5, scene_radius=3.0)
    _, f, seen, frac = net.gather(batch["images"], v, v[:, 0])
    block_mean = torch.nn.functional.avg_pool2d(batch["images"][:, 0], 2)  # (B, 3, 8, 8)
    rgb = f[:, 0, -3:].transpose(1, 2).reshape(2, 8, 8, 5, 3)
    assert torch.allclose(rgb, block_mean.permute(0, 2, 3, 1)[:, :, :, None].expand_as(rgb), atol=1e-5)
    assert seen.all() and (frac > 0).all() and (frac < 1).all()
    assert net(batch["images"], v, v[:, 0]).shape == (2, 8, 4, 4)


@pytest.mark.parametrize("rep", ["pool", "tower", "pyramid", "epipolar"])
def test_loss_terms_and_sigma_annealing(rep):
    torch.manual_seed(0)
    model = GQN(GQNConfig(representation=rep, **TINY))
    out = model.loss(fake_batch(), step=0)
    assert {"loss", "kl", "mse", "sigma", "bits_per_dim"} <= set(out) and out["loss"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in model.rep.parameters())
    assert model.sigma(0) == 2.0 and model.sigma(5) == pytest.approx(1.35) and model.sigma(100) == 0.7


def test_sigma_anneals_over_a_share_of_the_budget_by_default():
    model = GQN(GQNConfig(**{**TINY, "sigma_anneal_steps": None}))
    assert model.sigma(10_000) == 2.0  # nothing of the budget spent yet, whatever the step
    model.set_progress(SIGMA_SHARE / 2)
    assert model.sigma(0) == pytest.approx(1.35)
    model.set_progress(SIGMA_SHARE)
    assert model.sigma(0) == pytest.approx(0.7)
    model.set_progress(1.0)
    assert model.sigma(0) == pytest.approx(0.7)


def test_check_batch_names_the_mismatch():
    model = GQN(GQNConfig(**TINY))
    with pytest.raises(UserError, match=r"\(3, 16, 16\)"):
        model.check_batch(fake_batch(S=32))
    with pytest.raises(UserError, match="at least 2"):
        model.check_batch(fake_batch(V=1))


def test_nearest_context_by_direction():
    eye = torch.eye(3)[None].clone()  # contexts along +x, +y, +z
    from renderers.cameras import look_at

    R, _ = look_at(torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0.1, 4.0], [3.0, 0.5, 0]]), torch.zeros(4, 3),
                   up=(0.0, 0.0, 1.0))
    assert eye.shape == (1, 3, 3)
    assert nearest_context(R[None, :3], R[3:]).item() == 0


def test_cli_data_train_eval_probe(tmp_path, capsys):
    d, run = tmp_path / "sm", tmp_path / "run"
    assert main(["data", "shepard-metzler", "--scenes", "12", "--views", "4", "--size", "16", "--out", str(d),
                 "--renderer", "pytorch3d", "--quiet"]) == 0
    args = ["train", "gqn", "--data", str(d), "--out", str(run), "--steps", "4", "--batch-size", "4", "--quiet",
            "--image-size", "16", "--r-channels", "8", "--hidden", "8", "--canvas-channels", "8", "--gen-steps", "2",
            "--max-contexts", "3"]
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["gqn"]["gen_steps"] == 2 and cfg["settings"]["train"]["steps"] == 4
    assert main(args) == 2  # the run exists: needs --resume
    wrong = [a if a != "16" else "32" for a in args]
    wrong[wrong.index(str(run))] = str(tmp_path / "run2")
    assert main(wrong) == 2  # data / model image size disagree
    guess = [a for a in args if a not in ("--image-size", "16")]
    guess[guess.index(str(run))] = str(tmp_path / "run3")
    assert main(guess) == 0  # no --image-size: the data's 16 px
    assert json.loads((tmp_path / "run3" / "config.json").read_text())["settings"]["gqn"]["image_size"] == 16
    assert main(["eval", str(run), "--data", str(d), "--contexts", "1", "3"]) == 0
    m = json.loads((run / "metrics.json").read_text())["metrics"]
    assert set(m) == {"1", "3"} and {"gqn", "mean_image", "nearest_context"} == set(m["3"])
    assert {"mse", "psnr", "masked_psnr", "ssim", "elbo_bits_per_dim"} <= set(m["3"]["gqn"])
    assert (run / "samples.png").is_file()
    assert main(["eval", str(run), "--data", str(d), "--contexts", "4"]) == 2  # needs a query view
    assert main(["probe", str(run), "--data", str(d), "--contexts", "3"]) == 0
    p = json.loads((run / "probe.json").read_text())["probes"]
    assert "first_cube_color" in p and np.isfinite(p["first_cube_color"]["r"])
    assert "n_cubes" not in p  # constant in this data set
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(d)]) == 2


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "scene3d.cli", "train", "gqn", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--minutes" in out.stdout and "--representation" in out.stdout


def test_cli_grad_clip_bounds_the_gradient_norm_the_optimizer_sees(tmp_path):
    """`--grad-clip C`: every step's gradient reaches the optimizer with norm <= C; `--grad-clip 0` is off."""
    from tests.plato_core.test_trainer import grad_norms_seen_by_optimizers

    d = tmp_path / "sm"
    assert main(["data", "shepard-metzler", "--scenes", "4", "--views", "4", "--size", "16", "--out", str(d),
                 "--renderer", "pytorch3d", "--quiet"]) == 0
    seen = {}
    for clip in ("1e-4", "0"):
        with grad_norms_seen_by_optimizers() as norms:
            assert main(["train", "gqn", "--data", str(d), "--out", str(tmp_path / clip), "--steps", "2",
                         "--batch-size", "2", "--quiet", "--image-size", "16", "--r-channels", "8", "--hidden", "8",
                         "--canvas-channels", "8", "--gen-steps", "2", "--grad-clip", clip]) == 0
        seen[clip] = norms
    assert len(seen["1e-4"]) == 2 and max(seen["1e-4"]) <= 1e-4 * (1 + 1e-4)
    assert len(seen["0"]) == 2 and min(seen["0"]) > 1e-2  # unclipped, the same steps have far larger gradients


def test_data_scales_from_cameras_and_bounds():
    """Cameras 5 units from the origin: position_scale 1/5; scene_radius the bounds' half-size, else 5."""
    from types import SimpleNamespace

    import numpy as np

    from scene3d.gqn import data_scales

    R = np.broadcast_to(np.eye(3), (2, 3, 3, 3)).copy()
    t = np.broadcast_to(np.array([0.0, 0.0, -5.0]), (2, 3, 3)).copy()  # centre -R^T t = (0, 0, 5)
    got = data_scales(SimpleNamespace(R=R, t=t, meta={}))
    assert np.isclose(got["position_scale"], 0.2) and np.isclose(got["scene_radius"], 5.0)
    got = data_scales(SimpleNamespace(R=R, t=t, meta={"occupancy": {"bounds": [-2, -2, -1.5, 2, 2, 1.5]}}))
    assert np.isclose(got["scene_radius"], 2.0)
