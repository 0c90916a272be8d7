"""cryoDRGN metadata: pose and CTF pickles (``.pkl``) beside an MRC image stack.

Files (N = images in the stack, D = its box in px):

* poses: a tuple ``(R, trans)`` with ``R`` (N, 3, 3) rotations and ``trans`` (N, 2) in fractions of the box,
  or ``R`` alone. ``R`` is used as is (projecting cryoDRGN's toy volume with it reproduces
  ``toy_projections.mrcs`` at correlation 0.997; ``R^T`` does not). cryoDRGN copies RELION's origin into
  ``trans``, so ``shift_A = -trans * D * pixel_size``.
* CTF: an (N, 9) array: box (px), pixel size (Å/px), dfU, dfV (Å), dfAng (°), kV, Cs (mm), amplitude
  contrast, phase shift (°).
* indices: a 1-D integer array (``cryoem select --indices``).

Security: a pickle can run any code, so these files are read only through :class:`RestrictedUnpickler`,
which rebuilds numpy arrays, tuples, lists, numbers and strings and refuses everything else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from cryoem.formats import read_file
from cryoem.formats.mrc import open_mrc, stack_shape
from cryoem.particles import ParticleMeta, check_ctf, choose_pixel_size
from plato_core.runinfo import UserError, atomic_path

__all__ = ["RestrictedUnpickler", "load_pickle", "write_pickle", "meta_from_stack"]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy arrays (plus tuples, lists, numbers, strings).

    Any other global (a function, a class, ``os.system``...) is refused with ``UserError``.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def __init__(self, file, source: str = "pickle"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"{self.source}: refusing to unpickle {module}.{name}; only numpy arrays, tuples and "
                            "lists are allowed in cryoDRGN metadata")
        return super().find_class(module, name)


def load_pickle(path: str | Path):
    """Load a cryoDRGN ``.pkl`` (arrays / tuples / lists only) with :class:`RestrictedUnpickler`."""
    path = Path(path)
    obj = read_file(path, lambda p: RestrictedUnpickler(io.BytesIO(p.read_bytes()), str(p)).load(), "file",
                    "not a readable pickle of numpy arrays")
    _check_object_arrays(obj, path)
    return obj


def _check_object_arrays(obj, path: Path) -> None:
    items = obj if isinstance(obj, (tuple, list)) else [obj]
    for x in items:
        if isinstance(x, np.ndarray) and x.dtype.hasobject:
            raise UserError(f"{path}: object arrays are not allowed in cryoDRGN metadata")
        if isinstance(x, (tuple, list)):
            _check_object_arrays(x, path)


def write_pickle(path: str | Path, obj) -> None:
    """Write cryoDRGN metadata (a numpy array, or a tuple of them) as a ``.pkl``, atomically.

    Refuses anything :func:`load_pickle` would refuse to read back (other objects, object arrays).
    """
    items = obj if isinstance(obj, (tuple, list)) else (obj,)
    if not all(isinstance(x, np.ndarray) and not x.dtype.hasobject for x in items):
        raise ValueError("write_pickle: expected a numpy array or a tuple of numeric numpy arrays")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)


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
    n, box = stack_shape(stack)
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
        check_ctf(ctf_arr, {f: (ctf, col, rows) for f, col in _PKL_CTF.items()}, Path(ctf))
    pixel_size = choose_pixel_size(pixel_size, found, Path(ctf or stack), "the CTF pickle's column 2")
    if pixel_size is None:
        m = open_mrc(stack)
        pixel_size = float(m.voxel_size.x)
        m.close()
        if not pixel_size > 0:
            raise UserError(f"{stack}: no pixel size in the header; pass --pixel-size")
    R = shift = None
    if poses is not None:
        obj = load_pickle(poses)
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
    arr = load_pickle(path) if arr is None else arr
    arr = np.asarray(arr, dtype=np.float64) if isinstance(arr, np.ndarray) else None
    if arr is None or arr.ndim != len(shape) or arr.shape[1:] != shape[1:]:
        raise UserError(f"{path}: expected a {what} array of shape (N, {', '.join(map(str, shape[1:]))})")
    if arr.shape[0] != shape[0]:
        raise UserError(f"{path}: {arr.shape[0]} {what} rows but {stack} holds {shape[0]} images")
    bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1))
    if len(bad):
        raise UserError(f"{path}: row {bad[0] + 1}: {what} is NaN or inf")
    return arr


