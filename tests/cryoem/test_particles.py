"""Particle I/O: interop with real RELION / cryoSPARC / cryoDRGN files, validation, writers, pickles."""

import pickle
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from cryoem.ctf import CTF_FIELDS, CTFParams
from cryoem.formats.cryodrgn import load_pickle, meta_from_stack
from cryoem.formats.cryosparc import meta_from_cs
from cryoem.formats.mrc import read_mrc, write_mrc, write_mrcs
from cryoem.formats.star import meta_from_star, write_particles, write_star
from cryoem.particles import load_particles
from plato_core.runinfo import UserError
from renderers.cameras import euler_zyz_to_matrix

DATA = Path(__file__).resolve().parents[1] / "data"
CRYOEM = Path(sys.executable).parent / "cryoem"
F = {k: i for i, k in enumerate(CTF_FIELDS)}


def relion_R(df):
    ang = [torch.deg2rad(torch.tensor(df[c].to_numpy(), dtype=torch.float64))
           for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    return euler_zyz_to_matrix(*ang).numpy()


# ----------------------------------------------------------------------------- interop on real files
def test_relion31_star_values():
    ref = starfile.read(DATA / "relion31.v2.star")
    p, o = ref["particles"], ref["optics"]
    m = meta_from_star(DATA / "relion31.v2.star")
    assert len(m) == len(p) == 5
    assert m.pixel_size == pytest.approx(float(o["rlnImagePixelSize"][0])) and m.box == int(o["rlnImageSize"][0])
    assert np.allclose(m.ctf[:, F["defocus_u"]], p["rlnDefocusU"]) and np.allclose(m.ctf[:, F["defocus_v"]],
                                                                                   p["rlnDefocusV"])
    assert np.allclose(np.rad2deg(m.ctf[:, F["angle"]]), p["rlnDefocusAngle"])
    assert np.allclose(m.ctf[:, F["voltage"]], o["rlnVoltage"][0]) and np.allclose(m.ctf[:, F["cs"]],
                                                                                    o["rlnSphericalAberration"][0])
    assert np.allclose(m.R, relion_R(p))
    assert np.allclose(m.shift_A, -np.stack([p["rlnOriginXAngst"], p["rlnOriginYAngst"]], 1))
    assert m.files == [DATA / "relion31.mrcs"] and list(m.image_idx) == list(range(5))


def test_relion30_star_pixels_origins_and_detector_pixel_size():
    ref = starfile.read(DATA / "FinalRefinement-OriginalParticles-PfCRT.star")
    m = meta_from_star(DATA / "FinalRefinement-OriginalParticles-PfCRT.star")
    apix = 1.035 * 1e4 / 10000.0  # rlnDetectorPixelSize (µm) * 1e4 / rlnMagnification
    assert m.pixel_size == pytest.approx(apix)
    assert np.allclose(m.shift_A, -np.stack([ref["rlnOriginX"], ref["rlnOriginY"]], 1) * apix)
    assert np.allclose(m.R, relion_R(ref)) and np.allclose(m.ctf[:, F["defocus_u"]], ref["rlnDefocusU"])
    assert m.files[0] == DATA / "Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs"  # relative to the STAR


def test_relion5_star_values():
    ref = starfile.read(DATA / "relion5.star")
    m = meta_from_star(DATA / "relion5.star")
    assert len(m) == len(ref["particles"]) == 17
    assert m.pixel_size == pytest.approx(0.89) and m.box == 448
    assert np.allclose(m.ctf[:, F["defocus_u"]], ref["particles"]["rlnDefocusU"])
    assert np.allclose(m.R, relion_R(ref["particles"]))
    assert [f.name for f in m.files] == ["toy_images_a.mrcs", "toy_images_b.mrcs"]


def test_optics_groups_with_different_pixel_sizes_are_refused():
    with pytest.raises(UserError, match="relion31.6opticsgroups.star: optics groups disagree on rlnImagePixelSize"):
        meta_from_star(DATA / "relion31.6opticsgroups.star")


def test_optics_groups_are_merged_per_particle(tmp_path):
    ref = starfile.read(DATA / "relion31.6opticsgroups.star")
    o = ref["optics"].copy()
    o["rlnImagePixelSize"] = 1.25
    o["rlnVoltage"] = 200.0 + 10 * np.arange(len(o))
    write_star(tmp_path / "six.star", o, ref["particles"])
    m = meta_from_star(tmp_path / "six.star")
    want = o.set_index("rlnOpticsGroup").loc[ref["particles"]["rlnOpticsGroup"], "rlnVoltage"].to_numpy()
    assert np.allclose(m.ctf[:, F["voltage"]], want) and len(set(want)) > 1


def test_cryosparc_and_relion_agree_on_the_empiar_particles():
    star = meta_from_star(DATA / "empiar_10076_7.star")
    cs = meta_from_cs(DATA / "empiar_10076_7.cs")
    raw = np.load(DATA / "empiar_10076_7.cs")
    ref = starfile.read(DATA / "empiar_10076_7.star")
    assert np.allclose(cs.ctf[:, F["defocus_u"]], raw["ctf/df1_A"]) and np.allclose(star.ctf[:, F["defocus_u"]],
                                                                                     ref["rlnDefocusU"])
    assert np.allclose(star.ctf[:, F["defocus_u"]], cs.ctf[:, F["defocus_u"]], atol=0.1)
    assert np.allclose(star.ctf[:, F["defocus_v"]], cs.ctf[:, F["defocus_v"]], atol=0.1)
    assert np.allclose(star.ctf[:, F["angle"]], cs.ctf[:, F["angle"]], atol=1e-5)
    assert star.pixel_size == pytest.approx(cs.pixel_size, rel=1e-5)
    assert list(star.image_idx) == list(cs.image_idx) == list(range(7))
    assert cs.box == 320 and star.files[0].name == cs.files[0].name == "empiar_10076_7.mrc"


def test_cryosparc_poses_and_shifts():
    raw = np.load(DATA / "cryosparc_P12_J24_001_particles.cs")
    m = meta_from_cs(DATA / "cryosparc_P12_J24_001_particles.cs")
    assert len(m) == len(raw) == 2019 and m.box == 180 and m.pixel_size == pytest.approx(2.95)
    assert np.allclose(m.R, Rotation.from_rotvec(raw["alignments3D/pose"]).as_matrix().transpose(0, 2, 1), atol=1e-6)
    assert np.allclose(m.shift_A, -raw["alignments3D/shift"] * 2.95, atol=1e-5)
    assert np.allclose(m.ctf[:, F["defocus_v"]], raw["ctf/df2_A"]) and np.allclose(m.ctf[:, F["angle"]],
                                                                                    raw["ctf/df_angle_rad"])
    assert m.files[0].parts[-3:-1] == ("J19", "extract")


def test_cryodrgn_pickles(tmp_path):
    R, trans = pickle.load(open(DATA / "toy_rot_trans_50.pkl", "rb"))  # trusted: made for this test suite
    m = meta_from_stack(DATA / "toy_projections_50.mrcs", pixel_size=1.0, poses=DATA / "toy_rot_trans_50.pkl")
    assert np.allclose(m.R, R) and np.allclose(m.shift_A, -trans * 30 * 1.0)
    ctf = load_pickle(DATA / "test_ctf.pkl")
    assert ctf.shape == (1000, 9)
    with pytest.raises(UserError, match="1000 CTF rows but .*toy_projections_50.mrcs holds 50 images"):
        meta_from_stack(DATA / "toy_projections_50.mrcs", ctf=DATA / "test_ctf.pkl")
    with open(tmp_path / "ctf50.pkl", "wb") as f:
        pickle.dump(ctf[:50], f)
    m = meta_from_stack(DATA / "toy_projections_50.mrcs", ctf=tmp_path / "ctf50.pkl")
    assert m.pixel_size == pytest.approx(float(ctf[0, 1]))
    assert np.allclose(m.ctf[:, F["voltage"]], ctf[:50, 5]) and np.allclose(m.ctf[:, F["phase_shift"]],
                                                                             np.deg2rad(ctf[:50, 8]))


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(_Evil.target),))


