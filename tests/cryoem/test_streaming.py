"""Particles at scale: streamed training equals loaded training, every image is checked as it is read, the
float16 cache, and ``cryoem check --full``."""

import csv
import json

import mrcfile
import numpy as np
import pytest
import torch

import cryoem.particles as particles_module
from cryoem.cli import main
from plato_core.trainer import epoch_batches, load_checkpoint
from tests.cryoem.tiny import cryoem, simulate_ubiquitin

N = 48


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_ubiquitin(tmp_path_factory.mktemp("stream") / "sim", N, seed=3)


def _train(sim, out, *flags, steps=6):
    return cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb",
                  "--atoms", "ca", "--center", "none", "--zdim", 2, "--steps", steps, "--batch-size", 16,
                  "--threads", 1, "--quiet", "--out", out, *flags)


def _losses(run):
    with open(run / "log.csv") as f:
        return [(float(r["loss"]), float(r["rec"])) for r in csv.DictReader(f)]


def test_streamed_training_reads_what_loaded_training_reads(sim, tmp_path):
    """Memory-mapped stacks read a batch at a time by a worker process give the very same run as images loaded
    into memory: the same images in the same order, so the same losses, step by step."""
    loaded = _train(sim, tmp_path / "loaded", "--no-lazy", steps=12)  # 4 epochs: the workers restart each epoch
    streamed = _train(sim, tmp_path / "streamed", "--lazy", "--workers", "1", steps=12)
    assert loaded.returncode == 0 and streamed.returncode == 0, loaded.stderr + streamed.stderr
    assert "streamed from the stacks by 1 reader process" in streamed.stdout
    a, b = _losses(tmp_path / "loaded"), _losses(tmp_path / "streamed")
    assert len(a) == len(b) == 2 and a == b
    wa, wb = load_checkpoint(tmp_path / "loaded")["model"], load_checkpoint(tmp_path / "streamed")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _poison(stack, image):
    with mrcfile.open(stack, mode="r+") as m:
        m.data[image] = np.nan


