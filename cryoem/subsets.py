"""``cryoem select``: write the particles of a state back into the ORIGINAL RELION / cryoSPARC file.

A run's particles (the order of ``RUN/analysis/latents.npy``) are the rows of the file it was trained on.
When that file is a ``cryoem downsample`` output, its ``rlnPlatoSourceRow`` column and the
``downsample.json`` beside it lead back to the file that was downsampled (and on, through a chain of
downsamplings), so a subset is always written from the original:

* STAR: the original text with only the selected rows of its particle block; every other line (the optics
  table, comments, other blocks, every column of the kept rows) is copied byte for byte;
* cryoSPARC .cs: the selected rows of the structured array, every field (``uid`` included), written with
  ``np.save`` to an open file so that the name keeps its ``.cs`` suffix. A ``*_passthrough_*.cs`` beside the
  original is not merged in (cryoSPARC re-attaches passthrough fields by ``uid``).

The rows are written in source order, whatever the order of the selection.

Selections (on the run's particles): k-means clusters of ``cryoem analyze`` (``--clusters 0,3``), indices
into the run's particles (``--indices idx.npy``, 0-based, or a boolean mask), an interval of one principal
component of the latents (``--pc 1:LO:HI``, the PCA of ``cryoem.analyze.pca`` as analyze plots it), or a
polygon in the PC1/PC2 plane (``--polygon poly.json``: ``[[x, y], ...]``). ``--invert`` takes the
complement; ``--per-cluster`` writes one file per k-means cluster (of the selection, if one is given).

Half-set runs (``RUN/half1``, ``RUN/half2``): ``cryoem analyze RUN`` encodes every particle with half 1's
model into ``RUN/analysis``; a selection therefore covers the particles of both halves, and the particle
file is the one in ``RUN/half1/model.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryoem.downsample import RECORD, ROW_COLUMN
from cryoem.formats.cryodrgn import load_pickle
from cryoem.formats.cryosparc import read_cs, write_cs
from cryoem.formats.star import read_star, star_rows, write_star_rows
from plato_core.runinfo import UserError, read_json

__all__ = ["Original", "trace_original", "run_original", "write_subset", "write_selection", "selection_mask",
           "select"]


# ----------------------------------------------------------------------------- the subset
def write_subset(original: str | Path, rows: np.ndarray, out: str | Path) -> None:
    """Write rows (0-based, any order) of ``original`` (.star or .cs) to ``out`` (same format), in source order.

    STAR: every line other than the unselected particle rows is copied verbatim. .cs: every field of the
    selected records, saved with ``np.save`` to an open file (the name keeps ``.cs``). Atomic.
    """
    original, out = Path(original), Path(out)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if original.suffix.lower() == ".star":
        write_star_rows(original, out, rows)
    else:
        write_cs(out, read_cs(original)[rows])


# ----------------------------------------------------------------------------- from a run back to the original
@dataclass
class Original:
    """Where a run's particles come from.

    Attributes:
        path: the original particle file (.star or .cs), before any downsampling.
        rows: (N,) 0-based rows of ``path``, one per particle of the run (latents order).
        chain: the files followed, the run's particle file first, ``path`` last.
    """

    path: Path
    rows: np.ndarray
    chain: list[Path] = field(default_factory=list)


def _count(path: Path) -> int:
    if path.suffix.lower() == ".cs":
        return len(read_cs(path))
    if path.suffix.lower() == ".star":
        return star_rows(path)
    raise UserError(f"{path}: select writes subsets of RELION .star or cryoSPARC .cs files, not {path.suffix}")


def _downsample_record(path: Path) -> dict | None:
    """The ``downsample.json`` beside ``path`` when it describes ``path``, else None."""
    f = path.parent / RECORD
    if path.suffix.lower() != ".star" or not f.is_file():
        return None
    rec = read_json(f)
    if not isinstance(rec, dict) or rec.get("kind") != "plato-downsample" or rec.get("star") != path.name:
        return None
    if not isinstance(rec.get("source"), str) or not isinstance(rec.get("n_particles"), int):
        raise UserError(f"{f}: a downsample record without 'source' and 'n_particles'")
    return rec


def _source_rows(path: Path) -> np.ndarray:
    """The ``rlnPlatoSourceRow`` column of a downsampled STAR's particle block, checked."""
    blocks = read_star(path)
    df = next((b for k, b in blocks.items() if k != "optics" and "rlnImageName" in b.columns), None)
    if df is None or ROW_COLUMN not in df.columns:
        raise UserError(f"{path}: no {ROW_COLUMN} column in its particle block, though {RECORD} is beside it")
    v = np.asarray(df[ROW_COLUMN])
    if v.dtype.kind not in "iu" or (len(v) and v.min() < 0):
        raise UserError(f"{path}: {ROW_COLUMN} must hold row numbers >= 0")
    return v.astype(np.int64)


