"""Does the objective prefer the truth? Image loss and structural priors of a trained atom-VAE run at the truth.

Usage::

    python scripts/prior_probe.py RUN SIM [--n 96]

RUN was trained on the particles of SIM, a ``cryoem simulate`` folder. For the particles in the top quarter of
the true coordinate (the states far from the start), prints the reconstruction loss (nats per image, with the
run's own per-particle contrast and B-factor) and the weighted structural priors (bond, local distances, clash;
nats per image as in training) of three models:

- the starting model;
- the run's decoded model at each particle's stored posterior mean;
- the true structure of each particle.

If the truth's prior cost exceeds what it gains in the images over the decoded model, the objective itself holds
the decoder short of the motion, and more training cannot help (issue 13: at prior weights 1, every development
case was in that state).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def true_coords(sim: Path) -> tuple[torch.Tensor, callable, torch.Tensor]:
    """Each particle's distance from the start (N,: its coordinate, or for an ensemble its model's RMSD to the
    first), a function from particle indices to true coordinates (B, N, 3) Å, and the start (N, 3) Å, all in the
    simulator's frame."""
    from cryoem.simulate import ensemble_conformations, hinge_conformations, morph_conformations
    from cryoem.structure import read_structure

    cfg = json.loads((sim / "config.json").read_text())["settings"]
    gt = np.load(sim / "ground_truth.npz")
    if "model_index" in gt:
        conf = ensemble_conformations(read_structure(cfg["structure"]).select(cfg["select"]), None, cfg["bfactor"],
                                      cfg["potential"])
        label = torch.as_tensor(gt["model_index"]).long()
        rmsd = ((conf.states - conf.states[:1]) ** 2).sum(-1).mean(-1).sqrt()  # (models,) from the first model
        return rmsd[label], lambda i: conf.states[label[i]], conf.states[0]
    if "hinge_t" in gt:
        s = read_structure(cfg["structure"]).select(cfg["select"]).subset(models=0)
        conf = hinge_conformations(s, cfg["hinge"], cfg["morph_dist"], cfg["bfactor"], cfg["potential"])
        t = torch.as_tensor(gt["hinge_t"]).double().reshape(len(gt["hinge_t"]), -1)
        return t[:, 0], lambda i: conf.atom_coords(t[i]), conf.atom_coords(t[:1] * 0)[0]
    a, b = (read_structure(p, models="first").select(cfg["select"]) for p in cfg["morph"])
    conf = morph_conformations(a, b, cfg["morph_dist"], cfg["bfactor"], cfg.get("potential", "single"))
    t = torch.as_tensor(gt["morph_t"]).double()
    return t, lambda i: conf.atom_coords(t[i]), conf.atom_coords(t[:1] * 0)[0]


def main() -> None:
    from cryoem.train import load_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("sim", type=Path)
    p.add_argument("--n", type=int, default=96, help="far particles to probe")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, _, ds, _ = load_run(a.run)
    order, coords_of, start = true_coords(a.sim)
    far = torch.nonzero(order > torch.quantile(order.double(), 0.75))[:, 0][: a.n].numpy()
    x0 = model.decoder.x0
    if start.shape != x0.shape:
        raise SystemExit(f"{a.run}: its model has {len(x0)} atoms, the simulation {len(start)}")
    offset = (x0 - start).mean(0)  # the run's frame (the box centre) from the simulator's (the centroid)
    batch = ds.read_batch(far)
    idx = batch["index"]
    weight = model.prior_weights()
    with torch.no_grad():
        models = {"start": x0.expand(len(far), -1, -1), "decoded": model.decode(model.z_last[idx]),
                  "true": coords_of(far).float() + offset}
        for name, x in models.items():
            image = model.render(x, batch["R"], batch["shift_A"], batch["ctf"], idx)
            rec = model.reconstruction(batch["image"], image, None).mean()
            pri = model.prior_terms(x)
            cost = {k: weight[k] * float(v) for k, v in pri.items()}
            rmsd = float(((x - models["true"]) ** 2).sum(-1).mean().sqrt())
            print(f"{name:8s} image loss {rec:9.2f} nats   priors {sum(cost.values()):8.2f} nats "
                  f"(bond {cost['bond']:.2f}, local {cost['local']:.2f}, clash {cost['clash']:.2f})   "
                  f"RMSD to the truth {rmsd:.2f} Å")


if __name__ == "__main__":
    main()
