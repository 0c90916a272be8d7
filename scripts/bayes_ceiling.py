"""The Bayes ceiling of a ``cryoem simulate`` run: how well could any method order its particles by their true
morph or hinge coordinate (an ensemble: by their model's score on the ensemble's PC1), knowing the true
structures, poses, shifts, CTFs, per-particle B-factors and noise?

    python scripts/bayes_ceiling.py SIM_DIR [--n 1000] [--grid 31] [--bfactors B.npy] [--linear K]

For each of the first ``--n`` particles: render the true structure at ``--grid`` values of t (a grid per hinge for
several hinges) at the particle's pose, shift, CTF and B-factor; weigh them by the Gaussian likelihood of its
noisy image and by the simulated distribution of t; print the Spearman rho and R² of the posterior mean against
the truth. Compare with the atom VAE's |rho| (``python -m cryoem.evaluate RUN --sim SIM_DIR``). ``--bfactors``:
per-particle B (Å²) for simulations made before ``ground_truth.npz`` recorded ``particle_bfactor``. A diagnostic,
not a test; about 5 minutes for 1,000 particles of 6,000 atoms on one core.

``--linear K`` (ensembles): the ceiling of a *continuous* model instead, one that knows the ensemble's mean and
its top K principal components exactly and puts a Gaussian prior on the K scores (their variances over the
models), as a latent-variable model with a continuous latent would at best; the grid is ``--grid`` values per
score over +-3 standard deviations. Knowing that the structures are exactly the ensemble's models (the default)
is far more than any continuous latent can know.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import torch
from scipy.stats import spearmanr

from cryoem.analyze import pca
from cryoem.ctf import CTFParams
from cryoem.imaging import fourier_filter, project
from cryoem.simulate import Conformations, ensemble_conformations, hinge_conformations, morph_conformations
from cryoem.structure import read_structure


def conformations(cfg: dict) -> tuple[Conformations, str]:
    """The simulation's conformations, rebuilt from its recorded settings, and the truth's key."""
    if cfg.get("structure") and not cfg.get("hinge"):  # an ensemble (weights: uniform unless recorded)
        s = read_structure(cfg["structure"]).select(cfg["select"])
        w = np.loadtxt(cfg["weights"], ndmin=1) if cfg.get("weights") else None
        return ensemble_conformations(s, w, cfg["bfactor"], cfg.get("potential", "single")), "model_index"
    if cfg.get("hinge"):
        s = read_structure(cfg["structure"]).select(cfg["select"]).subset(models=0)
        return hinge_conformations(s, cfg["hinge"], cfg["morph_dist"], cfg["bfactor"], cfg["potential"]), "hinge_t"
    a, b = (read_structure(p, models="first").select(cfg["select"]) for p in cfg["morph"])
    return morph_conformations(a, b, cfg["morph_dist"], cfg["bfactor"], cfg.get("potential", "single")), "morph_t"


def log_prior(t: np.ndarray, dist: str) -> np.ndarray:
    """Log density (up to a constant) of ``t`` (G, H) under the simulated distribution (``sample_labels``)."""
    if dist == "uniform":
        return np.zeros(len(t))
    p = np.exp(-0.5 * ((t - 0.15) / 0.08) ** 2) + np.exp(-0.5 * ((t - 0.85) / 0.08) ** 2)  # bimodal
    return np.log(p + 1e-300).sum(1)


def posterior_means(sim: Path, n: int, grid_n: int, bfactors: np.ndarray | None,
                    linear: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means (n, H) of t for the first ``n`` particles, and their true t (n, H); ``linear``: see
    ``--linear``."""
    cfg = json.loads((sim / "config.json").read_text())["settings"]
    gt = np.load(sim / "ground_truth.npz")
    conf, key = conformations(cfg)
    if conf.mode == "ensemble" and linear:  # a Gaussian over the top PC scores; the coordinate the PC1 score
        xyz = conf.states.reshape(conf.states.shape[0], -1).double().numpy()
        mean = xyz.mean(0)
        score, fit = pca(xyz - mean, linear)  # (K, linear) scores on the unit axes (linear, 3N)
        axes = fit.components_
        sd = score.std(0)
        truth = score[gt[key][:n], :1]
        axis = np.linspace(-3, 3, grid_n)
        grid = np.stack(np.meshgrid(*[axis] * linear, indexing="ij"), -1).reshape(-1, linear) * sd
        coords = torch.as_tensor((mean + grid @ axes).reshape(len(grid), -1, 3)).float()
        lp = -0.5 * ((grid / sd) ** 2).sum(1)
        grid = torch.as_tensor(grid[:, :1])
    elif conf.mode == "ensemble":  # the grid is every model; the coordinate its PC1 score (as cryoem.evaluate)
        xyz = conf.states.reshape(conf.states.shape[0], -1).double().numpy()
        score = pca(xyz - xyz.mean(0), 1)[0][:, :1]  # (K, 1)
        truth, grid = score[gt[key][:n]], torch.as_tensor(score)
        coords = conf.coords(torch.arange(len(score)))
        w = conf.weights if conf.weights is not None else torch.ones(len(score))
        lp = np.log(w.double().numpy() / float(w.sum()) + 1e-300)
    else:
        truth = gt[key].reshape(len(gt[key]), -1)[:n]
        axis = torch.linspace(0, 1, grid_n, dtype=torch.float64)
        grid = torch.cartesian_prod(*[axis] * truth.shape[1]).reshape(-1, truth.shape[1])
        coords = conf.coords(grid if conf.mode == "hinge" else grid[:, 0])  # (G, K, 3) Å
        lp = log_prior(grid.numpy(), cfg["morph_dist"])
    H = truth.shape[1]
    extra_b = gt["particle_bfactor"] if "particle_bfactor" in gt else bfactors
    extra_b = np.zeros(len(gt["R"])) if extra_b is None else extra_b
    images = mrcfile.mmap(sim / "particles.mrcs", "r").data
    apix, box, G = float(gt["pixel_size"]), images.shape[-1], len(grid)
    out = np.empty((n, H))
    for i in range(n):
        sig = (conf.sigmas.double() ** 2 + extra_b[i] / (8 * math.pi**2)).sqrt().float()
        R = torch.as_tensor(gt["R"][i]).float().expand(G, 3, 3)
        img = project(coords, conf.amplitudes, sig, R, apix, box)
        ctf = CTFParams.from_tensor(torch.as_tensor(gt["ctf"][i:i + 1]).expand(G, -1))
        img = fourier_filter(img, apix, torch.as_tensor(gt["shift_A"][i]).float().expand(G, 2), ctf)[:, 0]
        y = torch.as_tensor(np.array(images[i]))
        logp = lp - ((img - y) ** 2).sum((1, 2)).double().numpy() / (2 * gt["noise_sigma"][i] ** 2)
        w = np.exp(logp - logp.max())
        out[i] = (w / w.sum()) @ grid.numpy()
    return out, truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sim", type=Path, help="a cryoem simulate output folder (morph, hinges or ensemble)")
    p.add_argument("--n", type=int, default=1000, help="particles (the first N)")
    p.add_argument("--grid", type=int, default=31, help="values of t per coordinate")
    p.add_argument("--bfactors", type=Path, help="per-particle B (Å², .npy) for simulations that lack them")
    p.add_argument("--linear", type=int, default=0, metavar="K",
                   help="ensembles: the ceiling of a continuous model of the top K principal components")
    a = p.parse_args()
    torch.set_num_threads(1)
    est, truth = posterior_means(a.sim, a.n, a.grid, None if a.bfactors is None else np.load(a.bfactors), a.linear)
    for h in range(truth.shape[1]):
        rho = spearmanr(est[:, h], truth[:, h])[0]
        r2 = 1 - np.var(est[:, h] - truth[:, h]) / np.var(truth[:, h])
        print(f"coordinate {h + 1}: Spearman rho {rho:.3f}, R² {r2:.3f} (posterior mean vs truth, {a.n} particles)")


if __name__ == "__main__":
    main()
