"""Latent-use curves of atom-VAE runs side by side: KL, active units, shuffled-z cost, encoder gradient.

Usage::

    python scripts/collapse_curves.py RUN1:LABEL1 RUN2:LABEL2 ... --out docs/collapse_curves.png

Reads each run's ``train_log.csv`` (``cryoem train`` logs these columns every 10 steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANELS = [("kl", "KL(q || p), nats per particle", "linear"),
          ("au", "active latent units (of zdim)", "linear"),
          ("shuffle", "shuffled-z cost, nats per particle", "symlog"),
          ("gnorm_encoder", "encoder gradient norm (before clipping)", "log")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RUN:LABEL")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="")
    a = p.parse_args()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), dpi=100)
    for spec in a.runs:
        run, _, label = spec.partition(":")
        log = np.genfromtxt(Path(run) / "train_log.csv", delimiter=",", names=True)
        for ax, (col, title, scale) in zip(axes, PANELS):
            ok = np.isfinite(log[col])
            ax.plot(log["step"][ok], log[col][ok], label=label or run, lw=1.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.set_yscale(scale)
    axes[0].legend(fontsize=8)
    fig.suptitle(a.title, fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
