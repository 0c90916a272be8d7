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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoem import io as cio
from cryoem.ctf import CTF_FIELDS, CTFParams
from renderers.cameras import axis_angle_to_matrix, euler_zyz_to_matrix
from scene3d.runinfo import UserError

__all__ = ["ParticleMeta", "ParticleSet", "load_particles", "validate", "meta_from_star", "meta_from_cs",
           "meta_from_stack", "write_particles"]


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

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(1, len(self.file_idx) + 1)

    def __len__(self) -> int:
        return len(self.file_idx)

    def ctf_params(self, idx=slice(None)) -> CTFParams | None:
        return None if self.ctf is None else CTFParams.from_tensor(torch.as_tensor(self.ctf[idx]))


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


def _parse_image_names(names, path: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    files: dict[Path, int] = {}
    fidx, iidx = [], []
    for row, name in enumerate(names):
        s = str(name)
        idx, sep, fname = s.partition("@")
        if not sep or not idx.strip().isdigit() or not fname.strip():
            raise UserError(f"{path}: row {row + 1}: rlnImageName {s!r} is not of the form 'index@file'")
        if int(idx) < 1:
            raise UserError(f"{path}: row {row + 1}: image index {idx} in {s!r} must be >= 1")
        f = Path(fname.strip())
        f = f if f.is_absolute() else (path.parent / f)
        fidx.append(files.setdefault(f, len(files)))
        iidx.append(int(idx) - 1)
    return list(files), np.array(fidx, dtype=np.int64), np.array(iidx, dtype=np.int64)


def meta_from_star(path: str | Path, pixel_size: float | None = None) -> ParticleMeta:
    """Particle metadata from a RELION STAR file (3.0 single block, 3.1+ optics + particles, RELION 5).

    ``idx@file`` names are resolved relative to the STAR file's folder. Optics groups are
    merged per particle; ``pixel_size`` overrides the file (needed only if it has none).
    """
    path = Path(path)
    blocks = cio.read_star(path)
    df = _merge_optics(blocks, _particle_block(blocks, path), path)
    if len(df) == 0:
        raise UserError(f"{path}: the particle block has no rows")
    apix = pixel_size or _pixel_size_from_star(df, path)
    if apix is None:
        raise UserError(f"{path}: no pixel size (rlnImagePixelSize or rlnDetectorPixelSize + rlnMagnification); "
                        "pass --apix")
    files, fidx, iidx = _parse_image_names(df["rlnImageName"], path)
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
    return ParticleMeta(files, fidx, iidx, apix, box, R, shift, _ctf_from_star(df, path), str(path))


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
    return np.stack([cols[k] for k in CTF_FIELDS], 1)


# ----------------------------------------------------------------------------- cryoSPARC
def meta_from_cs(path: str | Path, datadir: str | Path | None = None) -> ParticleMeta:
    """Particle metadata from a cryoSPARC ``.cs`` file.

    ``blob/path`` is resolved relative to ``datadir`` (default: the .cs file's folder;
    cryoSPARC's leading ``>`` is dropped); ``blob/idx`` is 0-based.
    """
    path = Path(path)
    cs = cio.read_cs(path)
    names = cs.dtype.names
    for need in ("blob/path", "blob/idx", "blob/psize_A"):
        if need not in names:
            raise UserError(f"{path}: missing field {need}")
    if len(cs) == 0:
        raise UserError(f"{path}: no particles")
    root = Path(datadir) if datadir else path.parent
    files: dict[Path, int] = {}
    fidx = np.empty(len(cs), dtype=np.int64)
    for i, p in enumerate(cs["blob/path"]):
        try:
            s = p.decode() if isinstance(p, bytes) else str(p)
        except UnicodeDecodeError:
            raise UserError(f"{path}: row {i + 1}: blob/path is not valid UTF-8 text") from None
        if not s.strip(">").strip():
            raise UserError(f"{path}: row {i + 1}: blob/path is empty")
        f = Path(s.lstrip(">"))
        fidx[i] = files.setdefault(f if f.is_absolute() else root / f, len(files))
    num = lambda k: _cs_float(cs, k, path)  # noqa: E731
    psize = num("blob/psize_A")
    bad = np.flatnonzero(~np.isclose(psize, psize[0], rtol=1e-4))
    if len(bad):
        raise UserError(f"{path}: row {bad[0] + 1}: blob/psize_A {psize[bad[0]]:.4f} differs from row 1 "
                        f"({psize[0]:.4f})")
    box = int(np.asarray(cs["blob/shape"])[0][-1]) if "blob/shape" in names else 0
    R = shift = None
    if "alignments3D/pose" in names:
        pose = torch.as_tensor(num("alignments3D/pose").reshape(-1, 3))
        R = axis_angle_to_matrix(pose).transpose(1, 2).numpy()
        shift = -num("alignments3D/shift").reshape(-1, 2) * psize[0] if "alignments3D/shift" in names else None
    ctf = None
    if "ctf/df1_A" in names:
        get = lambda k, d: num(k) if k in names else np.full(len(cs), d)  # noqa: E731
        cols = {"defocus_u": get("ctf/df1_A", 0), "defocus_v": get("ctf/df2_A", 0),
                "angle": get("ctf/df_angle_rad", 0), "voltage": get("ctf/accel_kv", 300),
                "cs": get("ctf/cs_mm", 2.7), "amp_contrast": get("ctf/amp_contrast", 0.1),
                "phase_shift": get("ctf/phase_shift_rad", 0), "bfactor": get("ctf/bfactor", 0),
                "scale": get("ctf/scale", 1)}
        ctf = np.stack([cols[k] for k in CTF_FIELDS], 1)
    return ParticleMeta(list(files), fidx, np.asarray(cs["blob/idx"], dtype=np.int64), float(psize[0]), box,
                        R, shift, ctf, str(path))


def _cs_float(cs: np.ndarray, key: str, path: Path) -> np.ndarray:
    try:
        v = np.asarray(cs[key], dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: field {key} is not numeric ({cio._one_line(e)})") from e
    bad = np.flatnonzero(~np.isfinite(v.reshape(len(v), -1)).all(1))
    if len(bad):
        raise UserError(f"{path}: row {bad[0] + 1}: {key} is NaN or inf")
    return v


# ----------------------------------------------------------------------------- stack + cryoDRGN pkl
def meta_from_stack(stack: str | Path, pixel_size: float | None = None, poses: str | Path | None = None,
                    ctf: str | Path | None = None) -> ParticleMeta:
    """An image stack with optional cryoDRGN pose ``.pkl`` (R N×3×3, trans N×2 in box fractions,
    or R alone) and CTF ``.pkl`` (N×9: box, Apix, dfU, dfV, dfAng°, kV, Cs, w, phase°)."""
    stack = Path(stack)
    n, box = cio.stack_shape(stack)
    ctf_arr = None
    if ctf is not None:
        c = _pkl_array(ctf, (n, 9), "CTF", stack)
        if not np.allclose(c[:, 0], box):
            raise UserError(f"{ctf}: row {int(np.argmax(c[:, 0] != box)) + 1}: box {c[0, 0]:g} differs from "
                            f"{stack} ({box} px); was the stack downsampled?")
        pixel_size = pixel_size or float(c[0, 1])
        if not np.allclose(c[:, 1], c[0, 1]):
            raise UserError(f"{ctf}: pixel size differs between rows")
        ctf_arr = np.stack([c[:, 2], c[:, 3], np.deg2rad(c[:, 4]), c[:, 5], c[:, 6], c[:, 7], np.deg2rad(c[:, 8]),
                            np.zeros(n), np.ones(n)], 1)
    if pixel_size is None:
        m = cio.open_mrc(stack)
        pixel_size = float(m.voxel_size.x) or None
        m.close()
        if not pixel_size:
            raise UserError(f"{stack}: no pixel size in the header; pass --apix")
    R = shift = None
    if poses is not None:
        obj = cio.load_pickle(poses)
        rot = obj[0] if isinstance(obj, (tuple, list)) else obj
        R = _pkl_array(poses, (n, 3, 3), "rotation", stack, rot)
        if isinstance(obj, (tuple, list)) and len(obj) > 1:
            shift = -_pkl_array(poses, (n, 2), "translation", stack, obj[1]) * box * pixel_size
        else:
            shift = np.zeros((n, 2))
    return ParticleMeta([stack.resolve()], np.zeros(n, dtype=np.int64), np.arange(n), float(pixel_size), box,
                        R, shift, ctf_arr, str(poses or ctf or stack))


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
                   lazy: bool = True, check_pixels: bool = True) -> ParticleSet:
    """Read and validate a particle set from ``.star``, ``.cs``, or ``.mrcs`` (+ cryoDRGN ``.pkl``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        meta = meta_from_star(path, pixel_size)
    elif suffix == ".cs":
        meta = meta_from_cs(path, datadir)
    elif suffix in (".mrcs", ".mrc", ".st"):
        meta = meta_from_stack(path, pixel_size, poses, ctf)
    else:
        raise UserError(f"{path}: unknown particle file type (expected .star, .cs or .mrcs)")
    return ParticleSet(validate(meta, check_pixels=check_pixels), lazy=lazy)


def write_particles(out_dir: str | Path, images: np.ndarray, pixel_size: float, R: np.ndarray | None = None,
                    shift_A: np.ndarray | None = None, ctf: CTFParams | None = None,
                    stack_name: str = "particles.mrcs", star_name: str = "particles.star") -> tuple[Path, Path]:
    """Write ``images`` (N, D, D) as an .mrcs and a RELION 3.1 STAR (optics + particles) beside it."""
    import pandas as pd

    from renderers.cameras import matrix_to_euler_zyz

    out = Path(out_dir)
    N, D = images.shape[0], images.shape[-1]
    cio.write_mrcs(out / stack_name, images, pixel_size)
    c = ctf if ctf is not None else CTFParams.create(torch.zeros(N), amp_contrast=0.1)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [float(c.amp_contrast[0])], "rlnSphericalAberration": [float(c.cs[0])],
        "rlnVoltage": [float(c.voltage[0])], "rlnImagePixelSize": [float(pixel_size)], "rlnImageSize": [int(D)],
        "rlnImageDimensionality": [2]})
    for f in ("amp_contrast", "cs", "voltage"):
        if not torch.allclose(getattr(c, f), getattr(c, f)[0]):
            raise ValueError(f"write_particles: {f} varies between particles; one optics group holds one value")
    cols = {"rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(N)], "rlnOpticsGroup": np.ones(N, int)}
    if R is not None:
        rot, tilt, psi = (np.rad2deg(a.numpy()) for a in matrix_to_euler_zyz(torch.as_tensor(R, dtype=torch.float64)))
        cols.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    if shift_A is not None:
        cols.update(rlnOriginXAngst=-np.asarray(shift_A)[:, 0], rlnOriginYAngst=-np.asarray(shift_A)[:, 1])
    if ctf is not None:
        cols.update(rlnDefocusU=c.defocus_u.numpy(), rlnDefocusV=c.defocus_v.numpy(),
                    rlnDefocusAngle=np.rad2deg(c.angle.numpy()), rlnPhaseShift=np.rad2deg(c.phase_shift.numpy()),
                    rlnCtfBfactor=c.bfactor.numpy(), rlnCtfScalefactor=c.scale.numpy())
    cio.write_star(out / star_name, optics, pd.DataFrame(cols))
    return out / stack_name, out / star_name
