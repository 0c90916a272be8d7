"""``scene3d`` subcommands of the voxel, mesh and NeRF autoencoders.

``add_subcommands(sub)`` adds, to the ``scene3d`` subparsers ``sub``:

* ``train voxel|mesh|nerf --data DIR --out RUN [--contexts K ...] [--minutes M]``: amortised training;
* ``fit nerf|voxel|mesh --data transforms_train.json --out RUN [--minutes M] [--eval-at 5 10 20]``:
  one scene from many views, scored on ``transforms_test.json`` (PSNR, SSIM, iterations/s);
* ``export RUN --scene I --out mesh.ply [--points]``: marching cubes / the mesh, to .ply / .obj;
* ``view RUN|FILE [--out snap.png]``: open3d window, or a headless snapshot;
* ``render RUN --scene I --turntable --out spin.gif``: novel views around the object;
* ``calibrate RUN [--data DIR]``: choose the occupancy threshold from training images
  (``ae_eval.calibrate``; ``train voxel|nerf`` runs it at the end).

The logic lives in :mod:`scene3d.ae_eval`; this module only parses and prints. ``scene3d eval`` (in
:mod:`scene3d.cli`) scores every kind of scene run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from plato_core.runinfo import UserError, atomic_path, atomic_write, remove_outputs
from plato_core.settings import add_run_args, add_settings, run_config, settings_from_args

MODELS = ("voxel", "mesh", "nerf")


def add_subcommands(sub, models) -> None:
    """Register this module's commands on the ``scene3d`` subparsers ``sub``, and the autoencoders on the
    ``train`` verb's model subparsers ``models``."""
    for kind in MODELS:
        p = models.add_parser(kind, help=f"amortised {kind} autoencoder: k context views -> 3D -> query views")
        _train_args(p, kind)
        p.set_defaults(func=cmd_train, kind=kind)
    s = sub.add_parser("fit", help="fit one scene's voxels / mesh / NeRF from many views")
    s.add_argument("kind", choices=MODELS)
    s.add_argument("--data", required=True, help="transforms_train.json or its folder (NeRF-Blender / nerfstudio)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--eval-at", type=float, nargs="+", default=None, metavar="MIN",
                   help="score the test views after each of these many minutes (e.g. 5 10 20)")
    add_run_args(s, batch_size=4, lr=None, lr_help="learning rate (default: nerf 1e-3 grid / 5e-4 mlp, voxel 5e-2, "
                                                    "mesh 1e-3)")
    s.add_argument("--field", choices=["grid", "mlp"], default="grid",
                   help="NeRF: explicit feature grid (default; renderers.gridfield) or the classic MLP")
    s.add_argument("--rays", type=int, default=None, help="NeRF: random rays per step (default: grid 4096, mlp 1024)")
    s.add_argument("--samples", type=int, default=None,
                   help="NeRF: stratified samples per ray, evaluated only in occupied space (default: grid 192, "
                        "mlp 128)")
    s.add_argument("--no-skip", dest="skip", action="store_false",
                   help="NeRF: no occupancy grid (32 coarse + 32 importance samples per ray, all evaluated)")
    s.add_argument("--tv-weight", type=float, default=1e-4, help="NeRF grid: total-variation weight")
    s.add_argument("--box", type=float, nargs=2, default=(-4.0, 4.0), metavar=("LO", "HI"),
                   help="world box [LO, HI]^3 holding the scene")
    s.add_argument("--background", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="background colour in [0, 1] (default: estimated from the training images' borders; "
                        "RGBA images are composited on white first)")
    s.set_defaults(func=cmd_fit)
    s = sub.add_parser("export", help="a run's 3D scene as a mesh or point cloud file")
    s.add_argument("run")
    s.add_argument("--scene", type=int, default=0)
    s.add_argument("--data", default=None, help="dataset of the context views (default: the run's training data)")
    s.add_argument("--contexts", type=int, default=1)
    s.add_argument("--level", type=float, default=None, help="density threshold, 1 / world units")
    s.add_argument("--points", action="store_true", help="write the mesh's vertices as a .ply point cloud")
    s.add_argument("--out", required=True, help=".ply or .obj")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("view", help="look at a run's scene or a .ply / .obj file (window, or --out PNG)")
    s.add_argument("target", help="run folder or mesh / point-cloud file")
    s.add_argument("--scene", type=int, default=0)
    s.add_argument("--data", default=None)
    s.add_argument("--contexts", type=int, default=1)
    s.add_argument("--out", default=None, help="headless snapshot PNG instead of a window")
    s.add_argument("--size", type=int, default=512)
    s.set_defaults(func=cmd_view)
    s = sub.add_parser("render", help="novel views of a run's scene (turntable GIF)")
    s.add_argument("run")
    s.add_argument("--scene", type=int, default=0)
    s.add_argument("--data", default=None)
    s.add_argument("--contexts", type=int, default=1)
    s.add_argument("--turntable", action="store_true", required=True)
    s.add_argument("--frames", type=int, default=36)
    s.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    s.add_argument("--out", required=True, help=".gif")
    s.set_defaults(func=cmd_render)
    s = sub.add_parser("calibrate", help="choose a run's occupancy threshold from its training images",
                       description="Pick the density level whose occupancy best matches the visual hulls carved "
                                   "from all views of training scenes; writes RUN/calibration.json.")
    s.add_argument("run")
    s.add_argument("--data", default=None, help="training-style dataset (default: the run's training data)")
    s.add_argument("--scenes", type=int, default=100)
    s.set_defaults(func=cmd_calibrate)


