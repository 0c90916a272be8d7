"""Evaluation and representation probes for a trained GQN run.

``evaluate``: for each number of contexts K, every test scene gets K context views and one
query view (fixed by ``seed``); the GQN's mean prediction (latents at the prior means) is
scored with MSE, PSNR, foreground-masked PSNR and SSIM (``scene3d.metrics``), and the ELBO
at the final pixel sigma in bits/dim. Two trivial baselines are scored on the same queries:
the dataset-mean image (mean of all views of the training data) and the context view
whose camera looks most nearly along the query's viewing direction.

``probe``: linear probes from the frozen representation r (K contexts, flattened) and from
the raw pixels of one view to the scene's ground-truth factors; ridge regression (R²) for
continuous factors, logistic regression (accuracy) for discrete ones, fitted on 80% of the
scenes and scored on the held-out 20%.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from plato_core.objective import bits_per_dim
from plato_core.runinfo import UserError, atomic_path, atomic_write
from scene3d import metrics
from scene3d.data import MultiViewDataset
from scene3d.gqn import GQN, extended_viewpoints
from scene3d.metrics import image_metrics


def _check(model: GQN, data: MultiViewDataset) -> None:
    c = model.cfg
    if data.image_size != (c.image_size, c.image_size):
        raise UserError(f"--data images are {data.image_size} but the run was trained at {c.image_size}²")


def _batches(data: MultiViewDataset, batch_size: int):
    for i in range(0, len(data), batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, len(data)))]
        yield {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def dataset_mean_image(data: MultiViewDataset) -> torch.Tensor:
    """(C, H, W) mean over all scenes and views, in [0, 1]."""
    return torch.from_numpy(data.images.reshape(-1, *data.images.shape[2:]).mean(0, dtype=np.float64)).permute(
        2, 0, 1).float() / 255


def nearest_context(ctx_R: torch.Tensor, q_R: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the context camera (B, K, 3, 3) whose viewing direction is closest to the query's (B, 3, 3)."""
    return (ctx_R[..., 2, :] * q_R[:, None, 2, :]).sum(-1).argmax(1)


@torch.no_grad()
def evaluate(model: GQN, data: MultiViewDataset, contexts=(1, 3, 5), train_mean: torch.Tensor | None = None,
             seed: int = 0, batch_size: int = 32, n_samples: int = 3, out: str | Path | None = None) -> dict:
    """Metrics per context count for the GQN and both baselines; writes metrics.json / samples.png into ``out``."""
    _check(model, data)
    if max(contexts) >= data.views:
        raise UserError(f"--contexts {max(contexts)}: the data has {data.views} views; need at most {data.views - 1}")
    bg = data.background
    mean_img = dataset_mean_image(data) if train_mean is None else train_mean
    sigma = model.cfg.sigma_end
    results, rows = {}, []
    for k in contexts:
        g = torch.Generator().manual_seed(seed * 1000 + k)
        acc: dict[str, dict[str, list]] = {"gqn": {}, "mean_image": {}, "nearest_context": {}}
        for bi, batch in enumerate(_batches(data, batch_size)):
            ctx_x, ctx_v, q_x, q_v, ctx_i, q_i = model.split(batch, k, generator=g)
            pred = model.predict(ctx_x, ctx_v, q_v, mean_latents=True)
            R = batch["R"]
            near = nearest_context(torch.stack([R[b, ctx_i[b]] for b in range(len(R))]),
                                   R[torch.arange(len(R)), q_i])
            base = {"mean_image": mean_img.expand_as(q_x),
                    "nearest_context": ctx_x[torch.arange(len(ctx_x)), near]}
            for name, p in [("gqn", pred), *base.items()]:
                for m, val in image_metrics(p, q_x, bg, data.background_tol).items():
                    acc[name].setdefault(m, []).append(val)
            terms = model.elbo_terms(ctx_x, ctx_v, q_x, q_v, sigma)
            acc["gqn"].setdefault("elbo_bits_per_dim", []).append(
                bits_per_dim(terms["nll"] + terms["kl"], q_x[0].numel()))
            if bi == 0 and k == max(contexts):
                samples = [model.predict(ctx_x, ctx_v, q_v) for _ in range(n_samples)]
                rows = _sample_rows(ctx_x, q_x, pred, samples, n=min(8, len(q_x)))
        results[str(k)] = {name: {m: float(torch.cat(v).nanmean()) for m, v in d.items()} for name, d in acc.items()}
    report = {"contexts": list(contexts), "scenes": len(data), "sigma": sigma, "background": bg,
              "prediction": "ConvDRAW with latents at the prior means", "metrics": results}
    if out is not None:
        out = Path(out)
        atomic_write(out / "metrics.json", json.dumps(report, indent=2))
        if rows:
            save_grid(rows, out / "samples.png")
    return report


