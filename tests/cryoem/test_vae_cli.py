"""The atom-VAE command line end to end on a tiny simulation, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
BIN = Path(sys.executable).parent


def cryoem(*args, cwd=None):
    return subprocess.run([BIN / "cryoem", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    r = cryoem("simulate", "--structure", DATA / "1ubi.pdb", "--select", "ca", "--n", 48, "--box", 32,
               "--apix", 2.5, "--snr", 1.0, "--seed", 3, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def run(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--zdim", 2, "--steps", 4, "--batch-size", 16, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_train_writes_the_run_record(run):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["model"]["zdim"] == 2 and cfg["versions"]["torch"].startswith("2.12")
    log = (run / "train_log.csv").read_text().splitlines()
    for term in ("rec", "kl", "bond", "local", "clash"):
        assert term in log[0]
    assert (run / "checkpoint.pt").is_file()


def test_analyze_decode_view(run, sim, tmp_path):
    r = cryoem("analyze", run, "--k", 2, "--color", f"{sim / 'ground_truth.npz'}:model_index")
    assert r.returncode == 0, r.stderr
    a = run / "analysis"
    z = np.load(a / "latents.npy")
    assert z.shape == (48, 2)
    html = (a / "index.html").read_text()
    for name in ("pca.png", "tsne.png", "rmsf.png", "kmeans.pdb", "pc1.pdb", "kmeans.png", "pc1.gif"):
        assert (a / name).is_file() and name in html
    assert (a / "kmeans_00.mrc").is_file() and (a / "pc2_09.mrc").is_file()
    np.save(tmp_path / "z.npy", z[:3])
    r = cryoem("decode", run, "--z", tmp_path / "z.npy", "--out", tmp_path / "m.pdb")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "m.pdb").read_text()
    assert text.count("ENDMDL") == 3 and text.count(" CA ") == 3 * 76
    r = cryoem("view", tmp_path / "m.pdb", "--color", "displacement", "--out", tmp_path / "v.png")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "v.png")).astype(int)
    assert img.shape[1] == 3 * img.shape[0]  # a strip of three models
    assert (np.abs(img - 255).sum(-1) > 60).mean() > 0.02  # something was drawn


def test_model_outside_box_is_a_clear_error(sim, tmp_path):
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", DATA / "1ubi.pdb", "--atoms", "ca",
               "--center", "map", "--steps", 1, "--out", tmp_path / "r")
    assert r.returncode == 2
    assert "box" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_poses_is_a_clear_error(sim, tmp_path):
    import starfile

    blocks = starfile.read(sim / "particles.star")
    parts = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write({"optics": blocks["optics"], "particles": parts}, tmp_path / "noposes.star")
    (tmp_path / "particles.mrcs").symlink_to(sim / "particles.mrcs")
    r = cryoem("train", "--particles", tmp_path / "noposes.star", "--structure", sim / "gt_models.pdb",
               "--atoms", "ca", "--center", "none", "--steps", 1, "--out", tmp_path / "r")
    assert r.returncode == 2
    assert "no poses" in r.stderr and "--infer-poses" in r.stderr
    # the same particles train with the experimental pose inference, and the run reloads without poses
    r = cryoem("train", "--particles", tmp_path / "noposes.star", "--structure", sim / "gt_models.pdb",
               "--atoms", "ca", "--center", "none", "--zdim", 2, "--steps", 4, "--batch-size", 16,
               "--infer-poses", "--pose-warmup", 2, "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "r" / "train_log.csv").read_text().splitlines()
    assert "pose" in log[0].split(",") and len(log) > 1
    z = tmp_path / "z.npy"
    np.save(z, np.zeros((2, 2), dtype=np.float32))
    r = cryoem("decode", tmp_path / "r", "--z", z, "--out", tmp_path / "m.pdb")
    assert r.returncode == 0, r.stderr


def test_unmatched_atoms_is_a_clear_error(run, tmp_path):
    from cryoem.evaluate import matched
    from cryoem.structure import read_structure
    from scene3d.runinfo import UserError

    s = read_structure(DATA / "1ubi.pdb").select("ca")
    with pytest.raises(UserError, match="not all matched"):
        matched(s, s.subset(np.arange(70)))


def test_half_sets_report_per_residue_disagreement(sim, tmp_path):
    out = tmp_path / "halves"
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--zdim", 2, "--steps", 2, "--batch-size", 16, "--half-sets", "--out", out)
    assert r.returncode == 0, r.stderr
    subsets = [set(json.loads((out / h / "model.json").read_text())["subset"]) for h in ("half1", "half2")]
    assert not subsets[0] & subsets[1] and len(subsets[0] | subsets[1]) == 48
    r = cryoem("analyze", out, "--k", 2, "--no-snapshots")
    assert r.returncode == 0, r.stderr
    dis = np.load(out / "analysis" / "halfset_disagreement.npy")
    assert dis.shape == (76,) and np.isfinite(dis).all() and dis.max() > 0


@pytest.mark.parametrize("motion", [False, True])
def test_collapse_warning(tmp_path, motion):
    """The collapse warning fires when the data hold no motion (zdim 8 with nothing to encode), in training
    and in analyze (with a banner in index.html), and stays silent when a domain swings by up to 60 degrees."""
    sim = tmp_path / "sim"
    hinge = ["--hinge", "A:50-76:60"] if motion else []
    r = cryoem("simulate", "--structure", DATA / "1ubi.pdb", "--select", "ca", *hinge, "--n", 1024, "--box", 32,
               "--apix", 2.5, "--snr", 1.0, "--seed", 5, "--quiet", "--out", sim)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--steps", 150, "--batch-size", 32, "--out", run)
    assert r.returncode == 0, r.stderr
    assert ("latent space has collapsed" in r.stderr) == (not motion), r.stderr[-2000:]
    r = cryoem("analyze", run, "--k", 2, "--no-snapshots")
    assert r.returncode == 0, r.stderr
    assert ("latent space has collapsed" in r.stderr) == (not motion), r.stderr[-2000:]
    html = (run / "analysis" / "index.html").read_text()
    assert ("latent space has collapsed" in html) == (not motion) and "latent_diagnostics.png" in html
    diag = json.loads(html.split("<pre>")[1].split("</pre>")[0].replace("&quot;", '"'))["latent_diagnostics"]
    assert (diag["spread_A"] > 1.0) if motion else (diag["spread_A"] < 0.25)  # the 60-degree hinge moves Cα by Å


def test_default_atoms_are_heavy_or_ca_for_a_ca_only_model():
    from cryoem.structure import read_structure
    from cryoem.train import atom_selection

    full = read_structure(DATA / "1ubi.pdb", models="first")
    ca = read_structure(Path(__file__).resolve().parents[2] / "cryoem/data/2k39_ca_ensemble.pdb.gz", models="first")
    assert atom_selection("auto", full) == "heavy" and atom_selection("auto", ca) == "ca"
    assert atom_selection("backbone", full) == "backbone"  # an explicit choice stands
    assert full.select("heavy").n_atoms == 602  # 1UBI: 76 residues, 602 non-hydrogen protein atoms (the PDB entry)
