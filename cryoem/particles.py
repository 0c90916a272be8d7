"""One particle-set type for every metadata source, validated before anything runs.

``load_particles`` reads RELION STAR (3.0, 3.1+, 5), cryoSPARC ``.cs``, or an image
stack with cryoDRGN ``.pkl`` poses / CTF, into :class:`ParticleMeta` (metadata in
file order, no pixels), validates it (:func:`validate`) and wraps it in
:class:`ParticleSet`, a ``torch.utils.data.Dataset`` that yields, per particle::

    {"image": (1, D, D) float32, "R": (3, 3), "shift_A": (2,), "ctf": (9,), "index": int}

``R`` is RELION's ``A`` (map frame -> projection frame; see ``renderers.cameras``),
``shift_A`` the in-plane shift in Plato's convention (Å; the particle centre appears at
pixel ``D // 2 + shift_A / pixel_size``, i.e. ``t`` of ``Camera.from_pose``), ``ctf`` the
``cryoem.ctf.CTF_FIELDS`` vector (radians). Keys whose metadata are absent (no poses / no CTF) are left out.

Project layouts: a stack name in a STAR or .cs file is tried as an absolute path, then under
``datadir``, the metadata file's folder and each of its ancestors (so ``Refine3D/job002/run_data.star``
finds ``Extract/job001/...`` and ``J12/J12_particles.cs`` finds ``J9/extract/...`` in the project
folder); a cryoSPARC passthrough file is merged by ``uid`` (:func:`meta_from_cs`), and
``ParticleMeta.provenance`` says which file gave the poses, shifts and CTF.

Conventions (tests/cryoem/test_conventions.py checks them on real files):
* Rotations: STAR Euler angles through ``renderers.cameras.euler_zyz_to_matrix``; a
  cryoDRGN pose ``.pkl`` ``R`` is used as is (projecting cryoDRGN's toy volume with it
  reproduces ``toy_projections.mrcs`` at correlation 0.997; ``R^T`` does not);
  cryoSPARC ``alignments3D/pose`` (axis-angle, rad) gives ``R = expmap(pose)^T``, the
  conversion of cryoDRGN's ``parse_pose_csparc``.
* Shifts: RELION's origin "shifts the observation into the reference projection"
  (RELION docs, Conventions; ``ObservationModel::predictObservation`` shifts the
  projection by ``-origin``), so the particle centre sits at ``box//2 - origin``:
  ``shift_A = -rlnOriginXYAngst`` (``-rlnOriginXY * pixel_size`` before 3.1). cryoDRGN
  copies RELION's origin into ``trans`` (fraction of the box) and cryoSPARC's
  ``alignments3D/shift`` (px) has the same sense, so ``shift_A = -trans * D * pixel_size``
  and ``shift_A = -shift * pixel_size``. The writers negate back.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import torch

from cryoem import io as cio
from cryoem.ctf import CTF_FIELDS, CTFParams, unphysical_ctf
from renderers.cameras import axis_angle_to_matrix, euler_zyz_to_matrix
from scene3d.runinfo import UserError, one_line

__all__ = ["ParticleMeta", "ParticleSet", "load_particles", "validate", "meta_from_star", "meta_from_cs",
           "meta_from_stack", "find_passthrough", "star_tables", "write_particles"]


@dataclass
class ParticleMeta:
    """Metadata of N particles in file order (no pixels).

    Attributes:
        files: stack files (absolute paths), each referenced by ``file_idx``.
        file_idx: (N,) int, index into ``files``.
        image_idx: (N,) int, 0-based image index inside that stack.
        pixel_size: Å / px. box: image side (px).
        R: (N, 3, 3) float64 rotations or None. shift_A: (N, 2) float64 Å or None.
        ctf: (N, 9) float64 in ``CTF_FIELDS`` order (radians) or None.
        source: the metadata file (for messages). rows: (N,) 1-based row numbers in it.
        provenance: which file each kind of metadata came from, ``{"images" | "poses" | "shifts" |
            "ctf": file name(s)}`` (a cryoSPARC passthrough file shows here); one line with
            :meth:`provenance_line`.
        searched: ``{index into files: (name as written, [places tried])}`` for stacks found
            nowhere (their ``files`` entry is the first place tried); :func:`validate` reports them.
    """

    files: list[Path]
    file_idx: np.ndarray
    image_idx: np.ndarray
    pixel_size: float
    box: int
    R: np.ndarray | None = None
    shift_A: np.ndarray | None = None
    ctf: np.ndarray | None = None
    source: str = ""
    rows: np.ndarray = field(default=None)
    provenance: dict[str, str] = field(default_factory=dict)
    searched: dict[int, tuple[str, list[Path]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(1, len(self.file_idx) + 1)

    def __len__(self) -> int:
        return len(self.file_idx)

    def ctf_params(self, idx=slice(None)) -> CTFParams | None:
        return None if self.ctf is None else CTFParams.from_tensor(torch.as_tensor(self.ctf[idx]))

    def provenance_line(self) -> str:
        """``provenance`` on one line, e.g. ``poses: J3_particles.cs; CTF: J3_passthrough_particles.cs``."""
        label = {"images": "images", "poses": "poses", "shifts": "shifts", "ctf": "CTF"}
        return "; ".join(f"{label.get(k, k)}: {v}" for k, v in self.provenance.items())


# ----------------------------------------------------------------------------- shared checks
def _search_roots(meta_file: Path, datadir=None) -> list[Path]:
    """Folders a relative stack name is tried against, in order: ``datadir`` (when given), the
    metadata file's folder, then each of its ancestors, nearest first (this finds a project root)."""
    here = Path(os.path.abspath(meta_file)).parent
    return ([Path(os.path.abspath(datadir))] if datadir else []) + [here, *here.parents]