@torch.no_grad()
def evaluate_fixed_views(model: GQN, data: MultiViewDataset, contexts=(1, 3), queries: int = 5,
                         scenes: int | None = None, batch_size: int = 16) -> dict:
    """Image metrics under the autoencoders' protocol (``scene3d.ae_eval``), for a table beside them.

    Contexts are views ``0 .. k-1`` and queries the last ``queries`` views of each of the first
    ``scenes`` scenes; predictions use the latents' prior means. Returns {k: {metric: mean}}.
    """
    _check(model, data)
    n = min(len(data), scenes or len(data))
    V = data.views
    q_idx = torch.arange(V - queries, V)
    out = {}
    for k in contexts:
        if k > V - queries:
            raise UserError(f"--contexts {k}: needs k + {queries} query views <= {V} views")
        acc: dict[str, list] = {}
        for batch in _batches(data.subset(range(n)), batch_size):
            v = extended_viewpoints(batch, model.cfg.position_scale)
            x = batch["images"]
            pred = model.predict(x[:, :k].repeat_interleave(queries, 0), v[:, :k].repeat_interleave(queries, 0),
                                 v[:, q_idx].flatten(0, 1), mean_latents=True)
            for m, val in image_metrics(pred, x[:, q_idx].flatten(0, 1), data.background,
                                               data.background_tol).items():
                acc.setdefault(m, []).append(val)
        out[str(k)] = {m: float(torch.cat(vals).nanmean()) for m, vals in acc.items()} | {"scenes": n}
    return out