def _train_args(p, kind: str) -> None:
    p.add_argument("--data", required=True, help="dataset folder (scene3d data)")
    p.add_argument("--out", required=True, help="run folder")
    from scene3d.autoencoders import AEConfig

    add_run_args(p, batch_size={"voxel": 16, "mesh": 8, "nerf": 8}[kind], lr=5e-4)
    add_settings(p.add_argument_group("model (AEConfig)"), AEConfig)


# ----------------------------------------------------------------------- train
def cmd_train(a) -> int:
    from plato_core.trainer import Trainer
    from scene3d.ae_eval import data_box
    from scene3d.autoencoders import AEConfig, SceneAE
    from scene3d.data import MultiViewDataset

    tc = run_config(a, ckpt_every=200)  # checks the budget; seeds torch before the model is built
    data = MultiViewDataset.load(a.data)
    lo, hi = data_box(data)
    cfg = settings_from_args(AEConfig, a, kind=a.kind, lo=lo, hi=hi, background=tuple(data.background or (0.0,) * 3))
    if max(cfg.contexts) + cfg.queries > data.views:
        raise UserError(f"--contexts/--queries: {max(cfg.contexts)} + {cfg.queries} views exceed the "
                        f"data's {data.views}")
    settings = {"data": str(Path(a.data).resolve())}  # the model records its own settings
    trainer = Trainer(SceneAE(cfg), data, tc, settings=settings)
    if a.overwrite and trainer.is_main:  # the checks passed: drop the previous run's records besides the trainer's
        remove_outputs(a.out, ("calibration.json", "metrics.json", "samples.png"))
    summary = trainer.fit()
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    if (a.kind != "mesh" and data.background is not None and trainer.is_main
            and not summary["stopped_by"].startswith("signal")):
        _calibrate(a.out, data)
    return 0


def _calibrate(run, data, scenes: int = 100) -> None:
    """``ae_eval.calibrate``, with its report printed."""
    from scene3d.ae_eval import calibrate

    report = calibrate(run, data, scenes)
    ious = ", ".join(f"{s}: {v:.3f}" for s, v in report["iou_vs_hull"].items())
    print(f"occupancy level x{report['level_scale']:g} of half-opaque (IoU vs {report['hull_views']}-view hulls "
          f"of {report['scenes']} scenes: {ious}) -> {run}/calibration.json")


