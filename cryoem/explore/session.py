"""What ``cryoem explore`` knows about a run: latents, axes, colour columns, decoded models, paths, selections.

Everything here is plain Python over numpy arrays; :mod:`cryoem.explore.server` only turns it into HTTP.

Conventions:
    * particles are the rows of ``RUN/analysis/latents.npy`` (N, zdim), the order of the run's particle file;
    * coordinates are Å in the starting model's frame (``cryoem.analyze.decode``);
    * a decoded model's B-factor column holds each atom's displacement from the starting model (Å), so that a
      molecular viewer colours by it without knowing Plato;
    * files the app writes go into ``RUN/explore/`` (``selections/``, ``paths/``, ``umap.npy``, ``tsne.npy``),
      atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from plato_core.runinfo import UserError, atomic_path, atomic_write

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # selection and path names: safe as file names
MAX_CATEGORIES = 32   # an integer or text column with more distinct values is drawn as continuous (or refused)
MEAN_SAMPLE = 256     # a selection's mean model averages the decodings of at most this many of its particles
MAX_FRAMES = 60       # frames of a path (each one a model and a map)
CACHE_SIZE = 512      # decoded models kept (PDB text)
TSNE_SAMPLE = 10_000  # particles embedded by t-SNE itself; the others are placed beside their latent neighbours


class Session:
    """A trained run opened for exploring: the model (for decoding) and ``RUN/analysis`` (latents, k-means).

    Args:
        run: the run folder (``cryoem train --out``), analysed by ``cryoem analyze``.
        particles, datadir, source: where the run's particle file, its stacks and the original file are now,
            when they have moved (as ``cryoem select``); only needed to colour by the file's columns and to save
            selections.
        colors: ``FILE.npz:KEY`` specs of extra per-particle columns (e.g. a simulation's ground truth).
    """

    def __init__(self, run: str | Path, particles: str | None = None, datadir: str | None = None,
                 source: str | None = None, colors: tuple[str, ...] = ()):
        from cryoem.analyze import load_color, pca
        from cryoem.subsets import read_latents
        from cryoem.train import load_model

        self.run = Path(run).resolve()
        if not self.run.is_dir():
            raise UserError(f"{run}: not a folder (give a run folder written by cryoem train)")
        self.z = read_latents(self.run / "analysis").astype(np.float32)
        primary = self.run / "half1" if (self.run / "half1" / "model.json").is_file() else self.run
        self.model, rec, self.structure = load_model(primary)
        if self.model.cfg.zdim != self.z.shape[1]:
            raise UserError(f"{self.run / 'analysis' / 'latents.npy'}: zdim {self.z.shape[1]}, but the model's is "
                            f"{self.model.cfg.zdim}; re-run cryoem analyze")
        self.offset = np.asarray(rec["offset"], dtype=np.float64)
        self.start = self.structure.coords[0]  # (N, 3) Å: the starting model
        self.scores, self.pca = pca(self.z, min(3, self.z.shape[1]))
        self.labels = _kmeans_labels(self.run / "analysis", len(self.z))
        self.extra = {}
        for spec in colors:
            values, key = load_color(spec, len(self.z))
            self.extra[key] = values
        self._where = (particles, datadir, source)
        self._table = None       # the particle file's table, read on first use
        self._original = None    # cryoem.subsets.Original, traced on the first save
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._model_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._file_lock = threading.Lock()
        self.out = self.run / "explore"

    # ------------------------------------------------------------------------- what the page asks first
    def meta(self) -> dict:
        """The page's start-up facts: sizes, axes, colour columns, clusters, saved selections."""
        counts = np.bincount(self.labels) if self.labels is not None else np.zeros(0, int)
        return {"run": str(self.run), "particles": len(self.z), "zdim": int(self.z.shape[1]),
                "atoms": int(self.structure.n_atoms), "axes": self.axes(), "columns": self.column_names(),
                "clusters": [{"id": int(c), "count": int(n)} for c, n in enumerate(counts)],
                "pca_explained": self.pca.explained_variance_ratio_.tolist(), "selections": self.selections(),
                "paths": self.paths(), "max_frames": MAX_FRAMES}

    def axes(self) -> list[str]:
        """Names of the 2-D embeddings :meth:`embedding` accepts."""
        k = self.scores.shape[1]
        pcs = [f"pca:{i},{j}" for i in range(1, k + 1) for j in range(i + 1, k + 1)] or ["pca:1,1"]
        return pcs + ["umap", "tsne"]

    # ------------------------------------------------------------------------- axes
    def embedding(self, name: str) -> np.ndarray:
        """(N, 2) float32 coordinates of every particle on the axes ``name`` (``pca:1,2`` ..., ``umap`` or ``tsne``)."""
        if name in ("umap", "tsne"):
            return self._nonlinear(name)
        if name not in self.axes():
            raise UserError(f"axes {name!r}: expected one of {', '.join(self.axes())}")
        i, j = (int(v) - 1 for v in name[4:].split(","))
        return np.ascontiguousarray(self.scores[:, [i, j]], dtype=np.float32)

    def _nonlinear(self, kind: str) -> np.ndarray:
        """(N, 2) UMAP or t-SNE of the latents, computed once and kept in ``RUN/explore/{kind}.npy``."""
        path, key = self.out / f"{kind}.npy", hashlib.sha1(self.z.tobytes()).hexdigest()
        with self._file_lock:
            if path.is_file() and (self.out / f"{kind}.json").is_file():
                try:
                    if json.loads((self.out / f"{kind}.json").read_text()).get("latents_sha1") == key:
                        return np.load(path, allow_pickle=False).astype(np.float32)
                except (OSError, ValueError):
                    pass  # a damaged cache is recomputed
            emb = (umap_embedding if kind == "umap" else tsne_embedding)(self.z)
            with atomic_path(path) as tmp:
                np.save(tmp, emb)
            atomic_write(self.out / f"{kind}.json", json.dumps({"latents_sha1": key, "n": len(self.z)}))
        return emb

    # ------------------------------------------------------------------------- colour columns
    def column_names(self) -> list[str]:
        """Per-particle columns to colour by: k-means, latent PCs, half-set, --color arrays, the particle file's."""
        names = (["k-means cluster"] if self.labels is not None else [])
        names += [f"latent PC{i + 1}" for i in range(self.scores.shape[1])]
        names += ["half-set"] if self._halves() is not None else []
        names += list(self.extra)
        names += [n for n in self._file_labels() if n not in names]
        return names

    def column(self, name: str) -> tuple[np.ndarray, dict]:
        """(N,) float32 values of column ``name`` and how to draw them: ``{"kind": "categorical", "categories":
        [...]}`` (the values are category codes 0..C-1) or ``{"kind": "continuous", "lo", "hi"}`` (the 0.5th and
        99.5th percentiles)."""
        if name == "k-means cluster" and self.labels is not None:
            values = self.labels
        elif name.startswith("latent PC") and name[9:].isdigit() and 1 <= int(name[9:]) <= self.scores.shape[1]:
            values = self.scores[:, int(name[9:]) - 1]
        elif name == "half-set" and self._halves() is not None:
            values = self._halves()
        elif name in self.extra:
            values = self.extra[name]
        elif name in self._file_labels():
            values = self._file_column(name)
        else:
            raise UserError(f"column {name!r}: not one of the run's columns")
        return describe_column(name, np.asarray(values))

    def _halves(self) -> np.ndarray | None:
        """(N,) 1 or 2: the half-set of each particle, from ``RUN/half1/model.json``'s ``subset``; None without."""
        f = self.run / "half1" / "model.json"
        if not f.is_file():
            return None
        subset = json.loads(f.read_text()).get("subset")
        if not isinstance(subset, list) or not all(isinstance(i, int) and 0 <= i < len(self.z) for i in subset):
            return None
        h = np.full(len(self.z), 2, dtype=np.int64)
        h[subset] = 1
        return h

    def particle_file(self) -> Path:
        """The run's particle file (``model.json``, or where ``--particles`` says); one UserError line if gone."""
        from cryoem.subsets import run_particles

        return run_particles(self.run, *self._where[:2])

    def _file_labels(self) -> list[str]:
        """Column names of the run's particle file (.star header or .cs fields); [] when it cannot be read."""
        from cryoem.formats.cryosparc import read_cs
        from cryoem.subsets import star_particle_labels

        try:
            path = self.particle_file()
        except UserError:
            return []
        if path.suffix.lower() == ".star":
            return [n for n in star_particle_labels(path) if n != "rlnImageName"]
        if path.suffix.lower() == ".cs":
            if self._table is None:
                self._table = read_cs(path)
            return [n for n in self._table.dtype.names if self._table.dtype[n].shape == ()]
        return []

    def _file_column(self, name: str) -> np.ndarray:
        """(N,) one column of the particle file, read once (STAR: with its optics group's values merged)."""
        from cryoem.formats.star import particle_block, read_star

        path = self.particle_file()
        with self._file_lock:
            if self._table is None:
                self._table = particle_block(read_star(path), path)
        col = self._table[name]
        values = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col)
        if len(values) != len(self.z):
            raise UserError(f"{path}: {len(values)} particles, but the run's latents hold {len(self.z)}")
        if values.dtype.kind == "S":
            values = values.astype(str)
        return values

    # ------------------------------------------------------------------------- decoding
    def latent(self, particle: int | None = None, cluster: int | None = None, z=None) -> np.ndarray:
        """(zdim,) float32: particle ``particle``'s latent, the mean latent of k-means cluster ``cluster``, or
        ``z`` itself (checked)."""
        if particle is not None:
            if not 0 <= particle < len(self.z):
                raise UserError(f"particle {particle}: expected 0..{len(self.z) - 1}")
            return self.z[particle]
        if cluster is not None:
            if self.labels is None or not 0 <= cluster <= self.labels.max():
                raise UserError(f"cluster {cluster}: the run has no such k-means cluster")
            return self.z[self.labels == cluster].mean(0)
        z = np.asarray(z, dtype=np.float32)
        if z.shape != (self.z.shape[1],) or not np.isfinite(z).all():
            raise UserError(f"z: expected {self.z.shape[1]} finite numbers")
        return z

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(M, zdim) latents -> (M, N, 3) coordinates, Å; one decode at a time (the model is shared)."""
        from cryoem.analyze import decode

        with self._model_lock:
            return decode(self.model, np.atleast_2d(z), self.offset)

    def model_pdb(self, z: np.ndarray) -> bytes:
        """PDB text of the model decoded at ``z`` (zdim,), B-factor = displacement from the start (Å); cached."""
        def make() -> bytes:
            coords = self.decode(z)
            return self.pdb(coords, self.displacement(coords[0]))

        return self._cached(("model", np.asarray(z, dtype=np.float32).tobytes()), make)

    def mean_pdb(self, indices: np.ndarray) -> bytes:
        """PDB of the mean of the models decoded from (at most ``MEAN_SAMPLE`` of) the particles ``indices``."""
        idx = self.check_indices(indices)
        if len(idx) > MEAN_SAMPLE:
            idx = np.sort(np.random.default_rng(0).choice(idx, MEAN_SAMPLE, replace=False))
        def make() -> bytes:
            coords = self.decode(self.z[idx]).mean(0, keepdims=True)
            return self.pdb(coords, self.displacement(coords[0]))

        return self._cached(("mean", idx.tobytes()), make)

    def map_mrc(self, z: np.ndarray) -> bytes:
        """MRC bytes of the density map (box³ at the particle pixel size) of the model decoded at ``z``."""
        from cryoem.analyze import write_maps

        def make() -> bytes:
            with tempfile.TemporaryDirectory() as d:
                name = write_maps(self.model, self.decode(z), self.offset, Path(d), "map")[0]
                return (Path(d) / name).read_bytes()

        return self._cached(("map", np.asarray(z, dtype=np.float32).tobytes()), make)

    def _cached(self, key: tuple, make) -> bytes:
        """``make()``, remembered under ``key`` (least recently used out first, ``CACHE_SIZE`` kept)."""
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()  # outside the lock: other requests go on meanwhile
        with self._cache_lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    def displacement(self, coords: np.ndarray) -> np.ndarray:
        """(N,) Å: each atom's distance from its place in the starting model, for coords (N, 3)."""
        return np.linalg.norm(coords - self.start, axis=-1)

    def pdb(self, coords: np.ndarray, bfactor: np.ndarray) -> bytes:
        """PDB text of the models ``coords`` (M, N, 3) with ``bfactor`` (N,) in the B column (≤ 999.99)."""
        from cryoem.structure import Structure, write_pdb

        s = self.structure
        s = Structure(coords, s.element, s.name, s.resname, s.resnum, s.chain, s.icode, np.minimum(bfactor, 999.99))
        with tempfile.TemporaryDirectory() as d:
            write_pdb(Path(d) / "m.pdb", s)
            return (Path(d) / "m.pdb").read_bytes()

    def check_indices(self, indices) -> np.ndarray:
        """Sorted unique particle indices (int64), each in 0..N-1, at least one; else one UserError line."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or not len(idx):
            raise UserError("indices: expected a non-empty list of particle numbers")
        idx = np.unique(idx.astype(np.int64))
        if idx[0] < 0 or idx[-1] >= len(self.z):
            raise UserError(f"indices: expected particle numbers in 0..{len(self.z) - 1}")
        return idx

    # ------------------------------------------------------------------------- paths
    def path_latents(self, points=None, pc: int | None = None, frames: int = 20) -> np.ndarray:
        """(frames, zdim): a piecewise-linear path through the latents ``points`` (K >= 2, zdim), frames spread
        by segment length; or, with ``pc``, latent PC ``pc`` from its 5th to its 95th percentile."""
        from cryoem.analyze import traversal

        if not 2 <= frames <= MAX_FRAMES:
            raise UserError(f"frames {frames}: expected 2..{MAX_FRAMES}")
        if pc is not None:
            if not 1 <= pc <= self.scores.shape[1]:
                raise UserError(f"pc {pc}: expected 1..{self.scores.shape[1]}")
            return traversal(self.pca, self.z, pc - 1, frames).astype(np.float32)
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2 or len(p) < 2 or p.shape[1] != self.z.shape[1] or not np.isfinite(p).all():
            raise UserError(f"path: expected at least 2 points of {self.z.shape[1]} finite numbers")
        arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        t = np.linspace(0, arc[-1], frames) if arc[-1] > 0 else np.zeros(frames)
        return np.stack([np.interp(t, arc, p[:, k]) for k in range(p.shape[1])], 1).astype(np.float32)

    def write_path(self, z: np.ndarray, name: str | None = None) -> dict:
        """Decode the path ``z`` (F, zdim) into ``RUN/explore/paths/NAME/``: ``path.pdb`` (F models; B = each
        atom's largest displacement from the start along the path, Å), ``map_XX.mrc`` and ``path.cxc`` (ChimeraX
        opens both as series). Returns the path's record."""
        from cryoem.analyze import write_maps

        name = name or time.strftime("path-%Y%m%d-%H%M%S")
        check_name(name)
        folder = self.out / "paths" / name
        if folder.exists():
            raise UserError(f"path {name!r}: exists; choose another name")
        coords = self.decode(z)
        peak = np.max([self.displacement(c) for c in coords], axis=0)
        folder.mkdir(parents=True)
        atomic_write(folder / "path.pdb", self.pdb(coords, peak))
        maps = write_maps(self.model, coords, self.offset, folder, "map")
        atomic_write(folder / "path.cxc", chimerax_script("path.pdb", maps))
        np.save(folder / "latents.npy", z)
        return self._path_record(name)

    def _path_record(self, name: str) -> dict:
        rel = f"explore/paths/{name}"
        files = sorted(p.name for p in (self.out / "paths" / name).iterdir() if not p.name.startswith("."))
        return {"name": name, "pdb": f"{rel}/path.pdb", "cxc": f"{rel}/path.cxc",
                "maps": [f"{rel}/{f}" for f in files if f.endswith(".mrc")]}

    def paths(self) -> list[dict]:
        folder = self.out / "paths"
        if not folder.is_dir():
            return []
        return [self._path_record(p.name) for p in sorted(folder.iterdir()) if (p / "path.pdb").is_file()]

    # ------------------------------------------------------------------------- selections
    def selections(self) -> list[dict]:
        """The saved selections (``RUN/explore/selections.json``), oldest first."""
        f = self.out / "selections.json"
        if not f.is_file():
            return []
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            raise UserError(f"{f}: not valid JSON; the file is damaged") from None
        return data if isinstance(data, list) else []

    def original(self):
        """The run's original .star / .cs (:func:`cryoem.subsets.run_original`), traced once."""
        from cryoem.subsets import run_original

        if self._original is None:
            self._original = run_original(self.run, len(self.z), *self._where)
        return self._original

    def save_selection(self, name: str, indices) -> dict:
        """Write the particles ``indices`` as ``RUN/explore/selections/NAME.star`` (or ``.cs``: a subset of the
        ORIGINAL file, every column kept, through :func:`cryoem.subsets.write_selection`) and ``NAME.npy`` (the
        0-based particle indices, as ``cryoem select --indices`` reads them); list it in ``selections.json``."""
        from cryoem.subsets import write_selection

        check_name(name)
        idx = self.check_indices(indices)
        with self._file_lock:
            saved = self.selections()
            if any(s["name"] == name for s in saved):
                raise UserError(f"selection {name!r}: exists; choose another name")
            orig = self.original()
            folder = self.out / "selections"
            subset = folder / f"{name}{orig.path.suffix.lower()}"
            write_selection(orig, idx, subset)
            with atomic_path(folder / f"{name}.npy") as tmp:
                np.save(tmp, idx)
            entry = {"name": name, "count": len(idx), "subset": f"explore/selections/{subset.name}",
                     "indices": f"explore/selections/{name}.npy", "original": str(orig.path),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write(self.out / "selections.json", json.dumps([*saved, entry], indent=1))
        return entry

    def selection_indices(self, name: str) -> np.ndarray:
        """(K,) int64 particle indices of the saved selection ``name``."""
        check_name(name)
        if not any(s["name"] == name for s in self.selections()):
            raise UserError(f"selection {name!r}: not saved")
        return self.check_indices(np.load(self.out / "selections" / f"{name}.npy", allow_pickle=False))


# ----------------------------------------------------------------------------- small pure helpers
def umap_embedding(z: np.ndarray) -> np.ndarray:
    """(N, 2) float32 UMAP of the latents z (N, zdim): umap-learn, seed 0, 15 neighbours."""
    import umap

    return umap.UMAP(n_components=2, random_state=0, n_neighbors=min(15, len(z) - 1)).fit_transform(z).astype(
        np.float32)


def tsne_embedding(z: np.ndarray, sample: int = TSNE_SAMPLE, neighbours: int = 5) -> np.ndarray:
    """(N, 2) float32 t-SNE of the latents z (N, zdim).

    Exact t-SNE is quadratic and Barnes-Hut still takes minutes past 10^4 points, so at most ``sample`` particles
    (a seeded random subset) are embedded by scikit-learn's t-SNE (PCA initialisation, seed 0, perplexity 30), and
    every other particle is placed at the mean position of its ``neighbours`` nearest embedded particles in latent
    space.
    """
    from sklearn.manifold import TSNE
    from sklearn.neighbors import NearestNeighbors

    n = len(z)
    if n < 3:
        return np.zeros((n, 2), np.float32)
    sub = np.sort(np.random.default_rng(0).choice(n, min(n, sample), replace=False))
    emb = np.empty((n, 2), np.float32)
    emb[sub] = TSNE(2, init="pca", random_state=0, perplexity=min(30.0, len(sub) - 1.0)).fit_transform(z[sub])
    rest = np.setdiff1d(np.arange(n), sub)
    if len(rest):
        _, nn = NearestNeighbors(n_neighbors=min(neighbours, len(sub))).fit(z[sub]).kneighbors(z[rest])
        emb[rest] = emb[sub][nn].mean(1)
    return emb


def check_name(name: str) -> str:
    """A selection or path name: 1-64 letters, digits, ``_ . -``, not starting with ``.``; else UserError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def describe_column(name: str, values: np.ndarray) -> tuple[np.ndarray, dict]:
    """(N,) values -> (N,) float32 to draw and how: categorical codes (integers or text with at most
    ``MAX_CATEGORIES`` distinct values) or continuous numbers with their 0.5-99.5th percentile range."""
    if values.dtype.kind in "biuUSO":
        cats, codes = np.unique(values, return_inverse=True)
        if len(cats) <= MAX_CATEGORIES:
            labels = [c.item() if hasattr(c, "item") else c for c in cats]
            return codes.astype(np.float32), {"kind": "categorical", "categories": labels}
        if values.dtype.kind not in "biu":
            raise UserError(f"column {name!r}: {len(cats)} distinct text values; cannot colour by it")
    v = values.astype(np.float64)
    finite = v[np.isfinite(v)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
    return v.astype(np.float32), {"kind": "continuous", "lo": float(lo), "hi": float(hi)}


def chimerax_script(pdb: str, maps: list[str]) -> str:
    """A ChimeraX ``.cxc`` that opens a multi-model PDB as a trajectory and the maps as a volume series."""
    lines = ["# Plato path: open with `chimerax path.cxc` (run from this folder)",
             f"open {pdb} coordsets true", "open " + " ".join(maps) + " vseries true" if maps else "",
             "color bfactor palette bluered"]
    return "\n".join(line for line in lines if line) + "\n"


def _kmeans_labels(analysis: Path, n: int) -> np.ndarray | None:
    """``analysis/kmeans_labels.npy`` (N,) int64, or None when analyze did not write it."""
    from cryoem.subsets import kmeans_labels

    if not (analysis / "kmeans_labels.npy").is_file():
        return None
    return kmeans_labels(analysis, np.zeros((n, 1)))
