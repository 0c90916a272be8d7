"""``cryoem downsample`` and ``cryoem select``: the Fourier crop against independent references, a
downsampled simulation against a native one by backprojection, and subsets written back into the original
RELION / cryoSPARC files, compared with ``starfile`` / ``numpy`` reads of the originals.

The CLI runs in-process (``cryoem.cli.main``, the console script's entry point) to keep the tests fast.
"""

import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoem.cli import main
from cryoem.downsample import fourier_crop
from cryoem.particles import load_particles
from tests.cryoem.tiny import star_as_cs

DATA = Path(__file__).resolve().parents[1] / "data"


def cryoem(*args) -> int:
    return main([str(a) for a in args])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cryoem(*args)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *args) -> str:
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (to prove that nothing was written)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


# ----------------------------------------------------------------------------- the crop
def crop_reference(x: np.ndarray, d: int) -> np.ndarray:
    """Direct evaluation, at the output pixels, of the trigonometric interpolant of ``x`` (..., D, D) restricted
    to |k| <= d/2 cycles per field of view. An even D's Nyquist bin is the interpolant's two half-terms at
    +-D/2. Output pixel j sits at input position D//2 + (j - d//2) * D / d (the particle centre is kept)."""
    D = x.shape[-1]
    F = np.fft.fft2(x) / D**2
    k = np.round(np.fft.fftfreq(D) * D)
    src, ks, ws = [], [], []
    for i, kk in enumerate(k):
        halves = [(-D / 2, 0.5), (D / 2, 0.5)] if D % 2 == 0 and kk == -D // 2 else [(kk, 1.0)]
        for kv, w in halves:
            src.append(i)
            ks.append(kv)
            ws.append(w if abs(kv) <= d / 2 else 0.0)
    u = D // 2 + (np.arange(d) - d // 2) * D / d
    E = np.exp(2j * np.pi * np.outer(u, ks) / D) * np.asarray(ws)  # (d, K)
    G = F[..., src, :][..., :, src]
    out = E @ G @ E.T
    assert np.abs(out.imag).max() < 1e-9 * max(1.0, np.abs(out.real).max())
    return out.real


@pytest.mark.parametrize("D,d", [(32, 16), (32, 32), (33, 16), (30, 16), (40, 12), (31, 14), (17, 8)])
def test_fourier_crop_equals_the_numpy_reference(D, d):
    x = np.random.default_rng(D * 100 + d).normal(size=(3, D, D))
    got = fourier_crop(torch.as_tensor(x), d).numpy()
    np.testing.assert_allclose(got, crop_reference(x, d), atol=1e-11)
    got32 = fourier_crop(torch.as_tensor(x, dtype=torch.float32), d)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), got, atol=2e-5)