def _recorded_source(path: Path, rec: dict) -> Path:
    """The source named by a downsample record: its absolute path, else relative to the record's folder."""
    tried = [Path(rec["source"]), path.parent / rec.get("source_relative", rec["source"])]
    for p in tried:
        if p.is_file():
            return p
    raise UserError(f"{path.parent / RECORD}: the original {rec['source']} is not there any more (tried "
                    f"{', '.join(map(str, dict.fromkeys(tried)))}); pass --source to say where it is")


def trace_original(particles: str | Path, source: str | Path | None = None) -> Original:
    """Follow a run's particle file back through ``cryoem downsample`` records to the original file.

    ``source`` replaces the original recorded beside ``particles`` (when it has moved). Raises ``UserError`` when
    the original changed (another row count) or a record is broken.
    """
    path = Path(particles)
    if not path.is_file():
        raise UserError(f"{path}: particle file not found; pass --particles to say where it is")
    chain, rows = [path], None
    if source is not None and _downsample_record(path) is None and not _has_row_column(path):
        raise UserError(f"--source {source}: {path} is not a cryoem downsample output, so it is the original")
    while (rec := _downsample_record(path)) is not None or (len(chain) == 1 and source is not None):
        col = _source_rows(path)
        src = Path(source) if source is not None and len(chain) == 1 else _recorded_source(path, rec)
        if not src.is_file():
            raise UserError(f"--source {src}: file not found")
        n_src = _count(src)
        if (rec is not None and n_src != rec["n_particles"]) or (len(col) and col.max() >= n_src):
            was = rec["n_particles"] if rec is not None else f"at least {col.max() + 1}"
            raise UserError(f"{src}: {n_src} particles, but {path} was downsampled from {was}; is this the "
                            "original file?")
        rows = col if rows is None else col[rows]
        path = src
        chain.append(path)
        if len(chain) > 32:
            raise UserError(f"{chain[0]}: more than 32 downsample records in a chain (a loop?)")
    n = _count(path)
    if len(chain) == 1 and path.suffix.lower() == ".star" and _has_row_column(path):
        raise UserError(f"{path}: a cryoem downsample output ({ROW_COLUMN}) without its {RECORD}; put the "
                        "record back beside it or pass --source ORIGINAL")
    return Original(path, np.arange(n) if rows is None else rows, chain)


def _has_row_column(path: Path) -> bool:
    """Whether a STAR file's particle block has the ``rlnPlatoSourceRow`` column (reads only the headers)."""
    return path.suffix.lower() == ".star" and ROW_COLUMN in star_particle_labels(path)


def star_particle_labels(path: str | Path) -> list[str]:
    """The column names (without ``_``) of a STAR file's particle block, the first loop with ``_rlnImageName``;
    reads only up to its first row. [] when there is none."""
    labels: list[str] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            s = line.strip()
            if s.startswith("_"):
                labels.append(s.split()[0][1:])
            elif s.startswith("loop_"):
                labels = []
            elif s and not s.startswith(("#", "data_")) and "rlnImageName" in labels:  # the particle block's row 1
                return labels
    return []


# ----------------------------------------------------------------------------- selections on the run's particles
def read_latents(analysis: Path) -> np.ndarray:
    """``RUN/analysis/latents.npy``: (N, zdim) finite posterior means, in the run's particle order."""
    f = analysis / "latents.npy"
    if not f.is_file():
        raise UserError(f"{analysis.parent}: no analysis/latents.npy; run `cryoem analyze {analysis.parent}` first")
    try:
        z = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{f}: not a numpy .npy array ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(z, np.ndarray) or z.ndim != 2 or z.dtype.kind != "f" or not np.isfinite(z).all():
        raise UserError(f"{f}: expected an (N, zdim) array of finite latents; re-run cryoem analyze")
    return z


