"""The simulator and `cryoem simulate`: outputs, ground truth, morphs, bad input."""

import json

import numpy as np
import pytest
import starfile
import torch

from cryoem.cli import main
from cryoem.ctf import CTFParams
from cryoem.imaging import ImageFormation
from cryoem.particles import load_particles
from cryoem.simulate import ensemble_conformations, morph_conformations, random_rotations, simulate
from cryoem.structure import read_structure, rmsd, write_pdb

from .test_conventions import DATA


def test_cli_simulate_ensemble_writes_everything(tmp_path):
    (tmp_path / "w.txt").write_text("\n".join(["1", "0", "2", "0", "0", "0", "0", "0", "0", "1"]))
    out = tmp_path / "run"
    code = main(["simulate", "--structure", str(DATA / "2k39_ca_10models.pdb"), "--weights", str(tmp_path / "w.txt"),
                 "--n", "40", "--box", "32", "--apix", "3.0", "--snr", "0.1", "--defocus", "1.0", "2.5",
                 "--seed", "3", "--out", str(out), "--quiet", "--preview"])
    assert code == 0
    for f in ("particles.mrcs", "particles.star", "ground_truth.npz", "gt_models.pdb", "config.json", "preview.png"):
        assert (out / f).is_file(), f
    gt = np.load(out / "ground_truth.npz")
    assert set(np.unique(gt["model_index"])) <= {0, 2, 9} and gt["R"].shape == (40, 3, 3)
    ps = load_particles(out / "particles.star")
    assert len(ps) == 40 and ps.box == 32 and ps.pixel_size == pytest.approx(3.0)
    assert np.allclose(ps.meta.R, gt["R"], atol=1e-5) and np.allclose(ps.meta.shift_A, gt["shift_A"], atol=1e-5)
    assert np.allclose(ps.meta.ctf, gt["ctf"], atol=1e-4)
    df = gt["ctf"][:, 0] / 1e4
    assert (df >= 1.0).all() and (df <= 2.5).all()
    assert "optics" in starfile.read(out / "particles.star")
    assert read_structure(out / "gt_models.pdb").n_models == 10
    assert json.loads((out / "config.json").read_text())["settings"]["n"] == 40


def test_clean_images_equal_image_formation_from_ground_truth():
    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    conf = ensemble_conformations(s)
    res = simulate(conf, 6, box=48, pixel_size=1.5, snr=None, seed=1, progress=False)
    form = ImageFormation(48, 1.5)
    again = form(conf.states[0], conf.amplitudes, conf.sigmas, torch.as_tensor(res.R).float(),
                 torch.as_tensor(res.shift_A).float(), res.ctf)
    assert torch.allclose(again[:, 0], torch.as_tensor(res.images), atol=1e-4 * float(np.abs(res.images).max()))
    noisy = simulate(conf, 6, box=48, pixel_size=1.5, snr=0.5, seed=1, progress=False)
    snr = res.images.var(axis=(1, 2)) / (noisy.images - res.images).var(axis=(1, 2))
    assert snr.mean() == pytest.approx(0.5, rel=0.15)


def test_poses_are_uniform_on_so3():
    R = random_rotations(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(20000, 3, 3), atol=1e-12)
    z = R[:, 2]  # viewing directions: uniform on the sphere -> every coordinate uniform in [-1, 1]
    assert z.mean(0).abs().max() < 0.02 and ((z**2).mean(0) - 1 / 3).abs().max() < 0.01


@pytest.fixture
def two_states(tmp_path):
    a = read_structure(DATA / "1ubi.pdb").select("heavy")
    xyz = a.coords[0].copy()
    tail = a.resnum > 60
    xyz[tail] += np.array([4.0, 0.0, 0.0])  # a domain motion
    R = random_rotations(1, torch.Generator().manual_seed(5))[0].numpy()
    b = a.with_coords(xyz @ R.T + 20.0).subset(np.flatnonzero(a.name != "O"))  # rotated, moved, fewer atoms
    write_pdb(tmp_path / "b.pdb", b)
    return a, b, tmp_path / "b.pdb"


def test_morph_matches_superposes_and_interpolates(two_states):
    a, b, _ = two_states
    conf = morph_conformations(a, b, "uniform")
    assert conf.states.shape[1] == b.n_atoms
    A, B = conf.states.double()
    assert rmsd(A, B, superposition=False).item() == pytest.approx(rmsd(A, B).item(), abs=1e-3)  # superposed
    mid = conf.coords(torch.tensor([0.5], dtype=torch.float64))[0].double()
    assert torch.allclose(mid, (A + B) / 2, atol=1e-5)
    t = morph_conformations(a, b, "bimodal").sample_labels(4000, torch.Generator().manual_seed(0))
    assert ((t - 0.5).abs() < 0.1).float().mean() < 0.05 and (t.min() >= 0) and (t.max() <= 1)


def test_cli_morph(tmp_path, two_states):
    _, _, bpath = two_states
    out = tmp_path / "m"
    code = main(["simulate", "--morph", str(DATA / "1ubi.pdb"), str(bpath), "--morph-dist", "bimodal", "--n", "16",
                 "--box", "32", "--apix", "2", "--out", str(out), "--quiet"])
    assert code == 0
    gt = np.load(out / "ground_truth.npz")
    assert gt["morph_t"].shape == (16,) and "model_index" not in gt
    assert read_structure(out / "gt_models.pdb").n_models == 11


@pytest.mark.parametrize("args, message", [
    (["--n", "5"], "exactly one of --structure or --morph"),
    (["--structure", "missing.pdb", "--n", "5"], "missing.pdb: structure file not found"),
    (["--structure", str(DATA / "1ubi.pdb"), "--snr", "-1"], "--snr"),
    (["--structure", str(DATA / "2k39_ca_10models.pdb"), "--weights", "WEIGHTS"], "--weights: expected 10"),
    (["--structure", str(DATA / "1ubi.pdb"), "--defocus", "3", "1"], "--defocus"),
])
def test_cli_simulate_bad_input_exits_2(tmp_path, capsys, args, message):
    (tmp_path / "w.txt").write_text("1 2 3")
    args = [a.replace("WEIGHTS", str(tmp_path / "w.txt")) for a in args]
    code = main(["simulate", *args, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_ctf_params_round_trip_through_ground_truth():
    p = CTFParams.create(torch.tensor([1e4, 2e4]))
    assert torch.equal(CTFParams.from_tensor(p.as_tensor()).defocus_u, p.defocus_u)