def test_malicious_pickle_is_refused(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    evil = tmp_path / "poses.pkl"
    evil.write_bytes(pickle.dumps((np.eye(3)[None], _Evil())))
    with pytest.raises(UserError, match="refusing to unpickle pathlib"):
        load_pickle(evil)
    assert not (tmp_path / "pwned").exists()
    os_call = tmp_path / "os.pkl"
    os_call.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned2").encode() + b"'\ntR.")
    out = subprocess.run([CRYOEM, "check", str(DATA / "toy_projections_50.mrcs"), "--poses", str(os_call),
                          "--apix", "1"], capture_output=True, text=True)
    assert out.returncode == 2 and "refusing to unpickle os.system" in out.stderr
    assert not (tmp_path / "pwned2").exists()


# ----------------------------------------------------------------------------- the dataset
def test_particle_set_items_lazy_and_in_memory():
    lazy = load_particles(DATA / "toy_projections_50.mrcs", pixel_size=1.0, poses=DATA / "toy_rot_trans_50.pkl")
    mem = load_particles(DATA / "toy_projections_50.mrcs", pixel_size=1.0, poses=DATA / "toy_rot_trans_50.pkl",
                         lazy=False)
    raw, _, _ = read_mrc(DATA / "toy_projections_50.mrcs")
    item = lazy[7]
    assert item["index"] == 7 and item["image"].shape == (1, 30, 30) and item["R"].shape == (3, 3)
    assert np.array_equal(item["image"][0].numpy(), raw[7]) and torch.equal(mem[7]["image"], item["image"])
    batch = next(iter(torch.utils.data.DataLoader(lazy, batch_size=8)))
    assert batch["image"].shape == (8, 1, 30, 30) and batch["shift_A"].shape == (8, 2)
    assert torch.equal(lazy.images([3, 1]), mem.images([3, 1]))
    picked = lazy.read_batch([3, 1])  # the same particles as the items, in the order asked
    for key in ("image", "R", "shift_A"):
        assert torch.equal(picked[key], torch.stack([lazy[3][key], lazy[1][key]]))
    assert picked["index"].tolist() == [3, 1] and np.array_equal(picked["image"][1, 0].numpy(), raw[1])


# ----------------------------------------------------------------------------- writers
def test_write_particles_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(6, 16, 16, generator=g).numpy()
    R = euler_zyz_to_matrix(*(torch.rand(6, generator=g, dtype=torch.float64) * 2 for _ in range(3))).numpy()
    shift = torch.randn(6, 2, generator=g, dtype=torch.float64).numpy()
    ctf = CTFParams.create(torch.linspace(10000, 20000, 6, dtype=torch.float64), angle=0.4, phase_shift=0.2)
    write_particles(tmp_path, imgs, 1.7, R, shift, ctf)
    blocks = starfile.read(tmp_path / "particles.star")
    assert set(blocks) == {"optics", "particles"} and blocks["optics"]["rlnImagePixelSize"][0] == pytest.approx(1.7)
    ps = load_particles(tmp_path / "particles.star")
    assert ps.box == 16 and np.allclose(ps.meta.R, R, atol=1e-6) and np.allclose(ps.meta.shift_A, shift, atol=1e-5)
    assert np.allclose(ps.meta.ctf, ctf.as_tensor().numpy(), atol=1e-5)  # STAR keeps 6 decimals
    assert np.array_equal(ps.images(slice(None))[:, 0].numpy(), imgs)
    starfile.write(blocks, tmp_path / "again.star")  # and starfile writes what it read
    assert starfile.read(tmp_path / "again.star")["particles"].equals(blocks["particles"])


def test_mrc_map_writer_keeps_voxel_size_and_origin(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "m.mrc", vol, 1.3, origin=(-5.2, -5.2, 4.0))
    with mrcfile.open(tmp_path / "m.mrc") as m:
        assert np.array_equal(m.data, vol) and m.voxel_size.x == pytest.approx(1.3)
        assert (float(m.header.origin.x), float(m.header.origin.z)) == pytest.approx((-5.2, 4.0))
    data, vs, origin = read_mrc(tmp_path / "m.mrc")
    assert vs == pytest.approx(1.3) and origin[0] == pytest.approx(-5.2)


# ----------------------------------------------------------------------------- validation, one case each
def _stack(path, n=4, shape=(8, 8), bad=None):
    imgs = np.ones((n, *shape), dtype=np.float32)
    if bad is not None:
        imgs[bad] = np.nan
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(imgs)
    return path


def _star(path, names, **extra):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0], "rlnImageSize": [8],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": [1] * len(names),
                          "rlnDefocusU": [1e4] * len(names), **extra})
    starfile.write({"optics": optics, "particles": parts}, path)
    return path


