"""Side by side with cryoDRGN on the same simulated particles: latent quality and throughput.

Usage (cryoDRGN lives in its own environment; it is not a Plato dependency)::

    python scripts/compare_cryodrgn.py --sim SIM --plato RUN --cryodrgn /path/to/venv/bin/cryodrgn \
        --out CMP [--epochs 1] [--threads 1] [--train-only]

1. Converts the simulation's STAR file with ``cryodrgn parse_pose_star`` / ``parse_ctf_star``.
2. Trains ``cryodrgn train_vae`` (encoder and decoder 3 x 256, as in issue 13's measurement: its
   default 3 x 1024 ran at ~2 particles/s on one core; zdim 8; batch 32) and reads its particles/s
   off its own log. A finished run in ``OUT/train`` is reused.
3. Scores both latents against the simulation's truth (``cryoem.evaluate``): Spearman |rho| of
   latent PC1 against the true coordinate, and the cross-validated linear R² of each true
   coordinate; Plato's decoded-model RMSD ratio as well. Writes ``OUT/comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import pickle  # noqa: S403 - only cryoDRGN's own output, written in this run
import re
import subprocess
import time
from pathlib import Path

import numpy as np


def sh(cmd: list, log: Path) -> float:
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t


def train_cryodrgn(exe: str, sim: Path, out: Path, D: int, apix: float, zdim: int, epochs: int, threads: int
                   ) -> tuple[np.ndarray, float]:
    """cryoDRGN's latents (N, zdim) and its training throughput (particles/s)."""
    log, train = out / "cryodrgn.log", out / "train"
    star = sim / "particles.star"
    if not list(train.glob("z*.pkl")):
        sh([exe, "parse_pose_star", star, "-o", out / "pose.pkl", "-D", D, "--Apix", apix], log)
        sh([exe, "parse_ctf_star", star, "-o", out / "ctf.pkl", "-D", D, "--Apix", apix], log)
        sh([exe, "train_vae", sim / "particles.mrcs", "--poses", out / "pose.pkl", "--ctf", out / "ctf.pkl",
            "--zdim", zdim, "-n", epochs, "-b", 32, "--enc-dim", 256, "--enc-layers", 3, "--dec-dim", 256,
            "--dec-layers", 3, "--no-analysis", "--max-threads", threads, "-o", train], log)
    # per-epoch "Finished in H:MM:SS" lines; a run stopped after some epochs counts the epochs it finished
    epoch_s = [int(h) * 3600 + int(m) * 60 + float(sec) for h, m, sec in
               re.findall(r"Epoch: \d+ Average .* Finished in (\d+):(\d+):([\d.]+)", log.read_text())]
    if not epoch_s:
        raise SystemExit(f"{train}: no finished epoch in cryoDRGN's log")
    z_file = train / "z.pkl" if (train / "z.pkl").is_file() else train / f"z.{len(epoch_s)}.pkl"
    with open(z_file, "rb") as f:
        z = pickle.load(f)  # noqa: S301 - written by cryoDRGN in this run
    return np.asarray(z), len(z) * len(epoch_s) / sum(epoch_s)


def main() -> None:
    from scipy.stats import spearmanr

    from cryoem.analyze import encode_all, pca
    from cryoem.evaluate import evaluate, linear_r2, truth
    from cryoem.particles import load_particles
    from cryoem.train import load_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", type=Path, required=True)
    p.add_argument("--plato", type=Path, required=True)
    p.add_argument("--cryodrgn", required=True, help="path to the cryodrgn executable")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--train-only", action="store_true", help="only train cryoDRGN (while Plato trains)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    meta = load_particles(a.sim / "particles.star", pixels="none")
    z_drgn, drgn_pps = train_cryodrgn(a.cryodrgn, a.sim, a.out, meta.box, meta.pixel_size, a.zdim, a.epochs,
                                      a.threads)
    if a.train_only:
        return
    model, rec, ds, s = load_run(a.plato)
    tr = truth(a.sim)
    lat = a.plato / "analysis" / "latents.npy"
    z_plato = np.load(lat) if lat.is_file() else encode_all(model, ds)
    plato = evaluate(model, rec, s, z_plato, a.sim, decoded_maps=False)
    plog = np.genfromtxt(a.plato / "train_log.csv", delimiter=",", names=True)
    batch = json.loads((a.plato / "config.json").read_text())["settings"]["train"]["batch_size"]
    plato_pps = float(plog["step"][-1] * batch / plog["time_s"][-1])
    drgn_rho = abs(float(spearmanr(pca(z_drgn, 1)[0][:, 0], tr.coord[:, 0]).statistic))
    result = {"case": str(a.sim), "particles": len(ds),
              "plato": {"abs_spearman": plato["abs_spearman"], "r2": plato["r2"], "ratio_far": plato.get("ratio_far"),
                        "particles_per_s": plato_pps, "steps": int(plog["step"][-1])},
              "cryodrgn": {"abs_spearman": drgn_rho, "r2": linear_r2(z_drgn, tr.coord), "epochs": a.epochs,
                           "particles_per_s": drgn_pps}}
    (a.out / "comparison.json").write_text(json.dumps(result, indent=2))
    for name, r in (("Plato", result["plato"]), ("cryoDRGN", result["cryodrgn"])):
        ratio = r.get("ratio_far")
        print(f"{name:9s} |rho| {r['abs_spearman']:.3f}  R² {', '.join(f'{v:.3f}' for v in r['r2'])}  "
              f"RMSD ratio {'-' if ratio is None else f'{ratio:.3f}'}  {r['particles_per_s']:.1f} particles/s")


if __name__ == "__main__":
    main()
