"""Fourier cropping of particle images, and ``cryoem downsample``: any particle set -> a smaller-box RELION set.

The crop (:func:`fourier_crop`) keeps the field of view and the particle centre and makes the pixels larger:
a D x D image at ``a`` Å/px becomes d x d at ``a * D / d`` Å/px, *exactly*, whether or not d divides D
(200 px at 1.0 Å/px -> 64 px at 3.125 Å/px). Its output is the samples, on the coarse grid, of the
input's band-limited (trigonometric) interpolant low-passed to ``|kx|, |ky| <= d / 2`` cycles per field
of view; a component exactly at the new Nyquist frequency is sampled, i.e. folded onto the Nyquist bin.
Pixel values are samples (not sums): a constant image stays the same constant.

Centres: Plato puts the particle centre at pixel ``D // 2`` (see ``cryoem.particles``). For even D and d
the grids share that point; for an odd input box the crop shifts the content by half an input pixel so that
input pixel ``D // 2`` lands on output pixel ``d // 2``. Shifts in Å therefore stay valid unchanged.

Boxes: the output box must be even (RELION, and cryoDRGN's downsample, expect even boxes) and at most the
input box (equal: the images are copied; larger: refused, as Fourier padding adds no information). Any input
box works, odd or not dividing by d.

``cryoem downsample`` (:func:`downsample`) reads a RELION STAR or cryoSPARC .cs set lazily and writes, into
an output folder::

    particles_000.mrcs, particles_001.mrcs, ...   at most ``chunk`` particles each (float32; or float16, scaled
                         to standard deviation 1: the cache to train on at scale, half the bytes per particle)
    particles.star       RELION 3.1 (optics + particles): new box and pixel size (to the 6 decimals RELION
                         writes; downsample.json holds it in full), the source's poses,
                         shifts (Å, unchanged) and CTF, and ``rlnPlatoSourceRow``: each particle's 0-based
                         row in the source's particle block (.star) or array (.cs), in source order
    downsample.json      the source file (absolute path, and relative to this folder), its format and
                         particle count: ``cryoem select`` follows it back to the original file
    config.json          the settings, versions and git commit (``plato_core.runinfo.write_config``)

Memory is one output chunk plus one input batch of about 64 MB, whatever the size of the set.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plato_core.runinfo import UserError, atomic_write, check_out_dir, remove_outputs, write_config

__all__ = ["fourier_crop", "downsample", "ROW_COLUMN", "RECORD", "STAR_NAME"]

ROW_COLUMN = "rlnPlatoSourceRow"  # 0-based row of each particle in the source file
RECORD = "downsample.json"  # beside the STAR: where the source file is
STAR_NAME = "particles.star"
_STACK = re.compile(r"particles_\d+\.mrcs")
_BATCH_FLOATS = 2**24  # input pixels per batch: 64 MB of float32


# ----------------------------------------------------------------------------- the crop
def _crop_axis(F: Tensor, n: int, dim: int) -> Tensor:
    """Keep ``n`` frequencies of a spectrum along ``dim`` (FFT order, ``n`` <= its length).

    Output bins hold k = 0 .. (n-1)//2 and -(n//2) .. -1; for even ``n`` the bin -n/2 is the new Nyquist
    bin, onto which sampling on the coarse grid folds +n/2: it receives F(-n/2) + F(+n/2).
    """
    n_in = F.shape[dim]
    if n == n_in:
        return F
    k = torch.cat([torch.arange(0, (n - 1) // 2 + 1), torch.arange(-(n // 2), 0)]) % n_in
    out = F.index_select(dim, k.to(F.device))
    if n % 2 == 0:
        out.narrow(dim, n // 2, 1).add_(F.narrow(dim, n // 2, 1))
    return out


def fourier_crop(images: Tensor, box: int) -> Tensor:
    """Fourier-crop images (..., D, D) to (..., box, box), same field of view: pixel size x D / box.

    Args:
        images: (..., D, D) real tensor (float32 or float64), any D >= box.
        box: the new side, 1 <= box <= D.
    Returns:
        (..., box, box) in the dtype of ``images``: samples at the output pixels of the input's trigonometric
        interpolant, low-passed to ``|kx|, |ky| <= box / 2`` cycles per field of view (module docstring).
        Output pixel ``box // 2`` sits on input pixel ``D // 2`` (the particle centre).
    """
    D = images.shape[-1]
    if images.shape[-2] != D or not 1 <= box <= D:
        raise ValueError(f"fourier_crop: expected (..., D, D) images with D >= box, got {tuple(images.shape)} "
                         f"and box {box}")
    if box == D:
        return images.clone()
    # move the content by delta input px so that input pixel D//2 lands on output pixel box//2
    delta = (box // 2) * D / box - D // 2
    k = torch.fft.fftfreq(D, d=1.0 / D, dtype=torch.float64, device=images.device)  # integer frequencies
    phase = None if delta == 0 else torch.polar(torch.ones_like(k), -2 * math.pi * k * delta / D)
    F = torch.fft.fft(images, dim=-1, norm="forward")  # coefficients of the interpolant along x
    if phase is not None:
        F = F * phase.to(F.dtype)
    F = torch.fft.fft(_crop_axis(F, box, -1), dim=-2, norm="forward")
    if phase is not None:
        F = F * phase.to(F.dtype)[:, None]
    return torch.fft.ifft2(_crop_axis(F, box, -2), norm="forward").real.to(images.dtype)


# ----------------------------------------------------------------------------- the STAR of the output
# ----------------------------------------------------------------------------- the command
def _check_inputs(particles: Path, out: Path, box: int | None, chunk: int, overwrite: bool) -> None:
    """Argument checks that need no file reading (one ``UserError`` line each)."""
    if particles.suffix.lower() not in (".star", ".cs"):
        raise UserError(f"--particles {particles}: expected a RELION .star or cryoSPARC .cs file")
    if not particles.is_file():
        raise UserError(f"--particles {particles}: file not found")
    if box is not None and (box < 2 or box % 2):
        raise UserError(f"--box {box}: expected an even number of pixels >= 2 (RELION expects even boxes)")
    if chunk < 1:
        raise UserError(f"--chunk {chunk}: expected at least 1 particle per stack")
    check_out_dir(out, overwrite=overwrite)


def _load_source(particles: Path, datadir, pixel_size, box: int | None):
    """The source set (lazy, pixels unchecked: each batch is checked as it is read), with box checks."""
    from cryoem.particles import load_particles

    ds = load_particles(particles, pixel_size=pixel_size, datadir=datadir, lazy=True, pixels="none")
    if box is not None and box > ds.box:
        raise UserError(f"--box {box}: larger than the input box ({ds.box} px); downsample only makes images "
                        "smaller (Fourier padding adds no information)")
    return ds


def _stack_names(n: int, chunk: int) -> list[str]:
    count = -(-n // chunk)
    width = max(3, len(str(count - 1)))
    return [f"particles_{c:0{width}d}.mrcs" for c in range(count)]


def _check_not_source(out: Path, ds, particles: Path, names: list[str]) -> None:
    """Refuse outputs (or --overwrite deletions) that would replace the source file or one of its stacks."""
    sources = {os.path.realpath(p) for p in [particles, *ds.meta.files]}
    old = [p.name for p in out.iterdir() if _STACK.fullmatch(p.name)] if out.is_dir() else []
    for name in {*names, *old, STAR_NAME, RECORD, "config.json"}:
        if os.path.realpath(out / name) in sources:
            raise UserError(f"--out {out}: writing {name} there would replace the source {out / name}; "
                            "choose another folder")


def _float16_scale(ds, box: int, n: int = 1024) -> float:
    """The factor that brings the cropped images' standard deviation to 1 (over ``n`` images spread over the
    set): float16 keeps 11 bits wherever the values lie, but only within 6e-5..65504."""
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int))
    sd = float(fourier_crop(ds.images(idx)[:, 0], box).double().std())
    return 1.0 / sd if sd > 0 else 1.0


def _write_stacks(ds, out: Path, box: int, chunk: int, names: list[str], pixel_size: float,
                  progress: bool, dtype: str = "float32", scale: float = 1.0) -> None:
    """Crop every particle in source order into ``names`` (``chunk`` particles each), times ``scale``, as
    ``dtype``; an image holding NaN/inf raises ``DataError`` (``ParticleSet`` checks each as it reads it)."""
    from tqdm import tqdm

    from cryoem.formats.mrc import write_mrcs

    N, D = len(ds), ds.box
    batch = max(1, min(chunk, _BATCH_FLOATS // (D * D)))
    with tqdm(total=N, unit="particle", desc="downsample", disable=not progress, dynamic_ncols=True) as bar:
        for c, name in enumerate(names):
            lo, hi = c * chunk, min(N, (c + 1) * chunk)
            stack = np.empty((hi - lo, box, box), dtype=np.float32)
            for s in range(lo, hi, batch):
                idx = np.arange(s, min(hi, s + batch))
                stack[s - lo:s - lo + len(idx)] = fourier_crop(ds.images(idx)[:, 0], box).numpy()
                bar.update(len(idx))
            if scale != 1.0:
                stack *= scale
            write_mrcs(out / name, stack, pixel_size, dtype=dtype)


def downsample(particles: str | Path, out: str | Path, box: int | None = None, *, datadir: str | Path | None = None,
               pixel_size: float | None = None, chunk: int = 10000, overwrite: bool = False,
               progress: bool = True, dtype: str = "float32") -> Path:
    """Fourier-crop a RELION .star or cryoSPARC .cs particle set to ``box`` px (None: the input box, a copy);
    returns ``out/particles.star``.

    ``dtype`` "float16" writes MRC mode-12 stacks (half the bytes to read per particle), with the images
    scaled so that their standard deviation is 1 (``scale`` in downsample.json; Plato's models fit their own
    image scale and noise, so training is unchanged by it).

    Every input is checked before anything is written; ``out`` must be new or empty unless ``overwrite``
    (then only the files this command writes are replaced). On a failure part-way (an image holding NaN),
    the stacks written so far are removed. See the module docstring for what is written.
    """
    particles, out = Path(particles), Path(out)
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype {dtype}: expected float32 or float16")
    _check_inputs(particles, out, box, chunk, overwrite)
    ds = _load_source(particles, datadir, pixel_size, box)
    box = ds.box if box is None else box
    if box % 2:
        raise UserError(f"the input box is {box} px, odd: give an even --box (RELION expects even boxes)")
    N, D, apix_in = len(ds), ds.box, ds.pixel_size
    apix = apix_in * D / box  # same field of view, exactly
    names = _stack_names(N, chunk)
    _check_not_source(out, ds, particles, names)
    if overwrite and out.is_dir():
        remove_outputs(out, [STAR_NAME, RECORD, "config.json",
                             *(p.name for p in out.iterdir() if _STACK.fullmatch(p.name))])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        scale = _float16_scale(ds, box) if dtype == "float16" else 1.0
        _write_stacks(ds, out, box, chunk, names, apix, progress, dtype, scale)
    except BaseException:
        remove_outputs(out, names)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    image_names = [f"{i - c * chunk + 1:06d}@{names[c]}" for c in range(len(names))
                   for i in range(c * chunk, min(N, (c + 1) * chunk))]
    from cryoem.formats.star import star_tables, write_star

    m = ds.meta
    optics, parts = star_tables(image_names, apix, box, m.R, m.shift_A, m.ctf,
                                {ROW_COLUMN: np.asarray(m.rows - 1, dtype=np.int64)})

    write_star(out / STAR_NAME, optics, parts, decimals=6)  # RELION's precision
    source = os.path.abspath(particles)
    record = {"kind": "plato-downsample", "version": 1, "star": STAR_NAME, "row_column": ROW_COLUMN,
              "source": source, "source_relative": os.path.relpath(source, os.path.abspath(out)),
              "source_format": particles.suffix.lower()[1:], "n_particles": N,
              "box_in": D, "pixel_size_in": apix_in, "box_out": box, "pixel_size_out": apix, "stacks": names,
              "dtype": dtype, "scale": scale}
    atomic_write(out / RECORD, json.dumps(record, indent=2))
    write_config(out, {"particles": source, "datadir": None if datadir is None else os.path.abspath(datadir),
                       "pixel_size": pixel_size, "box": box, "chunk": chunk, "overwrite": overwrite, "dtype": dtype})
    return out / STAR_NAME