def _check(path, *args, capsys):
    """Run ``cryoem check`` in-process (same entry point as the console script)."""
    from cryoem.cli import main

    capsys.readouterr()
    code = main(["check", str(path), *args])
    return code, capsys.readouterr().err.strip()


def test_validation_errors_name_file_and_row_and_exit_2(tmp_path, capsys):
    _stack(tmp_path / "s.mrcs")
    cases = {
        "out of range": (_star(tmp_path / "a.star", ["1@s.mrcs", "9@s.mrcs"]),
                         "a.star: row 2: image 9 is out of range"),
        "missing stack": (_star(tmp_path / "b.star", ["1@s.mrcs", "1@gone.mrcs"]), "b.star: row 2: image stack"),
        "duplicate": (_star(tmp_path / "c.star", ["1@s.mrcs", "2@s.mrcs", "1@s.mrcs"]),
                      r"c.star: row 3: duplicate particle \(same image as row 1\)"),
        "nan metadata": (_star(tmp_path / "d.star", ["1@s.mrcs", "2@s.mrcs"], rlnAngleRot=[0.0, np.nan],
                               rlnAngleTilt=[0.0, 0.0], rlnAnglePsi=[0.0, 0.0]), "d.star: row 2: rlnAngleRot is NaN"),
    }
    _stack(tmp_path / "nan.mrcs", bad=2)
    cases["nan image"] = (_star(tmp_path / "e.star", ["1@nan.mrcs", "3@nan.mrcs"]),
                          "e.star: row 2: image 3 of .*nan.mrcs contains NaN")
    _stack(tmp_path / "rect.mrcs", shape=(8, 10))
    cases["non-square"] = (_star(tmp_path / "f.star", ["1@rect.mrcs"]), "rect.mrcs: images are not square")
    _stack(tmp_path / "big.mrcs", shape=(12, 12))
    cases["box across stacks"] = (_star(tmp_path / "g.star", ["1@s.mrcs", "1@big.mrcs"]),
                                  "big.mrcs: box 12 px differs from")
    for name, (path, pattern) in cases.items():
        with pytest.raises(UserError, match=pattern):
            load_particles(path)
        code, err = _check(path, capsys=capsys)
        assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, name