@pytest.mark.parametrize("D", [128, 127, 200])
def test_fourier_crop_samples_a_smooth_blob_at_the_same_place(D):
    """A Gaussian blob (sigma 6 input px, off centre) cropped to 64 px equals the same blob sampled on the
    coarse grid: the values, the centre (input pixel D//2 on output pixel 32) and the scale D/64 hold for an
    even, an odd and a non-dividing input box."""
    d, sigma, (x0, y0) = 64, 6.0, (D // 2 + 3.3, D // 2 - 5.1)
    i = np.arange(D)
    img = np.exp(-((i[None] - x0) ** 2 + (i[:, None] - y0) ** 2) / (2 * sigma**2))
    u = D // 2 + (np.arange(d) - d // 2) * D / d
    want = np.exp(-((u[None] - x0) ** 2 + (u[:, None] - y0) ** 2) / (2 * sigma**2))
    got = fourier_crop(torch.as_tensor(img), d).numpy()
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_fourier_crop_refuses_a_larger_box():
    with pytest.raises(ValueError, match="box"):
        fourier_crop(torch.zeros(1, 16, 16), 18)


# ----------------------------------------------------------------------------- a small simulated set
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """48 particles, 64 px at 1.25 Å/px (C-alpha ubiquitin), with a cryoSPARC copy of its metadata."""
    out = tmp_path_factory.mktemp("sim")
    assert cryoem("simulate", "--structure", DATA / "1ubi.pdb", "--select", "ca", "--n", 48, "--box", 64,
                  "--apix", 1.25, "--snr", 1.0, "--seed", 3, "--quiet", "--out", out) == 0
    star_as_cs(out / "particles.star", out / "orig.cs")
    return out


@pytest.fixture(scope="module")
def down(sim, tmp_path_factory):
    """The simulation downsampled to 32 px (2.5 Å/px), in stacks of at most 20 particles."""
    out = tmp_path_factory.mktemp("down") / "ds"
    assert cryoem("downsample", "--particles", sim / "particles.star", "--box", 32, "--chunk", 20, "--quiet",
                  "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def run(sim, down, tmp_path_factory):
    """A 2-step run trained on the downsampled STAR with no extra flags, analysed with k = 2."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cryoem("train", "--particles", down / "particles.star", "--structure", sim / "gt_models.pdb",
                  "--atoms", "ca", "--center", "none", "--zdim", 2, "--steps", 2, "--batch-size", 16,
                  "--out", out) == 0
    assert cryoem("analyze", out, "--k", 2, "--no-snapshots") == 0
    return out


def stack_images(star: Path) -> np.ndarray:
    """Images of a STAR file in row order, read with starfile + mrcfile (stacks beside the STAR)."""
    names = starfile.read(star)["particles"]["rlnImageName"]
    out = []
    for name in names:
        i, f = name.split("@")
        with mrcfile.open(star.parent / f) as m:
            out.append(np.array(m.data[int(i) - 1]))
    return np.stack(out)


def assert_records_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Two structured arrays hold the same fields and values (NaN equal to NaN)."""
    assert a.dtype == b.dtype and len(a) == len(b)
    for name in a.dtype.names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def rotations(df) -> np.ndarray:
    from renderers.cameras import euler_zyz_to_matrix

    return euler_zyz_to_matrix(*(torch.deg2rad(torch.as_tensor(np.array(df[c], dtype=np.float64)))
                                 for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).numpy()


# ----------------------------------------------------------------------------- downsample
def test_downsample_writes_stacks_and_a_relion_star(sim, down):
    src, out = starfile.read(sim / "particles.star"), starfile.read(down / "particles.star")
    o, p, sp = out["optics"], out["particles"], src["particles"]
    assert o["rlnImagePixelSize"].tolist() == [2.5] and o["rlnImageSize"].tolist() == [32]
    assert sorted(f.name for f in down.glob("*.mrcs")) == ["particles_000.mrcs", "particles_001.mrcs",
                                                            "particles_002.mrcs"]
    with mrcfile.open(down / "particles_002.mrcs") as m:
        assert m.data.shape == (8, 32, 32) and m.voxel_size.x == pytest.approx(2.5)
    assert p["rlnPlatoSourceRow"].tolist() == list(range(48))
    np.testing.assert_allclose(rotations(p), rotations(sp), atol=1e-5)
    for c in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        np.testing.assert_allclose(p[c], sp[c], atol=1e-5, err_msg=c)
    for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert o[c].tolist() == src["optics"][c].tolist()
    want = crop_reference(stack_images(sim / "particles.star").astype(np.float64), 32)
    np.testing.assert_allclose(stack_images(down / "particles.star"), want, atol=2e-5 * np.abs(want).max())
    rec = json.loads((down / "downsample.json").read_text())
    assert rec["source"] == str(sim / "particles.star") and rec["n_particles"] == 48
    # Plato reads it with no flags: the pixel size and box of the STAR
    ps = load_particles(down / "particles.star")
    assert ps.pixel_size == 2.5 and ps.box == 32 and len(ps) == 48


def test_train_on_the_downsampled_star_needs_no_flags(run):
    rec = json.loads((run / "model.json").read_text())
    assert rec["pixel_size"] == 2.5 and rec["box"] == 32 and rec["n_particles"] == 48
    assert np.load(run / "analysis" / "latents.npy").shape == (48, 2)


def test_a_cryosparc_source_gives_the_same_downsampled_set(sim, down, tmp_path):
    assert cryoem("downsample", "--particles", sim / "orig.cs", "--box", 32, "--quiet", "--out", tmp_path / "d") == 0
    a, b = starfile.read(tmp_path / "d" / "particles.star"), starfile.read(down / "particles.star")
    assert a["optics"]["rlnImagePixelSize"].tolist() == [2.5]
    ref = stack_images(down / "particles.star")
    np.testing.assert_allclose(stack_images(tmp_path / "d" / "particles.star"), ref, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(rotations(a["particles"]), rotations(b["particles"]), atol=1e-5)
    for c in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusAngle"):
        np.testing.assert_allclose(a["particles"][c], b["particles"][c], atol=2e-3, err_msg=c)  # .cs holds float32
    assert json.loads((tmp_path / "d" / "downsample.json").read_text())["source_format"] == "cs"


def test_odd_and_non_dividing_boxes(sim, tmp_path, capsys):
    """An odd output box is refused (RELION expects even boxes), as is a box larger than the input; a box
    that does not divide the input gives the pixel size apix * D_in / D_out exactly."""
    line = one_line_error(capsys, "downsample", "--particles", sim / "particles.star", "--box", 33,
                          "--out", tmp_path / "a")
    assert "--box 33" in line and "even" in line
    line = one_line_error(capsys, "downsample", "--particles", sim / "particles.star", "--box", 66,
                          "--out", tmp_path / "a")
    assert "larger than the input box (64 px)" in line
    assert not (tmp_path / "a").exists()
    rc, out, err = run_cli(capsys, "downsample", "--particles", sim / "particles.star", "--box", 48, "--quiet",
                           "--out", tmp_path / "b")
    assert rc == 0, err
    # exact in downsample.json; in the STAR to the 6 decimals RELION writes
    assert json.loads((tmp_path / "b" / "downsample.json").read_text())["pixel_size_out"] == 1.25 * 64 / 48
    apix = float(starfile.read(tmp_path / "b" / "particles.star")["optics"]["rlnImagePixelSize"][0])
    assert apix == round(1.25 * 64 / 48, 6) and load_particles(tmp_path / "b" / "particles.star").pixel_size == apix
    want = crop_reference(stack_images(sim / "particles.star")[:5].astype(np.float64), 48)
    got = stack_images(tmp_path / "b" / "particles.star")[:5]
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_the_console_script_exits_2_with_one_line(sim, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([Path(sys.executable).parent / "cryoem", "downsample", "--particles", sim / "particles.star",
                        "--box", "33", "--out", tmp_path / "o"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "--box 33" in r.stderr
    assert not (tmp_path / "o").exists()


def test_downsample_user_errors_write_nothing(sim, down, tmp_path, capsys):
    star = sim / "particles.star"
    for particles, args, words in [
        (star, ("--box", 0), "--box 0"),
        (star, ("--box", 32, "--chunk", 0), "--chunk 0"),
        (sim / "particles.mrcs", ("--box", 32), ".star or cryoSPARC .cs"),
        (tmp_path / "missing.star", ("--box", 32), "not found"),
    ]:
        assert words in one_line_error(capsys, "downsample", "--particles", particles, *args, "--out", tmp_path / "o")
        assert not (tmp_path / "o").exists()
    before = tree(down)
    assert "not empty" in one_line_error(capsys, "downsample", "--particles", star, "--box", 16, "--out", down)
    # --overwrite of the source's own folder would replace the source STAR: refused
    assert "replace the source" in one_line_error(capsys, "downsample", "--particles", down / "particles.star",
                                                  "--box", 16, "--overwrite", "--out", down)
    assert tree(down) == before


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_an_image_with_nan_stops_and_leaves_no_stacks(sim, tmp_path, capsys):
    with mrcfile.open(sim / "particles.mrcs") as m:
        imgs = np.array(m.data)
    imgs[30, 5, 5] = np.nan
    (tmp_path / "src").mkdir()
    with mrcfile.new(tmp_path / "src" / "particles.mrcs") as m:
        m.set_data(imgs)
    (tmp_path / "src" / "particles.star").write_bytes((sim / "particles.star").read_bytes())
    line = one_line_error(capsys, "downsample", "--particles", tmp_path / "src" / "particles.star", "--box", 32,
                          "--chunk", 10, "--quiet", "--out", tmp_path / "o")
    assert "row 31" in line and "NaN" in line
    assert not (tmp_path / "o").exists()  # the three stacks written before image 31 were removed


# ----------------------------------------------------------------------------- downsampled vs native, by backprojection
def ramp_filter(images: torch.Tensor) -> torch.Tensor:
    D = images.shape[-1]
    w = torch.sqrt(torch.fft.fftfreq(D, dtype=images.dtype)[:, None] ** 2
                   + torch.fft.rfftfreq(D, dtype=images.dtype)[None] ** 2)
    return torch.fft.irfft2(torch.fft.rfft2(images) * w, s=(D, D))


def backproject(star: Path, pixel_size: float | None = None, batch: int = 16) -> torch.Tensor:
    """Phase-flipped, re-centred, ramp-filtered real-space backprojection with the STAR's poses, shifts and CTF,
    at ``pixel_size`` (default: the STAR's), evaluated at the voxels of a D^3 map within D/2 - 2 voxels of the
    centre: (V,) float32. Cameras follow ``renderers.cameras`` (as tests/cryoem/test_conventions.py)."""
    from cryoem.ctf import ctf_2d
    from cryoem.imaging import fourier_filter
    from renderers.cameras import Camera

    ps = load_particles(star)
    apix, D, N = pixel_size or ps.pixel_size, ps.box, len(ps)
    b = ps.read_batch(np.arange(N))
    flip = torch.sign(ctf_2d(ps.meta.ctf_params(), D, apix, dtype=torch.float64))
    img = ramp_filter(fourier_filter(b["image"].double(), apix, -b["shift_A"].double(), flip)[:, 0]).float()
    r = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    inside = (x**2 + y**2 + z**2) < (D // 2 - 2) ** 2
    world = (torch.stack([x, y, z], -1)[inside] * apix)[None]
    vol = torch.zeros(world.shape[1])
    for s in range(0, N, batch):
        R = b["R"][s:s + batch]
        cam = Camera.from_pose(R, torch.zeros(len(R), 2), apix, D)
        uv, _ = cam.project(world.expand(len(R), -1, 3))
        grid = (uv / D * 2 - 1)[:, :, None]  # align_corners=False: pixel j spans [j, j+1)
        vol += torch.nn.functional.grid_sample(img[s:s + batch, None], grid, align_corners=False).sum(0).reshape(-1)
    return vol


def map_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_downsampled_128px_backprojects_like_a_native_64px_simulation(tmp_path):
    """128 px at 1 Å/px downsampled to 64 px at 2 Å/px against native 64 px simulations at 2 Å/px.

    ``n1`` is the native twin of the 128 px set (same seed: same poses, shifts in Å, CTF); ``n2`` has other
    poses. Downsampled images match their twins (per-image correlation > 0.995), and the downsampled map
    correlates with ``n2``'s as well as ``n1``'s does, within 0.01. Why 0.01: the native renderer integrates
    each atom over the 2 Å pixel (a box filter: sinc, 0.64 at Nyquist) while the crop band-limits the 1 Å
    image, so two native sets share an attenuation that the downsampled set lacks; that costs 0.003-0.004
    here (0.8964 against 0.8999). 0.01 still catches a half-pixel centre error (it costs 0.016) and the
    input pixel size left in the STAR (the correlation falls below 0).
    """
    common = ("--structure", DATA / "1ubi.pdb", "--select", "ca", "--n", 100, "--snr", 1000, "--quiet")
    assert cryoem("simulate", *common, "--box", 128, "--apix", 1.0, "--shift-std", 2, "--seed", 1,
                  "--out", tmp_path / "s128") == 0
    assert cryoem("downsample", "--particles", tmp_path / "s128" / "particles.star", "--box", 64, "--quiet",
                  "--out", tmp_path / "d64") == 0
    for seed in (1, 2):  # shifts of 1 px at 2 Å/px: the same shifts in Å as 2 px at 1 Å/px
        assert cryoem("simulate", *common, "--box", 64, "--apix", 2.0, "--shift-std", 1, "--seed", seed,
                      "--out", tmp_path / f"n{seed}") == 0
    down, twin = stack_images(tmp_path / "d64" / "particles.star"), stack_images(tmp_path / "n1" / "particles.star")
    per_image = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(down, twin)]
    assert min(per_image) > 0.995, min(per_image)
    d, n1, n2 = (backproject(tmp_path / f / "particles.star") for f in ("d64", "n1", "n2"))
    native, got = map_corr(n1, n2), map_corr(d, n2)
    assert got >= native - 0.01, (got, native)
    # the controls: a half-pixel centre error, and the input pixel size left in the STAR
    stack = tmp_path / "d64" / "particles_000.mrcs"
    with mrcfile.open(stack, mode="r+") as m:
        m.data[:] = np.fft.irfft2(np.fft.rfft2(m.data) * half_pixel_phase(64), s=(64, 64)).astype(np.float32)
    assert map_corr(backproject(tmp_path / "d64" / "particles.star"), n2) < native - 0.01
    assert map_corr(backproject(tmp_path / "d64" / "particles.star", pixel_size=1.0), n2) < native - 0.5


def half_pixel_phase(D: int) -> np.ndarray:
    """rfft2 phase ramp (D, D//2+1) that moves an image by half a pixel along x and y."""
    ky, kx = np.fft.fftfreq(D)[:, None], np.fft.rfftfreq(D)[None]
    return np.exp(-2j * np.pi * (kx + ky) * 0.5)


# ----------------------------------------------------------------------------- select, on a real run
def test_select_clusters_writes_the_original_rows(run, sim, tmp_path, capsys):
    from cryoem.analyze import kmeans

    z = np.load(run / "analysis" / "latents.npy")
    labels = kmeans(z, 2)[1]  # analyze ran with --k 2
    assert np.array_equal(np.load(run / "analysis" / "kmeans_labels.npy"), labels)
    rc, out, err = run_cli(capsys, "select", run, "--clusters", 1, "--out", tmp_path / "c1.star")
    assert rc == 0, err
    src, sub = starfile.read(sim / "particles.star"), starfile.read(tmp_path / "c1.star")
    rows = np.flatnonzero(labels == 1)
    pd.testing.assert_frame_equal(sub["particles"], src["particles"].iloc[rows].reset_index(drop=True))
    pd.testing.assert_frame_equal(sub["optics"], src["optics"])
    # every kept line is the original's text, byte for byte, and in the original order
    src_lines = (sim / "particles.star").read_text().splitlines()
    sub_lines = (tmp_path / "c1.star").read_text().splitlines()
    assert set(sub_lines) <= set(src_lines) and sub_lines == [s for s in src_lines if s in set(sub_lines)]
    # --invert gives the rest: together the whole set, no overlap
    assert cryoem("select", run, "--clusters", 1, "--invert", "--out", tmp_path / "rest.star") == 0
    a = set(sub["particles"]["rlnImageName"])
    b = set(starfile.read(tmp_path / "rest.star")["particles"]["rlnImageName"])
    assert not a & b and a | b == set(src["particles"]["rlnImageName"])
    # the same selection made directly on the original (the run's particles given as the 64 px STAR)
    assert cryoem("select", run, "--clusters", 1, "--particles", sim / "particles.star",
                  "--out", tmp_path / "direct.star") == 0
    assert (tmp_path / "direct.star").read_bytes() == (tmp_path / "c1.star").read_bytes()


def test_per_cluster_pc_polygon_and_indices(run, sim, tmp_path):
    from sklearn.decomposition import PCA

    z = np.load(run / "analysis" / "latents.npy")
    src = starfile.read(sim / "particles.star")["particles"]
    assert cryoem("select", run, "--per-cluster", "--out", tmp_path / "k.star") == 0
    parts = [starfile.read(tmp_path / f"k_cluster{c:02d}.star")["particles"] for c in (0, 1)]
    assert sorted(sum((p["rlnImageName"].tolist() for p in parts), [])) == sorted(src["rlnImageName"])
    pc1 = PCA(2).fit(z).transform(z)[:, 0]
    assert cryoem("select", run, "--pc", "1:0:", "--out", tmp_path / "pc.star") == 0
    got = starfile.read(tmp_path / "pc.star")["particles"]
    pd.testing.assert_frame_equal(got, src.iloc[np.flatnonzero(pc1 >= 0)].reset_index(drop=True))
    big = 1e3
    (tmp_path / "poly.json").write_text(json.dumps([[0, -big], [big, -big], [big, big], [0, big]]))
    assert cryoem("select", run, "--polygon", tmp_path / "poly.json", "--out", tmp_path / "poly.star") == 0
    assert (tmp_path / "poly.star").read_bytes() == (tmp_path / "pc.star").read_bytes()
    np.save(tmp_path / "idx.npy", np.array([30, 5, 1, 5]))
    assert cryoem("select", run, "--indices", tmp_path / "idx.npy", "--out", tmp_path / "i.star") == 0
    got = starfile.read(tmp_path / "i.star")["particles"]
    pd.testing.assert_frame_equal(got, src.iloc[[1, 5, 30]].reset_index(drop=True))  # source order, once each


def test_cs_subset_through_a_downsampled_copy_keeps_every_field(run, sim, tmp_path):
    """The run's particles given as a downsampled copy of the .cs: the subset is of the .cs, uids and all."""
    assert cryoem("downsample", "--particles", sim / "orig.cs", "--box", 32, "--quiet", "--out", tmp_path / "d") == 0
    np.save(tmp_path / "idx.npy", np.array([40, 2, 17]))
    assert cryoem("select", run, "--indices", tmp_path / "idx.npy", "--particles", tmp_path / "d" / "particles.star",
                  "--out", tmp_path / "sub.cs") == 0
    assert not (tmp_path / "sub.cs.npy").exists()
    orig, sub = np.load(sim / "orig.cs"), np.load(tmp_path / "sub.cs")
    assert sub["uid"].tolist() == orig["uid"][[2, 17, 40]].tolist()
    assert_records_equal(sub, orig[[2, 17, 40]])


# ----------------------------------------------------------------------------- select on real RELION / cryoSPARC files
def fake_run(root: Path, particles: Path, n: int) -> Path:
    """A run folder as select reads it: model.json naming the particles, and analysis/latents.npy."""
    run = root / "run"
    (run / "analysis").mkdir(parents=True)
    rec = {"data": {"particles": str(particles), "structure": str(root / "model.pdb")}, "model": {},
           "offset": [0.0, 0.0, 0.0], "noise_sigma": 1.0, "n_particles": n}
    (run / "model.json").write_text(json.dumps(rec))
    np.save(run / "analysis" / "latents.npy", np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32))
    return run


@pytest.mark.parametrize("name", ["relion31.6opticsgroups.star", "relion31.star",
                                  "FinalRefinement-OriginalParticles-PfCRT.star"])
def test_star_subset_keeps_every_column_and_the_optics(name, tmp_path):
    src = tmp_path / name
    src.write_bytes((DATA / name).read_bytes())
    ref = starfile.read(src, always_dict=True)
    block = next(k for k, v in ref.items() if k != "optics" and "rlnImageName" in v.columns)
    n = len(ref[block])
    run = fake_run(tmp_path, src, n)
    rows = np.array(sorted({n - 1, 0, n // 2}))
    np.save(tmp_path / "idx.npy", rows[::-1].copy())
    assert cryoem("select", run, "--indices", tmp_path / "idx.npy", "--out", tmp_path / "sub.star") == 0
    sub = starfile.read(tmp_path / "sub.star", always_dict=True)
    assert list(sub) == list(ref)
    pd.testing.assert_frame_equal(sub[block], ref[block].iloc[rows].reset_index(drop=True))
    for k in ref:
        if k != block:
            pd.testing.assert_frame_equal(sub[k], ref[k])
    assert cryoem("select", run, "--indices", tmp_path / "idx.npy", "--invert", "--out", tmp_path / "inv.star") == 0
    inv = starfile.read(tmp_path / "inv.star", always_dict=True)[block]
    pd.testing.assert_frame_equal(inv, ref[block].drop(index=ref[block].index[rows]).reset_index(drop=True))


def test_a_half_set_run_selects_from_half1s_particles(tmp_path):
    """Half-set runs keep model.json in half1/ and half2/ and the analysis (every particle) in RUN/analysis."""
    src = tmp_path / "run_data.star"
    src.write_bytes((DATA / "relion31.star").read_bytes())
    run = fake_run(tmp_path, src, 5)
    rec = (run / "model.json").read_text()
    (run / "model.json").unlink()
    for h in ("half1", "half2"):
        (run / h).mkdir()
        (run / h / "model.json").write_text(rec)
    np.save(tmp_path / "idx.npy", np.array([3, 0]))
    assert cryoem("select", run, "--indices", tmp_path / "idx.npy", "--out", tmp_path / "sub.star") == 0
    ref = starfile.read(src)["particles"]
    pd.testing.assert_frame_equal(starfile.read(tmp_path / "sub.star")["particles"],
                                  ref.iloc[[0, 3]].reset_index(drop=True))


def test_cs_subset_of_a_real_cryosparc_export(tmp_path):
    src = tmp_path / "P12_J24_particles.cs"
    src.write_bytes((DATA / "cryosparc_P12_J24_001_particles.cs").read_bytes())
    orig = np.load(src)
    run = fake_run(tmp_path, src, len(orig))
    assert cryoem("select", run, "--pc", "2:-0.3:0.5", "--out", tmp_path / "sub.cs") == 0
    assert cryoem("select", run, "--pc", "2:-0.3:0.5", "--invert", "--out", tmp_path / "inv.cs") == 0
    sub, inv = np.load(tmp_path / "sub.cs"), np.load(tmp_path / "inv.cs")
    assert sub.dtype == orig.dtype and 0 < len(sub) < len(orig) and len(sub) + len(inv) == len(orig)
    assert not set(sub["uid"].tolist()) & set(inv["uid"].tolist())
    keep = np.isin(orig["uid"], sub["uid"])
    assert_records_equal(sub, orig[keep])  # every field, in source order


def test_select_user_errors_write_nothing(run, sim, tmp_path, capsys):
    out = tmp_path / "o.star"
    cases = [
        (("select", run, "--out", out), "give one selection"),
        (("select", run, "--clusters", "5", "--out", out), "clusters 0 to 1"),
        (("select", run, "--clusters", "a", "--out", out), "--clusters a"),
        (("select", run, "--clusters", "0", "--out", tmp_path / "o.cs"), "must end in .star"),
        (("select", run, "--pc", "3:0:1", "--out", out), "PCs 1 to 2"),
        (("select", run, "--pc", "1:2:1", "--out", out), "LO < HI"),
        (("select", run, "--pc", "1:0", "--out", out), "PC:LO:HI"),
        (("select", run, "--indices", tmp_path / "nope.npy", "--out", out), "not found"),
        (("select", run, "--polygon", sim / "particles.star", "--out", out), "--polygon"),
        (("select", tmp_path, "--clusters", "0", "--out", out), "cryoem analyze"),
        (("select", run, "--clusters", "0", "--particles", sim / "particles.star", "--overwrite",
          "--out", sim / "particles.star"), "one of the run's particle files"),
        (("select", run, "--pc", "1:1e9:", "--out", out), "none of the run's 48 particles"),
    ]
    np.save(tmp_path / "big.npy", np.array([0, 48]))
    cases.append((("select", run, "--indices", tmp_path / "big.npy", "--out", out), "outside 0..47"))
    before = tree(sim)
    for args, words in cases:
        assert words in one_line_error(capsys, *args), args
        assert not out.exists() and not (tmp_path / "o.cs").exists()
    assert tree(sim) == before
    out.write_text("keep me")
    assert "--overwrite" in one_line_error(capsys, "select", run, "--clusters", "0", "--out", out)
    assert out.read_text() == "keep me"


def test_select_follows_a_moved_original_only_when_told(run, sim, down, tmp_path, capsys):
    """Copy the downsampled set elsewhere and move the original: select says where it looked, and --source
    points it at the original's new place."""
    (tmp_path / "d").mkdir()
    for f in down.iterdir():
        (tmp_path / "d" / f.name).write_bytes(f.read_bytes())
    rec = json.loads((tmp_path / "d" / "downsample.json").read_text())
    rec["source"], rec["source_relative"] = str(tmp_path / "gone.star"), "gone.star"
    (tmp_path / "d" / "downsample.json").write_text(json.dumps(rec))
    line = one_line_error(capsys, "select", run, "--clusters", "0", "--particles", tmp_path / "d" / "particles.star",
                          "--out", tmp_path / "o.star")
    assert "--source" in line and "gone.star" in line
    assert cryoem("select", run, "--clusters", "0", "--particles", tmp_path / "d" / "particles.star",
                  "--source", sim / "particles.star", "--out", tmp_path / "o.star") == 0
    assert cryoem("select", run, "--clusters", "0", "--out", tmp_path / "ref.star") == 0
    assert (tmp_path / "o.star").read_bytes() == (tmp_path / "ref.star").read_bytes()
    # a source with another particle count is not the original
    line = one_line_error(capsys, "select", run, "--clusters", "0", "--particles", tmp_path / "d" / "particles.star",
                          "--source", DATA / "relion31.star", "--out", tmp_path / "x.star")
    assert "is this the original" in line and not (tmp_path / "x.star").exists()
