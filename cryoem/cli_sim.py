"""``cryoem simulate`` and ``cryoem fsc``: the simulator and map-comparison verbs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from plato_core.runinfo import UserError, atomic_path, check_out_dir, remove_outputs, write_config

SIM_OUTPUTS = ("config.json", "particles.mrcs", "particles.star", "ground_truth.npz", "gt_models.pdb", "preview.png")

GT_HELP = """ground_truth.npz holds, per particle in stack order: model_index (ensemble), morph_t (morph,
in [0, 1]) or hinge_t (N, hinges) in [0, 1]; model_labels, the label of each model of gt_models.pdb;
R (N, 3, 3), RELION's A (map -> projection frame); shift_A (N, 2), Plato's shift (the
particle centre sits at pixel box//2 + shift_A / apix; the STAR file's rlnOriginXYAngst = -shift_A);
ctf (N, 9) in the order of ctf_fields (radians); noise_sigma (N,); particle_bfactor (N,), the extra
B-factor of --particle-bfactor in Å²; plus pixel_size and snr."""


def add_subcommands(sub) -> None:
    s = sub.add_parser("simulate", help="simulate a particle stack with ground truth from atomic models",
                       description="Simulate particles from an ensemble (or a morph between two states).\n\n" + GT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--structure", type=Path, help="ensemble .pdb/.cif (every model is a conformation)")
    s.add_argument("--weights", type=Path, help="text file with one non-negative weight per model")
    s.add_argument("--morph", type=Path, nargs=2, metavar=("A", "B"), help="two states to interpolate between")
    s.add_argument("--morph-dist", choices=["uniform", "bimodal"], default="uniform",
                   help="distribution of the morph coordinate t (default: uniform)")
    s.add_argument("--hinge", action="append", metavar="CHAIN:FIRST-LAST:DEGREES",
                   help="with --structure: residues FIRST-LAST of CHAIN swing as a rigid domain by up to DEGREES "
                        "about the residue that joins them to the chain, along the axis whose path clashes "
                        "least with the rest (repeat for independent motions: one coordinate each)")
    s.add_argument("--potential", choices=["single", "peng5"], default="single",
                   help="atoms as one moment-matched Gaussian, or Peng's 5 Gaussians (default: single)")
    s.add_argument("--particle-bfactor", type=float, nargs=2, default=(0.0, 0.0), metavar=("MIN", "MAX"),
                   help="extra B-factor per particle, uniform in [MIN, MAX] Å^2 (default: 0 0)")
    s.add_argument("--shift-dist", choices=["gaussian", "uniform"], default="gaussian",
                   help="in-plane shifts: Gaussian clipped at 3 std, or uniform with the same std (default: gaussian)")
    s.add_argument("--atoms", "--select", dest="select", choices=["all", "heavy", "backbone", "ca"], default="heavy",
                   help="atoms to image (default: heavy; C-alpha-only files use residue pseudo-atoms)")
    s.add_argument("--n", type=int, default=1000, help="number of particles (default: 1000)")
    s.add_argument("--box", type=int, default=64, help="box size in pixels (default: 64)")
    s.add_argument("--pixel-size", "--apix", dest="apix", type=float, default=2.0,
                   help="pixel size in Å (default: 2.0)")
    s.add_argument("--snr", type=float, default=0.1, help="signal variance / noise variance (default: 0.1)")
    s.add_argument("--defocus", type=float, nargs=2, default=(1.0, 2.5), metavar=("MIN", "MAX"),
                   help="defocus range in µm (default: 1.0 2.5)")
    s.add_argument("--bfactor", type=float, default=30.0, help="B-factor blur of the atoms in Å^2 (default: 30)")
    s.add_argument("--shift-std", type=float, default=1.0, help="in-plane shift std in pixels (default: 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--batch-size", "--batch", dest="batch", type=int, default=256,
                   help="particles per batch (default: 256)")
    s.add_argument("--preview", action="store_true", help="also write preview.png: clean, SNR 1 and SNR 0.1")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--out", type=Path, required=True, help="output folder (new or empty, unless --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace the simulation in a non-empty --out")
    s.set_defaults(func=cmd_simulate)

    f = sub.add_parser("fsc", help="FSC, resolution at 0.5/0.143, AU-FSC and correlation of two maps")
    f.add_argument("map_a", type=Path)
    f.add_argument("map_b", type=Path)
    f.add_argument("--pixel-size", "--apix", dest="apix", type=float,
                   help="pixel size in Å (default: from the first map's header)")
    f.add_argument("--plot", type=Path, help="write the FSC curve to this PNG")
    f.set_defaults(func=cmd_fsc)

    c = sub.add_parser("check", help="read and validate a particle set (.star, .cs, or .mrcs with cryoDRGN .pkl)")
    c.add_argument("particles", type=Path)
    c.add_argument("--poses", type=Path, help="cryoDRGN pose .pkl (with an .mrcs stack)")
    c.add_argument("--ctf", type=Path, help="cryoDRGN CTF .pkl (with an .mrcs stack)")
    c.add_argument("--pixel-size", "--apix", dest="apix", type=float, help="pixel size in Å, when the metadata lack it")
    c.add_argument("--datadir", type=Path, help="folder that the stack names in a .star or .cs file are relative to "
                                                "(default: the metadata file's folder, then each folder above it)")
    c.add_argument("--passthrough", type=Path, help="cryoSPARC passthrough .cs (default: found beside the .cs file)")
    c.add_argument("--full", action="store_true", help="read every pixel of every stack, with a progress bar (default: "
                                                       "the metadata in full and the pixels of 1,024 images, as "
                                                       "`cryoem train` does before it reads every image as it trains)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_check)


def _conformations(args):
    from cryoem.simulate import ensemble_conformations, hinge_conformations, morph_conformations
    from cryoem.structure import read_structure

    if (args.structure is None) == (args.morph is None):
        raise UserError("give exactly one of --structure or --morph A B")
    potential = getattr(args, "potential", "single")
    if args.morph is not None:
        if args.weights is not None or getattr(args, "hinge", None):
            raise UserError("--weights and --hinge apply to --structure, not to --morph")
        a, b = (read_structure(p, models="first").select(args.select) for p in args.morph)
        return morph_conformations(a, b, args.morph_dist, args.bfactor, potential)
    s = read_structure(args.structure).select(args.select)
    if s.n_atoms == 0:
        raise UserError(f"{args.structure}: no atoms left after --atoms {args.select}")
    if getattr(args, "hinge", None):
        if args.weights is not None:
            raise UserError("--weights applies to ensembles, not to --hinge")
        return hinge_conformations(s.subset(models=0), args.hinge, args.morph_dist, args.bfactor, potential)
    weights = None
    if args.weights is not None:
        try:
            weights = np.loadtxt(args.weights, dtype=np.float64, ndmin=1)
        except (OSError, ValueError) as e:
            raise UserError(f"{args.weights}: cannot read weights ({' '.join(str(e).split())[:200]})") from e
    return ensemble_conformations(s, weights, args.bfactor, potential)


def cmd_simulate(args: argparse.Namespace) -> int:
    from cryoem.formats.star import write_particles
    from cryoem.simulate import ground_truth_arrays, simulate
    from cryoem.structure import write_pdb

    if not args.snr > 0:
        raise UserError(f"--snr: expected a positive number, got {args.snr}")
    out = check_out_dir(args.out, overwrite=args.overwrite)
    conf = _conformations(args)
    warn_hinge_clashes(conf, args.hinge or [])
    res = simulate(conf, args.n, args.box, args.apix, args.snr, tuple(args.defocus), args.shift_std, args.seed,
                   args.batch, progress=not args.quiet, shift_dist=args.shift_dist,
                   bfactor_range=tuple(args.particle_bfactor))
    if args.overwrite:  # every check has passed: replace the previous set's files, and nothing else
        remove_outputs(out, SIM_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, vars(args))
    write_particles(out, res.images, args.apix, res.R, res.shift_A, res.ctf)
    with atomic_path(out / "ground_truth.npz") as tmp:
        np.savez(tmp, **ground_truth_arrays(res, conf, args.apix, args.snr))
    write_pdb(out / "gt_models.pdb", conf.models_for_output())
    if args.preview:
        write_preview(out / "preview.png", conf, args)
    print(f"wrote {args.n} particles ({args.box} px, {args.apix} Å/px, SNR {args.snr}) to {out}")
    return 0


def warn_hinge_clashes(conf, specs: list[str]) -> None:
    """One line on stderr per hinge whose domain, fully turned, overlaps the rest of the protein."""
    for spec, h in zip(specs, conf.hinges or []):
        if h.clash > 10.0:
            print(f"warning: --hinge {spec}: fully turned, the domain overlaps the rest of the protein by "
                  f"{h.clash:.0f} Å² (summed squared overlap of atom pairs under 3 Å, 4 Å in C-alpha-only models); "
                  "no real motion does this, and the atom VAE's clash prior will resist it: choose a smaller angle "
                  "or another domain",
                  file=sys.stderr)


def write_preview(path: Path, conf, args, n: int = 8) -> None:
    """Montage: the same n particles clean, at SNR 1 and at SNR 0.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryoem.simulate import simulate

    rows = [("clean", simulate(conf, n, args.box, args.apix, None, tuple(args.defocus), args.shift_std, args.seed,
                               progress=False).images)]
    for snr in (1.0, 0.1):
        rows.append((f"SNR {snr:g}", simulate(conf, n, args.box, args.apix, snr, tuple(args.defocus), args.shift_std,
                                              args.seed, progress=False).images))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n, 1.6 * len(rows)))
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label)
    fig.suptitle(f"simulated particles ({args.box} px, {args.apix} Å/px, defocus {args.defocus[0]}-"
                 f"{args.defocus[1]} µm)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def cmd_check(args: argparse.Namespace) -> int:
    from cryoem.particles import PIXEL_SAMPLE, load_particles

    ps = load_particles(args.particles, pixel_size=args.apix, poses=args.poses, ctf=args.ctf, datadir=args.datadir,
                        passthrough=args.passthrough, pixels="all" if args.full else "sample",
                        progress=not args.quiet)
    m = ps.meta
    print(f"{args.particles}: {len(ps)} particles in {len(m.files)} stack(s), {m.box} px, {m.pixel_size:.4f} Å/px, "
          f"poses: {'yes' if m.R is not None else 'no'}, CTF: {'yes' if m.ctf is not None else 'no'}")
    print(f"read from: {m.provenance_line()}")
    print("pixels: every image is finite" if args.full else
          f"pixels: {min(len(ps), PIXEL_SAMPLE)} sampled images are finite (--full reads them all)")
    return 0


def cmd_fsc(args: argparse.Namespace) -> int:
    from cryoem.formats.mrc import read_mrc
    from cryoem.metrics import fsc_report

    a, apix_a, _ = read_mrc(args.map_a)
    b, _, _ = read_mrc(args.map_b)
    for path, m in ((args.map_a, a), (args.map_b, b)):
        bad = ~np.isfinite(m)
        if bad.any():  # one NaN voxel makes every Fourier coefficient NaN, and the FSC meaningless
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise UserError(f"{path}: {int(bad.sum())} voxels are NaN or infinite (first at z, y, x = {first}); "
                            "an FSC needs finite maps")
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise UserError(f"{args.map_b}: shape {b.shape} differs from {args.map_a} {a.shape} (need equal cubic maps)")
    apix = args.apix or apix_a
    if not apix or apix <= 0:
        raise UserError(f"{args.map_a}: no voxel size in the header; pass --pixel-size")
    r = fsc_report(a, b, apix)
    print(f"resolution (FSC=0.5)   {r['res_0.5']:.2f} Å")
    print(f"resolution (FSC=0.143) {r['res_0.143']:.2f} Å")
    print(f"AU-FSC                 {r['au_fsc']:.4f}")
    print(f"map correlation        {r['map_corr']:.4f}")
    if args.plot:
        _plot_fsc(args.plot, r, args)
    return 0


def _plot_fsc(path: Path, r: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(r["freq"], r["fsc"], label="FSC")
    for thr in (0.5, 0.143):
        ax.axhline(thr, ls="--", lw=0.8, color="gray")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(f"{args.map_a.name} vs {args.map_b.name}: {r['res_0.143']:.1f} Å at 0.143")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