def test_a_nan_image_met_during_training_stops_it_with_a_checkpoint_and_one_line(tmp_path, monkeypatch, capsys):
    """The start-up check samples the pixels (here 2 images); a NaN image outside every image read before
    training (that sample, the noise estimate's 1,000 and the scale's first 256) is found when its batch is read,
    in a worker process: the run writes a checkpoint at the step before and exits 2 with one line naming the
    file, the image and the metadata row."""
    n = 1200
    data = simulate_ubiquitin(tmp_path / "sim", n, seed=4)
    read_first = {0, n - 1, *range(256), *np.linspace(0, n - 1, 1000).astype(int).tolist()}
    second = epoch_batches(n, 16, 0, 0)[1]  # the batch of step 2 (seed 0, epoch 0)
    bad = next(i for i in second if i not in read_first)
    _poison(data / "particles.mrcs", bad)
    monkeypatch.setattr(particles_module, "PIXEL_SAMPLE", 2)
    capsys.readouterr()
    code = main(["train", "--particles", str(data / "particles.star"), "--structure", str(data / "gt_models.pdb"),
                 "--atoms", "ca", "--center", "none", "--zdim", "2", "--steps", "6", "--batch-size", "16",
                 "--threads", "1", "--quiet", "--lazy", "--workers", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"row {bad + 1}: image {bad + 1} of {data / 'particles.mrcs'} contains NaN or inf" in err[0]
    assert "stopped at step 1, checkpoint written" in err[0] and "Traceback" not in err[0]
    assert load_checkpoint(tmp_path / "run")["step"] == 1


def test_check_samples_the_pixels_and_full_reads_every_image(tmp_path, monkeypatch, capsys):
    """``cryoem check`` reads the metadata in full and the pixels of a sample; ``--full`` reads every image of
    every stack, also one that the metadata do not list."""
    imgs = np.ones((6, 8, 8), np.float32)
    imgs[3] = np.inf
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(imgs)
    star = tmp_path / "p.star"
    rows = "\n".join(f"{i}@s.mrcs 1 10000 10000 0" for i in (1, 2, 3, 5, 6))  # image 4 is not listed
    star.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n_rlnVoltage\n"
                    "_rlnSphericalAberration\n_rlnAmplitudeContrast\n1 1.0 8 300 2.7 0.1\n\n"
                    "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n_rlnDefocusV\n"
                    f"_rlnDefocusAngle\n{rows}\n")
    capsys.readouterr()
    assert main(["check", str(star)]) == 0
    assert "5 sampled images are finite" in capsys.readouterr().out
    assert main(["check", str(star), "--full", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {star}: image 4 of {tmp_path / 's.mrcs'} contains NaN or inf"
    imgs[3] = 1.0
    imgs[4] = np.nan  # listed (row 4), but outside a sample of 2 (rows 1 and 5)
    with mrcfile.new(tmp_path / "s.mrcs", overwrite=True) as m:
        m.set_data(imgs)
    monkeypatch.setattr(particles_module, "PIXEL_SAMPLE", 2)
    assert main(["check", str(star)]) == 0
    assert main(["check", str(star), "--full", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"row 4: image 5 of {tmp_path / 's.mrcs'} contains NaN or inf")


def test_float16_cache_keeps_the_images_to_float16_precision_and_trains_with_no_flag(sim, tmp_path):
    """``cryoem downsample --dtype float16`` (no --box: the same box) writes MRC mode-12 stacks scaled to a
    standard deviation of 1; they equal the source times the recorded scale to float16's precision, and
    ``cryoem train`` reads the cache as it is."""
    r = cryoem("downsample", "--particles", sim / "particles.star", "--dtype", "float16", "--chunk", 20,
               "--quiet", "--out", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "cache/downsample.json").read_text())
    assert rec["dtype"] == "float16" and rec["box_out"] == rec["box_in"] == 32 and len(rec["stacks"]) == 3
    with mrcfile.open(sim / "particles.mrcs") as m:
        src = m.data.astype(np.float64)
    parts = []
    for name in rec["stacks"]:
        with mrcfile.open(tmp_path / "cache" / name) as m:
            assert m.header.mode == 12 and m.data.dtype == np.float16
            parts.append(m.data.astype(np.float64))
    cache = np.concatenate(parts)
    assert rec["scale"] == pytest.approx(1 / src.std(), rel=0.02)  # from a sample: here every image
    assert np.allclose(cache, src * rec["scale"], rtol=2**-10, atol=2**-14)
    t = cryoem("train", "--particles", tmp_path / "cache/particles.star", "--structure", sim / "gt_models.pdb",
               "--atoms", "ca", "--center", "none", "--zdim", 2, "--steps", 2, "--batch-size", 16, "--threads", 1,
               "--quiet", "--out", tmp_path / "run")
    assert t.returncode == 0, t.stderr


def _torchrun(sim, out, steps, *flags):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cryoem.cli",
           "train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
           "--center", "none", "--zdim", 2, "--steps", steps, "--batch-size", 16, "--threads", 1, "--quiet",
           "--out", out, *flags]
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_infer_the_latents_of_one_and_resume_with_another_count(sim, tmp_path):
    """Two gloo processes (torchrun) split each global batch of 16: after one step, every particle of that batch
    has the posterior mean a one-process run gives it (the Gauss-Newton step is per particle, from the same
    starting weights), gathered from both ranks into rank 0's checkpoint. A run of two processes then resumes
    in one, and the other way round."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(sim, one, steps=1).returncode == 0
    r = _torchrun(sim, two, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(one)["model"], load_checkpoint(two)["model"]
    first = epoch_batches(N, 16, 0, 0)[0]
    assert b["z_seen"].sum() == 16 and b["z_seen"][first].all() and torch.equal(a["z_seen"], b["z_seen"])
    torch.testing.assert_close(b["z_last"][first], a["z_last"][first], rtol=1e-4, atol=1e-5)
    assert a["z_last"][first].abs().max() > 1e-3  # not the zeros of particles never seen
    r = _train(sim, two, "--resume", steps=4)  # 2 processes -> 1
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(sim, two, 6, "--resume")  # 1 -> 2
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(two)
    assert ck["step"] == 6 and ck["model"]["z_seen"].all()  # 6 steps of 16: two epochs of the 48 particles