def _resolve_stacks(names: list[str], roots: list[Path]) -> tuple[list[Path], np.ndarray, dict]:
    """Resolve distinct stack names to files, one lookup per name (not per particle).

    An absolute name is used as is; a relative one is tried under each of ``roots`` in order.
    Returns ``files`` (each found file once), ``which`` (len(names),) the index of each name's
    file, and ``{file index: (name, places tried)}`` for names found nowhere (their ``files``
    entry is the first place tried, and :func:`validate` reports them).
    """
    files: dict[Path, int] = {}
    which = np.empty(len(names), dtype=np.int64)
    missing = {}
    for j, name in enumerate(names):
        p = Path(name)
        tried = [p] if p.is_absolute() else [r / p for r in roots]
        found = next((t for t in tried if _is_file(t)), None)
        which[j] = files.setdefault(found or tried[0], len(files))
        if found is None:
            missing[int(which[j])] = (name, tried)
    return list(files), which, missing


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. a name too long for the filesystem: not there
        return False


def _user_pixel_size(given: float | None, found: float | None, path: Path, where: str,
                     given_wins: bool = True) -> float | None:
    """The pixel size to use (Å/px): ``given`` (the user's) or ``found`` (the metadata's, from ``where``).

    ``given_wins`` says which one is used when both exist; when they differ by more than 0.1 %,
    a one-line warning naming both values and the one used goes to stderr.
    """
    if given is not None and not given > 0:
        raise UserError(f"{path}: pixel size must be positive, got {given}")
    if given and found and not math.isclose(given, found, rel_tol=1e-3):
        used = given if given_wins else found
        print(f"warning: {path}: pixel size {given:g} Å/px given, but {where} says {found:g} Å/px; using "
              f"{used:g} Å/px", file=sys.stderr)
    return (given or found) if given_wins else (found or given)


def _check_ctf(ctf: np.ndarray, where: dict[str, tuple], path: Path) -> None:
    """Refuse unphysical CTF values (``cryoem.ctf.unphysical_ctf``) naming the file, row and column.

    ``ctf``: (N, 9) in ``CTF_FIELDS`` order. ``where[field] = (file, column name, rows)`` says where
    each entry was read, ``rows`` (N,) being 1-based rows in that file; a field not in ``where``
    took a default and is reported against ``path``.
    """
    bad = unphysical_ctf(ctf)
    if bad is not None:
        i, name, problem = bad
        src, col, rows = where.get(name, (path, f"{name} (default)", np.arange(1, len(ctf) + 1)))
        raise UserError(f"{src}: row {rows[i]}: {col}: {problem}")


# ----------------------------------------------------------------------------- RELION
def _col(df, *names):
    for n in names:
        if n in df.columns:
            return n
    return None


def _float_col(df, name: str, path: Path) -> np.ndarray:
    try:
        v = np.array(df[name], dtype=np.float64)
    except (ValueError, TypeError):
        bad = next(i for i, x in enumerate(df[name]) if not _is_number(x))
        raise UserError(f"{path}: row {bad + 1}: {name} = {df[name].iloc[bad]!r} is not a number") from None
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise UserError(f"{path}: row {bad[0] + 1}: {name} is NaN or inf")
    return v


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _particle_block(blocks: dict, path: Path):
    for k, df in blocks.items():
        if "rlnImageName" in df.columns and k != "optics":
            return df
    raise UserError(f"{path}: no particle block with rlnImageName")


def _merge_optics(blocks: dict, parts, path: Path):
    optics = blocks.get("optics")
    if optics is None:
        return parts
    if "rlnOpticsGroup" not in parts.columns or "rlnOpticsGroup" not in optics.columns:
        raise UserError(f"{path}: optics block present but rlnOpticsGroup is missing")
    groups = set(np.asarray(optics["rlnOpticsGroup"]).tolist())
    for i, g in enumerate(parts["rlnOpticsGroup"]):
        if g not in groups:
            raise UserError(f"{path}: row {i + 1}: optics group {g} is not defined in data_optics")
    shared = [c for c in optics.columns if c in parts.columns and c != "rlnOpticsGroup"]
    for name in ("rlnImagePixelSize", "rlnImageSize"):
        if name in optics.columns and len(set(np.asarray(optics[name]).tolist())) > 1:
            raise UserError(f"{path}: optics groups disagree on {name} ({sorted(set(optics[name]))}); "
                            "split the file per group")
    merged = parts.drop(columns=shared).merge(optics, on="rlnOpticsGroup", how="left", sort=False)
    merged.index = parts.index
    return merged


def _pixel_size_from_star(df, path: Path) -> float | None:
    if c := _col(df, "rlnImagePixelSize", "rlnPixelSize"):
        v = _float_col(df, c, path)
    elif "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        v = _float_col(df, "rlnDetectorPixelSize", path) * 1e4 / _float_col(df, "rlnMagnification", path)
    else:
        return None
    if not np.allclose(v, v[0], rtol=1e-4):
        i = int(np.flatnonzero(~np.isclose(v, v[0], rtol=1e-4))[0])
        raise UserError(f"{path}: row {i + 1}: pixel size {v[i]:.4f} Å differs from row 1 ({v[0]:.4f} Å)")
    if v[0] <= 0:
        raise UserError(f"{path}: row 1: pixel size must be positive, got {v[0]}")
    return float(v[0])


