"""RELION and cryoSPARC project layouts, built in tmp_path from real interop files and loaded from elsewhere.

The expected values are read independently of ``cryoem.particles``: metadata with ``starfile`` / ``numpy``,
images with ``mrcfile``, rotations with ``scipy``.
"""

import pathlib
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from numpy.lib import recfunctions
from scipy.spatial.transform import Rotation

from cryoem.ctf import CTF_FIELDS
from cryoem.formats.cryosparc import find_passthrough, meta_from_cs
from cryoem.formats.star import meta_from_star
from cryoem.particles import load_particles
from plato_core.runinfo import UserError

DATA = Path(__file__).resolve().parents[1] / "data"
F = {k: i for i, k in enumerate(CTF_FIELDS)}


def _toy_images() -> np.ndarray:
    with mrcfile.open(DATA / "toy_projections_50.mrcs") as m:
        return np.array(m.data)


def _write_stack(path: Path, images: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(images, dtype=np.float32))
    return path


def _read_image(path: Path, i: int) -> np.ndarray:
    with mrcfile.open(path) as m:
        return np.array(m.data[i])


# ----------------------------------------------------------------------------- RELION
NAMES = ["2@Extract/job001/Movies/mic_001.mrcs", "1@Extract/job001/Movies/mic_002.mrcs",
         "3@Extract/job001/Movies/mic_001.mrcs", "4@Extract/job001/Movies/mic_002.mrcs",
         "1@Extract/job001/Movies/mic_001.mrcs"]


def relion_project(root: Path, names=NAMES, star="Refine3D/job002/run_data.star") -> Path:
    """A RELION project: the real relion31.star (5 particles, poses, CTF, origins in Å) as
    ``Refine3D/job002/run_data.star``, its images re-pointed at two ``Extract/job001/Movies`` stacks
    made of real cryoDRGN projections (30 px)."""
    toy = _toy_images()
    _write_stack(root / "Extract/job001/Movies/mic_001.mrcs", toy[:3])
    _write_stack(root / "Extract/job001/Movies/mic_002.mrcs", toy[3:7])
    src = starfile.read(DATA / "relion31.star")
    optics, parts = src["optics"].copy(), src["particles"].copy()
    optics["rlnImageSize"] = toy.shape[-1]
    parts["rlnImageName"] = names
    (root / star).parent.mkdir(parents=True, exist_ok=True)
    starfile.write({"optics": optics, "particles": parts}, root / star)
    return root / star


