"""Build, train and reload the atom VAE from files: particles + starting model -> a run folder.

A run folder holds ``config.json`` (every setting), ``checkpoint.pt`` (scene3d trainer),
``train_log.csv`` (every loss term), ``tb/`` (TensorBoard), and ``model.json`` (what
is needed to rebuild the model: paths, atom selection, centring offset). With half-sets
it holds ``half1/`` and ``half2/``, each a full run on its half of the particles.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from cryoem.particles import ParticleSet, load_particles
from cryoem.structure import Structure, bonded_pairs, read_structure, scattering_gaussians
from cryoem.vae import AtomVAE, AtomVAEConfig, estimate_noise_sigma, latent_diagnostics
from scene3d.runinfo import UserError, atomic_write
from scene3d.trainer import TrainConfig, Trainer, load_checkpoint


@dataclass
class DataSpec:
    """Where the data come from; enough to rebuild the model and dataset later (``model.json``)."""

    particles: str
    structure: str
    atoms: str = "auto"  # auto (heavy, or ca for a C-alpha-only model) | ca | backbone | heavy
    poses: str | None = None
    ctf: str | None = None
    pixel_size: float | None = None
    datadir: str | None = None
    center: str = "centroid"  # centroid | map | none: how the model sits relative to the box centre
    chains: str | None = None  # comma-separated chain ids to model (default: all)
    lazy: bool = False


def load_data(spec: DataSpec, check_pixels: bool = True, need_poses: bool = True) -> ParticleSet:
    """Read and validate the particles; require the CTF, and poses unless ``need_poses`` is False."""
    ds = load_particles(spec.particles, pixel_size=spec.pixel_size, poses=spec.poses, ctf=spec.ctf,
                        datadir=spec.datadir, lazy=spec.lazy, check_pixels=check_pixels)
    if ds.meta.R is None and need_poses:
        raise UserError(f"{spec.particles}: the metadata has no poses; run a consensus refinement first "
                        "(RELION / cryoSPARC), give --poses pose.pkl, or try the experimental --infer-poses")
    if ds.meta.ctf is None:
        raise UserError(f"{spec.particles}: the metadata has no CTF parameters; give --ctf ctf.pkl")
    return ds


def atom_selection(atoms: str, s: Structure) -> str:
    """``--atoms`` resolved for a structure: ``auto`` is ``ca`` for a C-alpha-only model, else ``heavy``."""
    if atoms != "auto":
        return atoms
    return "ca" if s.is_ca_only() else "heavy"


def starting_model(spec: DataSpec, box: int, apix: float) -> tuple[Structure, np.ndarray, np.ndarray]:
    """The selected atoms of the starting model, centred in the box; returns (structure, x0 (N,3), offset (3,))."""
    s = read_structure(spec.structure, models="first")
    if spec.atoms not in ("auto", "ca", "backbone", "heavy"):
        raise UserError(f"--atoms: expected auto, ca, backbone or heavy, got {spec.atoms!r}")
    if s.is_ca_only() and spec.atoms not in ("auto", "ca"):
        raise UserError(f"{spec.structure}: the model has only C-alpha atoms; use --atoms ca")
    s = s.select(atom_selection(spec.atoms, s))
    if spec.chains:
        want = [c.strip() for c in spec.chains.split(",") if c.strip()]
        missing = sorted(set(want) - set(s.chain.tolist()))
        if missing:
            raise UserError(f"--chains: {spec.structure} has no chain {', '.join(missing)} "
                            f"(it has {', '.join(sorted(set(s.chain.tolist())))})")
        s = s.subset(np.flatnonzero(np.isin(s.chain, want)))
    if s.n_atoms == 0:
        raise UserError(f"{spec.structure}: no {spec.atoms} atoms in the model")
    if spec.center == "centroid":
        offset = s.coords[0].mean(0)
    elif spec.center == "map":  # coordinates fitted in a map of this box whose origin is 0
        offset = np.full(3, (box // 2) * apix)
    elif spec.center == "none":  # coordinates already relative to the box centre
        offset = np.zeros(3)
    else:
        raise UserError(f"--center: expected centroid, map or none, got {spec.center!r}")
    x0 = s.coords[0] - offset
    half = box * apix / 2
    reach = np.abs(x0).max() + 3.0
    if reach > half:
        raise UserError(f"{spec.structure}: the model reaches {reach:.1f} Å from the box centre but the box "
                        f"({box} px x {apix:.3g} Å/px) only reaches {half:.1f} Å; use a larger box or check --center")
    return s, x0, offset


def build_model(spec: DataSpec, cfg: AtomVAEConfig, ds: ParticleSet, noise_sigma: float | None = None
                ) -> tuple[AtomVAE, Structure, np.ndarray]:
    """The model for a dataset; estimates the noise sigma from up to 1,000 images unless given."""
    box, apix = ds.box, ds.pixel_size
    s, x0, offset = starting_model(spec, box, apix)
    idx, amp, sig = scattering_gaussians(s, mode="single")
    bonds = bonded_pairs(s)
    if noise_sigma is None:
        sample = np.linspace(0, len(ds) - 1, min(len(ds), 1000)).astype(int)
        noise_sigma = estimate_noise_sigma(ds.images(sample))
    model = AtomVAE(cfg, torch.as_tensor(x0), torch.as_tensor(amp), torch.as_tensor(sig),
                    torch.as_tensor(bonds), box, apix, len(ds), noise_sigma)
    return model, s, offset


def _split_halves(ds: ParticleSet, seed: int) -> list[np.ndarray]:
    """Indices of two independent halves: RELION's rlnRandomSubset when present, else a random split."""
    subset = getattr(ds.meta, "random_subset", None)
    if subset is not None and set(np.unique(subset)) == {1, 2}:
        return [np.flatnonzero(subset == 1), np.flatnonzero(subset == 2)]
    perm = np.random.default_rng(seed).permutation(len(ds))
    return [np.sort(perm[: len(ds) // 2]), np.sort(perm[len(ds) // 2:])]


def train(spec: DataSpec, cfg: AtomVAEConfig, tcfg: TrainConfig, halves: bool = False) -> dict:
    """Train one model (or two on independent halves); returns the trainer summaries."""
    ds = load_data(spec, need_poses=not cfg.infer_poses)
    out = Path(tcfg.out)
    if not halves:
        return {"full": _train_one(spec, cfg, tcfg, ds, None)}
    summary = {}
    for h, idx in enumerate(_split_halves(ds, tcfg.seed), start=1):
        sub_cfg = TrainConfig(**{**asdict(tcfg), "out": str(out / f"half{h}")})
        summary[f"half{h}"] = _train_one(spec, cfg, sub_cfg, ds, idx)
    return summary


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, idx):
        self.ds, self.idx = ds, np.asarray(idx)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.ds[int(self.idx[i])]


def _train_one(spec: DataSpec, cfg: AtomVAEConfig, tcfg: TrainConfig, ds: ParticleSet, idx) -> dict:
    model, s, offset = build_model(spec, cfg, ds)
    data = ds if idx is None else _Subset(ds, idx)
    out = Path(tcfg.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if not tcfg.resume:
        probe = torch.utils.data.default_collate([data[i] for i in range(min(256, len(data)))])
        scale = model.init_scale(probe)
        if rank0:
            print(f"image scale {scale:.4g} per unit projected density; noise sigma {float(model.noise_sigma):.4g}")
    record = {"data": asdict(spec), "model": asdict(cfg), "offset": offset.tolist(),
              "box": ds.box, "pixel_size": ds.pixel_size, "n_particles": len(ds),
              "noise_sigma": float(model.noise_sigma), "subset": None if idx is None else idx.tolist()}
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "model.json", json.dumps(record))
    trainer = Trainer(model, data, tcfg, settings={"data": asdict(spec), "model": asdict(cfg)})
    summary = trainer.fit()
    if rank0 and (out / "log.csv").is_file():
        atomic_write(out / "train_log.csv", (out / "log.csv").read_text())
    if rank0:
        diag = latent_diagnostics(model, ds, idx, n=512)
        if diag["warning"]:
            print(diag["warning"], file=sys.stderr)
        summary["collapse_warning"] = diag["warning"]
    return summary


def load_run(run: str | os.PathLike, device: str = "cpu") -> tuple[AtomVAE, dict, ParticleSet, Structure]:
    """Rebuild a trained model, its record, its particles and the selected starting model from a run folder."""
    run = Path(run)
    if not (run / "model.json").is_file():
        raise UserError(f"{run}: not an atom-VAE run folder (no model.json)")
    rec = json.loads((run / "model.json").read_text())
    spec = DataSpec(**rec["data"])
    # runs written before the reference channel, and before the Laplace posterior, existed
    saved = {"enc_reference": False, "posterior": "amortized", "dec_scale": 1.0, "whiten_every": 0,
             "warm_start": False, **rec["model"]}
    cfg = AtomVAEConfig(**{f.name: saved[f.name] for f in fields(AtomVAEConfig) if f.name in saved})
    ds = load_data(spec, check_pixels=False, need_poses=not cfg.infer_poses)
    model, s, _ = build_model(spec, cfg, ds, noise_sigma=rec["noise_sigma"])
    state = load_checkpoint(run, map_location=device)["model"]
    for k in ("z_last", "z_seen", "prior_var"):  # runs written before the warm starts (none remembered) or the
        state.setdefault(k, getattr(model, k))    # structural latent axes (prior N(0, I))
    model.load_state_dict(state)
    return model.to(device).eval(), rec, ds, s