def cmd_calibrate(a) -> int:
    from scene3d.autoencoders import SceneAE
    from scene3d.data import MultiViewDataset

    _, settings = SceneAE.from_run(a.run)
    _calibrate(a.run, MultiViewDataset.load(a.data or settings["data"]), a.scenes)
    return 0


# ------------------------------------------------------------------------- fit
def _nerf_root(path: str) -> Path:
    p = Path(path)
    return p.parent if p.is_file() else p


def _check_fit_flags(a) -> None:
    """One-line errors for ``fit``'s own flags, before anything is read or written."""
    if a.eval_at and (sorted(a.eval_at) != a.eval_at or min(a.eval_at) <= 0):
        raise UserError(f"--eval-at {' '.join(f'{m:g}' for m in a.eval_at)}: expected increasing positive minutes")
    if a.eval_at and a.minutes is not None:
        raise UserError("--eval-at and --minutes: give one (the last --eval-at is the budget)")
    if not a.eval_at and a.minutes is None and a.train_steps is None and a.epochs is None:
        raise UserError("give a budget: --minutes, --steps, --epochs or --eval-at")
    if not a.box[0] < a.box[1]:
        raise UserError(f"--box {a.box[0]:g} {a.box[1]:g}: expected LO < HI")
    for flag, v in (("--rays", a.rays), ("--samples", a.samples)):
        if v is not None and v < 1:
            raise UserError(f"{flag}: expected a positive number, got {v}")
    if a.tv_weight < 0:
        raise UserError(f"--tv-weight: expected a non-negative weight, got {a.tv_weight:g}")
    if a.background is not None and not all(0 <= c <= 1 for c in a.background):
        raise UserError(f"--background {' '.join(f'{c:g}' for c in a.background)}: expected three values in [0, 1]")


def _fit_config(a, train) -> "AEConfig":  # noqa: F821
    """The per-scene model's settings from ``fit``'s flags and the training views."""
    from scene3d.autoencoders import AEConfig
    from scene3d.data import estimate_background

    lo, hi = a.box
    grid = a.kind == "nerf" and a.field == "grid"
    bg = tuple(a.background) if a.background is not None else estimate_background(train[0]["images"])
    return AEConfig(kind=a.kind, image_size=train.image_size[0], rays=a.rays or (4096 if grid else 1024), lo=lo,
                    hi=hi, background=bg, contexts=(1,), queries=1, field=a.field if a.kind == "nerf" else "mlp",
                    occupancy_res=64 if a.kind == "nerf" and a.skip else 0,
                    samples=a.samples or (192 if grid else 128), tv_weight=a.tv_weight if grid else 0.0)