def test_image_count_must_match_pickle_rows(tmp_path, capsys):
    _stack(tmp_path / "s.mrcs", n=4)
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((np.tile(np.eye(3), (5, 1, 1)), np.zeros((5, 2))), f)
    code, err = _check(tmp_path / "s.mrcs", "--poses", str(tmp_path / "poses.pkl"), "--apix", "1", capsys=capsys)
    assert code == 2 and "5 rotation rows but" in err and "holds 4 images" in err


def test_write_mrcs_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_mrcs(tmp_path / "x.mrcs", np.full((2, 4, 4), np.nan), 1.0)


# ----------------------------------------------------------------------------- inputs that cannot corrupt a run
def _cs_with(path, fields: dict, base=DATA / "empiar_10076_7.cs"):
    """``base`` (a real .cs) with ``fields`` replaced or added, each (N, ...) as given."""
    src = np.load(base)
    keep = [k for k in src.dtype.names if k not in fields]
    out = np.zeros(len(src), dtype=[(k, src.dtype[k]) for k in keep] +
                   [(k, v.dtype, v.shape[1:]) for k, v in fields.items()])
    for k in keep:
        out[k] = src[k]
    for k, v in fields.items():
        out[k] = v
    with open(path, "wb") as f:
        np.save(f, out)
    return path


def _one_line_user_error(fn, *args, match, **kw) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("field, shape, want", [
    ("alignments3D/pose", (7, 6), r"field alignments3D/pose has shape \(7, 6\), expected \(7, 3\)$"),
    ("alignments3D/shift", (7, 3), r"field alignments3D/shift has shape \(7, 3\), expected \(7, 2\)$"),
    ("alignments3D/pose", (7, 2), r"field alignments3D/pose has shape \(7, 2\), expected \(7, 3\)$"),
    ("ctf/df1_A", (7, 2), r"field ctf/df1_A has shape \(7, 2\), expected \(7,\)$"),
])
def test_cryosparc_fields_of_the_wrong_width_are_refused(tmp_path, field, shape, want):
    fields = {"alignments3D/pose": np.zeros((7, 3), np.float32), "alignments3D/shift": np.zeros((7, 2), np.float32)}
    fields[field] = np.ones(shape, np.float32)
    path = _cs_with(tmp_path / "wide.cs", fields)
    msg = _one_line_user_error(meta_from_cs, path, match=want)
    assert msg.startswith(f"{path}: field ")


def _relion_with(path, optics=None, row3=None):
    """relion31.v2.star with optics columns set for every group and particle columns set on row 3."""
    ref = starfile.read(DATA / "relion31.v2.star")
    o, p = ref["optics"].copy(), ref["particles"].copy()
    for k, v in (optics or {}).items():
        o[k] = v
    for k, v in (row3 or {}).items():
        p.loc[2, k] = v
    starfile.write({"optics": o, "particles": p}, path)
    return path


