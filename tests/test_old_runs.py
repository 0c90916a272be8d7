"""Run folders written before run format 2 (``tests/data/old_runs``, see its README) still load and work."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plato_core.runinfo import RUN_FORMAT, UserError, load_run, run_kind

ROOT = Path(__file__).resolve().parent.parent
OLD = ROOT / "tests" / "data" / "old_runs"


@pytest.fixture
def old(tmp_path):
    """A copy of the old runs (commands write metrics into run folders; the fixture must stay as it is)."""
    shutil.copytree(OLD, tmp_path / "old_runs")
    return tmp_path / "old_runs"


def _ca_coords(pdb: Path) -> np.ndarray:
    """C-alpha coordinates of the first model, read straight from the PDB columns."""
    xyz = []
    for line in pdb.read_text().splitlines():
        if line.startswith("ENDMDL"):
            break
        if line.startswith("ATOM") and line[12:16].strip() == "CA":
            xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
    return np.array(xyz)


@pytest.mark.parametrize("name, kind, cls", [("gqn", "gqn", "GQN"), ("voxel", "voxel", "SceneAE"),
                                             ("atom_vae", "atom-vae", "AtomVAE")])
def test_format1_runs_have_a_kind_and_load(name, kind, cls, monkeypatch):
    monkeypatch.chdir(ROOT)  # the atom-VAE record names its files relative to the repository, as old runs did
    cfg = json.loads((OLD / name / "config.json").read_text())
    assert "kind" not in cfg and "format" not in cfg  # really the old format
    assert run_kind(OLD / name) == kind
    model, settings = load_run(OLD / name)
    assert type(model).__name__ == cls and not model.training and isinstance(settings, dict)


def test_old_gqn_run_is_scored_by_eval(old):
    from scene3d.cli import main

    assert main(["eval", str(old / "gqn"), "--data", str(old / "sm"), "--contexts", "1"]) == 0
    m = json.loads((old / "gqn" / "metrics.json").read_text())["metrics"]["1"]
    assert np.isfinite(m["gqn"]["psnr"]) and m["gqn"]["psnr"] > 0


def test_old_voxel_run_is_scored_by_eval_and_keeps_its_calibration(old):
    from scene3d.cli import main

    model, _ = load_run(old / "voxel")
    assert model.cfg.level_scale == json.loads((old / "voxel" / "calibration.json").read_text())["level_scale"]
    assert main(["eval", str(old / "voxel"), "--data", str(old / "sm"), "--contexts", "1", "--queries", "2"]) == 0
    m = json.loads((old / "voxel" / "metrics.json").read_text())
    assert 0 <= m["1"]["iou"] <= 1 and m["1"]["scenes"] == 4


def test_old_atom_vae_run_decodes_without_its_particles(old, tmp_path):
    """``cryoem decode`` reads no particle image: it works with the particles gone. Two training steps barely
    move the decoder (initial output std 1e-3 Å), so z = 0 decodes to the starting model's C-alpha atoms."""
    shutil.rmtree(old / "sim")
    rec = json.loads((old / "atom_vae" / "model.json").read_text())
    rec["data"]["particles"] = str(tmp_path / "gone.star")
    (old / "atom_vae" / "model.json").write_text(json.dumps(rec))
    np.save(tmp_path / "z.npy", np.zeros((1, 2), np.float32))
    out = subprocess.run([sys.executable, "-m", "cryoem.cli", "decode", str(old / "atom_vae"), "--z",
                          str(tmp_path / "z.npy"), "--out", str(tmp_path / "z0.pdb")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got, want = _ca_coords(tmp_path / "z0.pdb"), _ca_coords(ROOT / "tests" / "data" / "1ubi.pdb")
    assert got.shape == want.shape == (76, 3)
    assert np.abs(got - want).max() < 0.1


def test_a_new_run_records_its_kind_and_format(tmp_path):
    from scene3d.cli import main

    run = tmp_path / "gqn"
    assert main(["train", "gqn", "--data", str(OLD / "sm"), "--out", str(run), "--steps", "1", "--batch-size", "2",
                 "--image-size", "16", "--hidden", "4", "--r-channels", "8", "--z-channels", "2",
                 "--canvas-channels", "4", "--gen-steps", "2", "--quiet"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["kind"], cfg["format"], cfg["model"]) == ("gqn", RUN_FORMAT, "scene3d.gqn:GQN")
    model, settings = load_run(run)
    old, _ = load_run(OLD / "gqn")  # the same flags gave the old run: its ``steps`` is read as ``gen_steps``
    # the epipolar defaults changed since (32 -> 16 features and points per ray): the old run keeps what it had
    assert (old.cfg.depth_samples, old.cfg.epipolar_features) == (32, 32)
    assert (model.cfg.depth_samples, model.cfg.epipolar_features) == (16, 16)
    # and the pixel sigma's annealing (2,000 steps -> the first 55% of the budget): the old run keeps its steps
    assert (old.cfg.sigma_anneal_steps, model.cfg.sigma_anneal_steps) == (2000, None)
    # and one query ray per 4x4 pixels instead of 2x2: the old run keeps its finer rays
    assert (old.cfg.ray_cell, model.cfg.ray_cell) == (2, 4)
    changed = {"depth_samples": 16, "epipolar_features": 16, "sigma_anneal_steps": None, "ray_cell": 4}
    assert model.cfg == dataclasses.replace(old.cfg, **changed) and model.cfg.gen_steps == 2
    assert settings["data"] == str(OLD / "sm")


def test_not_a_run_is_one_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"settings": {}}))
    with pytest.raises(UserError, match="not a Plato run folder"):
        run_kind(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "gqn", "format": 2, "model": "os:system"}))
    with pytest.raises(UserError, match="cannot load"):
        load_run(tmp_path)
