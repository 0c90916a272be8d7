"""Score a trained atom VAE against the ground truth of a ``cryoem simulate --morph`` run.

* Spearman |rho| between latent PC1 and the true morph coordinate t.
* Per decile of t: decode the decile's mean latent; C-alpha RMSD (after superposition)
  to the true model at the decile's mean t, beside the starting model's RMSD to it.
* Per decile: FSC / AU-FSC between the decoded model's map and the true model's map.

The true model at t is ``(1 - t) A + t B`` with A, B the first and last models of the
simulation's ``gt_models.pdb`` (the simulator morphs linearly).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from cryoem.analyze import decode, pca
from cryoem.metrics import fsc_report
from cryoem.structure import Structure, match_atoms, read_structure, rmsd
from renderers.gaussian import gaussian_density_map
from scene3d.runinfo import UserError, atomic_write


def truth(sim_dir: Path) -> tuple[np.ndarray, Structure]:
    """Per-particle morph coordinate t (N,) and the two end states (a 2-model Structure)."""
    gt = np.load(sim_dir / "ground_truth.npz")
    if "morph_t" not in gt:
        raise UserError(f"{sim_dir}/ground_truth.npz: not a morph simulation (no morph_t)")
    models = read_structure(sim_dir / "gt_models.pdb")
    return gt["morph_t"], models.subset(models=[0, models.n_models - 1])


def matched(model_structure: Structure, ends: Structure) -> tuple[np.ndarray, np.ndarray]:
    """Atom indices pairing the decoded model with the truth; every modelled atom must match."""
    ia, ib = match_atoms(model_structure, ends)
    if len(ia) != model_structure.n_atoms:
        raise UserError(f"the starting model's atoms are not all matched in gt_models.pdb "
                        f"({model_structure.n_atoms - len(ia)} of {model_structure.n_atoms} unmatched); "
                        "select the same chains and atoms as the simulation (--chains, --atoms)")
    return ia, ib


def truth_map(sim_dir: Path, ends: Structure, t: float, box: int, apix: float) -> np.ndarray:
    """The true map at morph coordinate ``t``: the simulation's atoms and Gaussians (its B-factor), box-centred."""
    from cryoem.structure import scattering_gaussians

    cfg = json.loads((sim_dir / "config.json").read_text()).get("settings", {})
    _, amp, sig = scattering_gaussians(ends, bfactor=float(cfg.get("bfactor", 30.0)))
    coords = (1 - t) * ends.coords[0] + t * ends.coords[1]
    return map_of(coords, torch.as_tensor(amp, dtype=torch.float32), torch.as_tensor(sig, dtype=torch.float32),
                  box, apix, np.zeros(3))


def map_of(coords: np.ndarray, amplitudes: torch.Tensor, sigmas: torch.Tensor, box: int, apix: float,
           centre: np.ndarray) -> np.ndarray:
    """Density map (box³) of coordinates (N, 3) Å; ``centre`` sits at voxel box // 2."""
    c = torch.as_tensor(coords - centre, dtype=torch.float32)
    return gaussian_density_map(c, amplitudes, sigmas, box, apix).numpy()


def evaluate(model, rec: dict, structure: Structure, latents: np.ndarray, sim_dir: str | Path,
             decoded_maps: bool = True) -> dict:
    """The acceptance numbers for one run; ``latents`` (N, zdim) in particle order."""
    sim_dir = Path(sim_dir)
    t, ends = truth(sim_dir)
    if len(t) != len(latents):
        raise UserError(f"{sim_dir}: {len(t)} ground-truth particles but {len(latents)} latents")
    ia, ib = matched(structure, ends)
    A, B = ends.coords[0][ib], ends.coords[1][ib]
    ca = structure.name[ia] == "CA"
    scores, _ = pca(latents, 1)
    rho = float(spearmanr(scores[:, 0], t).statistic)
    start = structure.coords[0][ia]
    offset = np.asarray(rec["offset"])
    rows = []
    for d in range(10):
        sel = (t >= d / 10) & ((t < (d + 1) / 10) if d < 9 else (t <= 1))
        if not sel.any():
            continue
        tm = float(t[sel].mean())
        true = (1 - tm) * A + tm * B
        dec = decode(model, latents[sel].mean(0, keepdims=True), offset)[0][ia]
        r_dec = float(rmsd(torch.as_tensor(dec[ca]), torch.as_tensor(true[ca])))
        r_start = float(rmsd(torch.as_tensor(start[ca]), torch.as_tensor(true[ca])))
        row = {"decile": d, "n": int(sel.sum()), "t_mean": tm, "rmsd_decoded_A": r_dec, "rmsd_start_A": r_start}
        if decoded_maps:  # decoded atoms with the model's Gaussians vs the simulation's own map
            m_true = truth_map(sim_dir, ends, tm, model.box, model.apix)
            full = decode(model, latents[sel].mean(0, keepdims=True), np.zeros(3))[0]
            m_dec = map_of(full, model.amplitudes.cpu(), model.sigmas.cpu(), model.box, model.apix, np.zeros(3))
            rep = fsc_report(m_dec, m_true, model.apix)
            row.update({f"map_{k}": float(rep[k]) for k in ("res_0.5", "res_0.143", "au_fsc", "map_corr")})
        rows.append(row)
    far = [r for r in rows if r["rmsd_start_A"] > 2.0]
    out = {"spearman_pc1_vs_t": rho, "abs_spearman": abs(rho), "deciles": rows,
           "mean_rmsd_decoded_far_A": float(np.mean([r["rmsd_decoded_A"] for r in far])) if far else None,
           "mean_rmsd_start_far_A": float(np.mean([r["rmsd_start_A"] for r in far])) if far else None}
    if far:
        out["ratio_far"] = out["mean_rmsd_decoded_far_A"] / out["mean_rmsd_start_far_A"]
    return out


def print_table(result: dict) -> None:
    print(f"Spearman |rho|(latent PC1, true t) = {result['abs_spearman']:.3f}")
    keys = [k for k in result["deciles"][0] if k != "decile"]
    print("decile " + " ".join(f"{k:>16s}" for k in keys))
    for r in result["deciles"]:
        print(f"{r['decile']:6d} " + " ".join(f"{r[k]:16.3f}" if isinstance(r[k], float) else f"{r[k]:16}"
                                         for k in keys))
    if result.get("ratio_far") is not None:
        print(f"deciles > 2 Å from the start: mean RMSD decoded {result['mean_rmsd_decoded_far_A']:.2f} Å vs "
              f"start {result['mean_rmsd_start_far_A']:.2f} Å (ratio {result['ratio_far']:.3f}; target <= 0.333)")


def main(argv=None) -> int:
    import argparse

    from cryoem.analyze import encode_all
    from cryoem.train import load_run

    p = argparse.ArgumentParser(prog="python -m cryoem.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--sim", required=True, help="the `cryoem simulate --morph` output folder")
    a = p.parse_args(argv)
    model, rec, ds, s = load_run(a.run)
    lat_path = Path(a.run) / "analysis" / "latents.npy"
    z = np.load(lat_path) if lat_path.is_file() else encode_all(model, ds)
    res = evaluate(model, rec, s, z, a.sim)
    print_table(res)
    atomic_write(Path(a.run) / "evaluation.json", json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    from scene3d.runinfo import run_cli

    raise SystemExit(run_cli(main))
