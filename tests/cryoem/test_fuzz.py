"""Hypothesis fuzzing of the STAR, .cs and MRC readers: every bad input ends in a UserError."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryoem.formats.cryosparc import meta_from_cs
from cryoem.formats.mrc import open_mrc, read_mrc
from cryoem.formats.star import meta_from_star
from plato_core.runinfo import UserError

DATA = Path(__file__).resolve().parents[1] / "data"
STAR = (DATA / "relion31.v2.star").read_bytes()
STAR30 = (DATA / "FinalRefinement-OriginalParticles-PfCRT.star").read_bytes()
CS = (DATA / "empiar_10076_7.cs").read_bytes()
MRC = (DATA / "toy_projections_50.mrcs").read_bytes()[:1024 + 30 * 30 * 4 * 2]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run(reader, name: str, data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            return reader(path)
        except UserError as e:
            assert str(e).startswith(str(path)), str(e)  # names the file
            assert "\n" not in str(e)
            return None


def _mutations(base: bytes):
    """Truncations, byte flips and line deletions of a real file."""
    cut = st.integers(0, len(base)).map(lambda n: base[:n])
    flips = st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda fl: bytes(b for b in _flip(base, fl)))
    lines = base.split(b"\n")
    drop = st.sets(st.integers(0, len(lines) - 1), min_size=1, max_size=4).map(
        lambda ix: b"\n".join(line for i, line in enumerate(lines) if i not in ix))
    return st.one_of(cut, flips, drop, st.binary(max_size=600))


def _flip(base: bytes, flips):
    b = bytearray(base)
    for i, v in flips:
        b[i] = v
    return b


@FUZZ
@given(_mutations(STAR) | _mutations(STAR30))
def test_star_reader_never_crashes(data):
    _run(meta_from_star, "p.star", data)


_WORDS = st.sampled_from(["data_", "data_optics", "data_particles", "loop_", "_rlnImageName", "_rlnOpticsGroup",
                          "_rlnDefocusU", "_rlnAngleRot", "_rlnImagePixelSize", "1@x.mrcs", "nan", "inf", "-1",
                          "abc", "1", "2.5", "\n", " ", "#", '"'])


@FUZZ
@given(st.lists(_WORDS, max_size=60).map(lambda w: " ".join(w).encode()))
def test_star_reader_on_star_like_garbage(data):
    _run(meta_from_star, "g.star", data)


@FUZZ
@given(_mutations(CS))
def test_cs_reader_never_crashes(data):
    _run(meta_from_cs, "p.cs", data)


@FUZZ
@given(st.sampled_from([("blob/path", "S10"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"), ("ctf/df1_A", "<f4"),
                        ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]).flatmap(
    lambda _: st.lists(st.sampled_from([("blob/path", "S10"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"),
                                        ("ctf/df1_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                                        ("alignments3D/shift", "<f4", (2,)), ("blob/psize_A", "S4")]),
                       max_size=6, unique_by=lambda f: f[0])),
       st.integers(0, 4), st.sampled_from([0.0, np.nan, np.inf, 1.5]))
def test_cs_reader_on_wrong_fields(fields, n, fill):
    arr = np.zeros(n, dtype=fields)
    for name in arr.dtype.names:
        if arr.dtype[name].kind == "f":
            arr[name] = fill
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.cs"
        with open(path, "wb") as f:
            np.save(f, arr)
        try:
            meta_from_cs(path)
        except UserError as e:
            assert str(e).startswith(str(path))


@FUZZ
@given(_mutations(MRC))
def test_mrc_reader_never_crashes(data):
    def read(path):
        m = open_mrc(path)
        m.close()
        return read_mrc(path)

    _run(read, "s.mrcs", data)
