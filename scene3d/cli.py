"""``scene3d``: the command line for 3D scenes. One subcommand per verb; each has ``--help``."""

from __future__ import annotations

import argparse
import os

from plato_core.runinfo import UserError, cli_main, cmd_info, version_string


def cmd_data(args: argparse.Namespace) -> int:
    """Render a procedural multi-view dataset, or import gqn-datasets tfrecord files."""
    if args.kind == "import-gqn":
        return _import_gqn(args)
    if args.files:
        raise UserError(f"scene3d data {args.kind} takes no input files (got {args.files[0]}); did you mean "
                        "import-gqn?")
    from scene3d.generators import generate

    scenes = 1000 if args.scenes is None else args.scenes
    out = generate(args.kind, args.out, scenes, args.views, args.size or 64, args.seed, n_cubes=args.cubes,
                   shard_size=args.shard_size, meshes=not args.no_meshes, renderer=args.renderer,
                   specular=args.specular, progress=not args.quiet)
    print(f"wrote {scenes} scenes to {out}")
    return 0


def _import_gqn(args: argparse.Namespace) -> int:
    """``scene3d data import-gqn FILES --out DIR``: DeepMind gqn-datasets tfrecords -> a dataset folder."""
    import math
    from pathlib import Path

    from plato_core.runinfo import check_out_dir
    from scene3d.data import load_gqn_tfrecord

    if not args.files:
        raise UserError("scene3d data import-gqn: give the .tfrecord files to import")
    if not 0 < args.fov < 180:
        raise UserError(f"--fov {args.fov}: expected degrees in (0, 180)")
    check_out_dir(Path(args.out))
    ds = load_gqn_tfrecord(args.files, image_size=args.size, fov=math.radians(args.fov), max_scenes=args.scenes)
    out = ds.save(args.out, shard_size=args.shard_size)
    bg = ds.background
    print(f"wrote {len(ds)} scenes of {ds.views} views at {ds.image_size[0]} px to {out}; "
          + (f"background {tuple(round(c * 255) for c in bg)}/255 (tolerance {ds.background_tol * 255:.1f}/255), "
             "from the views' borders: masked PSNR is measured against it" if bg is not None else
             "the views' borders are not one colour, so no background: no masked PSNR"))
    return 0


def _train_config(args: argparse.Namespace):
    from plato_core.settings import run_config

    return run_config(args, lr_schedule=args.lr_schedule, lr_final=args.lr_final,
                      lr_anneal_steps=args.lr_anneal_steps, grad_clip=args.grad_clip or None,
                      ckpt_every=args.ckpt_every)


def cmd_train_gqn(args: argparse.Namespace) -> int:
    """Train a GQN on a multi-view dataset folder."""
    from plato_core.settings import settings_from_args
    from plato_core.trainer import Trainer
    from scene3d.data import MultiViewDataset
    from scene3d.gqn import GQN, GQNConfig, data_scales

    tcfg = _train_config(args)  # checks the budget, sets the threads
    data = MultiViewDataset.load(args.data)
    if data.views < 2:
        raise UserError(f"{args.data}: scenes have {data.views} view(s); GQN needs at least 2")
    if args.image_size is None:
        args.image_size = data.image_size[0]
    gcfg = settings_from_args(GQNConfig, args, **data_scales(data))
    if args.resume:  # the model is the one in the checkpoint, whatever the model flags say
        gcfg = GQN.from_run(args.out)[0].cfg
    if gcfg.image_size != data.image_size[0] or data.image_size[0] != data.image_size[1]:
        raise UserError(f"--image-size {gcfg.image_size}: the data in {args.data} has images of "
                        f"{data.image_size[0]}x{data.image_size[1]} (pass --image-size {data.image_size[0]})")
    model = GQN(gcfg)
    settings = {"data": os.path.abspath(args.data)}  # loads from any folder; the model adds its own
    summary = Trainer(model, data, tcfg, settings=settings).fit()
    print(f"stopped at step {summary['step']} (epoch {summary['epoch']}, {summary['elapsed_s'] / 60:.1f} min, "
          f"{summary['stopped_by']}); checkpoint in {args.out}")
    return 0