def kmeans_labels(analysis: Path, z: np.ndarray) -> np.ndarray:
    """(N,) k-means cluster of each particle, from ``analysis/kmeans_labels.npy`` (written by analyze)."""
    f = analysis / "kmeans_labels.npy"
    if not f.is_file():
        raise UserError(f"{analysis}: no kmeans_labels.npy (analyses before this version did not write it); "
                        "re-run cryoem analyze")
    labels = np.load(f, allow_pickle=False)
    if labels.shape != (len(z),) or labels.dtype.kind not in "iu":
        raise UserError(f"{f}: expected {len(z)} integer cluster labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _pc_scores(z: np.ndarray, n: int) -> np.ndarray:
    """(N, max(2, n)) principal-component scores as ``cryoem analyze`` computes them (zeros past zdim)."""
    from cryoem.analyze import pca

    scores, _ = pca(z, max(2, n))
    pad = max(2, n) - scores.shape[1]
    return np.concatenate([scores, np.zeros((len(z), pad))], 1) if pad > 0 else scores


def parse_clusters(spec: str, labels: np.ndarray) -> np.ndarray:
    """``"0,3"`` -> the cluster numbers, each checked against the run's k-means clusters."""
    try:
        ids = sorted({int(c) for c in spec.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--clusters {spec}: expected comma-separated cluster numbers, e.g. 0,3") from None
    k = int(labels.max()) + 1
    bad = [c for c in ids if not 0 <= c < k]
    if not ids or bad:
        raise UserError(f"--clusters {spec}: the run's k-means has clusters 0 to {k - 1}")
    return np.asarray(ids)


def read_indices(path: str | Path, n: int) -> np.ndarray:
    """``--indices``: an .npy (or cryoDRGN index .pkl) of 0-based particle indices, or a boolean mask of N."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--indices {path}: file not found")
    try:
        idx = load_pickle(path) if path.suffix.lower() == ".pkl" else np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"--indices {path}: not a numpy .npy array ({' '.join(str(e).split())[:120]})") from None
    idx = np.asarray(idx) if isinstance(idx, (np.ndarray, list, tuple)) else None
    if idx is not None and idx.dtype == bool and idx.shape == (n,):
        return np.flatnonzero(idx)
    if idx is None or idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise UserError(f"--indices {path}: expected a 1-D array of integer indices or a boolean mask of {n}")
    bad = np.flatnonzero((idx < 0) | (idx >= n))
    if len(bad):
        raise UserError(f"--indices {path}: entry {bad[0]} is {idx[bad[0]]}, outside 0..{n - 1} (the run's particles)")
    return idx.astype(np.int64)


def parse_pc(spec: str, zdim: int) -> tuple[int, float, float]:
    """``"1:LO:HI"`` -> (pc, lo, hi); an empty bound is open (``"2::0"``: PC2 <= 0). PCs count from 1."""
    parts = spec.split(":")
    try:
        pc = int(parts[0])
        lo, hi = (float(v) if v.strip() else b for v, b in zip(parts[1:], (-np.inf, np.inf), strict=True))
    except ValueError:
        raise UserError(f"--pc {spec}: expected PC:LO:HI, e.g. 1:-0.5:2 (a bound may be empty)") from None
    if not 1 <= pc <= zdim:
        raise UserError(f"--pc {spec}: the run's latents have PCs 1 to {zdim}")
    if np.isnan(lo) or np.isnan(hi) or not lo < hi:
        raise UserError(f"--pc {spec}: expected LO < HI")
    return pc, lo, hi


def read_polygon(path: str | Path) -> np.ndarray:
    """``--polygon``: a JSON list of at least 3 ``[x, y]`` vertices (PC1, PC2) -> (V, 2) float."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--polygon {path}: file not found")
    try:
        v = np.asarray(json.loads(path.read_text()), dtype=np.float64)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise UserError(f"--polygon {path}: expected JSON [[x, y], ...] ({' '.join(str(e).split())[:120]})") from None
    if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3 or not np.isfinite(v).all():
        raise UserError(f"--polygon {path}: expected a list of at least 3 [x, y] pairs of finite numbers in the "
                        "PC1/PC2 plane")
    return v


def selection_mask(analysis: Path, z: np.ndarray, *, clusters: str | None = None, indices: str | None = None,
                   pc: str | None = None, polygon: str | None = None) -> np.ndarray:
    """(N,) bool over the run's particles from at most one selection (none: every particle)."""
    from matplotlib.path import Path as Polygon

    n = len(z)
    if clusters is not None:
        labels = kmeans_labels(analysis, z)
        return np.isin(labels, parse_clusters(clusters, labels))
    mask = np.zeros(n, dtype=bool)
    if indices is not None:
        mask[read_indices(indices, n)] = True
    elif pc is not None:
        k, lo, hi = parse_pc(pc, z.shape[1])
        s = _pc_scores(z, k)[:, k - 1]
        mask = (s >= lo) & (s <= hi)
    elif polygon is not None:
        mask = Polygon(read_polygon(polygon)).contains_points(_pc_scores(z, 2)[:, :2])
    else:
        mask[:] = True
    return mask


# ----------------------------------------------------------------------------- the command
def run_particles(run: Path, particles: str | None = None, datadir: str | None = None) -> Path:
    """The particle file a run was trained on (``RUN/model.json``, or ``RUN/half1/model.json`` for half
    sets), or ``particles`` when the data have moved."""
    from cryoem.train import read_record, run_spec

    folder = run / "half1" if not (run / "model.json").is_file() and (run / "half1" / "model.json").is_file() else run
    return Path(run_spec(folder, read_record(folder), particles, datadir).particles)


def _outputs(out: Path, groups: dict, per_cluster: bool) -> list[tuple[Path, np.ndarray]]:
    if not per_cluster:
        return [(out, groups[None])]
    return [(out.with_name(f"{out.stem}_cluster{c:02d}{out.suffix}"), idx) for c, idx in groups.items()]


def run_original(run: str | Path, n: int, particles: str | None = None, datadir: str | None = None,
                 source: str | None = None) -> Original:
    """The original .star / .cs of a run whose ``analysis/latents.npy`` holds ``n`` particles, checked to have
    ``n`` rows (``particles`` / ``datadir`` / ``source``: where the data are now, when they have moved)."""
    orig = trace_original(run_particles(Path(run), particles, datadir), source)
    if len(orig.rows) != n:
        raise UserError(f"{orig.chain[0]}: {len(orig.rows)} particles, but {Path(run) / 'analysis' / 'latents.npy'} "
                        f"has {n}; give the run's particles (--particles) or re-run cryoem analyze")
    return orig


def _check_format(orig: Original, out: Path) -> None:
    fmt = orig.path.suffix.lower()
    if out.suffix.lower() != fmt:
        raise UserError(f"--out {out}: the original particles are {orig.path} ({fmt}); the subset is written in "
                        f"the same format, so --out must end in {fmt}")


def write_selection(orig: Original, idx: np.ndarray, out: str | Path, overwrite: bool = False) -> int:
    """Write the run's particles ``idx`` (0-based, latents order) as a subset of the original file ``orig`` to
    ``out`` (same format), after checking ``out``; returns the number of particles written. ``cryoem select``
    and ``cryoem explore`` both write through here."""
    out = Path(out)
    idx = np.unique(np.asarray(idx, dtype=np.int64))
    if not len(idx):
        raise UserError("the selection holds no particles; nothing written")
    if idx[0] < 0 or idx[-1] >= len(orig.rows):
        raise UserError(f"selection: particle indices must lie in 0..{len(orig.rows) - 1}")
    _check_format(orig, out)
    _check_outputs([out], orig, overwrite)
    write_subset(orig.path, orig.rows[idx], out)
    return len(idx)


def _check_outputs(outs: list[Path], orig: Original, overwrite: bool) -> None:
    chain = {os.path.realpath(p) for p in orig.chain}
    for o in outs:
        if os.path.realpath(o) in chain:
            raise UserError(f"--out {o}: that is one of the run's particle files ({o}); choose another name")
        if o.exists() and not overwrite:
            raise UserError(f"--out {o}: exists; pass --overwrite to replace it")
        if o.parent.exists() and not o.parent.is_dir():
            raise UserError(f"--out {o}: {o.parent} is not a folder")


def select(run: str | Path, out: str | Path, *, clusters: str | None = None, indices: str | None = None,
           pc: str | None = None, polygon: str | None = None, invert: bool = False, per_cluster: bool = False,
           particles: str | None = None, datadir: str | None = None, source: str | None = None,
           overwrite: bool = False) -> list[tuple[Path, int]]:
    """Write a selection of a run's particles as a subset of the original .star / .cs file.

    Exactly one of ``clusters`` / ``indices`` / ``pc`` / ``polygon`` (or none with ``per_cluster``);
    ``invert`` takes the complement; ``per_cluster`` writes ``OUT_clusterNN.EXT`` per k-means cluster.
    Every input is checked before anything is written. Returns ``(file written, particles in it)``.
    """
    run, out = Path(run), Path(out)
    given = [s for s in (clusters, indices, pc, polygon) if s is not None]
    if len(given) > 1 or (not given and not per_cluster):
        raise UserError("give one selection: --clusters, --indices, --pc or --polygon (or --per-cluster alone)")
    analysis = run / "analysis"
    z = read_latents(analysis)
    orig = run_original(run, len(z), particles, datadir, source)
    _check_format(orig, out)
    mask = selection_mask(analysis, z, clusters=clusters, indices=indices, pc=pc, polygon=polygon)
    mask = ~mask if invert else mask
    if per_cluster:
        labels = kmeans_labels(analysis, z)
        groups = {int(c): np.flatnonzero(mask & (labels == c)) for c in np.unique(labels[mask])}
    else:
        groups = {None: np.flatnonzero(mask)}
    writes = [(o, idx) for o, idx in _outputs(out, groups, per_cluster) if len(idx)]
    if not writes:
        raise UserError(f"the selection holds none of the run's {len(z)} particles; nothing written")
    _check_outputs([o for o, _ in writes], orig, overwrite)  # every output before the first is written
    for o, idx in writes:
        write_selection(orig, idx, o, overwrite=True)
    return [(o, len(idx)) for o, idx in writes]
