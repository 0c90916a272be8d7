"""The format modules' writers give back every column / field of a real file (read independently: starfile, numpy)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoem.formats.cryodrgn import load_pickle, write_pickle
from cryoem.formats.cryosparc import read_cs, write_cs
from cryoem.formats.mrc import read_mrc, write_mrc
from cryoem.formats.star import read_star, star_rows, write_star, write_star_rows

DATA = Path(__file__).resolve().parents[1] / "data"
STARS = ["relion31.star", "relion31.6opticsgroups.star", "relion5.star"]
CS = ["cryosparc_P12_J24_001_particles.cs", "empiar_10076_7.cs"]


def _assert_same_tables(ref: dict, got: dict, where: str) -> None:
    assert list(got) == list(ref), where
    for block, df in ref.items():
        assert list(got[block].columns) == list(df.columns), f"{where}: {block}"
        for col in df.columns:
            a, b = df[col].to_numpy(), got[block][col].to_numpy()
            assert a.dtype == b.dtype, f"{where}: {block}/{col}: {a.dtype} -> {b.dtype}"
            assert np.array_equal(a, b), f"{where}: {block}/{col}: {a[:3]} -> {b[:3]}"


@pytest.mark.parametrize("name", STARS)
def test_write_star_keeps_every_column_of_a_real_file(tmp_path, name):
    blocks = read_star(DATA / name)
    write_star(tmp_path / name, blocks["optics"], blocks["particles"])
    ref = starfile.read(DATA / name, always_dict=True)
    _assert_same_tables(ref, starfile.read(tmp_path / name, always_dict=True), name)


def test_write_star_keeps_digits_beyond_relions_six_decimals(tmp_path):
    # relion5.star has rlnMagMat01 = -0.000704404: %.6f alone would write -0.000704
    blocks = read_star(DATA / "relion5.star")
    assert not np.array_equal(np.round(blocks["optics"]["rlnMagMat01"], 6), blocks["optics"]["rlnMagMat01"])
    write_star(tmp_path / "a.star", blocks["optics"], blocks["particles"], decimals=6)
    assert (starfile.read(tmp_path / "a.star")["optics"]["rlnMagMat01"] == -0.000704).all()


@pytest.mark.parametrize("name", STARS)
def test_star_subset_writer_copies_a_real_file(tmp_path, name):
    n = star_rows(DATA / name)
    write_star_rows(DATA / name, tmp_path / "all.star", np.arange(n))
    assert (tmp_path / "all.star").read_bytes() == (DATA / name).read_bytes()
    rows = np.arange(0, n, 2)
    write_star_rows(DATA / name, tmp_path / "sub.star", rows)
    ref = starfile.read(DATA / name, always_dict=True)
    ref["particles"] = ref["particles"].iloc[rows].reset_index(drop=True)
    _assert_same_tables(ref, starfile.read(tmp_path / "sub.star", always_dict=True), name)


@pytest.mark.parametrize("name", CS)
def test_write_cs_keeps_every_field_of_a_real_file(tmp_path, name):
    ref = np.load(DATA / name, allow_pickle=False)
    out = tmp_path / name
    write_cs(out, read_cs(DATA / name))
    got = np.load(out, allow_pickle=False)
    assert out.suffix == ".cs" and got.dtype == ref.dtype and got.shape == ref.shape
    for field in ref.dtype.names:
        assert got[field].tobytes() == ref[field].tobytes(), field
    rows = np.array([0, 3, 5])
    write_cs(tmp_path / "sub.cs", read_cs(DATA / name)[rows])
    sub = np.load(tmp_path / "sub.cs", allow_pickle=False)
    assert all(sub[f].tobytes() == ref[f][rows].tobytes() for f in ref.dtype.names)


def test_write_cs_refuses_what_is_not_a_cs_array(tmp_path):
    with pytest.raises(ValueError):
        write_cs(tmp_path / "x.cs", np.zeros(3))


@pytest.mark.parametrize("name", ["toy_rot_trans_50.pkl", "hand_rot.pkl", "test_ctf.pkl"])
def test_write_pickle_round_trips_cryodrgn_metadata(tmp_path, name):
    with open(DATA / name, "rb") as f:
        ref = pickle.load(f)  # trusted test data: read independently of the restricted unpickler
    write_pickle(tmp_path / name, load_pickle(DATA / name))
    got = load_pickle(tmp_path / name)
    ref, got = (ref, got) if isinstance(ref, tuple) else ((ref,), (got,))
    assert len(got) == len(ref) and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(ref, got))


def test_write_pickle_refuses_objects(tmp_path):
    with pytest.raises(ValueError):
        write_pickle(tmp_path / "x.pkl", (np.eye(3), {"a": 1}))
    with pytest.raises(ValueError):
        write_pickle(tmp_path / "x.pkl", np.array([object()]))


def test_mrc_map_round_trip(tmp_path):
    data, vs, origin = read_mrc(DATA / "toymodel_small_nocenter.mrc")
    write_mrc(tmp_path / "m.mrc", data, vs, origin)
    d2, vs2, o2 = read_mrc(tmp_path / "m.mrc")
    assert np.array_equal(d2, data) and vs2 == pytest.approx(vs) and np.allclose(o2, origin)
