"""cryoSPARC particle files (``.cs``): read, write, and merge with the passthrough file.

A ``.cs`` file is a 1-D numpy structured array saved with ``np.save`` (the name keeps its ``.cs`` suffix),
one record per particle, read here without pickles. :func:`meta_from_cs` turns it into a
:class:`cryoem.particles.ParticleMeta`; the fields Plato reads (N particles):

* ``blob/path`` (N,) text, ``>`` marking a path relative to the project folder; ``blob/idx`` (N,) 0-based;
  ``blob/psize_A`` (N,) Å/px; ``blob/shape`` (N, 2) px;
* ``alignments3D/pose`` (N, 3) axis-angle (rad), giving ``R = expmap(pose)^T`` (the conversion of cryoDRGN's
  ``parse_pose_csparc``); ``alignments3D/shift`` (N, 2) px, in the sense of RELION's origin, so
  ``shift_A = -shift * pixel_size``;
* ``ctf/df1_A``, ``ctf/df2_A`` (Å), ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
  ``ctf/phase_shift_rad``, ``ctf/bfactor``, ``ctf/scale`` (N,).

cryoSPARC writes the fields a job passed through from upstream jobs (often the CTF, sometimes the poses) to
a ``*_passthrough_particles.cs`` beside the particles (:func:`find_passthrough`), merged here by ``uid``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import torch

from cryoem.ctf import CTF_FIELDS
from cryoem.formats import read_file
from cryoem.particles import ParticleMeta, check_ctf, choose_pixel_size, resolve_stacks, search_roots
from plato_core.runinfo import UserError, atomic_path, one_line
from renderers.cameras import axis_angle_to_matrix

__all__ = ["read_cs", "write_cs", "find_passthrough", "meta_from_cs"]


# ----------------------------------------------------------------------------- the file
def read_cs(path: str | Path) -> np.ndarray:
    """Load a cryoSPARC ``.cs`` structured array without pickles (``allow_pickle=False``)."""
    path = Path(path)
    arr = read_file(path, lambda p: np.load(p, allow_pickle=False), "cryoSPARC file", "not a cryoSPARC .cs file")
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise UserError(f"{path}: not a cryoSPARC .cs file (expected a 1-D numpy structured array)")
    return arr


def write_cs(path: str | Path, records: np.ndarray) -> None:
    """Write a 1-D structured array (every field, ``uid`` included) as a cryoSPARC ``.cs``, atomically.

    Saved with ``np.save`` to an open file, so that the name keeps its ``.cs`` suffix.
    """
    if not isinstance(records, np.ndarray) or records.dtype.names is None or records.ndim != 1:
        raise ValueError("write_cs: expected a 1-D numpy structured array")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, records, allow_pickle=False)


# ----------------------------------------------------------------------------- particles and passthrough
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
    main = read_cs(path)
    n, names = len(main), main.dtype.names
    rows = np.arange(1, n + 1)
    cs = _CsFields({k: main[k] for k in names}, dict.fromkeys(names, path), dict.fromkeys(names, rows), n)
    if passthrough is None or n == 0:
        return cs
    pt = read_cs(passthrough)
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
    """Resolve ``blob/path`` (:func:`cryoem.particles.resolve_stacks`), decoding each distinct path once."""
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
    files, which, missing = resolve_stacks(names, roots)
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
    check_ctf(ctf, {f: (cs.origin[k], k, cs.rows[k]) for f, (k, _) in _CS_CTF.items() if k in cs.arrays}, path)
    return ctf


def meta_from_cs(path: str | Path, datadir: str | Path | None = None, passthrough: str | Path | bool | None = None,
                 pixel_size: float | None = None) -> ParticleMeta:
    """Particle metadata from a cryoSPARC ``.cs`` file, merged with its passthrough file.

    ``blob/path`` (cryoSPARC's leading ``>``, "relative to the project", is dropped) resolves like
    a STAR file's stacks, each distinct path once: an absolute path; relative to ``datadir`` (the
    project folder) when given; relative to the .cs file's folder, then to each ancestor folder,
    nearest first (``J12/J12_particles.cs`` names ``J9/extract/...`` relative to the project).
    ``blob/idx`` is 0-based. A stack found nowhere is reported by :func:`cryoem.particles.validate`.

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
    files, fidx, missing = _cs_stacks(cs, search_roots(path, datadir))
    psize = _cs_pixel_size(cs)
    choose_pixel_size(pixel_size, psize, path, "blob/psize_A", given_wins=False)
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

