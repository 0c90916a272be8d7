"""Score a trained atom VAE against the ground truth of a ``cryoem simulate`` run.

Works for every kind of simulation: a morph (one coordinate t), hinges (one t per hinge)
and ensembles (a model index per particle; its true coordinate is the model's score on
the ensemble's first principal component).

* ``abs_spearman``: Spearman |rho| between latent PC1 and the true coordinate (the first
  one, for several hinges).
* ``r2``: per true coordinate, the R² of a linear map from z to it (5-fold cross-validated).
* Per bin of the truth (deciles of t; a 3 x 3 grid of two hinge coordinates; each
  ensemble model with at least 20 particles): decode the bin's mean latent; C-alpha RMSD
  (after superposition) to the true model, beside the starting model's RMSD to it;
  optionally FSC / AU-FSC between the decoded and true maps.
* ``ratio_far``: decoded over starting RMSD, averaged over the bins more than 2 Å from the start.

The true model of a bin is interpolated (linearly, or bilinearly on a 2-D grid) between the
models of ``gt_models.pdb`` at their ``model_labels``: exact for a morph, within ~0.1 Å for
hinges (``gt_models.pdb`` samples each hinge finely enough).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from cryoem.analyze import decode, pca
from cryoem.metrics import fsc_report
from cryoem.structure import Structure, match_atoms, read_structure, rmsd
from plato_core.runinfo import UserError, atomic_write
from renderers.gaussian import gaussian_density_map


@dataclass
class Truth:
    """Ground truth of a simulation: ``coord`` (N, d) per particle, and how to build the true model."""

    kind: str  # morph | hinge | ensemble
    coord: np.ndarray  # (N, d) true coordinates the latent is scored against
    labels: np.ndarray  # (N,) model index (ensemble) or (N, d) t values
    models: Structure  # gt_models.pdb
    model_labels: np.ndarray  # label of each model: (M,) index or t, or (M, d) grid of t

    def model_at(self, label) -> np.ndarray:
        """True coordinates (N_atoms, 3) at a label (ensemble: a model index; else t of shape (d,))."""
        xyz = self.models.coords
        if self.kind == "ensemble":
            return xyz[int(label)]
        t = np.atleast_1d(np.asarray(label, dtype=np.float64))
        grid = self.model_labels.reshape(len(xyz), -1)
        axes = [np.unique(grid[:, k]) for k in range(grid.shape[1])]
        out = np.zeros_like(xyz[0])
        for corner in np.ndindex(*(2,) * len(axes)):  # (bi)linear interpolation on the grid of models
            w, key = 1.0, []
            for k, ax in enumerate(axes):
                i = int(np.clip(np.searchsorted(ax, t[k]) - 1, 0, len(ax) - 2))
                f = (t[k] - ax[i]) / (ax[i + 1] - ax[i])
                w *= f if corner[k] else 1 - f
                key.append(ax[i + corner[k]])
            out += w * xyz[int(np.flatnonzero((grid == key).all(1))[0])]
        return out

    def bins(self) -> list[tuple[str, np.ndarray, object]]:
        """(name, particle mask, label of the true model) for each bin with particles."""
        out = []
        if self.kind == "ensemble":
            for m in np.unique(self.labels):
                sel = self.labels == m
                if sel.sum() >= 20:
                    out.append((f"model {m + 1}", sel, int(m)))
            return out
        t = self.labels.reshape(len(self.labels), -1)
        n = 10 if t.shape[1] == 1 else 3
        idx = np.minimum((t * n).astype(int), n - 1)  # value bins: [k/n, (k+1)/n), the last one closed
        for key in np.ndindex(*(n,) * t.shape[1]):
            sel = (idx == key).all(1)
            if sel.any():
                out.append(("/".join(str(k) for k in key), sel, t[sel].mean(0)))
        return out


def truth(sim_dir: Path) -> Truth:
    """Read ``ground_truth.npz`` and ``gt_models.pdb`` of a simulation folder."""
    sim_dir = Path(sim_dir)
    if not (sim_dir / "ground_truth.npz").is_file():
        raise UserError(f"{sim_dir}: no ground_truth.npz (not a `cryoem simulate` folder)")
    gt = np.load(sim_dir / "ground_truth.npz")
    models = read_structure(sim_dir / "gt_models.pdb")
    if "model_index" in gt:
        labels = gt["model_index"]
        xyz = models.coords.reshape(models.n_models, -1)
        pc1 = pca(xyz - xyz.mean(0), 1)[0][:, 0]
        return Truth("ensemble", pc1[labels][:, None], labels, models, np.arange(models.n_models))
    kind = "hinge" if "hinge_t" in gt else "morph"
    t = gt["hinge_t"] if kind == "hinge" else gt["morph_t"]
    model_labels = gt["model_labels"] if "model_labels" in gt else np.linspace(0, 1, models.n_models)
    return Truth(kind, t.reshape(len(t), -1), t, models, model_labels)


def matched(model_structure: Structure, models: Structure) -> tuple[np.ndarray, np.ndarray]:
    """Atom indices pairing the decoded model with the truth; every modelled atom must match."""
    ia, ib = match_atoms(model_structure, models)
    if len(ia) != model_structure.n_atoms:
        raise UserError(f"the starting model's atoms are not all matched in gt_models.pdb "
                        f"({model_structure.n_atoms - len(ia)} of {model_structure.n_atoms} unmatched); "
                        "select the same chains and atoms as the simulation (--chains, --atoms)")
    return ia, ib


def truth_map(sim_dir: Path, models: Structure, coords: np.ndarray, box: int, apix: float) -> np.ndarray:
    """The true map of atoms ``coords`` (N, 3) of ``models``: the simulation's Gaussians (its B-factor), box-centred."""
    from cryoem.structure import scattering_gaussians

    cfg = json.loads((Path(sim_dir) / "config.json").read_text()).get("settings", {})
    _, amp, sig = scattering_gaussians(models, bfactor=float(cfg.get("bfactor", 30.0)))
    return map_of(coords, torch.as_tensor(amp, dtype=torch.float32), torch.as_tensor(sig, dtype=torch.float32),
                  box, apix, np.zeros(3))