@pytest.mark.parametrize("optics, row3, want", [
    ({"rlnVoltage": 0.0}, None, r"row 1: rlnVoltage: voltage 0 kV must be positive$"),
    ({"rlnVoltage": 300000.0}, None, r"row 1: rlnVoltage: voltage 300000 kV is above 1000 kV \(volts\?\)$"),
    (None, {"rlnDefocusU": -5000.0}, r"row 3: rlnDefocusU: negative defocus -5000 Å"),
    (None, {"rlnDefocusV": -1.0}, r"row 3: rlnDefocusV: negative defocus -1 Å"),
    ({"rlnSphericalAberration": -2.7}, None, r"row 1: rlnSphericalAberration: negative spherical aberration -2.7 mm$"),
    ({"rlnAmplitudeContrast": 1.5}, None, r"row 1: rlnAmplitudeContrast: amplitude contrast 1.5 is outside \[0, 1\]$"),
    ({"rlnImagePixelSize": 0.0}, None, r"row 1: pixel size must be positive, got 0.0$"),
])
def test_unphysical_ctf_in_star_is_refused(tmp_path, capsys, optics, row3, want):
    path = _relion_with(tmp_path / "bad.star", optics, row3)
    msg = _one_line_user_error(meta_from_star, path, match=want)
    assert msg.startswith(f"{path}: row ")
    code, err = _check(path, capsys=capsys)  # `cryoem check` refuses it too (it accepted voltage 0)
    assert code == 2 and err == f"error: {msg}"


@pytest.mark.parametrize("fields, want", [
    ({"ctf/accel_kv": [300.0] * 6 + [0.0]}, r"row 7: ctf/accel_kv: voltage 0 kV must be positive$"),
    ({"ctf/accel_kv": [300000.0] * 7}, r"row 1: ctf/accel_kv: voltage 300000 kV is above 1000 kV \(volts\?\)$"),
    ({"ctf/df1_A": [1e4, 1e4, -2e4, 1e4, 1e4, 1e4, 1e4]}, r"row 3: ctf/df1_A: negative defocus -20000 Å"),
    ({"ctf/cs_mm": [-0.1] * 7}, r"row 1: ctf/cs_mm: negative spherical aberration -0.1 mm$"),
    ({"ctf/amp_contrast": [0.07] * 3 + [-0.07] * 4}, r"row 4: ctf/amp_contrast: amplitude contrast -0.07 is outside"),
    ({"blob/psize_A": [0.0] * 7}, r"row 1: blob/psize_A must be positive, got 0$"),
])
def test_unphysical_ctf_in_cs_is_refused(tmp_path, fields, want):
    path = _cs_with(tmp_path / "bad.cs", {k: np.asarray(v, np.float32) for k, v in fields.items()})
    msg = _one_line_user_error(meta_from_cs, path, match=want)
    assert msg.startswith(f"{path}: row ")


@pytest.mark.parametrize("column, row, value, want", [
    (5, 0, 300000.0, r"row 1: column 6 \(kV\): voltage 300000 kV is above 1000 kV \(volts\?\)$"),
    (5, 9, 0.0, r"row 10: column 6 \(kV\): voltage 0 kV must be positive$"),
    (2, 3, -100.0, r"row 4: column 3 \(dfU, Å\): negative defocus -100 Å"),
    (6, 0, -2.7, r"row 1: column 7 \(Cs, mm\): negative spherical aberration"),
    (7, 0, 2.0, r"row 1: column 8 \(amplitude contrast\): amplitude contrast 2 is outside \[0, 1\]$"),
    (1, 0, 0.0, r"row 1: column 2 \(pixel size\) must be positive, got 0$"),
])
def test_unphysical_ctf_in_pkl_is_refused(tmp_path, column, row, value, want):
    ctf = load_pickle(DATA / "test_ctf.pkl")[:50].copy()
    ctf[row, column] = value
    if column == 1:
        ctf[:, 1] = value
    with open(tmp_path / "ctf.pkl", "wb") as f:
        pickle.dump(ctf, f)
    msg = _one_line_user_error(meta_from_stack, DATA / "toy_projections_50.mrcs", ctf=tmp_path / "ctf.pkl", match=want)
    assert msg.startswith(f"{tmp_path / 'ctf.pkl'}: row ")