def _sample_rows(ctx_x, q_x, pred, samples, n: int) -> list[list[np.ndarray]]:
    """Rows of images (H, W, 3) uint8: contexts | truth | mean prediction | samples."""
    to = lambda t: (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return [[to(c) for c in ctx_x[b]] + [to(q_x[b]), to(pred[b])] + [to(s[b]) for s in samples] for b in range(n)]


def save_grid(rows: list[list[np.ndarray]], path: Path, scale: int = 3, gap: int = 2) -> None:
    """Save rows of equally sized images as one PNG, with a white gap between the column groups."""
    from PIL import Image

    H, W, _ = rows[0][0].shape
    n = len(rows[0])
    canvas = np.full((len(rows) * (H + gap), n * (W + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas[i * (H + gap):i * (H + gap) + H, j * (W + gap):j * (W + gap) + W] = im
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp)


def format_table(report: dict) -> str:
    """The metrics of ``evaluate`` as a text table, one row per (contexts, method)."""
    rows = [{"k": k, "method": name, **m} for k, d in report["metrics"].items() for name, m in d.items()]
    return metrics.format_table(rows, {"method": "method", "k": "K", "mse": "MSE", "psnr": "PSNR",
                                       "masked_psnr": "mPSNR", "ssim": "SSIM", "elbo_bits_per_dim": "ELBO b/d"})


# --------------------------------------------------------------------- probes
def probe_targets(data: MultiViewDataset) -> dict[str, tuple[np.ndarray, str]]:
    """Ground-truth factors as probe targets: name -> ((N, d) or (N,) array, 'regression' | 'classification').

    Constant targets and NaN-padded slots are dropped.
    """
    f, out = data.factors, {}
    if "positions" in f and "n_cubes" in f:  # Shepard–Metzler
        pos, col = f["positions"], f["colors"]
        out["n_cubes"] = (f["n_cubes"], "classification")
        out["first_cube_color"] = (col[:, 0], "regression")
        out["first_cube_position"] = (pos[:, 0], "regression")
        n = int(np.isfinite(pos[..., 0]).all(0).sum())  # slots filled in every scene
        out["cube_positions"] = (pos[:, :n].reshape(len(pos), -1), "regression")
        out["cube_colors"] = (col[:, :n].reshape(len(col), -1), "regression")
        out["extent"] = (np.nanmax(pos, 1) - np.nanmin(pos, 1), "regression")
    elif "n_objects" in f:  # rooms
        out["n_objects"] = (f["n_objects"], "classification")
        out["first_object_kind"] = (f["kinds"][:, 0], "classification")
        out["first_object_color"] = (f["colors"][:, 0], "regression")
        out["first_object_position"] = (f["positions"][:, 0, :2], "regression")
        out["wall_color"] = (f["wall_color"], "classification")
        out["floor_color"] = (f["floor_color"], "classification")
    else:
        for k, v in f.items():
            v = np.asarray(v)
            kind = "classification" if v.dtype.kind in "iub" else "regression"
            out[k] = (v.reshape(len(v), -1) if kind == "regression" else v, kind)
    return {k: v for k, v in out.items() if np.unique(v[0], axis=0).shape[0] > 1}


@torch.no_grad()
def scene_features(model: GQN, data: MultiViewDataset, contexts: int = 5, batch_size: int = 64) -> np.ndarray:
    """(N, D) frozen representations r from the first ``contexts`` views of each scene, flattened."""
    feats = []
    for batch in _batches(data, batch_size):
        v = extended_viewpoints(batch, model.cfg.position_scale)
        r = model.represent(batch["images"][:, :contexts], v[:, :contexts], v[:, 0])  # epipolar: seen from view 0
        feats.append(r.flatten(1).numpy())
    return np.concatenate(feats)


def fit_probe(X: np.ndarray, y: np.ndarray, kind: str, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out R² (ridge, alpha by CV) or accuracy (logistic regression) of a linear probe."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        m = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
        m.fit(X[train], y[train])
        return float(m.score(X[test], y[test]))
    m = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
    m.fit(X[train], y[train])
    return float(m.score(X[test], y[test]))


def probe(model: GQN, data: MultiViewDataset, contexts: int = 5, seed: int = 0, out: str | Path | None = None) -> dict:
    """Linear probes on r and on one view's raw pixels; writes probe.json into ``out``."""
    _check(model, data)
    targets = probe_targets(data)
    if not targets:
        raise UserError("--data: the scenes carry no varying ground-truth factors to probe")
    N = len(data)
    perm = np.random.default_rng(seed).permutation(N)
    train, test = perm[: int(0.8 * N)], perm[int(0.8 * N):]
    feats = {"r": scene_features(model, data, min(contexts, data.views)),
             "pixels": data.images[:, 0].reshape(N, -1).astype(np.float32) / 255}
    table = {name: {"kind": kind, "metric": "R2" if kind == "regression" else "accuracy",
                    **{f: fit_probe(X, y, kind, train, test) for f, X in feats.items()}}
             for name, (y, kind) in targets.items()}
    report = {"contexts": contexts, "train_scenes": len(train), "test_scenes": len(test),
              "feature_dims": {k: int(v.shape[1]) for k, v in feats.items()}, "probes": table}
    if out is not None:
        atomic_write(Path(out) / "probe.json", json.dumps(report, indent=2))
    return report


def format_probe(report: dict) -> str:
    """The probes of ``probe`` as a text table: R² or accuracy from r and from pixels, per factor."""
    rows = [{"factor": name, **d} for name, d in report["probes"].items()]
    return metrics.format_table(rows, {"factor": "factor", "metric": "metric", "r": "r", "pixels": "pixels"})