def relion_R(df) -> np.ndarray:
    """RELION's A (map -> projection) from rot, tilt, psi: the transpose of scipy's intrinsic ZYZ rotation."""
    ang = np.stack([df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"]], 1)
    return Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)


def test_relion_project_loads_from_another_directory(tmp_path, monkeypatch):
    star = relion_project(tmp_path / "proj")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ps = load_particles("../proj/Refine3D/job002/run_data.star", lazy=False)
    ref = starfile.read(star)
    p, o = ref["particles"], ref["optics"]
    m = ps.meta
    assert len(ps) == 5 and ps.box == 30 and m.pixel_size == pytest.approx(float(o["rlnImagePixelSize"][0]))
    for i, name in enumerate(p["rlnImageName"]):
        idx, stack = name.split("@")
        want = _read_image(tmp_path / "proj" / stack, int(idx) - 1)
        assert np.array_equal(ps[i]["image"][0].numpy(), want)
    assert np.allclose(m.R, relion_R(p), atol=1e-10)
    assert np.allclose(m.shift_A, -np.stack([p["rlnOriginXAngst"], p["rlnOriginYAngst"]], 1))
    assert np.allclose(m.ctf[:, F["defocus_u"]], p["rlnDefocusU"]) and np.allclose(m.ctf[:, F["defocus_v"]],
                                                                                   p["rlnDefocusV"])
    assert np.allclose(np.rad2deg(m.ctf[:, F["angle"]]), p["rlnDefocusAngle"])
    assert np.allclose(m.ctf[:, F["voltage"]], o["rlnVoltage"][0]) and np.allclose(m.ctf[:, F["cs"]],
                                                                                    o["rlnSphericalAberration"][0])
    assert np.allclose(m.ctf[:, F["amp_contrast"]], o["rlnAmplitudeContrast"][0])
    assert sorted(f.name for f in m.files) == ["mic_001.mrcs", "mic_002.mrcs"] and all(f.is_absolute() for f in m.files)
    assert m.provenance_line() == ("images: run_data.star; poses: run_data.star; shifts: run_data.star; "
                                   "CTF: run_data.star")


def test_relion_datadir_comes_before_the_star_folder(tmp_path):
    """``datadir`` applies to STAR input, and is tried before the STAR file's own folder."""
    star = relion_project(tmp_path / "proj", names=[n.replace("Extract/job001/Movies/", "") for n in NAMES],
                          star="Select/job003/particles.star")
    toy = _toy_images()
    _write_stack(tmp_path / "proj/Select/job003/mic_001.mrcs", toy[40:43])  # same names beside the STAR file
    _write_stack(tmp_path / "proj/Select/job003/mic_002.mrcs", toy[43:47])
    beside = load_particles(star).images(slice(None))[:, 0].numpy()
    assert np.array_equal(beside[0], toy[41]) and np.array_equal(beside[1], toy[43])
    moved = load_particles(star, datadir=tmp_path / "proj/Extract/job001/Movies").images(slice(None))[:, 0].numpy()
    assert np.array_equal(moved[0], toy[1]) and np.array_equal(moved[1], toy[3]) and np.array_equal(moved[4], toy[0])


def test_relion_nearest_ancestor_wins(tmp_path):
    star = relion_project(tmp_path / "proj")
    toy = _toy_images()
    _write_stack(tmp_path / "proj/Refine3D/Extract/job001/Movies/mic_001.mrcs", toy[20:23])
    _write_stack(tmp_path / "proj/Refine3D/Extract/job001/Movies/mic_002.mrcs", toy[23:27])
    m = meta_from_star(star)
    assert {f.parent for f in m.files} == {tmp_path / "proj/Refine3D/Extract/job001/Movies"}


def test_relion_missing_stack_names_row_path_and_every_place_tried(tmp_path):
    names = NAMES[:2] + ["5@Extract/job009/Movies/gone.mrcs"]
    star = relion_project(tmp_path / "proj", names=names + NAMES[2:4])
    with pytest.raises(UserError) as e:
        load_particles(star, datadir=tmp_path / "dd")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{star}: row 3: image stack Extract/job009/Movies/gone.mrcs not found")
    tried = msg.split("tried ", 1)[1].split(", ")
    job = tmp_path / "proj/Refine3D/job002"
    assert tried[:5] == [str(d / "Extract/job009/Movies/gone.mrcs") for d in
                         (tmp_path / "dd", job, job.parent, tmp_path / "proj", tmp_path)]
    assert tried[-1] == str(Path("/") / "Extract/job009/Movies/gone.mrcs")  # up to the filesystem root


def test_relion_stack_names_are_looked_up_once_each(tmp_path, monkeypatch):
    """2,000 rows naming 2 stacks cost a few file lookups, not 2,000."""
    names = [f"{i % 3 + 1}@Extract/job001/Movies/mic_00{i % 2 + 1}.mrcs" for i in range(2000)]
    star = relion_project(tmp_path / "proj")
    src = starfile.read(star)
    parts = src["particles"].iloc[np.arange(2000) % 5].reset_index(drop=True)
    parts["rlnImageName"] = names
    starfile.write({"optics": src["optics"], "particles": parts}, star, overwrite=True)
    calls = []
    is_file = pathlib.Path.is_file
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: calls.append(self) or is_file(self))
    m = meta_from_star(star)
    assert len(m) == 2000 and len(m.files) == 2 and len(calls) <= 10  # 3 folders per name, and the STAR file
    assert list(m.image_idx[:4]) == [0, 1, 2, 0]


# ----------------------------------------------------------------------------- cryoSPARC
MAIN_FIELDS = ["uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A", "blob/sign", "alignments3D/split",
               "alignments3D/shift", "alignments3D/pose", "alignments3D/psize_A"]


