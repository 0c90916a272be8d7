"""MRC / MRCS files: particle image stacks, and maps.

The MRC2014 header holds the voxel size (Å, ``voxel_size.x``) and the origin (x, y, z) Å, the position of
voxel (0, 0, 0). An image stack is (N, D, D) (a 2D file counts as one image); Plato reads stacks through a
read-only memory map (:func:`open_mrc`) and writes float32, atomically. Every reader turns a bad file into
a ``UserError`` with one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryoem.formats import read_file
from plato_core.runinfo import UserError, atomic_path

__all__ = ["open_mrc", "stack_shape", "StackReader", "read_mrc", "write_mrc", "write_mrcs"]


def open_mrc(path: str | Path):
    """Memory-map an MRC file read-only after checking its header; returns the ``mrcfile`` object.

    Raises ``UserError`` for a missing file, an unreadable header or data, or non-square images.
    """
    import mrcfile

    path = Path(path)
    m = read_file(path, lambda p: mrcfile.mmap(p, mode="r", permissive=True), "image stack",
                  "not a readable MRC file")
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


class StackReader:
    """Images of one MRC stack, read by their exact byte ranges (``os.pread``; no memory map).

    Why: a random batch then costs its own bytes. Through a memory map, each page fault also read the pages
    around it: 14 MB from disk per batch of 32 images of 16 KB at 10^6 particles (``python -m cryoem.bench
    train``), and the mapped pages counted in the process's memory. Sequential reads still get the kernel's
    readahead. Picklable: each process (a DataLoader worker) opens its own descriptor.
    """

    def __init__(self, path: str | Path):
        m = open_mrc(path)
        try:
            d = m.data
            self.n, self.box, self.dtype = (1 if d.ndim == 2 else d.shape[0]), d.shape[-1], d.dtype
            self.offset = 1024 + int(m.header.nsymbt)  # the main header, then the extended header
        finally:
            m.close()
        self.path, self._fd = Path(path), None
        self._bytes = self.box * self.box * self.dtype.itemsize

    def read(self, j: np.ndarray) -> np.ndarray:
        """Images ``j`` (M,) (0-based, best ascending: each run of consecutive indices is one read) ->
        (M, D, D) in the file's dtype."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        j = np.asarray(j, dtype=np.int64)
        out = np.empty((len(j), self.box, self.box), self.dtype)
        starts = np.flatnonzero(np.diff(j, prepend=-2) != 1)
        for a, b in zip(starts, [*starts[1:], len(j)]):
            count = b - a
            buf = os.pread(self._fd, count * self._bytes, self.offset + int(j[a]) * self._bytes)
            if len(buf) != count * self._bytes:
                raise UserError(f"{self.path}: truncated (image {int(j[a]) + count} is past the end of the file)")
            out[a:b] = np.frombuffer(buf, self.dtype).reshape(count, self.box, self.box)
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


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
              stack: bool = False, dtype: str = "float32") -> None:
    """Write a map (D, H, W) (or an image stack with ``stack=True``) as float32 MRC (or float16, MRC2014 mode 12,
    with ``dtype``), atomically.

    ``origin`` (x, y, z) Å is the position of voxel (0, 0, 0), as in the MRC2014 header.
    """
    import mrcfile

    if dtype not in ("float32", "float16"):
        raise ValueError(f"write_mrc: dtype must be float32 or float16, got {dtype!r}")
    data = np.ascontiguousarray(np.asarray(data, dtype=dtype))
    if not np.isfinite(data).all():
        raise ValueError("write_mrc: data contains NaN or inf" + (" (beyond float16's range?)" if dtype == "float16"
                                                                  else ""))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            if stack:
                m.set_image_stack()
            m.voxel_size = float(voxel_size)
            m.header.origin = tuple(float(o) for o in origin)
            m.update_header_stats()


def write_mrcs(path: str | Path, images: np.ndarray, pixel_size: float, dtype: str = "float32") -> None:
    """Write an image stack (N, D, D) as an ``.mrcs`` (float32, or float16: MRC mode 12), atomically."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"write_mrcs: expected (N, D, D) images, got {images.shape}")
    write_mrc(path, images, pixel_size, stack=True, dtype=dtype)

