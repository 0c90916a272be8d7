"""``cryoem downsample | select``: particle-set verbs between Plato and RELION / cryoSPARC projects."""

from __future__ import annotations

import argparse
from pathlib import Path

DOWNSAMPLE_HELP = """Fourier-crop a RELION .star or cryoSPARC .cs particle set to a smaller box; write .mrcs stacks
and a RELION 3.1 particles.star that `cryoem train` reads with no extra flags.

The field of view and the particle centre are kept: the pixel size becomes exactly
pixel_size_in * box_in / box (200 px at 1 Å/px -> --box 64 at 3.125 Å/px; downsample.json holds it in full,
the STAR to RELION's 6 decimals), whether or not --box divides the input box; an odd input box works too.
--box must be even and at most the input box. Shifts (Å), poses and CTF are copied; rlnPlatoSourceRow
(0-based) and downsample.json record where each particle came from, for `cryoem select`.
Memory: one --chunk of output plus ~64 MB, whatever the number of particles.

For training at scale, --dtype float16 (with or without --box) writes the set as a cache that `cryoem train`
reads with no flag: Fourier-cropped, scaled to a standard deviation of 1 (the factor is in downsample.json),
in contiguous stacks of --chunk particles, half the bytes of float32 to read per particle."""

SELECT_HELP = """Write the particles of a selection as a subset of the ORIGINAL particle file (the one before any
`cryoem downsample`, followed through rlnPlatoSourceRow and downsample.json): a .star keeps every line and
column of the kept rows verbatim, and its optics table; a .cs keeps every field, uid included. Rows stay in
source order. The selection is on the run's particles (RUN/analysis, from `cryoem analyze`); for half-set
runs that is half 1's model applied to every particle, so a subset spans both halves."""


def add_subcommands(sub) -> None:
    """Register ``downsample`` and ``select`` on an argparse sub-parser collection."""
    p = sub.add_parser("downsample", help="Fourier-crop a .star / .cs particle set to a smaller box (RELION STAR "
                                          "out), or write it as a float16 training cache",
                       description=DOWNSAMPLE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=Path, required=True, help="RELION .star or cryoSPARC .cs")
    p.add_argument("--datadir", type=Path, help="folder the stack paths in --particles are relative to")
    p.add_argument("--pixel-size", type=float, help="input pixel size in Å/px, when the metadata lack it")
    p.add_argument("--box", type=int, help="new box in pixels (even, at most the input box; default: the input box)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="of the written stacks; float16 also scales the images to standard deviation 1 "
                        "(default: float32, unscaled)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty, unless --overwrite)")
    p.add_argument("--chunk", type=int, default=10000, help="particles per .mrcs stack (default: 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier downsample in --out (its files only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_downsample)

    s = sub.add_parser("select", help="write selected particles back as a subset of the original .star / .cs",
                       description=SELECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", type=Path, help="run folder of `cryoem train`, analysed by `cryoem analyze`")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--clusters", help="k-means clusters of cryoem analyze, e.g. 0,3")
    how.add_argument("--indices", help=".npy (or cryoDRGN .pkl) of 0-based indices into the run's particles, "
                                       "or a boolean mask")
    how.add_argument("--pc", help="PC:LO:HI, an interval of a principal component of the latents (PCs from 1; "
                                  "an empty bound is open), as in analysis/pca.png")
    how.add_argument("--polygon", help="JSON file [[x, y], ...]: a polygon in the PC1/PC2 plane of analysis/pca.png")
    s.add_argument("--invert", action="store_true", help="take the particles outside the selection")
    s.add_argument("--per-cluster", action="store_true",
                   help="one file per k-means cluster (of the selection, if one is given): OUT_clusterNN.EXT")
    s.add_argument("--particles", help="the run's particle file, when it has moved since training")
    s.add_argument("--datadir", help="the run's stack folder, when it has moved (select reads no images)")
    s.add_argument("--source", help="the original file, when it has moved since `cryoem downsample`")
    s.add_argument("--out", type=Path, required=True, help="subset .star or .cs (the original's format)")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.set_defaults(func=cmd_select)


def cmd_downsample(a: argparse.Namespace) -> int:
    from cryoem.downsample import downsample

    star = downsample(a.particles, a.out, a.box, datadir=a.datadir, pixel_size=a.pixel_size, chunk=a.chunk,
                      overwrite=a.overwrite, progress=not a.quiet, dtype=a.dtype)
    import json

    rec = json.loads((star.parent / "downsample.json").read_text())
    print(f"wrote {rec['n_particles']} particles: {rec['box_in']} px at {rec['pixel_size_in']:.4g} Å/px -> "
          f"{rec['box_out']} px at {rec['pixel_size_out']:.5g} Å/px, in {len(rec['stacks'])} stack(s); {star}")
    return 0


def cmd_select(a: argparse.Namespace) -> int:
    from cryoem.subsets import select

    written = select(a.run, a.out, clusters=a.clusters, indices=a.indices, pc=a.pc, polygon=a.polygon,
                     invert=a.invert, per_cluster=a.per_cluster, particles=a.particles, datadir=a.datadir,
                     source=a.source, overwrite=a.overwrite)
    for path, n in written:
        print(f"wrote {n} particles to {path}")
    return 0