def _parse_image_names(names, path: Path, datadir=None) -> tuple[list[Path], np.ndarray, np.ndarray, dict]:
    """Split ``idx@file`` names (vectorised) and resolve each distinct file once (:func:`_resolve_stacks`).

    Returns files, file_idx (N,), 0-based image_idx (N,) and the stacks found nowhere.
    """
    import pandas as pd

    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    parts = s.str.partition("@")
    idx, fname = parts[0].str.strip(), parts[2].str.strip()
    ok = ((parts[1] == "@") & idx.str.fullmatch(r"[0-9]{1,15}") & (fname != "")).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.argmin(ok))
        raise UserError(f"{path}: row {row + 1}: rlnImageName {s[row]!r} is not of the form 'index@file'")
    iidx = idx.to_numpy().astype(np.int64) - 1
    if (iidx < 0).any():
        row = int(np.argmax(iidx < 0))
        raise UserError(f"{path}: row {row + 1}: image index {idx[row]} in {s[row]!r} must be >= 1")
    codes, uniq = pd.factorize(fname)
    files, which, missing = _resolve_stacks(list(uniq), _search_roots(path, datadir))
    return files, which[codes], iidx, missing


def meta_from_star(path: str | Path, pixel_size: float | None = None, datadir: str | Path | None = None
                   ) -> ParticleMeta:
    """Particle metadata from a RELION STAR file (3.0 single block, 3.1+ optics + particles, RELION 5).

    ``idx@file`` stack names are resolved in this order, each distinct name once: an absolute
    path; relative to ``datadir`` when given; relative to the STAR file's folder; relative to each
    ancestor folder of the STAR file, nearest first. The last finds a RELION project root:
    ``Refine3D/job002/run_data.star`` names ``Extract/job001/Movies/mic_001.mrcs`` relative to the
    project folder. A stack found nowhere is reported by :func:`validate` with every place tried.

    Optics groups are merged per particle. Pixel size (Å/px): ``pixel_size`` wins over the file's
    (it is needed only when the file has none); when both exist and differ, a warning naming both
    goes to stderr. CTF values that no microscope has (``cryoem.ctf.unphysical_ctf``) are refused.
    """
    path = Path(path)
    blocks = cio.read_star(path)
    df = _merge_optics(blocks, _particle_block(blocks, path), path)
    if len(df) == 0:
        raise UserError(f"{path}: the particle block has no rows")
    try:
        found = _pixel_size_from_star(df, path)
    except UserError:
        if not pixel_size:
            raise
        found = None  # the user's pixel size replaces an inconsistent column
    apix = _user_pixel_size(pixel_size, found, path, "the STAR file")
    if apix is None:
        raise UserError(f"{path}: no pixel size (rlnImagePixelSize or rlnDetectorPixelSize + rlnMagnification); "
                        "pass --apix")
    files, fidx, iidx, missing = _parse_image_names(df["rlnImageName"], path, datadir)
    box = int(_float_col(df, "rlnImageSize", path)[0]) if "rlnImageSize" in df.columns else 0
    R = shift = None
    if all(c in df.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        ang = [torch.deg2rad(torch.as_tensor(_float_col(df, c, path))) for c in
               ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
        R = euler_zyz_to_matrix(*ang).numpy()
    if _col(df, "rlnOriginXAngst") and _col(df, "rlnOriginYAngst"):
        shift = -np.stack([_float_col(df, "rlnOriginXAngst", path), _float_col(df, "rlnOriginYAngst", path)], 1)
    elif _col(df, "rlnOriginX") and _col(df, "rlnOriginY"):
        shift = -np.stack([_float_col(df, "rlnOriginX", path), _float_col(df, "rlnOriginY", path)], 1) * apix
    elif R is not None:
        shift = np.zeros((len(df), 2))
    ctf = _ctf_from_star(df, path)
    name = path.name
    prov = {"images": name, **({"poses": name} if R is not None else {}),
            **({"shifts": name} if shift is not None else {}), **({"ctf": name} if ctf is not None else {})}
    return ParticleMeta(files, fidx, iidx, apix, box, R, shift, ctf, str(path), provenance=prov, searched=missing)


def _ctf_from_star(df, path: Path) -> np.ndarray | None:
    if "rlnDefocusU" not in df.columns:
        return None
    n = len(df)
    get = lambda name, default: _float_col(df, name, path) if name in df.columns else np.full(n, default)  # noqa: E731
    dfu = get("rlnDefocusU", 0.0)
    cols = {
        "defocus_u": dfu, "defocus_v": get("rlnDefocusV", np.nan) if "rlnDefocusV" in df.columns else dfu,
        "angle": np.deg2rad(get("rlnDefocusAngle", 0.0)), "voltage": get("rlnVoltage", 300.0),
        "cs": get("rlnSphericalAberration", 2.7), "amp_contrast": get("rlnAmplitudeContrast", 0.1),
        "phase_shift": np.deg2rad(get("rlnPhaseShift", 0.0)), "bfactor": get("rlnCtfBfactor", 0.0),
        "scale": get("rlnCtfScalefactor", 1.0),
    }
    ctf = np.stack([cols[k] for k in CTF_FIELDS], 1)
    star_names = {"defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "voltage": "rlnVoltage",
                  "cs": "rlnSphericalAberration", "amp_contrast": "rlnAmplitudeContrast"}
    rows = np.arange(1, n + 1)
    _check_ctf(ctf, {k: (path, v, rows) for k, v in star_names.items() if v in df.columns}, path)
    return ctf


# ----------------------------------------------------------------------------- cryoSPARC
_JOB = re.compile(r"(?:^|_)(J\d+)(?=_|$)")
# Plato's CTF field -> (cryoSPARC field, value when the field is absent); defocus_v defaults to defocus_u.
_CS_CTF = {"defocus_u": ("ctf/df1_A", 0.0), "defocus_v": ("ctf/df2_A", None), "angle": ("ctf/df_angle_rad", 0.0),
           "voltage": ("ctf/accel_kv", 300.0), "cs": ("ctf/cs_mm", 2.7), "amp_contrast": ("ctf/amp_contrast", 0.1),
           "phase_shift": ("ctf/phase_shift_rad", 0.0), "bfactor": ("ctf/bfactor", 0.0), "scale": ("ctf/scale", 1.0)}


def find_passthrough(path: str | Path) -> Path | None:
    """The passthrough file cryoSPARC writes beside a particle file, or None.

    A cryoSPARC job writes its particles as ``J12_particles.cs``, ``J12_003_particles.cs`` or
    ``cryosparc_P1_J12_003_particles.cs``, and the fields it passed through from upstream jobs
    (often the CTF, sometimes the poses) as ``J12_passthrough_particles.cs`` or
    ``P1_J12_passthrough_particles.cs``; an output group such as ``particles_selected`` gets
    ``J12_passthrough_particles_selected.cs``. Accepted here: a file in the same folder named
    ``*passthrough_particles<group suffix>.cs`` whose job ``J<n>``, when it names one, is the main
    file's (from its name, else its folder's). Several matches raise UserError.
    """
    path = Path(path)
    stem = path.name[:-3] if path.name.lower().endswith(".cs") else path.stem
    if "passthrough" in stem or "particles" not in stem:
        return None
    suffix = stem[stem.rfind("particles") + len("particles"):]
    job = _JOB.search(stem) or _JOB.fullmatch(path.parent.name)
    found = []
    for cand in sorted(path.parent.glob(f"*passthrough_particles{glob_escape(suffix)}.cs")):
        their = _JOB.search(cand.name[:-3])
        if cand != path and (their is None or job is None or their.group(1) == job.group(1)):
            found.append(cand)
    if len(found) > 1:
        raise UserError(f"{path}: several passthrough files beside it ({', '.join(f.name for f in found)}); "
                        "choose one with --passthrough")
    return found[0] if found else None


@dataclass
class _CsFields:
    """A cryoSPARC particle file's fields, merged with its passthrough file's by ``uid``.

    ``arrays[key]``: (N, ...) in the main file's order; ``origin[key]``: the file it came from
    (the main file wins when both have it); ``rows[key]``: (N,) 1-based rows in that file.
    """

    arrays: dict[str, np.ndarray]
    origin: dict[str, Path]
    rows: dict[str, np.ndarray]
    n: int

    def num(self, key: str, tail: tuple = ()) -> np.ndarray:
        """Field ``key`` as float64 of shape (N, *tail); UserError for another shape, text, NaN or inf."""
        v, src = self.arrays[key], self.origin[key]
        if v.shape != (self.n, *tail):
            raise UserError(f"{src}: field {key} has shape {v.shape}, expected {(self.n, *tail)}")
        try:
            v = np.asarray(v, dtype=np.float64)
        except (ValueError, TypeError) as e:
            raise UserError(f"{src}: field {key} is not numeric ({one_line(e)})") from e
        bad = np.flatnonzero(~np.isfinite(v.reshape(len(v), -1)).all(1))
        if len(bad):
            raise UserError(f"{src}: row {self.rows[key][bad[0]]}: {key} is NaN or inf")
        return v


def _read_cs_fields(path: Path, passthrough: Path | None) -> _CsFields:
    """Read ``path`` and add the fields only ``passthrough`` has, matched row by row through ``uid``."""
    main = cio.read_cs(path)
    n, names = len(main), main.dtype.names
    rows = np.arange(1, n + 1)
    cs = _CsFields({k: main[k] for k in names}, dict.fromkeys(names, path), dict.fromkeys(names, rows), n)
    if passthrough is None or n == 0:
        return cs
    pt = cio.read_cs(passthrough)
    for src, arr in ((path, main), (passthrough, pt)):
        if "uid" not in arr.dtype.names or arr["uid"].ndim != 1 or arr["uid"].dtype.kind not in "iu":
            raise UserError(f"{src}: no integer uid field, so {passthrough} cannot be merged with {path} by uid")
    order = _match_uids(main["uid"].astype(np.uint64), pt["uid"].astype(np.uint64), path, passthrough)
    for k in pt.dtype.names:
        if k not in cs.arrays:
            cs.arrays[k], cs.origin[k], cs.rows[k] = pt[k][order], passthrough, order + 1
    return cs


def _match_uids(uid: np.ndarray, pt_uid: np.ndarray, path: Path, pt: Path) -> np.ndarray:
    """(N,) 0-based row in ``pt_uid`` of each of ``uid``; UserError if a uid is missing there or repeated."""
    if len(pt_uid) == 0:
        raise UserError(f"{pt}: no particles, but {path} has {len(uid)}; the files do not belong together")
    sorter = np.argsort(pt_uid, kind="stable")
    s = pt_uid[sorter]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        raise UserError(f"{pt}: row {sorter[dup[0] + 1] + 1}: uid {s[dup[0]]} appears twice (also row "
                        f"{sorter[dup[0]] + 1})")
    pos = np.minimum(np.searchsorted(s, uid), len(s) - 1)
    hit = s[pos] == uid
    if not hit.all():
        i = int(np.argmin(hit))
        raise UserError(f"{path}: row {i + 1}: uid {uid[i]} is not in the passthrough file {pt}; the files "
                        f"describe different particles")
    return sorter[pos]


def _cs_stacks(cs: _CsFields, roots: list[Path]) -> tuple[list[Path], np.ndarray, dict]:
    """Resolve ``blob/path`` (:func:`_resolve_stacks`), decoding each distinct path once."""
    raw, src, rows = cs.arrays["blob/path"], cs.origin["blob/path"], cs.rows["blob/path"]
    if raw.shape != (cs.n,) or raw.dtype.kind not in "SU":
        raise UserError(f"{src}: field blob/path has shape {raw.shape} and type {raw.dtype}, expected ({cs.n},) text")
    uniq, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    names = []
    for p, i in zip(uniq, first):
        row = rows[i]
        try:
            s = p.decode() if isinstance(p, bytes) else str(p)
        except UnicodeDecodeError:
            raise UserError(f"{src}: row {row}: blob/path is not valid UTF-8 text") from None
        if not s.strip(">").strip():
            raise UserError(f"{src}: row {row}: blob/path is empty")
        names.append(s.lstrip(">"))  # '>' marks a path relative to the project folder
    files, which, missing = _resolve_stacks(names, roots)
    return files, which[inverse.reshape(-1)], missing


def _cs_pixel_size(cs: _CsFields) -> float:
    """The one ``blob/psize_A`` (Å/px) of every row; UserError if one is <= 0 or differs from row 1's."""
    psize, src, rows = cs.num("blob/psize_A"), cs.origin["blob/psize_A"], cs.rows["blob/psize_A"]
    bad = np.flatnonzero(~(psize > 0))
    if len(bad):
        raise UserError(f"{src}: row {rows[bad[0]]}: blob/psize_A must be positive, got {psize[bad[0]]:g}")
    bad = np.flatnonzero(~np.isclose(psize, psize[0], rtol=1e-4))
    if len(bad):
        raise UserError(f"{src}: row {rows[bad[0]]}: blob/psize_A {psize[bad[0]]:.4f} differs from row "
                        f"{rows[0]} ({psize[0]:.4f})")
    return float(psize[0])


def _ctf_from_cs(cs: _CsFields, path: Path) -> np.ndarray | None:
    """(N, 9) CTF in ``CTF_FIELDS`` order from the ``ctf/*`` fields (absent ones take cryoSPARC's defaults)."""
    if "ctf/df1_A" not in cs.arrays:
        return None
    cols = {}
    for f in CTF_FIELDS:
        key, default = _CS_CTF[f]
        if key in cs.arrays:
            cols[f] = cs.num(key)
        else:
            cols[f] = cols["defocus_u"] if default is None else np.full(cs.n, default)
    ctf = np.stack([cols[f] for f in CTF_FIELDS], 1)
    _check_ctf(ctf, {f: (cs.origin[k], k, cs.rows[k]) for f, (k, _) in _CS_CTF.items() if k in cs.arrays}, path)
    return ctf


def meta_from_cs(path: str | Path, datadir: str | Path | None = None, passthrough: str | Path | bool | None = None,
                 pixel_size: float | None = None) -> ParticleMeta:
    """Particle metadata from a cryoSPARC ``.cs`` file, merged with its passthrough file.

    ``blob/path`` (cryoSPARC's leading ``>``, "relative to the project", is dropped) resolves like
    a STAR file's stacks, each distinct path once: an absolute path; relative to ``datadir`` (the
    project folder) when given; relative to the .cs file's folder, then to each ancestor folder,
    nearest first (``J12/J12_particles.cs`` names ``J9/extract/...`` relative to the project).
    ``blob/idx`` is 0-based. A stack found nowhere is reported by :func:`validate`.

    ``passthrough``: a ``*_passthrough_particles.cs`` merged by ``uid``, the main file winning
    when both have a field; None looks for one beside ``path`` (:func:`find_passthrough`); False
    reads ``path`` alone. Every uid of ``path`` must be in it. ``meta.provenance`` records which
    file gave the images, poses, shifts and CTF.

    Shapes: blob/path, blob/idx, blob/psize_A, ctf/* (N,); blob/shape (N, 2); alignments3D/pose
    (N, 3) axis-angle (rad); alignments3D/shift (N, 2) px. Another shape, text, NaN or inf, a pixel
    size <= 0 and unphysical CTF values (``cryoem.ctf.unphysical_ctf``) raise UserError.

    Pixel size (Å/px): the file's ``blob/psize_A`` wins over ``pixel_size``; when they differ, a
    warning naming both goes to stderr.
    """
    path = Path(path)
    pt = find_passthrough(path) if passthrough is None else (Path(passthrough) if passthrough else None)
    cs = _read_cs_fields(path, pt)
    for need in ("blob/path", "blob/idx", "blob/psize_A"):
        if need not in cs.arrays:
            raise UserError(f"{path}: missing field {need}" + (f" (in it and in {pt})" if pt else ""))
    if cs.n == 0:
        raise UserError(f"{path}: no particles")
    files, fidx, missing = _cs_stacks(cs, _search_roots(path, datadir))
    psize = _cs_pixel_size(cs)
    _user_pixel_size(pixel_size, psize, path, "blob/psize_A", given_wins=False)
    image_idx = cs.num("blob/idx").astype(np.int64)
    box = int(cs.num("blob/shape", (2,))[0, -1]) if "blob/shape" in cs.arrays else 0
    R = shift = None
    if "alignments3D/pose" in cs.arrays:
        R = axis_angle_to_matrix(torch.as_tensor(cs.num("alignments3D/pose", (3,)))).transpose(1, 2).numpy()
        if "alignments3D/shift" in cs.arrays:
            shift = -cs.num("alignments3D/shift", (2,)) * psize
    ctf = _ctf_from_cs(cs, path)

    def names(*keys: str) -> str:
        return " + ".join(dict.fromkeys(cs.origin[k].name for k in keys if k in cs.origin))

    prov = {"images": names("blob/path"), **({"poses": names("alignments3D/pose")} if R is not None else {}),
            **({"shifts": names("alignments3D/shift")} if shift is not None else {}),
            **({"ctf": names(*(k for k, _ in _CS_CTF.values()))} if ctf is not None else {})}
    return ParticleMeta(files, fidx, image_idx, psize, box, R, shift, ctf, str(path), provenance=prov,
                        searched=missing)


# ----------------------------------------------------------------------------- stack + cryoDRGN pkl
# cryoDRGN CTF pickle columns that unphysical_ctf checks: Plato field -> (column number, meaning)
_PKL_CTF = {"defocus_u": "column 3 (dfU, Å)", "defocus_v": "column 4 (dfV, Å)", "voltage": "column 6 (kV)",
            "cs": "column 7 (Cs, mm)", "amp_contrast": "column 8 (amplitude contrast)"}


def meta_from_stack(stack: str | Path, pixel_size: float | None = None, poses: str | Path | None = None,
                    ctf: str | Path | None = None) -> ParticleMeta:
    """An image stack with optional cryoDRGN pose ``.pkl`` (R N×3×3, trans N×2 in box fractions,
    or R alone) and CTF ``.pkl`` (N×9: box, Apix, dfU, dfV, dfAng°, kV, Cs, w, phase°).

    Pixel size (Å/px): ``pixel_size`` wins over the CTF pickle's Apix (a warning naming both goes
    to stderr when they differ), which wins over the stack header. Rotations that are not
    rotations (``|R^T R - I| > 1e-3`` or ``|det R - 1| > 1e-3``), a pixel size <= 0 and unphysical
    CTF values (``cryoem.ctf.unphysical_ctf``) raise UserError naming the first bad row.
    """
    stack = Path(stack)
    n, box = cio.stack_shape(stack)
    ctf_arr, found = None, None
    if ctf is not None:
        c = _pkl_array(ctf, (n, 9), "CTF", stack)
        if not np.allclose(c[:, 0], box):
            raise UserError(f"{ctf}: row {int(np.argmax(c[:, 0] != box)) + 1}: box {c[0, 0]:g} differs from "
                            f"{stack} ({box} px); was the stack downsampled?")
        if (c[:, 1] <= 0).any():
            i = int(np.argmax(c[:, 1] <= 0))
            raise UserError(f"{ctf}: row {i + 1}: column 2 (pixel size) must be positive, got {c[i, 1]:g}")
        if not np.allclose(c[:, 1], c[0, 1]):
            raise UserError(f"{ctf}: pixel size differs between rows")
        found = float(c[0, 1])
        ctf_arr = np.stack([c[:, 2], c[:, 3], np.deg2rad(c[:, 4]), c[:, 5], c[:, 6], c[:, 7], np.deg2rad(c[:, 8]),
                            np.zeros(n), np.ones(n)], 1)
        rows = np.arange(1, n + 1)
        _check_ctf(ctf_arr, {f: (ctf, col, rows) for f, col in _PKL_CTF.items()}, Path(ctf))
    pixel_size = _user_pixel_size(pixel_size, found, Path(ctf or stack), "the CTF pickle's column 2")
    if pixel_size is None:
        m = cio.open_mrc(stack)
        pixel_size = float(m.voxel_size.x)
        m.close()
        if not pixel_size > 0:
            raise UserError(f"{stack}: no pixel size in the header; pass --apix")
    R = shift = None
    if poses is not None:
        obj = cio.load_pickle(poses)
        rot = obj[0] if isinstance(obj, (tuple, list)) else obj
        R = _check_rotations(_pkl_array(poses, (n, 3, 3), "rotation", stack, rot), poses)
        if isinstance(obj, (tuple, list)) and len(obj) > 1:
            shift = -_pkl_array(poses, (n, 2), "translation", stack, obj[1]) * box * pixel_size
        else:
            shift = np.zeros((n, 2))
    prov = {"images": stack.name, **({"poses": Path(poses).name, "shifts": Path(poses).name} if R is not None else {}),
            **({"ctf": Path(ctf).name} if ctf_arr is not None else {})}
    return ParticleMeta([stack.resolve()], np.zeros(n, dtype=np.int64), np.arange(n), float(pixel_size), box,
                        R, shift, ctf_arr, str(poses or ctf or stack), provenance=prov)


def _check_rotations(R: np.ndarray, path, tol: float = 1e-3) -> np.ndarray:
    """Return ``R`` (N, 3, 3) if every matrix is a rotation (R^T R = I and det R = +1 within ``tol``);
    else UserError naming the first row that is not."""
    err = np.abs(np.einsum("nji,njk->nik", R, R) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(R)
    bad = np.flatnonzero((err > tol) | (np.abs(det - 1) > tol))
    if len(bad):
        i = bad[0]
        raise UserError(f"{path}: row {i + 1}: not a rotation matrix (max |R^T R - I| = {err[i]:.3g}, "
                        f"det R = {det[i]:.4g}; expected 0 and +1)")
    return R


def _pkl_array(path, shape, what: str, stack: Path, arr=None) -> np.ndarray:
    arr = cio.load_pickle(path) if arr is None else arr
    arr = np.asarray(arr, dtype=np.float64) if isinstance(arr, np.ndarray) else None
    if arr is None or arr.ndim != len(shape) or arr.shape[1:] != shape[1:]:
        raise UserError(f"{path}: expected a {what} array of shape (N, {', '.join(map(str, shape[1:]))})")
    if arr.shape[0] != shape[0]:
        raise UserError(f"{path}: {arr.shape[0]} {what} rows but {stack} holds {shape[0]} images")
    bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1))
    if len(bad):
        raise UserError(f"{path}: row {bad[0] + 1}: {what} is NaN or inf")
    return arr


# ----------------------------------------------------------------------------- validation
def validate(meta: ParticleMeta, check_pixels: bool = True, chunk: int = 1024) -> ParticleMeta:
    """Check a particle set before use; raise ``UserError`` naming file and row on the first problem.

    Checks: stacks exist and are square MRC with one box size; the box agrees with the
    metadata; every index is in range; no particle is listed twice; metadata are finite;
    and (``check_pixels``) no image holds NaN or inf. Fills in ``meta.box`` when unknown.
    """
    src = meta.source
    sizes, box = {}, None
    for k, f in enumerate(meta.files):
        if not f.is_file():
            row = int(meta.rows[np.argmax(meta.file_idx == k)])
            if k in meta.searched:
                name, tried = meta.searched[k]
                raise UserError(f"{src}: row {row}: image stack {name} not found; tried {', '.join(map(str, tried))}")
            raise UserError(f"{src}: row {row}: image stack {f} not found")
        n, b = cio.stack_shape(f)
        if box is not None and b != box:
            raise UserError(f"{f}: box {b} px differs from {meta.files[0]} ({box} px)")
        sizes[k], box = n, b
    if meta.box and box != meta.box:
        raise UserError(f"{src}: metadata box {meta.box} px but {meta.files[0]} holds {box} px images")
    meta.box = box
    n_in = np.array([sizes[k] for k in range(len(meta.files))])[meta.file_idx]
    bad = np.flatnonzero((meta.image_idx < 0) | (meta.image_idx >= n_in))
    if len(bad):
        i = bad[0]
        raise UserError(f"{src}: row {meta.rows[i]}: image {meta.image_idx[i] + 1} is out of range "
                        f"({meta.files[meta.file_idx[i]]} holds {n_in[i]} images)")
    key = meta.file_idx * (int(n_in.max()) + 1) + meta.image_idx
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = np.flatnonzero(key == key[first[np.argmax(counts > 1)]])
        raise UserError(f"{src}: row {meta.rows[dup[1]]}: duplicate particle (same image as row {meta.rows[dup[0]]})")
    for name in ("R", "shift_A", "ctf"):
        arr = getattr(meta, name)
        if arr is not None:
            bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1))
            if len(bad):
                raise UserError(f"{src}: row {meta.rows[bad[0]]}: {name} is NaN or inf")
    if check_pixels:
        _check_pixels(meta, chunk)
    return meta


