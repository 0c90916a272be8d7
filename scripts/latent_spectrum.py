"""Where does the motion sit in the latent space? One panel per run: the variance of each latent principal
component of the posterior means, coloured by how well that PC alone orders the particles (Spearman |rho|
against the simulation's true coordinate). Issue 13's diagnosis: the motion sat in the PC of least variance.

    python scripts/latent_spectrum.py --sim SIM --run LABEL=RUN [--run LABEL=RUN ...] --out docs/x.png [--n 2000]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np


def spectrum(run: str, sim: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Variance (K,) of each latent PC of the first ``n`` particles' posterior means, and each PC's |rho| (K,)."""
    from scipy.stats import spearmanr

    from cryoem.analyze import encode_all
    from cryoem.evaluate import truth
    from cryoem.train import load_run

    model, rec, ds, s = load_run(run)
    sub = _Head(ds, n)
    z = encode_all(model, sub, progress=False)
    t = truth(Path(sim)).coord[: len(z), 0]
    lam, U = np.linalg.eigh(np.cov(z.T))
    order = np.argsort(lam)[::-1]
    pcs = (z - z.mean(0)) @ U[:, order]
    return lam[order], np.array([abs(spearmanr(p, t).statistic) for p in pcs.T])


class _Head:
    """The first ``n`` particles of a ParticleSet (what ``encode_all`` reads: ``len`` and ``batch``)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self):
        return self.n

    def read_batch(self, idx):
        return self.ds.read_batch(idx)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", required=True)
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_FOLDER (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=2000)
    a = p.parse_args()
    runs = [r.split("=", 1) for r in a.run]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (label, run) in zip(axes[0], runs):
        lam, rho = spectrum(run, a.sim, a.n)
        k = np.arange(1, len(lam) + 1)
        ax.bar(k, lam / lam.sum(), color=cmap(rho))
        for ki, li, ri in zip(k, lam / lam.sum(), rho):
            ax.text(ki, li, f"{ri:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(textwrap.fill(label, 34), fontsize=9)
        ax.set_xlabel("latent PC")
        ax.set_xticks(k)
    axes[0][0].set_ylabel("share of the posterior means' variance")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes[0].tolist(), label="|ρ| of that PC vs true coordinate")
    fig.savefig(a.out, dpi=120, bbox_inches="tight")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
