"""The simulator and `cryoem simulate`: outputs, ground truth, morphs, bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

import cryoem
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


def test_particle_bfactor_is_recorded_and_is_the_one_each_image_was_made_with():
    """``particle_bfactor`` (ground truth) is the extra B of each image: rendering the atoms with
    sigma^2 + B / (8 pi^2) at that B gives the clean image back; the values lie in the asked range."""
    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    conf = ensemble_conformations(s)
    res = simulate(conf, 6, box=48, pixel_size=1.5, snr=None, seed=2, progress=False, bfactor_range=(10.0, 80.0))
    assert res.bfactor.shape == (6,) and ((res.bfactor >= 10) & (res.bfactor <= 80)).all() and res.bfactor.std() > 5
    sig = (conf.sigmas.double()[None] ** 2 + torch.as_tensor(res.bfactor)[:, None] / (8 * math.pi**2)).sqrt().float()
    again = ImageFormation(48, 1.5)(conf.states[0], conf.amplitudes, sig, torch.as_tensor(res.R).float(),
                                    torch.as_tensor(res.shift_A).float(), res.ctf)
    assert torch.allclose(again[:, 0], torch.as_tensor(res.images), atol=1e-4 * float(np.abs(res.images).max()))


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


def _rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rigid rotation that superposes point set a (N, 3) on b (Kabsch, numpy)."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    R = (u @ np.diag([1, 1, np.sign(np.linalg.det(u @ vt))]) @ vt).T
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def test_hinge_swings_a_rigid_domain_by_its_angle():
    from cryoem.simulate import hinge_conformations

    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    conf = hinge_conformations(s, ["A:60-76:40", "A:1-10:20"])
    x = conf.atom_coords(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]], dtype=torch.float64)).double().numpy()
    dom = (s.resnum >= 60) & (s.resnum <= 76)
    tail = s.resnum <= 10
    rest = ~dom & ~tail
    assert np.allclose(x[1][rest], x[0][rest]) and np.allclose(x[1][tail], x[0][tail])  # only the domain moves
    d0 = np.linalg.norm(x[0][dom][:, None] - x[0][dom][None], axis=-1)
    assert np.allclose(np.linalg.norm(x[1][dom][:, None] - x[1][dom][None], axis=-1), d0, atol=1e-4)  # rigidly
    assert _rotation_angle(x[0][dom], x[1][dom]) == pytest.approx(40, abs=0.01)
    assert _rotation_angle(x[0][dom], x[2][dom]) == pytest.approx(20, abs=0.01)  # t = 0.5
    assert _rotation_angle(x[0][tail], x[2][tail]) == pytest.approx(20, abs=0.01)  # the second hinge, t = 1
    pivot = (s.resnum == 60) & (s.name == "CA")
    assert np.allclose(x[1][pivot], x[0][pivot], atol=1e-4)  # the hinge atom stays put
    assert conf.output_labels().shape == (25, 2) and conf.models_for_output().n_models == 25


def _new_overlap(x0: np.ndarray, x1: np.ndarray, dom: np.ndarray, limit: float = 3.0) -> float:
    """Summed (limit - d)² over (domain, rest) atom pairs closer than ``limit`` Å in x1 but not in x0 (brute force)."""
    d0 = np.linalg.norm(x0[dom][:, None] - x0[~dom][None], axis=-1)
    d1 = np.linalg.norm(x1[dom][:, None] - x1[~dom][None], axis=-1)
    new = (d1 < limit) & (d0 >= limit)
    return float(((limit - d1[new]) ** 2).sum())


def test_hinge_path_keeps_the_domain_clear_of_the_rest():
    """6FLR's C-terminal domain, turned 40 degrees: about the chosen axis it stays clear of the rest at every t;
    about the old fixed axis (perpendicular to the hinge and the two centroids) it ran through the protein."""
    from cryoem.simulate import Hinge, hinge_conformations

    s = read_structure(Path(cryoem.__file__).parent / "data" / "6flr.pdb.gz").select("heavy").subset(models=0)
    conf = hinge_conformations(s, ["A:323-403:40"])
    dom = (s.chain == "A") & (s.resnum >= 323) & (s.resnum <= 403)
    x0 = conf.atom_coords(torch.zeros(1, 1, dtype=torch.float64))[0].double().numpy()
    h = conf.hinges[0]
    arm, rest = x0[dom].mean(0) - h.pivot.numpy(), x0[~dom].mean(0) - h.pivot.numpy()
    old = Hinge(h.mask, h.pivot, torch.as_tensor(np.cross(rest, arm) / np.linalg.norm(np.cross(rest, arm))), h.angle)
    for t in (0.5, 1.0):
        lab = torch.tensor([t], dtype=torch.float64)
        new_x = conf.atom_coords(lab[:, None])[0].double().numpy()
        old_x = old.apply(torch.as_tensor(x0)[None], lab)[0].numpy()
        assert _new_overlap(x0, new_x, dom) < 5.0
        assert _new_overlap(x0, old_x, dom) > 50.0
    assert h.clash == pytest.approx(_new_overlap(x0, new_x, dom), rel=1e-3, abs=1e-3)
    ca = (s.chain == "A") & (s.resnum == 323) & (s.name == "CA")
    assert np.allclose(new_x[ca], x0[ca], atol=1e-4)  # turns about the residue that joins it to the chain


def test_hinge_joined_at_both_ends_turns_about_its_joints():
    from cryoem.simulate import hinge_conformations

    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    conf = hinge_conformations(s, ["A:20-40:30"])
    x = conf.atom_coords(torch.tensor([[0.0], [1.0]], dtype=torch.float64)).double().numpy()
    dom = (s.resnum >= 20) & (s.resnum <= 40)
    for r in (20, 40):
        ca = (s.resnum == r) & (s.name == "CA")
        assert np.allclose(x[1][ca], x[0][ca], atol=1e-4)
    assert _rotation_angle(x[0][dom], x[1][dom]) == pytest.approx(30, abs=0.01)


def test_cli_warns_of_a_hinge_through_the_protein(tmp_path, capsys):
    code = main(["simulate", "--structure", str(Path(cryoem.__file__).parent / "data" / "6flr.pdb.gz"),
                 "--hinge", "A:290-381:40", "--n", "4", "--quiet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 0 and len(err.strip().splitlines()) == 1 and "--hinge A:290-381:40" in err and "overlaps" in err


def test_cli_hinge_bad_spec_is_one_line(tmp_path, capsys):
    for spec in ("A:60-76", "Z:60-76:30", "A:1-500:30"):
        code = main(["simulate", "--structure", str(DATA / "1ubi.pdb"), "--hinge", spec, "--n", "4",
                     "--quiet", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and "--hinge" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_peng5_and_particle_bfactor_keep_the_mass_and_blur():
    """Peng's 5 Gaussians per atom carry the same mass as the single moment-matched Gaussian, so the projected
    mass is equal; the image differs (a sharper core). A per-particle B-factor blurs without changing the mass."""
    from cryoem.imaging import project

    s = read_structure(DATA / "1ubi.pdb").select("heavy")
    one, five = ensemble_conformations(s, bfactor=0.0), ensemble_conformations(s, bfactor=0.0, potential="peng5")
    assert five.coords(torch.tensor([0])).shape[1] == 5 * s.n_atoms
    R = random_rotations(4, torch.Generator().manual_seed(2)).float()
    a = project(one.coords(torch.zeros(4, dtype=torch.long)), one.amplitudes, one.sigmas, R, 1.0, 96)
    b = project(five.coords(torch.zeros(4, dtype=torch.long)), five.amplitudes, five.sigmas, R, 1.0, 96)
    assert torch.allclose(a.sum((1, 2, 3)), b.sum((1, 2, 3)), rtol=1e-4)
    assert (b.amax((1, 2, 3)) > 1.03 * a.amax((1, 2, 3))).all()  # Peng's narrow core: higher peaks, every view
    sharp = simulate(one, 8, box=64, pixel_size=1.5, snr=None, seed=4, progress=False, defocus_um=(0, 0))
    blur = simulate(one, 8, box=64, pixel_size=1.5, snr=None, seed=4, progress=False, defocus_um=(0, 0),
                    bfactor_range=(200, 200))
    assert np.allclose(sharp.images.sum((1, 2)), blur.images.sum((1, 2)), rtol=1e-3)
    assert (blur.images.max((1, 2)) < 0.9 * sharp.images.max((1, 2))).all()


def test_uniform_shifts_have_the_asked_spread():
    s = read_structure(DATA / "1ubi.pdb").select("ca")
    res = simulate(ensemble_conformations(s), 4000, box=16, pixel_size=4.0, snr=None, seed=0, progress=False,
                   shift_std_px=2.0, shift_dist="uniform")
    px = res.shift_A / 4.0
    assert np.abs(px).max() <= 2.0 * np.sqrt(3) + 1e-9 and px.std(0) == pytest.approx([2.0, 2.0], rel=0.05)


def test_cli_simulate_refuses_an_existing_set_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "set"
    args = ["simulate", "--structure", str(DATA / "1ubi.pdb"), "--select", "ca", "--box", "16", "--apix", "5",
            "--out", str(out), "--quiet"]
    assert main([*args, "--n", "8"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*args, "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a bad input with --overwrite still writes nothing: every check comes first
    assert main([*args, "--n", "4", "--overwrite", "--defocus", "3", "1"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*args, "--n", "4", "--overwrite"]) == 0
    assert len(load_particles(out / "particles.star")) == 4
    assert json.loads((out / "config.json").read_text())["settings"]["n"] == 4


def test_one_word_per_concept_with_the_old_flags_kept():
    """simulate/check/fsc say --pixel-size, --atoms and --batch-size as train does; --apix, --select and --batch
    (older scripts) still parse to the same settings."""
    from cryoem.cli import build_parser

    p = build_parser()
    new = p.parse_args(["simulate", "--out", "o", "--pixel-size", "3", "--atoms", "ca", "--batch-size", "8"])
    old = p.parse_args(["simulate", "--out", "o", "--apix", "3", "--select", "ca", "--batch", "8"])
    assert vars(new) == vars(old) and (new.apix, new.select, new.batch) == (3.0, "ca", 8)
    for verb in (["check", "x.star"], ["fsc", "a.mrc", "b.mrc"]):
        assert p.parse_args([*verb, "--pixel-size", "1.5"]).apix == 1.5
