"""One particle-set type for every metadata source, validated before anything runs.

``load_particles`` reads a particle file by its suffix through one module of ``cryoem.formats`` per format:
RELION STAR (``formats.star``), cryoSPARC ``.cs`` (``formats.cryosparc``), or an MRC image stack
(``formats.mrc``) with cryoDRGN ``.pkl`` poses / CTF (``formats.cryodrgn``). Each gives a
:class:`ParticleMeta` (metadata in file order, no pixels), which :func:`validate` checks and
:class:`ParticleSet`, a ``torch.utils.data.Dataset``, wraps; it yields, per particle::

    {"image": (1, D, D) float32, "R": (3, 3), "shift_A": (2,), "ctf": (9,), "index": int}

``R`` is RELION's ``A`` (map frame -> projection frame; see ``renderers.cameras``),
``shift_A`` the in-plane shift in Plato's convention (Å; the particle centre appears at
pixel ``D // 2 + shift_A / pixel_size``, i.e. ``t`` of ``Camera.from_pose``), ``ctf`` the
``cryoem.ctf.CTF_FIELDS`` vector (radians). Keys whose metadata are absent (no poses / no CTF) are left out.
Each format module's docstring says how its angles and shifts become these (tests/cryoem/test_conventions.py
checks them on real files).

Also here, shared by the format modules: where a stack named in a STAR or .cs file is looked for
(:func:`resolve_stacks`: an absolute path, then under ``datadir``, the metadata file's folder and each of its
ancestors, so ``Refine3D/job002/run_data.star`` finds ``Extract/job001/...`` and ``J12/J12_particles.cs``
finds ``J9/extract/...`` in the project folder), which pixel size wins (:func:`choose_pixel_size`), and the
refusal of unphysical CTF values (:func:`check_ctf`).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoem.ctf import CTFParams, unphysical_ctf
from cryoem.formats.mrc import open_mrc, stack_shape
from plato_core.runinfo import UserError

__all__ = ["ParticleMeta", "ParticleSet", "load_particles", "validate", "search_roots", "resolve_stacks",
           "choose_pixel_size", "check_ctf"]


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
        random_subset: (N,) int, RELION's ``rlnRandomSubset`` (1 or 2: the gold-standard half of each
            particle), or None; ``cryoem train --half-sets`` follows it.
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
    random_subset: np.ndarray | None = None

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


# ----------------------------------------------------------------------------- shared by the format modules
def search_roots(meta_file: Path, datadir=None) -> list[Path]:
    """Folders a relative stack name is tried against, in order: ``datadir`` (when given), the
    metadata file's folder, then each of its ancestors, nearest first (this finds a project root)."""
    here = Path(os.path.abspath(meta_file)).parent
    return ([Path(os.path.abspath(datadir))] if datadir else []) + [here, *here.parents]


def resolve_stacks(names: list[str], roots: list[Path]) -> tuple[list[Path], np.ndarray, dict]:
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


def choose_pixel_size(given: float | None, found: float | None, path: Path, where: str,
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


def check_ctf(ctf: np.ndarray, where: dict[str, tuple], path: Path) -> None:
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
        n, b = stack_shape(f)
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
        m = open_mrc(f)
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
            m = open_mrc(self.meta.files[k])
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


class ParticleSubset(torch.utils.data.Dataset):
    """The particles ``idx`` (M,) of a :class:`ParticleSet`, with its ``__getitem__`` (whose ``index`` stays the
    index in the full set) and ``batch``."""

    def __init__(self, ds: ParticleSet, idx):
        self.ds, self.idx = ds, np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(self.idx[i])]

    def batch(self, i) -> dict:
        return self.ds.batch(self.idx[i])


def load_particles(path: str | Path, *, pixel_size: float | None = None, poses=None, ctf=None, datadir=None,
                   passthrough=None, lazy: bool = True, check_pixels: bool = True) -> ParticleSet:
    """Read and validate a particle set from ``.star``, ``.cs``, or ``.mrcs`` (+ cryoDRGN ``.pkl``).

    ``datadir``: the folder stack names are relative to (STAR and .cs; see
    :func:`cryoem.formats.star.meta_from_star`).
    ``passthrough``: a cryoSPARC passthrough file (None: look beside ``path``; False: none), see
    :func:`cryoem.formats.cryosparc.meta_from_cs`. ``pixel_size`` (Å/px) wins over a STAR file's and a CTF
    pickle's but not over a .cs file's ``blob/psize_A``; a contradiction prints a warning naming both values.
    """
    from cryoem.formats.cryodrgn import meta_from_stack  # the format modules import ParticleMeta from here
    from cryoem.formats.cryosparc import meta_from_cs
    from cryoem.formats.star import meta_from_star

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
