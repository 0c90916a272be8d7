"""RELION STAR files (3.0, 3.1+ with optics groups, RELION 5): read, write, and copy a subset of rows.

A STAR file holds data blocks; Plato's particles are the first loop with ``_rlnImageName`` outside
``data_optics`` (:func:`particle_block`), merged per row with its optics group. :func:`meta_from_star` turns
it into a :class:`cryoem.particles.ParticleMeta`.

Units at the boundary: angles in degrees (``rlnAngleRot/Tilt/Psi``, ZYZ, through
``renderers.cameras.euler_zyz_to_matrix``), defocus in Å, origins in Å (``rlnOriginXAngst``) or pixels
(``rlnOriginX``, RELION < 3.1). Inside Plato: radians and Å.

Shifts: RELION's origin "shifts the observation into the reference projection" (RELION docs, Conventions;
``ObservationModel::predictObservation`` shifts the projection by ``-origin``), so the particle centre sits
at ``box//2 - origin``: ``shift_A = -rlnOriginXYAngst`` (``-rlnOriginXY * pixel_size`` before 3.1). The
writer (:func:`star_tables`) negates back.

Writers: :func:`write_star` writes tables through ``starfile`` without losing digits (a value keeps RELION's
6 decimals when they hold it exactly, else all of its digits), so reading a file and writing it back keeps
every column; :func:`star_tables` builds RELION 3.1 tables from Plato's metadata (``cryoem downsample``,
the simulator's :func:`write_particles`); :func:`write_star_rows` copies the text of a file keeping only some
particle rows, every other line byte for byte (``cryoem select``).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import torch

from cryoem.ctf import CTF_FIELDS, CTFParams
from cryoem.formats import read_file
from cryoem.formats.mrc import write_mrcs
from cryoem.particles import ParticleMeta, check_ctf, choose_pixel_size, resolve_stacks, search_roots
from plato_core.runinfo import UserError, atomic_path
from renderers.cameras import euler_zyz_to_matrix

__all__ = ["read_star", "write_star", "particle_block", "meta_from_star", "star_tables", "write_particles",
           "star_rows", "write_star_rows"]


# ----------------------------------------------------------------------------- tables in, tables out
def read_star(path: str | Path) -> dict:
    """Read a STAR file with ``starfile``; returns ``{block name: DataFrame}``."""
    import pandas as pd
    import starfile

    path = Path(path)
    blocks = read_file(path, lambda p: starfile.read(p, always_dict=True), "STAR file", "cannot parse STAR file")
    if not isinstance(blocks, dict) or not blocks:
        raise UserError(f"{path}: no data blocks found")
    return {k: v if isinstance(v, pd.DataFrame) else pd.DataFrame([v]) for k, v in blocks.items()}


def write_star(path: str | Path, optics, particles, decimals: int | None = None) -> None:
    """Write a RELION 3.1 STAR file with ``data_optics`` and ``data_particles`` blocks (DataFrames), atomically.

    ``decimals``: None writes every float without loss (RELION's ``%.6f`` when it holds the value exactly,
    else the shortest text that reads back the same double); an int rounds every float to that many decimals.
    """
    import starfile

    fmt = _lossless if decimals is None else f"%.{int(decimals)}f"
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, overwrite=True, float_format=fmt)


def _lossless(x: float) -> str:
    s = f"{x:.6f}"
    return s if float(s) == x else repr(float(x))


# ----------------------------------------------------------------------------- the particle block -> ParticleMeta
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


def particle_block(blocks: dict, path: Path):
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


def _parse_image_names(names, path: Path, datadir=None) -> tuple[list[Path], np.ndarray, np.ndarray, dict]:
    """Split ``idx@file`` names (vectorised); resolve each distinct file once (``particles.resolve_stacks``).

    Returns files, file_idx (N,), 0-based image_idx (N,) and the stacks found nowhere.
    """
    import pandas as pd

    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    parts = s.str.partition("@")
    idx, fname = parts[0].str.strip(), parts[2].str.strip()
    ok = ((parts[1] == "@") & idx.str.fullmatch(r"[0-9]{1,15}") & (fname != "")).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.argmin(ok))
        raise UserError(f"{path}: row {row + 1}: rlnImageName {s[row]!r} is not of the form 'index@file'")
    iidx = idx.to_numpy().astype(np.int64) - 1
    if (iidx < 0).any():
        row = int(np.argmax(iidx < 0))
        raise UserError(f"{path}: row {row + 1}: image index {idx[row]} in {s[row]!r} must be >= 1")
    codes, uniq = pd.factorize(fname)
    files, which, missing = resolve_stacks(list(uniq), search_roots(path, datadir))
    return files, which[codes], iidx, missing


def meta_from_star(path: str | Path, pixel_size: float | None = None, datadir: str | Path | None = None
                   ) -> ParticleMeta:
    """Particle metadata from a RELION STAR file (3.0 single block, 3.1+ optics + particles, RELION 5).

    ``idx@file`` stack names are resolved in this order, each distinct name once: an absolute
    path; relative to ``datadir`` when given; relative to the STAR file's folder; relative to each
    ancestor folder of the STAR file, nearest first. The last finds a RELION project root:
    ``Refine3D/job002/run_data.star`` names ``Extract/job001/Movies/mic_001.mrcs`` relative to the
    project folder. A stack found nowhere is reported by :func:`cryoem.particles.validate` with every place tried.

    Optics groups are merged per particle. Pixel size (Å/px): ``pixel_size`` wins over the file's
    (it is needed only when the file has none); when both exist and differ, a warning naming both
    goes to stderr. CTF values that no microscope has (``cryoem.ctf.unphysical_ctf``) are refused.
    """
    path = Path(path)
    blocks = read_star(path)
    df = _merge_optics(blocks, particle_block(blocks, path), path)
    if len(df) == 0:
        raise UserError(f"{path}: the particle block has no rows")
    try:
        found = _pixel_size_from_star(df, path)
    except UserError:
        if not pixel_size:
            raise
        found = None  # the user's pixel size replaces an inconsistent column
    apix = choose_pixel_size(pixel_size, found, path, "the STAR file")
    if apix is None:
        raise UserError(f"{path}: no pixel size (rlnImagePixelSize or rlnDetectorPixelSize + rlnMagnification); "
                        "pass --pixel-size")
    files, fidx, iidx, missing = _parse_image_names(df["rlnImageName"], path, datadir)
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
    ctf = _ctf_from_star(df, path)
    name = path.name
    prov = {"images": name, **({"poses": name} if R is not None else {}),
            **({"shifts": name} if shift is not None else {}), **({"ctf": name} if ctf is not None else {})}
    halves = np.rint(_float_col(df, "rlnRandomSubset", path)).astype(int) if _col(df, "rlnRandomSubset") else None
    return ParticleMeta(files, fidx, iidx, apix, box, R, shift, ctf, str(path), provenance=prov, searched=missing,
                        random_subset=halves)


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
    ctf = np.stack([cols[k] for k in CTF_FIELDS], 1)
    star_names = {"defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "voltage": "rlnVoltage",
                  "cs": "rlnSphericalAberration", "amp_contrast": "rlnAmplitudeContrast"}
    rows = np.arange(1, n + 1)
    check_ctf(ctf, {k: (path, v, rows) for k, v in star_names.items() if v in df.columns}, path)
    return ctf




# ----------------------------------------------------------------------------- Plato's metadata as STAR tables
def star_tables(image_names: list[str], pixel_size: float, box: int, R=None, shift_A=None, ctf=None,
                extra: dict | None = None):
    """RELION 3.1 optics and particle tables (pandas DataFrames) for N particles.

    ``R`` (N, 3, 3) rotations -> ZYZ angles in degrees; ``shift_A`` (N, 2) Å -> ``rlnOriginX/YAngst = -shift``;
    ``ctf`` (N, 9) in ``CTF_FIELDS`` order -> defocus (Å), astigmatism angle and phase shift (degrees),
    B-factor and scale, with one optics group per distinct (voltage kV, Cs mm, amplitude contrast);
    ``extra``: more particle columns {name: (N,)}. Absent metadata give no columns, not invented values.
    """
    import pandas as pd

    from renderers.cameras import matrix_to_euler_zyz

    n = len(image_names)
    optics = {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"]}
    cols: dict = {"rlnImageName": list(image_names), "rlnOpticsGroup": np.ones(n, dtype=int)}
    if ctf is not None:
        col = {f: np.asarray(ctf, dtype=np.float64)[:, i] for i, f in enumerate(CTF_FIELDS)}
        groups, group_of = np.unique(np.stack([col["voltage"], col["cs"], col["amp_contrast"]], 1), axis=0,
                                     return_inverse=True)
        optics = {"rlnOpticsGroup": np.arange(1, len(groups) + 1),
                  "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(groups) + 1)],
                  "rlnAmplitudeContrast": groups[:, 2], "rlnSphericalAberration": groups[:, 1],
                  "rlnVoltage": groups[:, 0]}
        cols["rlnOpticsGroup"] = group_of.reshape(-1) + 1
    g = len(optics["rlnOpticsGroup"])
    optics.update(rlnImagePixelSize=[float(pixel_size)] * g, rlnImageSize=[int(box)] * g,
                  rlnImageDimensionality=[2] * g)
    if R is not None:
        angles = matrix_to_euler_zyz(torch.as_tensor(np.asarray(R), dtype=torch.float64))
        cols.update(zip(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), (np.rad2deg(a.numpy()) for a in angles)))
    if shift_A is not None:
        cols.update(rlnOriginXAngst=-np.asarray(shift_A)[:, 0], rlnOriginYAngst=-np.asarray(shift_A)[:, 1])
    if ctf is not None:
        cols.update(rlnDefocusU=col["defocus_u"], rlnDefocusV=col["defocus_v"],
                    rlnDefocusAngle=np.rad2deg(col["angle"]), rlnPhaseShift=np.rad2deg(col["phase_shift"]),
                    rlnCtfBfactor=col["bfactor"], rlnCtfScalefactor=col["scale"])
    cols.update(extra or {})
    return pd.DataFrame(optics), pd.DataFrame(cols)


def write_particles(out_dir: str | Path, images: np.ndarray, pixel_size: float, R: np.ndarray | None = None,
                    shift_A: np.ndarray | None = None, ctf: CTFParams | None = None,
                    stack_name: str = "particles.mrcs", star_name: str = "particles.star") -> tuple[Path, Path]:
    """Write ``images`` (N, D, D) as an .mrcs and a RELION 3.1 STAR (optics + particles, :func:`star_tables`)."""
    out = Path(out_dir)
    N, D = images.shape[0], images.shape[-1]
    write_mrcs(out / stack_name, images, pixel_size)
    names = [f"{i + 1:06d}@{stack_name}" for i in range(N)]
    optics, parts = star_tables(names, pixel_size, D, R, shift_A, None if ctf is None else ctf.as_tensor().numpy())
    write_star(out / star_name, optics, parts, decimals=6)
    return out / stack_name, out / star_name


# ----------------------------------------------------------------------------- STAR text, row by row
def _star_lines(path: Path):
    """Yield ``(line, row)`` for every line of a STAR file, ``row`` the 0-based index of a row of the particle
    block (the first loop with ``_rlnImageName`` outside ``data_optics``, as :func:`particle_block` reads it),
    else None. Lines come back unchanged (line endings and undecodable bytes included)."""
    block, labels, state, target, found, row = None, [], "none", False, False, 0
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if s.startswith("data_"):
                block, state, target = s[5:], "none", False
            elif s.startswith("loop_"):
                labels, state, target = [], "header", False
            elif not s or s.startswith("#"):
                pass
            elif s.startswith("_"):
                if state == "header":
                    labels.append(s.split()[0])
                else:
                    state = "none"  # a key-value pair after a loop ends it
            elif state in ("header", "rows"):
                if state == "header":
                    state, target = "rows", not found and block != "optics" and "_rlnImageName" in labels
                    found = found or target
                if target:
                    _check_row(s, len(labels), path, lineno, row)
                    yield line, row
                    row += 1
                    continue
            yield line, None
    if not found:
        raise UserError(f"{path}: no particle block with rlnImageName")


def _check_row(s: str, n_labels: int, path: Path, lineno: int, row: int) -> None:
    try:
        n = len(shlex.split(s)) if ('"' in s or "'" in s) else len(s.split())
    except ValueError:
        raise UserError(f"{path}: line {lineno} (particle row {row + 1}): unbalanced quotes") from None
    if n != n_labels:
        raise UserError(f"{path}: line {lineno} (particle row {row + 1}): {n} values for {n_labels} columns; "
                        "cannot copy rows that span several lines")


def star_rows(path: str | Path) -> int:
    """Number of rows in a STAR file's particle block (checked: one row per line, one value per column)."""
    return sum(r is not None for _, r in _star_lines(Path(path)))


def write_star_rows(src: Path, dst: Path, rows: np.ndarray) -> None:
    """Copy the STAR file ``src`` to ``dst`` (atomically) keeping only the particle rows ``rows`` (0-based,
    sorted, unique); every other line, the kept rows included, is copied byte for byte."""
    keep = np.zeros(int(rows.max()) + 1, dtype=bool)
    keep[rows] = True
    with atomic_path(dst) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as out:
            for line, r in _star_lines(src):
                if r is None or (r < len(keep) and keep[r]):
                    out.write(line)

