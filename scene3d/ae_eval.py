"""Loading, evaluating and showing the scene autoencoders of :mod:`scene3d.autoencoders`.

Evaluation protocol (``evaluate``) on held-out scenes, for each number of contexts k:
contexts are views ``0 .. k-1``; queries are the last ``queries`` views (the same for every k).

* image metrics on the query views (full and foreground-masked PSNR, SSIM) from ``scene3d.metrics``;
* voxel IoU at 32³ against the generator's occupancy (``scene3d.geometry_metrics.voxel_iou``); the
  prediction is thresholded at the run's occupancy level and its cavities filled (images only show
  surfaces). The level is a cell opacity of 1/2 unless ``calibrate_level`` chose another from the
  training images (``RUN/calibration.json``);
* symmetric Chamfer distance on 10k surface samples against ``meshes/scene-XXXXXX.ply``;
* the classical baseline: a visual hull carved at 32³ from the silhouettes of views 0, 1, 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plato_core.runinfo import UserError, atomic_path, atomic_write
from renderers.cameras import Camera, look_at
from scene3d.autoencoders import CALIBRATION, SceneAE, occupancy_level, predicted_occupancy, resize_views
from scene3d.data import MultiViewDataset, batch_cameras
from scene3d.geometry_metrics import (
    chamfer,
    sample_surface,
    visual_hull,
    voxel_iou,
)
from scene3d.metrics import foreground_mask, format_table

LEVEL_SCALES = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


# ----------------------------------------------------------------------- views
def scene_views(dataset: MultiViewDataset, i: int, size: int) -> tuple[Tensor, Camera]:
    """Scene ``i``: images (1, V, 3, S, S) and V cameras at ``size``."""
    if not 0 <= i < len(dataset):
        raise UserError(f"--scene {i}: the data has scenes 0 .. {len(dataset) - 1}")
    item = dataset[i]
    cams = batch_cameras(item, dataset.image_size)
    imgs, cams = resize_views(item["images"], cams, size)
    return imgs[None], cams


@torch.no_grad()
def decode_scene(model: SceneAE, dataset: MultiViewDataset | None, i: int, k: int) -> dict:
    """The 3D state of scene ``i`` from its first ``k`` views (per-scene runs: the fitted scene)."""
    if model.per_scene:
        return model.decoder(None)
    if dataset is None:
        raise UserError("--data: an amortised model needs the scenes' context views")
    imgs, cams = scene_views(dataset, i, model.cfg.image_size)
    if imgs.shape[1] < k:
        raise UserError(f"--contexts {k}: scene {i} has only {imgs.shape[1]} views")
    idx = torch.arange(k)
    return model.infer(imgs[:, idx], cams[idx])


def surface(model: SceneAE, state: dict, level: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Scene 0 of ``state`` as a coloured mesh (verts, faces, colours); ``level`` in 1 / world units."""
    return model.decoder.surface(state, 0, occupancy_level(model.cfg) if level is None else level)


# ---------------------------------------------------------------------- metrics
def mean_image_metrics(pred: Tensor, target: Tensor, background, tol: float = 4 / 255) -> dict[str, float]:
    """Means of ``scene3d.metrics.image_metrics`` (PSNR, masked PSNR, SSIM) over (N, 3, H, W) images."""
    from scene3d import metrics

    return {k: float(v.nanmean()) for k, v in metrics.image_metrics(pred, target, background, tol).items()}


def gt_occupancy(dataset: MultiViewDataset, i: int) -> Tensor:
    """The generator's occupancy of scene ``i`` in the [z, y, x] grid convention."""
    if dataset.occupancy is None:
        raise UserError("--data: the dataset has no ground-truth occupancy grids (made by `scene3d data`)")
    occ = torch.from_numpy(dataset.occupancy[i])
    order = dataset.meta.get("occupancy", {}).get("index_order", "zyx")
    return occ.permute(2, 1, 0) if order == "xyz" else occ


def gt_mesh(root: str | Path, i: int) -> tuple[Tensor, Tensor] | None:
    import open3d as o3d

    p = Path(root) / "meshes" / f"scene-{i:06d}.ply"
    if not p.is_file():
        return None
    m = o3d.io.read_triangle_mesh(str(p))
    return torch.from_numpy(np.asarray(m.vertices)).float(), torch.from_numpy(np.asarray(m.triangles)).long()


def data_box(dataset: MultiViewDataset) -> tuple[float, float]:
    b = dataset.meta.get("occupancy", {}).get("bounds")
    return (float(b[0]), float(b[3])) if b else (-4.0, 4.0)