def _save_cs(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.save(path) would append .npy
        np.save(f, arr)
    return path


def _add_field(arr: np.ndarray, name: str, values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(arr), dtype=arr.dtype.descr + [(name, values.dtype, values.shape[1:])])
    for k in arr.dtype.names:
        out[k] = arr[k]
    out[name] = values
    return out


def cryosparc_project(root: Path, rows=slice(0, None, 150), main="J3/J3_particles.cs",
                      passthrough="J3/J3_passthrough_particles.cs") -> tuple[Path, np.ndarray]:
    """A cryoSPARC project from the real cryosparc_P12_J24_001_particles.cs (every 150th row):
    ``J3/J3_particles.cs`` keeps uid, blob/* and alignments3D/*, the passthrough file keeps uid and
    ctf/* (shuffled, with rows of other particles) plus a stale ``alignments3D/pose`` that must lose.
    Blobs are re-pointed at ``J2/extract/<name>`` stacks of real cryoDRGN projections (30 px).

    Returns the main file and the source rows, with blob/path and blob/shape as written.
    """
    full = np.load(DATA / "cryosparc_P12_J24_001_particles.cs")
    src = full[rows].copy()
    toy = _toy_images()
    src["blob/path"] = [b"J2/extract/" + Path(p.decode()).name.encode() for p in src["blob/path"]]
    src["blob/shape"] = toy.shape[-1]
    for k, name in enumerate(np.unique(src["blob/path"])):
        n = int(src["blob/idx"][src["blob/path"] == name].max()) + 1
        _write_stack(root / name.decode(), toy[(np.arange(n) + 7 * k) % len(toy)])
    _save_cs(root / main, recfunctions.repack_fields(src[MAIN_FIELDS]))
    ctf_fields = ["uid"] + [k for k in src.dtype.names if k.startswith("ctf/")]
    extra = full[1:len(src) * 150:150][:3]  # other particles of the same job
    pt = np.concatenate([recfunctions.repack_fields(src[ctf_fields]), recfunctions.repack_fields(extra[ctf_fields])])
    pt = _add_field(pt[np.random.default_rng(0).permutation(len(pt))], "alignments3D/pose",
                    np.zeros((len(pt), 3), np.float32))
    if passthrough:
        _save_cs(root / passthrough, pt)
    return root / main, src


def test_cryosparc_project_with_passthrough_loads_from_another_directory(tmp_path, monkeypatch):
    main, src = cryosparc_project(tmp_path / "proj")
    assert len(src) == 14 and len(np.unique(src["blob/path"])) > 1
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ps = load_particles("../proj/J3/J3_particles.cs")
    m = ps.meta
    raw_main = np.load(tmp_path / "proj/J3/J3_particles.cs")
    raw_pt = np.load(tmp_path / "proj/J3/J3_passthrough_particles.cs")
    assert "ctf/df1_A" not in raw_main.dtype.names and "ctf/df1_A" in raw_pt.dtype.names
    psize = float(src["blob/psize_A"][0])
    assert len(ps) == len(src) and ps.box == 30 and m.pixel_size == pytest.approx(psize)
    for i in range(len(src)):
        want = _read_image(tmp_path / "proj" / src["blob/path"][i].decode(), int(src["blob/idx"][i]))
        assert np.array_equal(ps[i]["image"][0].numpy(), want)
    R = Rotation.from_rotvec(src["alignments3D/pose"].astype(np.float64)).as_matrix().transpose(0, 2, 1)
    assert np.allclose(m.R, R, atol=1e-6)  # the main file's poses, not the passthrough's zeros
    assert np.allclose(m.shift_A, -src["alignments3D/shift"] * psize, atol=1e-5)
    for field, key in (("defocus_u", "ctf/df1_A"), ("defocus_v", "ctf/df2_A"), ("angle", "ctf/df_angle_rad"),
                       ("voltage", "ctf/accel_kv"), ("cs", "ctf/cs_mm"), ("amp_contrast", "ctf/amp_contrast"),
                       ("phase_shift", "ctf/phase_shift_rad"), ("scale", "ctf/scale")):
        assert np.allclose(m.ctf[:, F[field]], src[key]), field
    assert m.provenance == {"images": "J3_particles.cs", "poses": "J3_particles.cs", "shifts": "J3_particles.cs",
                            "ctf": "J3_passthrough_particles.cs"}
    assert m.provenance_line() == ("images: J3_particles.cs; poses: J3_particles.cs; shifts: J3_particles.cs; "
                                   "CTF: J3_passthrough_particles.cs")


def test_cryosparc_datadir_and_explicit_passthrough(tmp_path):
    main, src = cryosparc_project(tmp_path / "proj", main="exports/sel.cs", passthrough="exports/ctf_only.cs")
    moved = tmp_path / "elsewhere/sel.cs"
    moved.parent.mkdir()
    moved.write_bytes(main.read_bytes())
    no_ctf = meta_from_cs(moved, datadir=tmp_path / "proj")  # no passthrough under cryoSPARC's naming
    assert no_ctf.ctf is None and "ctf" not in no_ctf.provenance
    ps = load_particles(moved, datadir=tmp_path / "proj", passthrough=tmp_path / "proj/exports/ctf_only.cs")
    assert np.allclose(ps.meta.ctf[:, F["defocus_u"]], src["ctf/df1_A"]) and ps.meta.provenance["ctf"] == "ctf_only.cs"
    assert ps.meta.files[0].parent == tmp_path / "proj/J2/extract"


def test_cryosparc_passthrough_naming(tmp_path):
    job = tmp_path / "J12"
    job.mkdir()
    for name in ("cryosparc_P1_J12_003_particles.cs", "P1_J12_passthrough_particles.cs", "J46_particles_selected.cs",
                 "J46_passthrough_particles_selected.cs", "J13_passthrough_particles.cs", "J7_particles.cs"):
        (job / name).touch()
    assert find_passthrough(job / "cryosparc_P1_J12_003_particles.cs") == job / "P1_J12_passthrough_particles.cs"
    assert find_passthrough(job / "J46_particles_selected.cs") == job / "J46_passthrough_particles_selected.cs"
    assert find_passthrough(job / "J7_particles.cs") is None  # J12 and J13 belong to other jobs
    assert find_passthrough(job / "P1_J12_passthrough_particles.cs") is None
    (job / "particles.cs").touch()  # no job in the name: the folder's (J12) decides
    assert find_passthrough(job / "particles.cs") == job / "P1_J12_passthrough_particles.cs"
    old = tmp_path / "P6/J46"  # cryoSPARC v2 named a Select 2D job's outputs without the job
    old.mkdir(parents=True)
    for name in ("particles_selected.cs", "passthrough_particles_selected.cs", "passthrough_particles_excluded.cs"):
        (old / name).touch()
    assert find_passthrough(old / "particles_selected.cs") == old / "passthrough_particles_selected.cs"
    (job / "J12_passthrough_particles.cs").touch()
    with pytest.raises(UserError, match=r"J12_003_particles.cs: several passthrough files beside it \("):
        find_passthrough(job / "cryosparc_P1_J12_003_particles.cs")


def test_cryosparc_passthrough_must_hold_every_uid(tmp_path):
    main, src = cryosparc_project(tmp_path / "proj", passthrough=None)
    pt = np.load(DATA / "cryosparc_P12_J24_001_particles.cs")[1:2000:150]  # other particles
    _save_cs(tmp_path / "proj/J3/J3_passthrough_particles.cs", pt)
    with pytest.raises(UserError) as e:
        meta_from_cs(main)
    assert str(e.value) == (f"{main}: row 1: uid {src['uid'][0]} is not in the passthrough file "
                            f"{tmp_path / 'proj/J3/J3_passthrough_particles.cs'}; the files describe different "
                            "particles")


def test_check_command_takes_datadir_and_passthrough_and_says_where_fields_came_from(tmp_path, capsys):
    from cryoem.cli import main

    main_cs, src = cryosparc_project(tmp_path / "proj", main="exports/sel.cs", passthrough="exports/ctf_only.cs")
    moved = tmp_path / "elsewhere/sel.cs"
    moved.parent.mkdir()
    moved.write_bytes(main_cs.read_bytes())
    rc = main(["check", str(moved), "--datadir", str(tmp_path / "proj"),
               "--passthrough", str(tmp_path / "proj/exports/ctf_only.cs")])
    out = capsys.readouterr().out
    assert rc == 0 and f"{len(src)} particles" in out and "CTF: yes" in out
    assert "read from: images: sel.cs; poses: sel.cs; shifts: sel.cs; CTF: ctf_only.cs" in out