def _check_pixels(meta: ParticleMeta, chunk: int) -> None:
    for k, f in enumerate(meta.files):
        m = cio.open_mrc(f)
        try:
            data = m.data if m.data.ndim == 3 else m.data[None]
            for s in range(0, data.shape[0], chunk):
                ok = np.isfinite(data[s:s + chunk]).reshape(min(chunk, data.shape[0] - s), -1).all(1)
                if not ok.all():
                    img = s + int(np.argmin(ok))
                    rows = meta.rows[(meta.file_idx == k) & (meta.image_idx == img)]
                    where = f"row {rows[0]}: " if len(rows) else ""
                    raise UserError(f"{meta.source}: {where}image {img + 1} of {f} contains NaN or inf")
        finally:
            m.close()


# ----------------------------------------------------------------------------- the dataset
class ParticleSet(torch.utils.data.Dataset):
    """Particles in file order; ``lazy=True`` memory-maps the stacks, else loads them all.

    ``ps[i]`` -> dict with ``image`` (1, D, D) float32, ``R`` (3, 3), ``shift_A`` (2,),
    ``ctf`` (9,) (float32 tensors; pose / CTF keys only when known) and ``index``.
    ``ps.images(idx)`` reads a batch (B, 1, D, D) directly.
    """

    def __init__(self, meta: ParticleMeta, lazy: bool = True):
        self.meta = meta
        self.lazy = lazy
        self._maps: dict[int, object] = {}
        self._data = None if lazy else np.stack([self._read(i) for i in range(len(meta))])
        self._R = None if meta.R is None else torch.as_tensor(meta.R, dtype=torch.float32)
        self._shift = None if meta.shift_A is None else torch.as_tensor(meta.shift_A, dtype=torch.float32)
        self._ctf = None if meta.ctf is None else torch.as_tensor(meta.ctf, dtype=torch.float32)

    @property
    def pixel_size(self) -> float:
        return self.meta.pixel_size

    @property
    def box(self) -> int:
        return self.meta.box

    def __len__(self) -> int:
        return len(self.meta)

    def _stack(self, k: int):
        if k not in self._maps:
            m = cio.open_mrc(self.meta.files[k])
            self._maps[k] = m.data if m.data.ndim == 3 else m.data[None]
        return self._maps[k]

    def _read(self, i: int) -> np.ndarray:
        return np.asarray(self._stack(int(self.meta.file_idx[i]))[int(self.meta.image_idx[i])], dtype=np.float32)

    def images(self, idx) -> torch.Tensor:
        """(B, 1, D, D) float32 images of the particles ``idx`` (ints, slice or array)."""
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.atleast_1d(np.asarray(idx))
        if self._data is not None:
            return torch.from_numpy(self._data[idx])[:, None]
        return torch.from_numpy(np.stack([self._read(int(i)) for i in idx]))[:, None]

    def batch(self, idx) -> dict:
        """The items ``idx`` (ints or array) stacked: image (B, 1, D, D) and, where known, R, shift_A, ctf."""
        idx = np.atleast_1d(np.asarray(idx))
        out = {"image": self.images(idx), "index": torch.as_tensor(idx)}
        for key, val in (("R", self._R), ("shift_A", self._shift), ("ctf", self._ctf)):
            if val is not None:
                out[key] = val[torch.as_tensor(idx)]
        return out

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        item = {"image": self.images([i])[0], "index": i}
        if self._R is not None:
            item["R"] = self._R[i]
        if self._shift is not None:
            item["shift_A"] = self._shift[i]
        if self._ctf is not None:
            item["ctf"] = self._ctf[i]
        return item

    def __getstate__(self):  # DataLoader workers re-open their own memory maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


