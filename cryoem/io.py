"""File formats: MRC stacks and maps, RELION STAR, cryoSPARC .cs, cryoDRGN .pkl.

Every reader turns a user's bad file into a ``UserError`` with one line naming the
file (and row, where there is one). Nothing here unpickles arbitrary objects:
cryoDRGN pickles go through :class:`RestrictedUnpickler`.

Units at the boundary: STAR angles in degrees, origins in Å (``rlnOriginXAngst``)
or pixels (``rlnOriginX``, RELION < 3.1); cryoSPARC angles in radians, shifts in
pixels; cryoDRGN translations as a fraction of the box. Inside Plato: radians and Å.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np

from scene3d.runinfo import UserError, atomic_path, atomic_write, one_line

__all__ = ["RestrictedUnpickler", "load_pickle", "open_mrc", "read_mrc", "write_mrc", "write_mrcs", "read_star",
           "write_star", "read_cs"]


# ----------------------------------------------------------------------------- pickles
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
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
    except UserError:
        raise
    except Exception as e:  # truncated / garbage pickles raise many types
        raise UserError(f"{path}: not a readable pickle of numpy arrays ({one_line(e)})") from e
    _check_object_arrays(obj, path)
    return obj


def _check_object_arrays(obj, path: Path) -> None:
    items = obj if isinstance(obj, (tuple, list)) else [obj]
    for x in items:
        if isinstance(x, np.ndarray) and x.dtype.hasobject:
            raise UserError(f"{path}: object arrays are not allowed in cryoDRGN metadata")
        if isinstance(x, (tuple, list)):
            _check_object_arrays(x, path)


# ----------------------------------------------------------------------------- MRC
def open_mrc(path: str | Path):
    """Memory-map an MRC file read-only after checking its header; returns the ``mrcfile`` object.

    Raises ``UserError`` for a missing file, an unreadable header or data, or non-square images.
    """
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image stack not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable MRC file ({one_line(e)})") from e
    data = m.data
    if data is None or data.ndim not in (2, 3) or data.size == 0:
        m.close()
        raise UserError(f"{path}: not a readable MRC file (header and data size disagree)")
    if data.shape[-1] != data.shape[-2]:
        m.close()
        raise UserError(f"{path}: images are not square ({data.shape[-2]} x {data.shape[-1]} pixels)")
    if data.dtype.kind not in "fiu":
        m.close()
        raise UserError(f"{path}: unsupported MRC data type {data.dtype}")
    return m


def stack_shape(path: str | Path) -> tuple[int, int]:
    """(number of images, box) of an MRC stack (a 2D file counts as one image)."""
    m = open_mrc(path)
    try:
        shape = m.data.shape
        return (1 if len(shape) == 2 else shape[0]), shape[-1]
    finally:
        m.close()


def read_mrc(path: str | Path) -> tuple[np.ndarray, float, np.ndarray]:
    """Read a whole MRC map or stack: (data float32, voxel size Å (x), origin (x, y, z) Å)."""
    m = open_mrc(path)
    try:
        data = np.array(m.data, dtype=np.float32)
        vs = float(m.voxel_size.x)
        origin = np.array([float(m.header.origin.x), float(m.header.origin.y), float(m.header.origin.z)])
    finally:
        m.close()
    return data, vs, origin


def write_mrc(path: str | Path, data: np.ndarray, voxel_size: float, origin=(0.0, 0.0, 0.0),
              stack: bool = False) -> None:
    """Write a map (D, H, W) (or an image stack with ``stack=True``) as float32 MRC, atomically.

    ``origin`` (x, y, z) Å is the position of voxel (0, 0, 0), as in the MRC2014 header.
    """
    import mrcfile

    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    if not np.isfinite(data).all():
        raise ValueError("write_mrc: data contains NaN or inf")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            if stack:
                m.set_image_stack()
            m.voxel_size = float(voxel_size)
            m.header.origin = tuple(float(o) for o in origin)
            m.update_header_stats()


def write_mrcs(path: str | Path, images: np.ndarray, pixel_size: float) -> None:
    """Write an image stack (N, D, D) as an ``.mrcs`` (float32), atomically."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"write_mrcs: expected (N, D, D) images, got {images.shape}")
    write_mrc(path, images, pixel_size, stack=True)


# ----------------------------------------------------------------------------- STAR
def read_star(path: str | Path) -> dict:
    """Read a STAR file with ``starfile``; returns ``{block name: DataFrame}``."""
    import pandas as pd
    import starfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: STAR file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as e:
        raise UserError(f"{path}: cannot parse STAR file ({one_line(e)})") from e
    if not isinstance(blocks, dict) or not blocks:
        raise UserError(f"{path}: no data blocks found")
    return {k: v if isinstance(v, pd.DataFrame) else pd.DataFrame([v]) for k, v in blocks.items()}


def write_star(path: str | Path, optics, particles) -> None:
    """Write a RELION 3.1 STAR file with ``data_optics`` and ``data_particles`` blocks (atomically)."""
    import starfile

    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, overwrite=True)


# ----------------------------------------------------------------------------- cryoSPARC
def read_cs(path: str | Path) -> np.ndarray:
    """Load a cryoSPARC ``.cs`` structured array without pickles (``allow_pickle=False``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: cryoSPARC file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: not a cryoSPARC .cs file ({one_line(e)})") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise UserError(f"{path}: not a cryoSPARC .cs file (expected a 1-D numpy structured array)")
    return arr


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text)
