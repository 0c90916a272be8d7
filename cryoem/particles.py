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
from cryoem.formats.mrc import StackReader, open_mrc, stack_shape
from plato_core.runinfo import DataError, UserError

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
PIXEL_CHECKS = ("all", "sample", "none")
PIXEL_SAMPLE = 1024  # images whose pixels ``pixels="sample"`` checks


def validate(meta: ParticleMeta, pixels: str = "sample", chunk: int = 1024, progress: bool = False) -> ParticleMeta:
    """Check a particle set before use; raise ``UserError`` naming file and row on the first problem.

    Checks: stacks exist and are square MRC with one box size; the box agrees with the
    metadata; every index is in range; no particle is listed twice; metadata are finite;
    and that no image holds NaN or inf: ``pixels`` "all" reads every image (``chunk`` at a time, a progress bar
    with ``progress``), "sample" ``PIXEL_SAMPLE`` images spread over the set (the time to start stays seconds at
    10^6 particles; :class:`ParticleSet` checks every other image as it reads it), "none" none.
    Fills in ``meta.box`` when unknown.
    """
    if pixels not in PIXEL_CHECKS:
        raise ValueError(f"pixels: expected one of {PIXEL_CHECKS}, got {pixels!r}")
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
    if pixels == "all":
        _check_all_pixels(meta, chunk, progress)
    elif pixels == "sample":
        ParticleSet(meta, lazy=True).images(np.unique(np.linspace(0, len(meta) - 1, PIXEL_SAMPLE).astype(int)))
    return meta


def _check_all_pixels(meta: ParticleMeta, chunk: int, progress: bool) -> None:
    """Read every image of every stack (also those the metadata do not list), ``chunk`` at a time."""
    from tqdm import tqdm

    total = sum(stack_shape(f)[0] for f in meta.files)
    with tqdm(total=total, desc="check pixels", unit="img", disable=not progress) as bar:
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
                    bar.update(len(ok))
            finally:
                m.close()


# ----------------------------------------------------------------------------- the dataset
class ParticleSet(torch.utils.data.Dataset):
    """Particles in file order; ``lazy=True`` reads the images from their stacks as they are asked for (memory
    O(batch), whatever N; :class:`cryoem.formats.mrc.StackReader`), else loads them all (N x D x D float32).

    ``ps[i]`` -> dict with ``image`` (1, D, D) float32, ``R`` (3, 3), ``shift_A`` (2,),
    ``ctf`` (9,) (float32 tensors; pose / CTF keys only when known) and ``index``.
    ``ps.read_batch(idx)`` reads a batch (the trainer's whole-batch reads); ``ps.images(idx)`` the images only.
    Every image is checked as it is read: one that holds NaN or inf raises ``DataError`` naming its file, its
    index there and its row in the metadata.
    """

    def __init__(self, meta: ParticleMeta, lazy: bool = True, progress: bool = False):
        self.meta = meta
        self.lazy = lazy
        self._stacks: dict[int, StackReader] = {}
        self._data = None if lazy else self._load_all(progress)
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

    def _stack(self, k: int) -> StackReader:
        if k not in self._stacks:
            self._stacks[k] = StackReader(self.meta.files[k])
        return self._stacks[k]

    def _load_all(self, progress: bool) -> np.ndarray:
        """Every image (N, D, D) float32, read stack by stack in file order (one copy in memory)."""
        from tqdm import tqdm

        out = np.empty((len(self.meta), self.meta.box, self.meta.box), np.float32)
        with tqdm(total=len(out), desc="load images", unit="img", disable=not progress) as bar:
            for s in range(0, len(out), 4096):
                idx = np.arange(s, min(s + 4096, len(out)))
                out[idx] = self._read(idx)
                bar.update(len(idx))
        return out

    def _read(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` (B,) -> (B, D, D) float32, read from the stacks in file order, checked to be finite."""
        out = np.empty((len(idx), self.meta.box, self.meta.box), np.float32)
        f, j = self.meta.file_idx[idx], self.meta.image_idx[idx]
        for k in np.unique(f):
            sel = np.flatnonzero(f == k)
            sel = sel[np.argsort(j[sel], kind="stable")]  # ascending offsets: sequential reads where the batch allows
            out[sel] = self._stack(int(k)).read(j[sel])
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(1)
        if bad.any():
            i = int(idx[np.argmax(bad)])
            raise DataError(f"{self.meta.source}: row {self.meta.rows[i]}: image {int(self.meta.image_idx[i]) + 1} "
                            f"of {self.meta.files[int(self.meta.file_idx[i])]} contains NaN or inf")
        return out

    def images(self, idx) -> torch.Tensor:
        """(B, 1, D, D) float32 images of the particles ``idx`` (ints, slice or array)."""
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.atleast_1d(np.asarray(idx))
        if self._data is not None:
            return torch.from_numpy(self._data[idx])[:, None]
        return torch.from_numpy(self._read(idx))[:, None]

    def read_batch(self, idx) -> dict:
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



class ParticleSubset(torch.utils.data.Dataset):
    """The particles ``idx`` (M,) of a :class:`ParticleSet`, with its ``__getitem__`` (whose ``index`` stays the
    index in the full set) and ``read_batch``."""

    def __init__(self, ds: ParticleSet, idx):
        self.ds, self.idx = ds, np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(self.idx[i])]

    def read_batch(self, i) -> dict:
        return self.ds.read_batch(self.idx[i])


def load_particles(path: str | Path, *, pixel_size: float | None = None, poses=None, ctf=None, datadir=None,
                   passthrough=None, lazy: bool = True, pixels: str = "sample", progress: bool = False
                   ) -> ParticleSet:
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
    return ParticleSet(validate(meta, pixels=pixels, progress=progress), lazy=lazy, progress=progress)
