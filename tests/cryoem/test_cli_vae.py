"""The atom-VAE command line end to end on a tiny simulation, and its one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cryoem.tiny import DATA, cryoem, simulate_ubiquitin, train_tiny


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_ubiquitin(tmp_path_factory.mktemp("sim"), 48, seed=3)


@pytest.fixture(scope="module")
def run(sim, tmp_path_factory):
    return train_tiny(sim, tmp_path_factory.mktemp("run") / "run", zdim=2)


def test_train_writes_the_run_record(run):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["model"]["zdim"] == 2 and cfg["versions"]["torch"].startswith("2.12")
    log = (run / "train_log.csv").read_text().splitlines()
    for term in ("rec", "kl", "bond", "local", "clash"):
        assert term in log[0]
    assert (run / "checkpoint.pt").is_file()
    # the default lr schedule: a cosine from --lr to --lr-final over the whole budget (4 steps here)
    assert cfg["settings"]["train"]["lr_schedule"] == "cosine" and cfg["settings"]["train"]["lr_anneal_steps"] is None
    first = dict(zip(log[0].split(","), log[1].split(",")))
    assert int(first["step"]) == 1
    assert float(first["lr"]) == pytest.approx(5e-5 + (1e-3 - 5e-5) * 0.5 * (1 + np.cos(np.pi / 4)))
    from plato_core.trainer import load_checkpoint

    assert load_checkpoint(run)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-5)  # after the last step


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
    from plato_core.runinfo import UserError

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


# ----------------------------------------------------------------- run and output folders
def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``: to show that nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("analysis", "tb"))
    return dest


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def test_new_runs_record_absolute_paths(run):
    data = json.loads((run / "model.json").read_text())["data"]
    assert Path(data["particles"]).is_absolute() and Path(data["structure"]).is_absolute()


def test_train_refuses_a_non_empty_out_and_other_settings_on_resume(sim, run):
    before_sim, before_run = snapshot(sim), snapshot(run)
    args = ["train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
            "--center", "none", "--zdim", 2, "--steps", 4, "--batch-size", 16]
    r = cryoem(*args, "--out", sim)  # a simulation folder: its config.json stays
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cryoem(*args, "--out", run)  # an existing run: its model.json stays
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    args[args.index("--zdim") + 1] = 3
    r = cryoem(*args, "--beta", 0.5, "--out", run, "--resume")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "zdim: run has 2, given 3" in r.stderr and "beta: run has None, given 0.5" in r.stderr
    assert snapshot(sim) == before_sim and snapshot(run) == before_run


def test_train_resume_and_overwrite(sim, tmp_path):
    out = tmp_path / "r"
    args = ["train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
            "--center", "none", "--zdim", 2, "--batch-size", 16, "--out", out]
    assert cryoem(*args, "--steps", 2).returncode == 0
    (out / "analysis").mkdir()
    r = cryoem(*args, "--steps", 3, "--resume")
    assert r.returncode == 0, r.stderr
    from plato_core.trainer import load_checkpoint

    assert load_checkpoint(out)["step"] == 3 and (out / "analysis").is_dir()
    r = cryoem(*args, "--steps", 2, "--zdim", 3, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out)["step"] == 2 and not (out / "analysis").exists()
    assert json.loads((out / "model.json").read_text())["model"]["zdim"] == 3


def test_old_run_with_relative_paths_loads_from_anywhere(run, sim, tmp_path, monkeypatch, capsys):
    """A run that recorded relative paths loads from its training folder, from anywhere above the run, and,
    once the data moved, with --particles; analyze takes --particles too."""
    import shutil

    import starfile

    from cryoem.cli import main
    from cryoem.train import load_run
    from plato_core.runinfo import UserError

    proj = tmp_path / "proj"
    shutil.copytree(sim, proj / "sim")
    (proj / "model").mkdir()
    shutil.copy(sim / "gt_models.pdb", proj / "model" / "gt.pdb")
    r = copy_run(run, proj / "runs" / "r")
    rec = json.loads((r / "model.json").read_text())
    rec["data"].update(particles="sim/particles.star", structure="model/gt.pdb")
    (r / "model.json").write_text(json.dumps(rec))
    monkeypatch.chdir(proj)  # the training folder
    assert len(load_run(r)[2]) == 48
    monkeypatch.chdir(tmp_path)  # elsewhere: found from the run's ancestors
    assert len(load_run(r)[2]) == 48
    shutil.move(proj / "sim", tmp_path / "moved")
    with pytest.raises(UserError, match="model.json: particles sim/particles.star not found.*--particles"):
        load_run(r)
    model, rec2, ds, _ = load_run(r, particles=tmp_path / "moved" / "particles.star", datadir=tmp_path / "moved")
    assert len(ds) == 48 and rec2["offset"] == rec["offset"]
    blocks = starfile.read(tmp_path / "moved" / "particles.star")
    starfile.write({"optics": blocks["optics"], "particles": blocks["particles"].iloc[:40]}, tmp_path / "moved/40.star")
    with pytest.raises(UserError, match="n_particles 40.*trained on 48"):
        load_run(r, particles=tmp_path / "moved" / "40.star")
    capsys.readouterr()
    assert main(["analyze", str(r), "--k", "2", "--no-snapshots", "--particles",
                 str(tmp_path / "moved" / "particles.star")]) == 0
    assert np.load(r / "analysis" / "latents.npy").shape == (48, 2)


def test_analyze_bad_inputs_are_one_line_and_write_nothing(run, tmp_path, capsys):
    from cryoem.cli import main

    r = copy_run(run, tmp_path / "r")
    before = snapshot(r)
    np.savez(tmp_path / "ok.npz", x=np.arange(48.0), short=np.arange(47.0), nan=np.r_[np.nan, np.arange(47.0)])
    np.save(tmp_path / "one.npy", np.arange(48.0))
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    cases = [(["--k", "0"], "--k 0"),
             (["--color", f"{tmp_path / 'none.npz'}:x"], "file not found"),
             (["--color", f"{tmp_path / 'junk.npz'}:x"], "not a numpy .npz"),
             (["--color", f"{tmp_path / 'one.npy'}:x"], "expected an .npz"),
             (["--color", f"{tmp_path / 'ok.npz'}:y"], "no array 'y'"),
             (["--color", f"{tmp_path / 'ok.npz'}:short"], "one value per particle (48,), got (47,)"),
             (["--color", f"{tmp_path / 'ok.npz'}:nan"], "1 values are NaN")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["analyze", str(r), "--no-snapshots", *args]) == 2, args
        one_error_line(capsys, message)
    assert snapshot(r) == before and not (r / "analysis").exists()


def test_decode_bad_latents_are_one_line_and_write_nothing(run, tmp_path, capsys):
    from cryoem.cli import main

    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    np.savez(tmp_path / "z.npz", z=np.zeros((2, 2)))
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    np.save(tmp_path / "zdim3.npy", np.zeros((2, 3)))
    np.save(tmp_path / "nan.npy", np.array([[0.0, 0.0], [np.nan, 1.0]]))
    np.save(tmp_path / "inf.npy", np.array([[np.inf, 0.0]]))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    cases = [("missing.npy", "file not found"), ("junk.npy", "not a numpy .npy"), ("z.npz", "an .npz archive"),
             ("cube.npy", "shape (M, zdim)"), ("zdim3.npy", "3 dimensions, the run's zdim is 2"),
             ("nan.npy", "1 of 2 latents hold NaN or infinite values (first: row 1)"), ("inf.npy", "NaN or infinite"),
             ("text.npy", "expected numbers")]
    for name, message in cases:
        capsys.readouterr()
        assert main(["decode", str(run), "--z", str(tmp_path / name), "--out", str(tmp_path / "m.pdb")]) == 2, name
        one_error_line(capsys, f"--z {tmp_path / name}", message)
        assert not (tmp_path / "m.pdb").exists()


def test_damaged_model_json_is_one_line(run, tmp_path, capsys):
    from cryoem.cli import main

    r = copy_run(run, tmp_path / "r")
    np.save(tmp_path / "z.npy", np.zeros((1, 2)))
    text = (r / "model.json").read_text()
    for damaged, message in ((text[: len(text) // 2], "not valid JSON"), ("[1, 2]", "not an atom-VAE run record"),
                             (json.dumps({**json.loads(text), "offset": [0, 0]}), "'offset'")):
        (r / "model.json").write_text(damaged)
        capsys.readouterr()
        assert main(["decode", str(r), "--z", str(tmp_path / "z.npy"), "--out", str(tmp_path / "m.pdb")]) == 2
        one_error_line(capsys, "model.json", message)
        assert main(["analyze", str(r), "--no-snapshots"]) == 2
        one_error_line(capsys, "model.json", message)
    assert not (tmp_path / "m.pdb").exists() and not (r / "analysis").exists()


def test_progress_into_a_log_file_is_not_a_line_per_step(sim, tmp_path):
    """Into a pipe (not a terminal) the bar updates at most every 30 s: 40 quick steps give the first and last
    updates only, not one per step; --quiet gives none."""
    for quiet, most in ((False, 3), (True, 0)):
        r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms",
                   "ca", "--center", "none", "--zdim", 1, "--steps", 40, "--batch-size", 8, *(["--quiet"] * quiet),
                   "--out", tmp_path / f"q{quiet}")
        assert r.returncode == 0, r.stderr
        updates = [u for u in r.stderr.replace("\r", "\n").splitlines() if "step" in u and "/40" in u]
        assert len(updates) <= most, updates


def test_half_sets_follow_relions_random_subset(sim, tmp_path):
    """A STAR file with rlnRandomSubset: --half-sets trains half1 on the particles RELION put in subset 1."""
    import starfile

    star = starfile.read(sim / "particles.star")
    halves = np.where(np.arange(len(star["particles"])) % 3 == 0, 1, 2)
    star["particles"]["rlnRandomSubset"] = halves
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "particles.mrcs").symlink_to(sim / "particles.mrcs")
    starfile.write(star, tmp_path / "data" / "particles.star")
    out = tmp_path / "halves"
    r = cryoem("train", "--particles", tmp_path / "data" / "particles.star", "--structure", sim / "gt_models.pdb",
               "--atoms", "ca", "--center", "none", "--zdim", 1, "--steps", 1, "--batch-size", 16, "--half-sets",
               "--out", out)
    assert r.returncode == 0, r.stderr
    for h in (1, 2):
        subset = json.loads((out / f"half{h}" / "model.json").read_text())["subset"]
        assert subset == np.flatnonzero(halves == h).tolist()


def test_model_setting_errors_are_value_errors_named_by_their_flag_on_the_command_line(sim, tmp_path):
    """The model raises a ValueError naming the setting; the command line names the flag, one line, exit 2."""
    from cryoem.train import DataSpec, build_model, load_data
    from cryoem.vae import AtomVAEConfig

    spec = DataSpec(str(sim / "particles.star"), str(sim / "gt_models.pdb"), atoms="ca", center="none")
    with pytest.raises(ValueError, match="^enc_downsample: 5 must divide the box size 32$"):
        build_model(spec, AtomVAEConfig(enc_downsample=5), load_data(spec))
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--steps", 1, "--likelihood", "correlation", "--out", tmp_path / "r")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --likelihood: correlation has no Laplace posterior; use it with posterior amortized")
    assert not (tmp_path / "r").exists()
    for bad in (0, 2e-3):  # not above 0, or above --lr (1e-3 by default)
        r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms",
                   "ca", "--center", "none", "--steps", 1, "--lr-final", bad, "--out", tmp_path / "r")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--lr-final" in r.stderr, r.stderr
        assert not (tmp_path / "r").exists()
    for flag in ("--w-linear", "--w-clash"):  # a negative weight would reward what its term measures
        r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms",
                   "ca", "--center", "none", "--steps", 1, flag, -1, "--out", tmp_path / "r")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {flag}: -1.0 is negative"), \
            r.stderr
        assert not (tmp_path / "r").exists()


def test_smoothed_decoder_trains_and_reloads(sim, tmp_path):
    """--dec-smooth: recorded, and rebuilt from the starting model on loading (its kernel is not in the checkpoint)."""
    import torch

    from cryoem.train import load_model
    from cryoem.vae import residue_kernel

    out = tmp_path / "smooth"
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--zdim", 2, "--steps", 3, "--batch-size", 16, "--dec-smooth", 6, "--dec-rigid", 0,
               "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "model.json").read_text())["model"]["dec_smooth"] == 6
    model, _, s = load_model(out)
    dec = model.decoder
    K = residue_kernel(dec.x0, torch.arange(s.n_atoms), 6.0).to_dense()  # C-alpha model: one atom per residue
    z = torch.randn(4, 2)
    with torch.no_grad():
        raw = dec.out(dec.mlp(z)).view(4, -1, 3)
        torch.testing.assert_close(model.decode(z), dec.x0 + dec.scale * torch.einsum("rs,bsc->brc", K, raw))


def test_analysis_keeps_the_means_stored_by_training_and_encodes_the_rest(run):
    from cryoem.analyze import encode_all, posterior_means
    from cryoem.particles import ParticleSubset
    from cryoem.train import load_run

    model, _, ds, _ = load_run(run)
    assert bool(model.z_seen.all())  # 4 steps of 16 visit all 48 particles
    model.z_seen[::3] = False  # as if training had never reached every third particle
    unseen = np.arange(0, 48, 3)
    z, how = posterior_means(model, ds, refine=False, progress=False)
    kept = np.setdiff1d(np.arange(48), unseen)
    np.testing.assert_array_equal(z[kept], model.z_last[kept].numpy())
    as_stored = encode_all(model, ParticleSubset(ds, unseen), progress=False, sample=False)  # Laplace means
    np.testing.assert_allclose(z[unseen], as_stored, atol=1e-6)
    assert "16 particles that training never reached" in how
    z_ref, _ = posterior_means(model, ds, refine=True, progress=False)
    np.testing.assert_allclose(z_ref, encode_all(model, ds, progress=False), atol=1e-6)  # importance-sampled means
    assert np.abs(z_ref[kept] - z[kept]).max() > 1e-4  # encoding again moved the stored means


def test_analyze_of_latents_far_outside_the_prior_is_one_line(run, tmp_path, capsys):
    """Stored means a million prior SDs out decode to models no PDB file can hold (|x| >= 10^4 Å): analyze says
    so in one line and suggests --refine, instead of a traceback from the PDB writer."""
    import torch

    from cryoem.cli import main
    from plato_core.trainer import load_checkpoint

    r = copy_run(run, tmp_path / "r")
    ckpt = load_checkpoint(r)
    ckpt["model"]["z_last"] = 1e6 * torch.randn_like(ckpt["model"]["z_last"])
    torch.save(ckpt, r / "checkpoint.pt")
    capsys.readouterr()
    assert main(["analyze", str(r), "--k", "2", "--no-snapshots", "--no-refine"]) == 2
    err = capsys.readouterr().err.splitlines()  # the tiny run's latent is collapsed: a warning line comes first
    assert "Traceback" not in "".join(err) and err[-1].startswith("error:"), err
    assert "Å from the origin" in err[-1] and "--refine" in err[-1]
    assert not (r / "analysis" / "kmeans.pdb").exists()


def test_analyze_of_identical_latents_skips_only_the_t_sne(run, tmp_path):
    """Every particle at the same latent (a latent that carries nothing): the analysis still completes; scikit-
    learn's t-SNE, which crashes the process on identical points, is skipped."""
    import torch

    from cryoem.cli import main
    from plato_core.trainer import load_checkpoint

    r = copy_run(run, tmp_path / "r")
    ckpt = load_checkpoint(r)
    ckpt["model"]["z_last"] = torch.zeros_like(ckpt["model"]["z_last"])
    torch.save(ckpt, r / "checkpoint.pt")
    assert main(["analyze", str(r), "--k", "2", "--no-snapshots", "--no-refine"]) == 0
    assert np.ptp(np.load(r / "analysis" / "latents.npy")) == 0 and (r / "analysis" / "kmeans.pdb").is_file()
    assert not (r / "analysis" / "tsne.png").exists() and "tsne.png" not in (r / "analysis" / "index.html").read_text()