@pytest.mark.parametrize("row, change, want", [
    (4, np.diag([2.0, 1.0, 1.0]), r"row 5: not a rotation matrix \(max \|R\^T R - I\| = 3, det R = 2"),
    (2, np.diag([1.0, 1.0, -1.0]), r"row 3: not a rotation matrix \(max \|R\^T R - I\| = [0-9.e-]+, det R = -1"),
    (0, np.full((3, 3), 0.0), r"row 1: not a rotation matrix"),
])
def test_pose_pkl_rotations_that_are_not_rotations_are_refused(tmp_path, row, change, want):
    R, trans = pickle.load(open(DATA / "toy_rot_trans_50.pkl", "rb"))  # trusted: made for this test suite
    R = np.array(R, dtype=np.float64)
    R[row] = R[row] @ change
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((R, trans), f)
    msg = _one_line_user_error(meta_from_stack, DATA / "toy_projections_50.mrcs", pixel_size=1.0,
                               poses=tmp_path / "poses.pkl", match=want)
    assert msg.startswith(f"{tmp_path / 'poses.pkl'}: row ")


def test_pixel_size_that_contradicts_the_metadata_warns(tmp_path, capsys):
    star_apix = float(starfile.read(DATA / "relion31.v2.star")["optics"]["rlnImagePixelSize"][0])
    cs_apix = float(np.load(DATA / "empiar_10076_7.cs")["blob/psize_A"][0])
    capsys.readouterr()
    assert meta_from_star(DATA / "relion31.v2.star", pixel_size=1.5).pixel_size == 1.5  # the user's wins for STAR
    err = capsys.readouterr().err
    assert err == (f"warning: {DATA / 'relion31.v2.star'}: pixel size 1.5 Å/px given, but the STAR file says "
                   f"{star_apix:g} Å/px; using 1.5 Å/px\n")
    assert meta_from_cs(DATA / "empiar_10076_7.cs", pixel_size=2.0).pixel_size == pytest.approx(cs_apix)  # file wins
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {DATA / 'empiar_10076_7.cs'}: pixel size 2 Å/px given, but blob/psize_A says "
                          f"{cs_apix:g} Å/px; using {cs_apix:g} Å/px") and err.count("\n") == 1
    ctf = load_pickle(DATA / "test_ctf.pkl")[:50]
    with open(tmp_path / "ctf50.pkl", "wb") as f:
        pickle.dump(ctf, f)
    assert meta_from_stack(DATA / "toy_projections_50.mrcs", pixel_size=3.0, ctf=tmp_path / "ctf50.pkl").pixel_size == 3
    assert f"pixel size 3 Å/px given, but the CTF pickle's column 2 says {float(ctf[0, 1]):g} Å/px; using 3 Å/px" in (
        capsys.readouterr().err)
    meta_from_star(DATA / "relion31.v2.star", pixel_size=star_apix)  # agreeing values: no warning
    assert capsys.readouterr().err == ""
    _one_line_user_error(meta_from_star, DATA / "relion31.v2.star", pixel_size=-1.0,
                         match=r"relion31.v2.star: pixel size must be positive, got -1.0$")


def test_datadir_applies_to_star_input(tmp_path):
    for d in ("data", "meta"):
        (tmp_path / d).mkdir()
    _stack(tmp_path / "data/s.mrcs")
    star = _star(tmp_path / "meta/a.star", ["1@s.mrcs", "3@s.mrcs"])
    ps = load_particles(star, datadir=tmp_path / "data")
    assert ps.meta.files == [tmp_path / "data/s.mrcs"] and list(ps.meta.image_idx) == [0, 2]


def test_stack_reader_reads_what_mrcfile_reads(tmp_path):
    """Exact byte-range reads (runs of consecutive images coalesced) past an extended header, in float16 and
    big-endian float32, in any order and with repeats, equal mrcfile's own reading of the file."""
    from cryoem.formats.mrc import StackReader

    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.dtype(">f4")):
        imgs = rng.normal(size=(9, 6, 6)).astype(dtype)
        path = tmp_path / f"s_{np.dtype(dtype).str[1:]}.mrcs"
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(imgs)
            m.set_extended_header(np.zeros(5, dtype=[("x", "<i4"), ("y", "<f8")]))
        with mrcfile.open(path) as m:
            ref = np.array(m.data)
            assert m.header.nsymbt == 60
        reader = StackReader(path)
        j = np.array([0, 1, 2, 5, 5, 8, 3])
        assert reader.read(j).dtype == ref.dtype and np.array_equal(reader.read(j), ref[j])
        assert np.array_equal(pickle.loads(pickle.dumps(reader)).read(np.arange(9)), ref)