def carved_hull(dataset: MultiViewDataset, i: int, views=None, res: int = 32) -> Tensor:
    """(res, res, res) visual hull of scene ``i`` carved from the silhouettes of ``views`` (default: all)."""
    item = dataset[i]
    idx = list(range(dataset.views) if views is None else views)
    cams = batch_cameras(item, dataset.image_size)[idx]
    masks = foreground_mask(item["images"][idx], dataset.background or (0.0, 0.0, 0.0))[:, 0]
    lo, hi = data_box(dataset)
    return visual_hull(masks, cams, res, lo, hi)


def visual_hull_iou(dataset: MultiViewDataset, i: int, views=(0, 1, 2)) -> float:
    """IoU at 32³ of the visual hull carved from ``views`` of scene ``i`` with the true occupancy."""
    gt = gt_occupancy(dataset, i)
    return float(voxel_iou(carved_hull(dataset, i, views, gt.shape[-1]), gt))


@torch.no_grad()
def calibrate_level(model: SceneAE, dataset: MultiViewDataset, scenes: int = 100, scales=LEVEL_SCALES,
                    res: int = 32, progress: bool = True) -> dict:
    """Choose the occupancy threshold from training images alone; returns the report for calibration.json.

    A model that is unsure of depth spreads density thinly along the rays, so half-opaque cells
    miss much of the solid. For each of the first ``scenes`` scenes, the visual hull carved from
    *all* its views stands in for the solid (images and cameras only, no 3D labels). The scene is
    decoded from k context views, k cycling through ``cfg.contexts``, and the multiple of the
    half-opaque level with the best mean IoU against the hulls wins (the default, 1, when no level
    overlaps any hull).
    """
    from tqdm import tqdm

    if dataset.background is None:
        raise UserError("--data: calibration needs a known background to cut silhouettes")
    n = min(scenes, len(dataset))
    ks = model.cfg.contexts
    base = occupancy_level(replace(model.cfg, level_scale=1.0), res)
    ious = np.zeros((n, len(scales)))
    for i in tqdm(range(n), desc="calibrate level", disable=not progress):
        hull = carved_hull(dataset, i, res=res)
        state = decode_scene(model, dataset, i, ks[i % len(ks)])
        for j, s in enumerate(scales):
            ious[i, j] = float(voxel_iou(predicted_occupancy(model, state, res, level=base * s)[0], hull))
    mean = ious.mean(0)
    scale = float(scales[int(mean.argmax())]) if mean.max() > 0 else 1.0  # nothing matches: keep the default
    return {"level_scale": scale, "level": float(base * scale), "scenes": n, "contexts": list(ks),
            "hull_views": dataset.views, "iou_vs_hull": {f"{s:g}": float(m) for s, m in zip(scales, mean)}}


@torch.no_grad()
def evaluate(model: SceneAE, dataset: MultiViewDataset, root: str | Path, contexts=(1, 3), queries: int = 5,
             scenes: int | None = None, chamfer_points: int = 10_000, progress: bool = True) -> dict:
    """Per-k means of image and 3D metrics over held-out scenes (see the module docstring)."""
    from tqdm import tqdm

    n = min(len(dataset), scenes or len(dataset))
    V = dataset.views
    q_idx = torch.arange(V - queries, V)
    bg = dataset.background or model.cfg.background
    out: dict = {}
    for k in contexts:
        if k > V - queries:
            raise UserError(f"--contexts {k}: needs k + {queries} query views <= {V} views")
        rows = []
        for i in tqdm(range(n), desc=f"eval {model.kind} k={k}", disable=not progress):
            state = decode_scene(model, dataset, i, k)
            imgs, cams = scene_views(dataset, i, model.cfg.image_size)
            pred = model.render(state, cams[q_idx], queries).clamp(0, 1)
            row = mean_image_metrics(pred, imgs[0, q_idx], bg, dataset.background_tol)
            if dataset.occupancy is not None:
                row["iou"] = float(voxel_iou(predicted_occupancy(model, state, gt_occupancy(dataset, i).shape[-1])[0],
                                             gt_occupancy(dataset, i)))
            gt = gt_mesh(root, i)
            if gt is not None:
                v, f, _ = surface(model, state)
                row["chamfer"] = (float(chamfer(sample_surface(v, f, chamfer_points),
                                                sample_surface(*gt, chamfer_points, seed=1)))
                                  if len(f) else math.nan)
            rows.append(row)
        out[str(k)] = {m: float(np.nanmean([r[m] for r in rows])) for m in rows[0]}
        out[str(k)]["scenes"] = n
    if dataset.occupancy is not None:
        out["visual_hull_3_views"] = {"iou": float(np.mean([visual_hull_iou(dataset, i) for i in range(n)])),
                                      "scenes": n}
    return out


