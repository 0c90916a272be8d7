"""Side by side with cryoDRGN on the same simulated particles: throughput and per-decile map quality.

Usage (cryoDRGN lives in its own environment; it is not a Plato dependency)::

    python scripts/compare_cryodrgn.py --sim SIM --plato RUN --cryodrgn /path/to/venv/bin/cryodrgn \
        --out CMP [--epochs 1] [--ind 2000]

1. Converts the simulation's STAR file with ``cryodrgn parse_pose_star`` / ``parse_ctf_star``.
2. Trains ``cryodrgn train_vae`` (small architecture: encoder and decoder 3 x 256, zdim as
   Plato's run) and reads its particles/s off its own log.
3. For each decile of the true morph coordinate: the mean cryoDRGN latent of the decile
   through ``cryodrgn eval_vol``, and FSC / AU-FSC against the true map; the same for
   Plato's decoded model (``cryoem.evaluate``). cryoDRGN's volume is compared as written
   and with its hand flipped / contrast inverted; the best of these is reported, and which.
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


def main() -> None:
    from cryoem.analyze import encode_all
    from cryoem.evaluate import evaluate, truth, truth_map
    from cryoem.io import read_mrc
    from cryoem.metrics import fsc_report
    from cryoem.train import load_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", type=Path, required=True)
    p.add_argument("--plato", type=Path, required=True)
    p.add_argument("--cryodrgn", required=True, help="path to the cryodrgn executable")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "cryodrgn.log"
    model, rec, ds, s = load_run(a.plato)
    D, apix, zdim = model.box, model.apix, model.cfg.zdim
    star = a.sim / "particles.star"
    train = a.out / "train"
    if not (train / "weights.pkl").is_file():  # reuse a finished cryoDRGN run in OUT/train
        sh([a.cryodrgn, "parse_pose_star", star, "-o", a.out / "pose.pkl", "-D", D, "--Apix", apix], log)
        sh([a.cryodrgn, "parse_ctf_star", star, "-o", a.out / "ctf.pkl", "-D", D, "--Apix", apix], log)
        sh([a.cryodrgn, "train_vae", a.sim / "particles.mrcs", "--poses", a.out / "pose.pkl", "--ctf",
            a.out / "ctf.pkl", "--zdim", zdim, "-n", a.epochs, "-b", a.batch_size, "--enc-dim", 256,
            "--enc-layers", 3, "--dec-dim", 256, "--dec-layers", 3, "--no-analysis", "--max-threads", 2,
            "-o", train], log)
    text = log.read_text() + ((train / "run.log").read_text() if (train / "run.log").is_file() else "")
    m = re.findall(r"Finished in (\d+):(\d+):([\d.]+) \(", text)
    if not m:
        raise SystemExit(f"{train}: no 'Finished in' line in cryoDRGN's log")
    train_s = int(m[-1][0]) * 3600 + int(m[-1][1]) * 60 + float(m[-1][2])
    epochs = len(list(train.glob("weights.*.pkl"))) or a.epochs
    n = len(ds)
    with open(train / "z.pkl", "rb") as f:
        z_drgn = pickle.load(f)  # noqa: S301 - written by cryoDRGN in this run
    t, ends = truth(a.sim)

    lat = a.plato / "analysis" / "latents.npy"
    z_plato = np.load(lat) if lat.is_file() else encode_all(model, ds)
    plato = evaluate(model, rec, s, z_plato, a.sim)
    plog = np.genfromtxt(a.plato / "train_log.csv", delimiter=",", names=True)
    batch = json.loads((a.plato / "config.json").read_text())["settings"]["train"]["batch_size"]
    plato_pps = float(plog["step"][-1] * batch / plog["time_s"][-1])

    rows = []
    for r in plato["deciles"]:
        d = r["decile"]
        sel = (t >= d / 10) & ((t < (d + 1) / 10) if d < 9 else (t <= 1))
        zc = z_drgn[sel].mean(0)
        vol = a.out / f"drgn_{d}.mrc"
        sh([a.cryodrgn, "eval_vol", train / "weights.pkl", "-c", train / "config.yaml", "-o", vol, "--Apix", apix,
            "-z", *[f"{v:.6f}" for v in zc]], log)
        v, _, _ = read_mrc(vol)
        truth_vol = truth_map(a.sim, ends, r["t_mean"], D, apix)
        variants = {"as written": v, "hand flipped": v[::-1], "inverted": -v, "flipped+inverted": -v[::-1]}
        reps = {k: fsc_report(np.ascontiguousarray(x), truth_vol, apix) for k, x in variants.items()}
        best = max(reps, key=lambda k: reps[k]["au_fsc"])
        rows.append({"decile": d, "t_mean": r["t_mean"], "plato_au_fsc": r["map_au_fsc"],
                     "plato_res_0.5": r["map_res_0.5"], "cryodrgn_au_fsc": float(reps[best]["au_fsc"]),
                     "cryodrgn_res_0.5": float(reps[best]["res_0.5"]), "cryodrgn_variant": best})
    result = {"particles": n, "cryodrgn_epochs": epochs, "cryodrgn_train_s": train_s,
              "cryodrgn_particles_per_s": n * epochs / train_s, "plato_particles_per_s": plato_pps,
              "plato": plato, "maps": rows}
    (a.out / "comparison.json").write_text(json.dumps(result, indent=2))
    print(f"throughput: Plato {plato_pps:.1f} particles/s, cryoDRGN {result['cryodrgn_particles_per_s']:.1f} "
          f"particles/s ({epochs} epoch(s), {train_s:.0f} s)")
    print("decile  t_mean  Plato AU-FSC  Plato res0.5  cryoDRGN AU-FSC  cryoDRGN res0.5  (cryoDRGN variant)")
    for r in rows:
        print(f"{r['decile']:6d}  {r['t_mean']:.3f}  {r['plato_au_fsc']:12.3f}  {r['plato_res_0.5']:12.1f}  "
              f"{r['cryodrgn_au_fsc']:15.3f}  {r['cryodrgn_res_0.5']:15.1f}  ({r['cryodrgn_variant']})")


if __name__ == "__main__":
    main()
