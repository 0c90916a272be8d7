"""``cryoem train | analyze | decode | view | explore``: the atom-VAE verbs of the cryoem command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_subcommands(sub) -> None:
    """Register the atom-VAE subcommands on an argparse sub-parser collection."""
    _add_train(sub)
    _add_analysis(sub)
    _add_explore(sub)


def _add_train(sub) -> None:
    from cryoem.vae import AtomVAEConfig
    from plato_core.settings import add_run_args, add_settings

    p = sub.add_parser("train", help="train the atom VAE on particles + a starting model",
                       description="Learn a latent per particle and a decoder from latent to atom coordinates.")
    p.add_argument("--particles", required=True,
                   help="particles: RELION .star, cryoSPARC .cs, or .mrcs with --poses and --ctf")
    p.add_argument("--poses", help="cryoDRGN pose .pkl (with an .mrcs stack)")
    p.add_argument("--ctf", help="cryoDRGN CTF .pkl (with an .mrcs stack)")
    p.add_argument("--structure", required=True, help="starting model .pdb / .cif")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--atoms", choices=["auto", "heavy", "backbone", "ca"], default="auto",
                   help="atoms the decoder moves (default auto: heavy, i.e. every non-hydrogen atom, or ca for a "
                        "C-alpha-only model; a backbone model of a full protein leaves half its density "
                        "unmodelled, and the latent spent dimensions on that)")
    p.add_argument("--center", choices=["centroid", "map", "none"], default="centroid",
                   help="centroid: the model's centroid sits at the box centre; map: the model was fitted in a "
                        "map of this box with origin 0; none: coordinates are already relative to the box centre "
                        "(e.g. the gt_models.pdb of `cryoem simulate`)")
    p.add_argument("--chains", help="comma-separated chain ids of the starting model to model (default: all)")
    p.add_argument("--pixel-size", type=float, help="Å/px, when the metadata lacks it")
    p.add_argument("--datadir", help="folder that the stack names in a .star or .cs file are relative to "
                                     "(default: the metadata file's folder, then each folder above it)")
    p.add_argument("--passthrough", help="cryoSPARC passthrough .cs with fields the particle file lacks "
                                         "(default: found beside it under cryoSPARC's naming)")
    add_run_args(p, batch_size=64, lr=1e-3)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="half a cosine from --lr to --lr-final over the whole budget (--minutes, --steps or --epochs: "
                        "whichever ends first), or constant (default: cosine; a --resume with a larger budget "
                        "raises the lr again)")
    p.add_argument("--lr-final", type=float, default=5e-5, help="the cosine's last learning rate (default: 5e-05)")
    add_settings(p.add_argument_group("model (AtomVAEConfig)"), AtomVAEConfig)
    p.add_argument("--half-sets", action="store_true", help="train two models on independent halves")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="read the images from their stacks during training (memory: a few batches, "
                        "whatever the number of particles) instead of loading them (default: when they would fill "
                        "more than a quarter of the available memory)")
    p.add_argument("--workers", type=int, help="processes that read batches ahead of the training step (default: 1 "
                                               "when the images are read from the stacks, else 0)")
    p.set_defaults(func=cmd_train)


def _add_analysis(sub) -> None:
    p = sub.add_parser("analyze", help="latents, PCA/t-SNE, k-means models and maps, traversals, RMSF, index.html")
    p.add_argument("run")
    p.add_argument("--k", type=int, default=10, help="k-means clusters")
    p.add_argument("--color", help="colour the scatter plots by FILE.npz:KEY (one value per particle)")
    p.add_argument("--no-snapshots", action="store_true", help="skip the open3d pictures")
    p.add_argument("--particles", help="the run's particles, when they have moved since training")
    p.add_argument("--datadir", help="folder of the stacks, when they have moved since training")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="encode every particle again: a Gauss-Newton step from its stored mean, then its posterior "
                        "mean by importance sampling (about 35 ms per particle of a 6,000-atom model on one core; "
                        "default: up to 20,000 particles; above, the means stored by training are kept and only "
                        "particles it never reached, or not lately, are encoded)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("decode", help="decode latents to atomic models")
    p.add_argument("run")
    p.add_argument("--z", required=True, help=".npy of shape (M, zdim)")
    p.add_argument("--out", required=True, help="multi-model .pdb or .cif")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("view", help="look at a (multi-model) .pdb / .cif with open3d")
    p.add_argument("structure")
    p.add_argument("--color", choices=["rmsf", "displacement", "chain"], default="chain")
    p.add_argument("--out", help="snapshot .png (a strip for several models) or .gif; omit for a window")
    p.add_argument("--size", type=int, default=320)
    p.set_defaults(func=cmd_view)


def _add_explore(sub) -> None:
    p = sub.add_parser("explore", help="the latent space in the browser: pick particles, see their models, save "
                                       "selections as subsets of the original .star / .cs",
                       description="A local web app over an analysed run (cryoem analyze RUN first). It binds "
                                   "127.0.0.1; on a remote machine forward the port: "
                                   "ssh -L 8050:127.0.0.1:8050 user@host")
    p.add_argument("run")
    p.add_argument("--port", type=int, default=8050, help="TCP port (0: any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network, with no password)")
    p.add_argument("--color", action="append", default=[], metavar="FILE.npz:KEY",
                   help="an extra per-particle column to colour by (repeatable), e.g. sim/ground_truth.npz:morph_t")
    p.add_argument("--particles", help="the run's particles, when they have moved since training")
    p.add_argument("--datadir", help="folder of the stacks, when they have moved since training")
    p.add_argument("--source", help="the original file a downsampled run came from, when it has moved")
    p.set_defaults(func=cmd_explore)


def cmd_explore(a: argparse.Namespace) -> int:
    from cryoem.explore import serve
    from plato_core.runinfo import UserError

    if not 0 <= a.port <= 65535:
        raise UserError(f"--port {a.port}: expected 0..65535")
    serve(a.run, a.host, a.port, particles=a.particles, datadir=a.datadir, source=a.source, colors=tuple(a.color))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from cryoem.train import DataSpec, train
    from cryoem.vae import AtomVAEConfig
    from plato_core.runinfo import UserError
    from plato_core.settings import run_config, settings_from_args

    spec = DataSpec(a.particles, a.structure, a.atoms, a.poses, a.ctf, a.pixel_size, a.datadir, a.center, a.chains,
                    a.lazy, a.passthrough)
    cfg = settings_from_args(AtomVAEConfig, a)
    if not 0 < a.lr_final <= a.lr:
        raise UserError(f"--lr-final: expected a learning rate above 0 and at most --lr ({a.lr:g}), got {a.lr_final:g}")
    # the pose warm-up leaves the model unused
    tcfg = run_config(a, ckpt_every=200, find_unused_parameters=cfg.infer_poses, lr_schedule=a.lr_schedule,
                      lr_final=a.lr_final, lr_anneal_steps=None)
    if a.workers is not None and a.workers < 0:
        raise UserError(f"--workers: expected 0 or more, got {a.workers}")
    for name, s in train(spec, cfg, tcfg, halves=a.half_sets, workers=a.workers).items():
        print(f"{name}: {s['step']} steps, {s['epoch']} epochs, {s['elapsed_s'] / 60:.1f} min, "
              f"stopped by {s['stopped_by']}")
    print(f"run folder: {a.out}")
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from cryoem.analyze import run_analysis

    index = run_analysis(a.run, k=a.k, color=a.color, snapshots=not a.no_snapshots, particles=a.particles,
                         datadir=a.datadir, refine=a.refine)
    print(f"open {index}")
    return 0


def cmd_decode(a: argparse.Namespace) -> int:
    from cryoem.analyze import decode
    from cryoem.structure import write_cif, write_pdb
    from cryoem.train import load_model
    from plato_core.runinfo import UserError

    z = read_latents(a.z)
    model, rec, s = load_model(a.run)
    if z.shape[1] != model.cfg.zdim:
        raise UserError(f"--z {a.z}: latents of {z.shape[1]} dimensions, the run's zdim is {model.cfg.zdim}")
    models = decode(model, z, rec["offset"])
    writer = write_cif if a.out.lower().endswith((".cif", ".mmcif")) else write_pdb
    writer(a.out, s.with_coords(models))
    print(f"wrote {len(models)} models to {a.out}")
    return 0


def read_latents(path: str) -> np.ndarray:
    """``--z`` file: an .npy of (M, zdim) or (zdim,) finite numbers -> (M, zdim) float32; else one UserError line."""
    from plato_core.runinfo import UserError

    if not Path(path).is_file():
        raise UserError(f"--z {path}: file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"--z {path}: not a numpy .npy array ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(z, np.ndarray):
        z.close()
        raise UserError(f"--z {path}: an .npz archive; expected one .npy array of shape (M, zdim)")
    if z.dtype.kind not in "biuf":
        raise UserError(f"--z {path}: holds {z.dtype} values; expected numbers")
    z = z[None] if z.ndim == 1 else z
    if z.ndim != 2 or z.shape[0] == 0:
        raise UserError(f"--z {path}: expected an array of shape (M, zdim) with M >= 1, got {z.shape}")
    bad = np.flatnonzero(~np.isfinite(z).all(1))
    if len(bad):
        raise UserError(f"--z {path}: {len(bad)} of {len(z)} latents hold NaN or infinite values "
                        f"(first: row {bad[0]})")
    return z.astype(np.float32)


def cmd_view(a: argparse.Namespace) -> int:
    from cryoem.structure import read_structure, rmsf
    from cryoem.view import atoms_mesh, chain_colors, render_models, save_frames, value_colors

    s = read_structure(a.structure)
    if a.color == "rmsf":
        colors = value_colors(rmsf(s.coords))
    elif a.color == "displacement":
        colors = np.stack([value_colors(np.linalg.norm(m - s.coords[0], axis=-1), 0,
                                        np.linalg.norm(s.coords - s.coords[0], axis=-1).max()) for m in s.coords])
    else:
        colors = chain_colors(s.chain)
    if a.out is None:
        from scene3d.viz import show

        show([atoms_mesh(s.coords[0], np.broadcast_to(colors, s.coords.shape)[0])])
        return 0
    frames = render_models(s.coords, colors, size=a.size)
    save_frames(frames, a.out, [f"model {i + 1}" for i in range(len(frames))] if len(frames) > 1 else None)
    print(f"wrote {a.out}")
    return 0