def evaluate_run(run: str | Path, data: str | Path, contexts=(1, 3), queries: int = 5, scenes: int | None = None,
                 with_gqn: str | Path | None = None) -> dict:
    """``scene3d eval`` of an autoencoder run: :func:`evaluate` on the scenes in ``data``, and with ``with_gqn``
    a GQN run scored on the same views (``gqn_eval.evaluate_fixed_views``); writes ``RUN/metrics.json``."""
    import time

    from scene3d.gqn import GQN
    from scene3d.gqn_eval import evaluate_fixed_views

    model, _ = SceneAE.from_run(run)
    dataset = MultiViewDataset.load(data)
    t0 = time.time()
    res = evaluate(model, dataset, data, tuple(contexts), queries, scenes)
    res["eval_seconds"] = time.time() - t0
    res["occupancy_level_scale"] = model.cfg.level_scale
    if with_gqn:
        gqn, _ = GQN.from_run(with_gqn)
        res["gqn"] = {"run": str(with_gqn),
                      **evaluate_fixed_views(gqn, dataset, tuple(contexts), queries, scenes)}
    atomic_write(Path(run) / "metrics.json", json.dumps(res, indent=2))
    return res


def format_results(kind: str, res: dict) -> str:
    """:func:`evaluate_run`'s results as a table: one row per (model, k), plus the visual-hull baseline."""
    rows = [{"model": name, "k": k, **row} for name, r in ((kind, res), ("gqn", res.get("gqn", {})))
            for k, row in r.items() if k.isdigit()]
    if "visual_hull_3_views" in res:
        rows.append({"model": "vis.hull", "k": "3", "iou": res["visual_hull_3_views"]["iou"]})
    return format_table(rows, {"model": "model", "k": "k", "psnr": "psnr", "masked_psnr": "masked_psnr",
                               "ssim": "ssim", "iou": "iou", "chamfer": "chamfer"})


def calibrate(run: str | Path, dataset: MultiViewDataset, scenes: int = 100) -> dict:
    """:func:`calibrate_level` for the run in ``run``; writes ``RUN/calibration.json`` and returns the report."""
    model, _ = SceneAE.from_run(run)
    if model.kind == "mesh":
        raise UserError(f"{run}: a mesh has no density threshold to calibrate")
    report = calibrate_level(model, dataset, scenes)
    atomic_write(Path(run) / CALIBRATION, json.dumps(report, indent=2))
    return report


def score_test_views(model: SceneAE, test: MultiViewDataset, strip: Path | None = None) -> dict:
    """PSNR / masked PSNR / SSIM of a per-scene model on the test views of ``test`` (one scene).

    With ``strip``, also writes truth (top) over prediction (bottom) for the first 6 test views.
    """
    model.eval()
    imgs, cams = scene_views(test, 0, test.image_size[0])
    with torch.no_grad():
        pred = torch.cat([model.render(model.decoder(None), cams[i:i + 4], len(cams[i:i + 4]))
                          for i in range(0, len(cams), 4)]).clamp(0, 1)
    model.train()
    if strip is not None:
        save_strip(pred[:6], imgs[0, :6], strip)
    return mean_image_metrics(pred, imgs[0], model.cfg.background)


def save_strip(pred: Tensor, target: Tensor, path: Path) -> None:
    """Truth (top row) over prediction (bottom row), (N, 3, H, W) in [0, 1], as a PNG."""
    from PIL import Image

    rows = [torch.cat(list(x), -1) for x in (target, pred)]
    img = (torch.cat(rows, -2).permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp)


# ------------------------------------------------------------------- turntables
def turntable_distance(model: SceneAE) -> float:
    """Camera distance of :func:`turntable_cameras` at which the model's box [lo, hi]^3 stays in view at a 45° fov:
    twice the box's half-width."""
    return model.cfg.hi - model.cfg.lo


def turntable_cameras(frames: int, size: int, distance: float, fov: float, elevation: float = 0.5,
                      target=(0.0, 0.0, 0.0)) -> Camera:
    """``frames`` perspective cameras circling the z axis at ``elevation`` (rad), looking at ``target``."""
    az = torch.arange(frames, dtype=torch.float32) * (2 * math.pi / frames)
    eye = distance * torch.stack([math.cos(elevation) * torch.cos(az), math.cos(elevation) * torch.sin(az),
                                  torch.full_like(az, math.sin(elevation))], -1)
    tgt = torch.tensor(target, dtype=torch.float32).expand(frames, 3)
    R, t = look_at(eye + tgt, tgt, up=(0.0, 0.0, 1.0))
    return Camera.create(R, t, (size, size), fov=fov)


@torch.no_grad()
def render_turntable(model: SceneAE, state: dict, cams: Camera, chunk: int = 8) -> np.ndarray:
    """(F, H, W, 3) uint8 novel views of scene 0 of ``state``."""
    frames = [model.render(state, cams[i:i + chunk], len(cams[i:i + chunk])) for i in range(0, len(cams), chunk)]
    imgs = torch.cat(frames).clamp(0, 1).permute(0, 2, 3, 1)
    return (imgs.numpy() * 255).round().astype(np.uint8)
