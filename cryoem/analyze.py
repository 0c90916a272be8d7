"""Latent-space analysis of a trained atom VAE: latents, PCA / t-SNE, k-means, traversals, RMSF, index.html."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from scene3d.runinfo import atomic_path, atomic_write  # noqa: E402


def pca(latents: np.ndarray, k: int = 2) -> tuple[np.ndarray, PCA]:
    """(N, zdim) -> (N, k) principal-component scores and the fitted PCA."""
    p = PCA(n_components=min(k, latents.shape[1])).fit(latents)
    return p.transform(latents), p


def kmeans(latents: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means in latent space: (k, zdim) centres and (N,) labels."""
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(latents)
    return km.cluster_centers_, km.labels_


def traversal(p: PCA, latents: np.ndarray, pc: int, n: int = 10) -> np.ndarray:
    """(n, zdim) latents along principal component ``pc`` (0-based), between its 5th and 95th percentiles."""
    scores = p.transform(latents)[:, pc]
    lo, hi = np.percentile(scores, [5, 95])
    steps = np.linspace(lo, hi, n)
    return p.mean_[None] + steps[:, None] * p.components_[pc][None]


def rmsf(models: np.ndarray) -> np.ndarray:
    """Root-mean-square fluctuation (Å) of each atom across models (M, N, 3) -> (N,)."""
    return np.sqrt(((models - models.mean(0)) ** 2).sum(-1).mean(0))


def scatter_png(path: Path, xy: np.ndarray, title: str, color: np.ndarray | None = None,
                color_label: str | None = None, centres: np.ndarray | None = None) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=3, c=color if color is not None else "tab:blue",
                    cmap="viridis", alpha=0.6, linewidths=0)
    if color is not None:
        fig.colorbar(sc, ax=ax, label=color_label)
    if centres is not None:
        ax.scatter(centres[:, 0], centres[:, 1], c="red", marker="x", s=40, label="k-means centres")
        for i, (x, y) in enumerate(centres):
            ax.annotate(str(i), (x, y), fontsize=8, color="red")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(f"{title.split()[0]} 1")
    ax.set_ylabel(f"{title.split()[0]} 2")
    fig.tight_layout()
    _save(fig, path)


def rmsf_png(path: Path, per_residue: np.ndarray, labels: list[str], title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 3), dpi=110)
    ax.plot(np.arange(len(per_residue)), per_residue, lw=1)
    ticks = np.linspace(0, len(labels) - 1, min(12, len(labels))).astype(int)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45, fontsize=7)
    ax.set_ylabel("RMSF (Å)")
    ax.set_xlabel("residue (chain:number)")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_index(folder: Path, items: list[tuple[str, str]], title: str, summary: dict) -> Path:
    """``index.html`` showing each (file, caption): images inline, other files as links."""
    rows = []
    for name, caption in items:
        cap = html.escape(caption)
        if name.endswith((".png", ".gif")):
            rows.append(f'<figure><img src="{name}" style="max-width:640px"><figcaption>{cap}</figcaption></figure>')
        else:
            rows.append(f'<p><a href="{name}">{html.escape(name)}</a>: {cap}</p>')
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>"
            f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>{''.join(rows)}</body></html>")
    path = folder / "index.html"
    atomic_write(path, body)
    return path