def _run_and_data(args: argparse.Namespace):
    """The GQN run's model and settings, and the first ``--scenes`` scenes of ``--data``."""
    from scene3d.data import MultiViewDataset
    from scene3d.gqn import GQN

    model, settings = GQN.from_run(args.run)
    data = MultiViewDataset.load(args.data)
    if args.scenes:
        data = data.subset(range(min(args.scenes, len(data))))
    return model, settings, data


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a scene run on held-out scenes: the command for every kind, dispatched on the run's kind."""
    from plato_core.runinfo import run_kind

    kind = run_kind(args.run)
    if kind == "gqn":
        return _eval_gqn(args)
    if kind not in ("voxel", "mesh", "nerf"):
        raise UserError(f"{args.run}: a run of kind {kind}; scene3d eval scores gqn, voxel, mesh and nerf runs "
                        "(atom-VAE runs: cryoem analyze)")
    from scene3d.ae_eval import evaluate_run, format_results

    res = evaluate_run(args.run, args.data, args.contexts or (1, 3), args.queries, args.scenes or None,
                       args.with_gqn)
    print(format_results(kind, res))
    return 0


def _eval_gqn(args: argparse.Namespace) -> int:
    """GQN against the dataset-mean and nearest-context baselines."""
    from scene3d.data import MultiViewDataset
    from scene3d.gqn_eval import dataset_mean_image, evaluate, format_table

    if args.with_gqn:
        raise UserError("--with-gqn: scores a GQN beside an autoencoder run; this run is a GQN")
    model, settings, data = _run_and_data(args)
    train_data = settings.get("data")
    mean = None
    try:
        mean = dataset_mean_image(MultiViewDataset.load(train_data)) if train_data else None
    except UserError:
        print(f"note: training data {train_data} not found; the mean-image baseline uses --data")
    report = evaluate(model, data, args.contexts or (1, 3, 5), train_mean=mean, seed=args.seed, out=args.run)
    print(format_table(report))
    print(f"wrote {args.run}/metrics.json and {args.run}/samples.png")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear probes from the frozen representation r (and raw pixels) to ground-truth factors."""
    from scene3d.gqn_eval import format_probe, probe

    model, _, data = _run_and_data(args)
    report = probe(model, data, args.contexts, args.seed, out=args.run)
    print(format_probe(report))
    print(f"({report['train_scenes']} train / {report['test_scenes']} held-out scenes; "
          f"r from {report['contexts']} views, {report['feature_dims']['r']} dims; "
          f"pixels of view 0, {report['feature_dims']['pixels']} dims) -> {args.run}/probe.json")
    return 0


def _add_data(sub) -> None:
    s = sub.add_parser("data", help="render a procedural multi-view dataset, or import gqn-datasets tfrecords",
                       description="Render Shepard-Metzler objects or rooms into sharded uint8 files, or import "
                                   "DeepMind gqn-datasets .tfrecord files (scene3d data import-gqn FILES --out DIR; "
                                   "their background colour, for the masked PSNR, is taken from the views' borders).")
    s.add_argument("kind", choices=["shepard-metzler", "rooms", "import-gqn"])
    s.add_argument("files", nargs="*", help="import-gqn: the .tfrecord files")
    s.add_argument("--scenes", type=int, default=None, help="scenes to render (default 1000), or at most to import "
                                                            "(default: all)")
    s.add_argument("--views", type=int, default=None, help="views per scene (default 15 / 10)")
    s.add_argument("--size", type=int, default=None, help="image side in pixels: 64 (default), 32 or 16; import-gqn: "
                                                          "resize the frames to it (default: keep)")
    s.add_argument("--fov", type=float, default=45.0, help="import-gqn: the cameras' horizontal field of view, "
                                                          "degrees (default: 45, gqn-datasets')")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--cubes", type=int, default=7, help="Shepard-Metzler cubes: 5 or 7")
    s.add_argument("--renderer", choices=["open3d", "pytorch3d"], default="open3d",
                   help="open3d offscreen (default) or PyTorch3D's rasteriser (faster on a busy CPU)")
    s.add_argument("--specular", type=float, default=0.0,
                   help="pytorch3d: Phong shading (smooth normals) with a white highlight of this strength, "
                        "e.g. 0.3 (default 0: flat shading)")
    s.add_argument("--shard-size", type=int, default=500)
    s.add_argument("--no-meshes", action="store_true", help="skip the per-scene ground-truth .ply meshes")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_data)


def _add_train(sub):
    """The ``train`` verb with its ``gqn`` model; returns the model subparsers (the autoencoders join them)."""
    from plato_core.settings import add_run_args, add_settings
    from scene3d.gqn import GQNConfig

    s = sub.add_parser("train", help="train a model on multi-view scenes").add_subparsers(
        dest="model", required=True, metavar="MODEL")
    g = s.add_parser("gqn", help="train a Generative Query Network",
                     description="Train GQN (representation network + ConvDRAW) with the shared trainer.")
    g.add_argument("--data", required=True, help="multi-view dataset folder (scene3d data ...)")
    g.add_argument("--out", required=True, help="run folder")
    add_run_args(g, batch_size=16, lr=1e-3, lr_help="initial learning rate [5e-4]")
    opt = g.add_argument_group("optimisation (CPU defaults; the paper's values in brackets)")
    opt.add_argument("--lr-final", type=float, default=1e-4, help="final learning rate [5e-5]")
    opt.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="linear",
                     help="linear = the paper's annealing form")
    opt.add_argument("--lr-anneal-steps", type=int, default=None,
                     help="steps of the lr annealing [1.6e6] (default: the whole budget, however many steps that is)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    opt.add_argument("--ckpt-every", type=int, default=200, help="checkpoint interval in steps")
    model = g.add_argument_group("model (GQNConfig; CPU defaults, the paper's values in brackets)")
    add_settings(model, GQNConfig, skip=("image_size",))
    model.add_argument("--image-size", type=int, help="image side in pixels [64] (default: the data's)")
    g.add_argument("--unshared-cores", dest="share_cores", action="store_false", help=argparse.SUPPRESS)  # old name
    g.set_defaults(func=cmd_train_gqn)
    return s


def _add_eval(sub) -> None:
    s = sub.add_parser("eval", help="score a run on held-out scenes (metrics.json)",
                       description="GQN runs: MSE, PSNR, masked PSNR, SSIM and ELBO per number of contexts, beside "
                                   "the dataset-mean and nearest-context baselines (and samples.png). Voxel, mesh "
                                   "and NeRF runs: PSNR, masked PSNR, SSIM on the query views, voxel IoU and "
                                   "Chamfer distance, beside a 3-view visual hull.")
    s.add_argument("run", help="run folder (holds checkpoint.pt)")
    s.add_argument("--data", required=True, help="held-out multi-view dataset folder")
    s.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="numbers of context views (default: 1 3 5 for GQN, 1 3 for the autoencoders)")
    s.add_argument("--queries", type=int, default=5, help="autoencoders: query views per scene")
    s.add_argument("--scenes", type=int, default=0, help="use only the first N scenes (0 = all)")
    s.add_argument("--seed", type=int, default=0, help="GQN: which views are contexts and queries")
    s.add_argument("--with-gqn", default=None, metavar="GQN_RUN",
                   help="autoencoders: also score this GQN run on the same views, in the same table")
    s.set_defaults(func=cmd_eval)


def _add_probe(sub) -> None:
    s = sub.add_parser("probe", help="linear probes from r to ground-truth factors",
                       description="Fit linear probes (80/20 split) from the frozen representation r, and from "
                                   "one view's raw pixels, to the scenes' factors.")
    s.add_argument("run")
    s.add_argument("--data", required=True)
    s.add_argument("--contexts", type=int, default=5, help="views summed into r")
    s.add_argument("--scenes", type=int, default=0, help="use only the first N scenes (0 = all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_probe)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scene3d", description="Learn 3D scenes from 2D images.")
    p.add_argument("--version", action="version", version=version_string("scene3d"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="versions and environment check")
    s.set_defaults(func=cmd_info)
    _add_data(sub)
    models = _add_train(sub)
    _add_eval(sub)
    _add_probe(sub)
    from scene3d.cli_ae import add_subcommands  # train voxel|mesh|nerf, fit, export, view, render, calibrate

    add_subcommands(sub, models)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