def cmd_fit(a) -> int:
    """Fit one scene; score the test views at each budget of ``--eval-at`` (or at the end) into metrics.json,
    keyed by the budget: minutes (``"2"``, ``"10"``), or ``"end"`` for a run stopped by --steps / --epochs."""
    from plato_core.trainer import Trainer
    from scene3d.ae_eval import score_test_views
    from scene3d.autoencoders import SceneAE, SceneViews
    from scene3d.data import batch_cameras, load_nerf_folder

    _check_fit_flags(a)
    budgets = a.eval_at or [a.minutes]
    # NeRF: no gradient clipping (as the reference NeRF; Adam normalises the grids' large gradients anyway)
    base = run_config(a, require_budget=False, ckpt_every=100, log_every=5,
                      **({"grad_clip": None} if a.kind == "nerf" else {}))  # seeds torch before the model
    root = _nerf_root(a.data)
    composite = tuple(a.background) if a.background is not None else (1.0, 1.0, 1.0)  # for RGBA images
    train = load_nerf_folder(root, "train", background=composite)
    test = load_nerf_folder(root, "test", background=composite)
    if test.image_size != train.image_size:
        raise UserError(f"{root}: test views are {test.image_size[1]}x{test.image_size[0]} px, training views "
                        f"{train.image_size[1]}x{train.image_size[0]}; expected one size")
    cfg = _fit_config(a, train)
    model = SceneAE(cfg, per_scene=True)
    if a.kind == "nerf":
        item = train[0]
        kept = model.decoder.carve(item["images"], batch_cameras(item, train.image_size))
        if kept is not None and not a.quiet:
            print(f"empty-space skipping: the views' visual hull keeps {100 * kept:.1f} % of the box")
    views = SceneViews(train, 0)
    lr = a.lr or {"nerf": 1e-3 if cfg.field == "grid" else 5e-4, "voxel": 5e-2, "mesh": 1e-3}[a.kind]
    settings = {"data": str(root.resolve())}
    results, resume, overwrite = {}, a.resume, a.overwrite
    for minutes in budgets:
        tc = replace(base, minutes=minutes, batch_size=min(a.batch_size, len(views)), lr=lr, resume=resume,
                     overwrite=overwrite)
        trainer = Trainer(model, views, tc, settings=settings)
        if overwrite:  # the checks passed: drop the previous fit's scores besides the trainer's records
            remove_outputs(a.out, ["metrics.json", *(p.name for p in Path(a.out).glob("test_*.png"))])
        summary = trainer.fit()
        resume, overwrite = True, False  # the next budget continues this run
        key = f"{minutes:g}" if minutes is not None else "end"
        strip = f"test_{minutes:g}min.png" if minutes is not None else f"test_{summary['step']}steps.png"
        row = {"minutes": summary["elapsed_s"] / 60, "steps": summary["step"],
               "iterations_per_s": summary["step"] / max(summary["elapsed_s"], 1e-9),
               **score_test_views(model, test, Path(a.out) / strip)}
        results[key] = row
        print(json.dumps({"budget": key, **row}), flush=True)
        atomic_write(Path(a.out) / "metrics.json", json.dumps({"test": results, "test_views": test.views,
                                                               "background": list(cfg.background)}, indent=2))
    return 0


# ---------------------------------------------------------------- export / view
def _state(a):
    from scene3d.ae_eval import decode_scene
    from scene3d.autoencoders import SceneAE
    from scene3d.data import MultiViewDataset

    model, settings = SceneAE.from_run(a.run if hasattr(a, "run") else a.target)
    data = None
    if not model.per_scene:
        data = MultiViewDataset.load(a.data or settings["data"])
    return model, decode_scene(model, data, a.scene, a.contexts)


def cmd_export(a) -> int:
    from scene3d.ae_eval import surface
    from scene3d.export import write_mesh, write_points

    model, state = _state(a)
    verts, faces, colors = surface(model, state, a.level)
    if a.points:
        write_points(a.out, verts, colors)
    else:
        write_mesh(a.out, verts, faces, colors)
    print(f"wrote {a.out}: {len(verts)} vertices, {len(faces)} faces")
    return 0


def cmd_view(a) -> int:

    from scene3d.export import mesh_to_open3d, read_geometry
    from scene3d.viz import show, snapshot

    target = Path(a.target)
    if target.is_dir():
        from scene3d.ae_eval import surface

        model, state = _state(a)
        verts, faces, colors = surface(model, state)
        if len(faces) == 0:
            raise UserError(f"{target}: scene {a.scene} has no surface at the default density level")
        geom = mesh_to_open3d(verts, faces, colors)
    else:
        geom = read_geometry(target)
    if a.out:
        snapshot([geom], a.out, size=(a.size, a.size))
        print(f"wrote {a.out}")
    else:
        show([geom], title=str(target))
    return 0


def cmd_render(a) -> int:
    import time

    import torch
    from PIL import Image

    from scene3d.ae_eval import render_turntable, turntable_cameras, turntable_distance

    model, state = _state(a)
    size = a.size or model.cfg.image_size
    cams = turntable_cameras(a.frames, size, distance=turntable_distance(model), fov=0.785)
    t0 = time.perf_counter()
    frames = render_turntable(model, state, cams)
    seconds = time.perf_counter() - t0
    with atomic_path(a.out) as tmp:
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=80, loop=0)
    print(f"wrote {a.out}: {len(frames)} frames of {size}x{size} ({len(frames) / seconds:.1f} frames/s, "
          f"{torch.get_num_threads()} thread(s))")
    return 0