def map_of(coords: np.ndarray, amplitudes: torch.Tensor, sigmas: torch.Tensor, box: int, apix: float,
           centre: np.ndarray) -> np.ndarray:
    """Density map (box³) of coordinates (N, 3) Å; ``centre`` sits at voxel box // 2."""
    c = torch.as_tensor(coords - centre, dtype=torch.float32)
    return gaussian_density_map(c, amplitudes, sigmas, box, apix).numpy()


def linear_r2(latents: np.ndarray, target: np.ndarray) -> list[float]:
    """Cross-validated (5-fold) R² of a linear map from latents (N, zdim) to each column of ``target`` (N, d)."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_predict

    folds = KFold(5, shuffle=True, random_state=0)
    pred = cross_val_predict(LinearRegression(), latents, target, cv=folds)
    ss = ((target - target.mean(0)) ** 2).sum(0)
    return (1 - ((target - pred) ** 2).sum(0) / np.maximum(ss, 1e-12)).tolist()


def evaluate(model, rec: dict, structure: Structure, latents: np.ndarray, sim_dir: str | Path,
             decoded_maps: bool = True) -> dict:
    """The acceptance numbers for one run; ``latents`` (N, zdim) in particle order."""
    sim_dir = Path(sim_dir)
    tr = truth(sim_dir)
    if len(tr.coord) != len(latents):
        raise UserError(f"{sim_dir}: {len(tr.coord)} ground-truth particles but {len(latents)} latents")
    ia, ib = matched(structure, tr.models)
    ca = structure.name[ia] == "CA"
    scores, _ = pca(latents, 1)
    rho = float(spearmanr(scores[:, 0], tr.coord[:, 0]).statistic)
    start = structure.coords[0][ia]
    offset = np.asarray(rec["offset"])
    rows = []
    for name, sel, label in tr.bins():
        true = tr.model_at(label)[ib]
        z_bin = latents[sel].mean(0, keepdims=True)
        dec = decode(model, z_bin, offset)[0][ia]
        r_dec = float(rmsd(torch.as_tensor(dec[ca]), torch.as_tensor(true[ca])))
        r_start = float(rmsd(torch.as_tensor(start[ca]), torch.as_tensor(true[ca])))
        row = {"bin": name, "n": int(sel.sum()), "rmsd_decoded_A": r_dec, "rmsd_start_A": r_start}
        if tr.kind != "ensemble":
            row["t_mean"] = [float(v) for v in np.atleast_1d(label)]
        if decoded_maps:  # decoded atoms with the model's Gaussians vs the simulation's own map
            m_true = truth_map(sim_dir, tr.models, tr.model_at(label), model.box, model.apix)  # gt_models: box-centred
            full = decode(model, z_bin, np.zeros(3))[0]
            m_dec = map_of(full, model.amplitudes.cpu(), model.sigmas.cpu(), model.box, model.apix, np.zeros(3))
            rep = fsc_report(m_dec, m_true, model.apix)
            row.update({f"map_{k}": float(rep[k]) for k in ("res_0.5", "res_0.143", "au_fsc", "map_corr")})
        rows.append(row)
    far = [r for r in rows if r["rmsd_start_A"] > 2.0]
    out = {"kind": tr.kind, "spearman_pc1_vs_t": rho, "abs_spearman": abs(rho), "r2": linear_r2(latents, tr.coord),
           "bins": rows,
           "mean_rmsd_decoded_far_A": float(np.mean([r["rmsd_decoded_A"] for r in far])) if far else None,
           "mean_rmsd_start_far_A": float(np.mean([r["rmsd_start_A"] for r in far])) if far else None}
    if far:
        out["ratio_far"] = out["mean_rmsd_decoded_far_A"] / out["mean_rmsd_start_far_A"]
    return out


def print_table(result: dict) -> None:
    print(f"Spearman |rho|(latent PC1, true coordinate) = {result['abs_spearman']:.3f}; "
          f"linear R² of each true coordinate from z: {', '.join(f'{v:.3f}' for v in result['r2'])}")
    print(f"{'bin':>10s} {'n':>6s} {'RMSD decoded':>13s} {'RMSD start':>11s}" +
          (f" {'AU-FSC':>7s}" if "map_au_fsc" in result["bins"][0] else ""))
    for r in result["bins"]:
        print(f"{r['bin']:>10s} {r['n']:6d} {r['rmsd_decoded_A']:13.2f} {r['rmsd_start_A']:11.2f}" +
              (f" {r['map_au_fsc']:7.3f}" if "map_au_fsc" in r else ""))
    if result.get("ratio_far") is not None:
        print(f"bins > 2 Å from the start: mean RMSD decoded {result['mean_rmsd_decoded_far_A']:.2f} Å vs "
              f"start {result['mean_rmsd_start_far_A']:.2f} Å (ratio {result['ratio_far']:.3f}; target <= 0.333)")


def main(argv=None) -> int:
    import argparse

    from cryoem.analyze import posterior_means
    from cryoem.train import load_run

    p = argparse.ArgumentParser(prog="python -m cryoem.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--sim", required=True, help="the `cryoem simulate` output folder")
    p.add_argument("--no-maps", action="store_true", help="skip the per-bin map FSC (faster)")
    a = p.parse_args(argv)
    model, rec, ds, s = load_run(a.run)
    lat_path = Path(a.run) / "analysis" / "latents.npy"
    z = np.load(lat_path) if lat_path.is_file() else posterior_means(model, ds)[0]
    res = evaluate(model, rec, s, z, a.sim, decoded_maps=not a.no_maps)
    print_table(res)
    atomic_write(Path(a.run) / "evaluation.json", json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    from plato_core.runinfo import run_cli

    raise SystemExit(run_cli(main))