def load_particles(path: str | Path, *, pixel_size: float | None = None, poses=None, ctf=None, datadir=None,
                   passthrough=None, lazy: bool = True, check_pixels: bool = True) -> ParticleSet:
    """Read and validate a particle set from ``.star``, ``.cs``, or ``.mrcs`` (+ cryoDRGN ``.pkl``).

    ``datadir``: the folder stack names are relative to (STAR and .cs; see :func:`meta_from_star`).
    ``passthrough``: a cryoSPARC passthrough file (None: look beside ``path``; False: none), see
    :func:`meta_from_cs`. ``pixel_size`` (Å/px) wins over a STAR file's and a CTF pickle's but not
    over a .cs file's ``blob/psize_A``; a contradiction prints a warning naming both values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        meta = meta_from_star(path, pixel_size, datadir)
    elif suffix == ".cs":
        meta = meta_from_cs(path, datadir, passthrough, pixel_size)
    elif suffix in (".mrcs", ".mrc", ".st"):
        meta = meta_from_stack(path, pixel_size, poses, ctf)
    else:
        raise UserError(f"{path}: unknown particle file type (expected .star, .cs or .mrcs)")
    return ParticleSet(validate(meta, check_pixels=check_pixels), lazy=lazy)


def star_tables(image_names: list[str], pixel_size: float, box: int, R=None, shift_A=None, ctf=None,
                extra: dict | None = None):
    """RELION 3.1 optics and particle tables (pandas DataFrames) for N particles.

    ``R`` (N, 3, 3) rotations -> ZYZ angles in degrees; ``shift_A`` (N, 2) Å -> ``rlnOriginX/YAngst = -shift``;
    ``ctf`` (N, 9) in ``CTF_FIELDS`` order -> defocus (Å), astigmatism angle and phase shift (degrees),
    B-factor and scale, with one optics group per distinct (voltage kV, Cs mm, amplitude contrast);
    ``extra``: more particle columns {name: (N,)}. Absent metadata give no columns, not invented values.
    """
    import pandas as pd

    from renderers.cameras import matrix_to_euler_zyz

    n = len(image_names)
    optics = {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"]}
    cols: dict = {"rlnImageName": list(image_names), "rlnOpticsGroup": np.ones(n, dtype=int)}
    if ctf is not None:
        col = {f: np.asarray(ctf, dtype=np.float64)[:, i] for i, f in enumerate(CTF_FIELDS)}
        groups, group_of = np.unique(np.stack([col["voltage"], col["cs"], col["amp_contrast"]], 1), axis=0,
                                     return_inverse=True)
        optics = {"rlnOpticsGroup": np.arange(1, len(groups) + 1),
                  "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(groups) + 1)],
                  "rlnAmplitudeContrast": groups[:, 2], "rlnSphericalAberration": groups[:, 1],
                  "rlnVoltage": groups[:, 0]}
        cols["rlnOpticsGroup"] = group_of.reshape(-1) + 1
    g = len(optics["rlnOpticsGroup"])
    optics.update(rlnImagePixelSize=[float(pixel_size)] * g, rlnImageSize=[int(box)] * g,
                  rlnImageDimensionality=[2] * g)
    if R is not None:
        angles = matrix_to_euler_zyz(torch.as_tensor(np.asarray(R), dtype=torch.float64))
        cols.update(zip(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), (np.rad2deg(a.numpy()) for a in angles)))
    if shift_A is not None:
        cols.update(rlnOriginXAngst=-np.asarray(shift_A)[:, 0], rlnOriginYAngst=-np.asarray(shift_A)[:, 1])
    if ctf is not None:
        cols.update(rlnDefocusU=col["defocus_u"], rlnDefocusV=col["defocus_v"],
                    rlnDefocusAngle=np.rad2deg(col["angle"]), rlnPhaseShift=np.rad2deg(col["phase_shift"]),
                    rlnCtfBfactor=col["bfactor"], rlnCtfScalefactor=col["scale"])
    cols.update(extra or {})
    return pd.DataFrame(optics), pd.DataFrame(cols)


def write_particles(out_dir: str | Path, images: np.ndarray, pixel_size: float, R: np.ndarray | None = None,
                    shift_A: np.ndarray | None = None, ctf: CTFParams | None = None,
                    stack_name: str = "particles.mrcs", star_name: str = "particles.star") -> tuple[Path, Path]:
    """Write ``images`` (N, D, D) as an .mrcs and a RELION 3.1 STAR (optics + particles, :func:`star_tables`)."""
    out = Path(out_dir)
    N, D = images.shape[0], images.shape[-1]
    cio.write_mrcs(out / stack_name, images, pixel_size)
    names = [f"{i + 1:06d}@{stack_name}" for i in range(N)]
    optics, parts = star_tables(names, pixel_size, D, R, shift_A, None if ctf is None else ctf.as_tensor().numpy())
    cio.write_star(out / star_name, optics, parts)
    return out / stack_name, out / star_name
