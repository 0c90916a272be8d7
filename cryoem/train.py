"""Build, train and reload the atom VAE from files: particles + starting model -> a run folder.

A run folder holds ``config.json`` (every setting), ``checkpoint.pt`` (scene3d trainer),
``train_log.csv`` (every loss term), ``tb/`` (TensorBoard), and ``model.json`` (what
is needed to rebuild the model: absolute data paths, atom selection, centring offset). With half-sets
it holds ``half1/`` and ``half2/``, each a full run on its half of the particles.

The output folder follows ``plato_core.runinfo.check_out_dir``: ``--out`` must be new or empty, unless
``--resume`` continues the run in it (with the same model settings, checked against its ``model.json``)
or ``--overwrite`` replaces it. Nothing is written before every check has passed.

A run loads from any working directory: new runs record absolute paths; for runs that recorded relative
paths, ``load_run`` tries the working directory, then each ancestor of the run folder, nearest first.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from cryoem.particles import ParticleSet, ParticleSubset, load_particles
from cryoem.structure import Structure, bonded_pairs, read_structure, residue_groups, scattering_gaussians
from cryoem.vae import AtomVAE, AtomVAEConfig, estimate_noise_sigma, latent_diagnostics
from plato_core.runinfo import (
    UserError,
    atomic_write,
    available_memory,
    check_out_dir,
    read_json,
    remove_outputs,
    settings_diff,
)
from plato_core.settings import SettingError
from plato_core.trainer import CHECKPOINT, RUN_FILES, TrainConfig, Trainer, load_checkpoint

PATH_FIELDS = ("particles", "structure", "poses", "ctf", "datadir", "passthrough")  # DataSpec fields that name files
# what a run writes into --out (with the trainer's files); --overwrite deletes these first
RUN_OUTPUTS = ("model.json", "train_log.csv", "half1", "half2", "analysis", *RUN_FILES)
# settings of runs written before they existed: the behaviour those runs had
OLD_MODEL_DEFAULTS = {"enc_reference": False, "posterior": "amortized", "dec_scale": 1.0, "whiten_every": 0,
                      "warm_start": False, "particle_nuisance": False, "dec_smooth": 0.0,
                      "dec_rigid": (), "search": 0}


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
    lazy: bool | None = None  # read the images from the stacks as needed; None: when they would not fit
    passthrough: str | None = None  # a cryoSPARC passthrough .cs (None: found beside the particle file)


def absolute_spec(spec: DataSpec) -> DataSpec:
    """``spec`` with every path made absolute (from the working directory), so that a run loads from anywhere."""
    return DataSpec(**{**asdict(spec), **{k: os.path.abspath(getattr(spec, k)) for k in PATH_FIELDS
                                          if getattr(spec, k) is not None}})


def load_data(spec: DataSpec, pixels: str = "sample", need_poses: bool = True) -> ParticleSet:
    """Read and validate the particles (``pixels``: see ``cryoem.particles.validate``), images left in their
    stacks (:func:`load_images` loads them); require the CTF, and poses unless ``need_poses`` is False."""
    ds = load_particles(spec.particles, pixel_size=spec.pixel_size, poses=spec.poses, ctf=spec.ctf,
                        datadir=spec.datadir, passthrough=spec.passthrough, lazy=True, pixels=pixels)
    if ds.meta.R is None and need_poses:
        raise SettingError("poses", f"{spec.particles} has no poses; run a consensus refinement first "
                                    "(RELION / cryoSPARC), give a poses file (`poses` pose.pkl), or try the "
                                    "experimental `infer_poses`")
    if ds.meta.ctf is None:
        raise SettingError("ctf", f"{spec.particles} has no CTF parameters; give a CTF file (`ctf` ctf.pkl)")
    return ds


def load_images(ds: ParticleSet, lazy: bool | None, progress: bool = False) -> ParticleSet:
    """``ds`` with its images loaded into memory, unless ``lazy`` (None: :func:`stream_images` decides)."""
    if lazy or (lazy is None and stream_images(ds)):
        return ds
    return ParticleSet(ds.meta, lazy=False, progress=progress and len(ds) >= 100_000)  # a bar where it takes seconds


def stream_images(ds: ParticleSet, share: float = 0.25) -> bool:
    """Whether to read ``ds``'s images from their stacks during training (memory O(batch), read
    ahead by DataLoader workers) rather than load them: when they would fill more than ``share`` of the memory
    available now, as float32."""
    return len(ds) * ds.box**2 * 4 > share * available_memory()


def atom_selection(atoms: str, s: Structure) -> str:
    """``--atoms`` resolved for a structure: ``auto`` is ``ca`` for a C-alpha-only model, else ``heavy``."""
    if atoms != "auto":
        return atoms
    return "ca" if s.is_ca_only() else "heavy"


def starting_model(spec: DataSpec, box: int, apix: float) -> tuple[Structure, np.ndarray, np.ndarray]:
    """The selected atoms of the starting model, centred in the box; returns (structure, x0 (N,3), offset (3,))."""
    s = read_structure(spec.structure, models="first")
    if spec.atoms not in ("auto", "ca", "backbone", "heavy"):
        raise SettingError("atoms", f"expected auto, ca, backbone or heavy, got {spec.atoms!r}")
    if s.is_ca_only() and spec.atoms not in ("auto", "ca"):
        raise SettingError("atoms", f"{spec.structure} has only C-alpha atoms; use `atoms` ca")
    s = s.select(atom_selection(spec.atoms, s))
    if spec.chains:
        want = [c.strip() for c in spec.chains.split(",") if c.strip()]
        missing = sorted(set(want) - set(s.chain.tolist()))
        if missing:
            raise SettingError("chains", f"{spec.structure} has no chain {', '.join(missing)} "
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
        raise SettingError("center", f"expected centroid, map or none, got {spec.center!r}")
    x0 = s.coords[0] - offset
    half = box * apix / 2
    reach = np.abs(x0).max() + 3.0
    if reach > half:
        raise UserError(f"{spec.structure}: the model reaches {reach:.1f} Å from the box centre but the box "
                        f"({box} px x {apix:.3g} Å/px) only reaches {half:.1f} Å; use a larger box or check `center`")
    return s, x0, offset


def build_model(spec: DataSpec, cfg: AtomVAEConfig, ds: ParticleSet, noise_sigma: float | None = None
                ) -> tuple[AtomVAE, Structure, np.ndarray]:
    """The model for a dataset; estimates the noise sigma from up to 1,000 images unless given."""
    if noise_sigma is None:
        sample = np.linspace(0, len(ds) - 1, min(len(ds), 1000)).astype(int)
        noise_sigma = estimate_noise_sigma(ds.images(sample))
    return _model(spec, cfg, ds.box, ds.pixel_size, len(ds), noise_sigma)


def _model(spec: DataSpec, cfg: AtomVAEConfig, box: int, apix: float, n_particles: int, noise_sigma: float
           ) -> tuple[AtomVAE, Structure, np.ndarray]:
    """The model for images of ``box`` px at ``apix`` Å/px; returns (model, selected structure, offset (3,) Å)."""
    s, x0, offset = starting_model(spec, box, apix)
    idx, amp, sig = scattering_gaussians(s, mode="single")
    bonds = bonded_pairs(s)
    groups, labels = residue_groups(s)
    chains = np.unique([lab.split(":")[0] for lab in labels], return_inverse=True)[1]  # (R,) each residue's chain
    model = AtomVAE(cfg, torch.as_tensor(x0), torch.as_tensor(amp), torch.as_tensor(sig),
                    torch.as_tensor(bonds), box, apix, n_particles, noise_sigma,
                    torch.as_tensor(groups), torch.as_tensor(chains))
    return model, s, offset


def _split_halves(ds: ParticleSet, seed: int) -> list[np.ndarray]:
    """Indices of two independent halves: RELION's rlnRandomSubset when present, else a random split."""
    subset = ds.meta.random_subset
    if subset is not None and set(np.unique(subset)) == {1, 2}:
        return [np.flatnonzero(subset == 1), np.flatnonzero(subset == 2)]
    perm = np.random.default_rng(seed).permutation(len(ds))
    return [np.sort(perm[: len(ds) // 2]), np.sort(perm[len(ds) // 2:])]


def train(spec: DataSpec, cfg: AtomVAEConfig, tcfg: TrainConfig, halves: bool = False, workers: int | None = None
          ) -> dict:
    """Train one model (or two on independent halves); returns the trainer summaries.

    ``workers``: DataLoader processes that read batches ahead; None: one when the images stream from their
    stacks (``spec.lazy``, or too large to load: :func:`stream_images`), else none.

    Every check (output folder, data, starting model, ``--resume`` settings) runs before anything is written;
    ``tcfg.overwrite`` then deletes the previous run's files (:data:`RUN_OUTPUTS` and the trainer's).
    """
    spec = absolute_spec(spec)
    out = check_out_dir(tcfg.out, tcfg.resume, tcfg.overwrite, run_file="half1/model.json" if halves else "model.json")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    ds = load_data(spec, need_poses=not cfg.infer_poses)
    starting_model(spec, ds.box, ds.pixel_size)  # fits the box: checked before any image is loaded
    parts = {"full": (out, None)} if not halves else {
        f"half{h}": (out / f"half{h}", idx) for h, idx in enumerate(_split_halves(ds, tcfg.seed), start=1)}
    for folder, idx in parts.values():
        if idx is not None and len(idx) < tcfg.batch_size:  # half 2's trainer would say so after half 1 ran
            raise SettingError("batch_size", f"{tcfg.batch_size}, but {folder.name} has only {len(idx)} particles")
        if tcfg.resume and (folder / "model.json").is_file():
            check_same_run(folder, spec, cfg, ds)
    ds = load_images(ds, spec.lazy, progress=tcfg.progress and rank0)
    tcfg = replace(tcfg, workers=(1 if ds.lazy else 0) if workers is None else workers)
    if rank0:
        print(f"particles: {len(ds)} read from {ds.meta.provenance_line()}"
              + (f"; streamed from the stacks by {tcfg.workers} reader process(es)" if ds.lazy else ""))
    summary = {}
    for i, (name, (folder, idx)) in enumerate(parts.items()):
        # a half-set run stopped during half 1 has no half2 yet: that half starts afresh
        resume = tcfg.resume and (idx is None or folder.exists())
        sub = TrainConfig(**{**asdict(tcfg), "out": str(folder), "resume": resume})
        clear = (lambda: remove_outputs(out, RUN_OUTPUTS)) if tcfg.overwrite and i == 0 else None
        summary[name] = _train_one(spec, cfg, sub, ds, idx, before_fit=clear)
    return summary


def check_same_run(run: Path, spec: DataSpec, cfg: AtomVAEConfig, ds: ParticleSet) -> None:
    """``--resume``: the run in ``run`` must have these model settings and this data; else one line naming
    each difference (``setting: run has A, given B``)."""
    rec = read_record(run)
    diff = settings_diff(_saved_model(rec), asdict(cfg))
    old = rec["data"]
    for key in ("atoms", "center", "chains"):
        if key in old and old[key] != getattr(spec, key):
            diff.append(f"{key}: run has {old[key]!r}, given {getattr(spec, key)!r}")
    recorded = _find_recorded(old["structure"], run, "structure", must_exist=False)
    if Path(spec.structure).is_file() and not (Path(recorded).is_file() and os.path.samefile(recorded, spec.structure)):
        diff.append(f"structure: run has {old['structure']!r}, given {spec.structure!r}")
    for key, now in (("box", ds.box), ("n_particles", len(ds))):
        if key in rec and rec[key] != now:
            diff.append(f"{key}: run has {rec[key]!r}, the particles give {now!r}")
    if "pixel_size" in rec and abs(rec["pixel_size"] - ds.pixel_size) > 1e-4 * rec["pixel_size"]:
        diff.append(f"pixel_size: run has {rec['pixel_size']!r}, the particles give {ds.pixel_size!r}")
    if diff:
        raise SettingError("resume", f"{run} is a run with other settings: {'; '.join(diff)} (resume with the "
                                     "run's settings, or start a new output folder)")


def _train_one(spec: DataSpec, cfg: AtomVAEConfig, tcfg: TrainConfig, ds: ParticleSet, idx,
               before_fit=None) -> dict:
    """One run in ``tcfg.out``; ``before_fit`` (rank 0) runs after the trainer's checks, before any write."""
    model, s, offset = build_model(spec, cfg, ds)
    data = ds if idx is None else ParticleSubset(ds, idx)
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
    trainer = Trainer(model, data, tcfg, settings={"data": asdict(spec), "model": asdict(cfg)},
                      files={"model.json": json.dumps(record)})  # written by fit, after the first batch's check
    if rank0 and before_fit is not None:
        before_fit()
    summary = trainer.fit()
    if rank0 and (out / "log.csv").is_file():
        atomic_write(out / "train_log.csv", (out / "log.csv").read_text())
    if rank0:
        diag = latent_diagnostics(model, ds, idx, n=512)
        if diag["warning"]:
            print(diag["warning"], file=sys.stderr)
        summary["collapse_warning"] = diag["warning"]
    return summary


def read_record(run: str | os.PathLike) -> dict:
    """``RUN/model.json``, checked: a dict with ``data`` (particles, structure), ``model``, ``offset`` (3 numbers)
    and ``noise_sigma`` (> 0). A damaged file is one ``UserError`` line naming it."""
    path = Path(run) / "model.json"
    if not path.is_file():
        raise UserError(f"{run}: no model.json, the atom-VAE run record that cryoem train (cryoem.train.train) "
                        "writes; a model trained with the Trainer alone reloads with build_model and "
                        "load_state_dict(load_checkpoint(run)['model'])")
    rec = read_json(path)
    problem = None
    if not isinstance(rec, dict) or not isinstance(rec.get("data"), dict) or not isinstance(rec.get("model"), dict):
        problem = "expected an object with 'data' and 'model' objects"
    elif not all(isinstance(rec["data"].get(k), str) for k in ("particles", "structure")):
        problem = "'data' lacks the 'particles' and 'structure' paths"
    elif not (isinstance(rec.get("offset"), list) and len(rec["offset"]) == 3
              and all(isinstance(v, (int, float)) and np.isfinite(v) for v in rec["offset"])):
        problem = f"'offset': expected 3 finite numbers, got {rec.get('offset')!r}"
    elif not (isinstance(rec.get("noise_sigma"), (int, float)) and rec["noise_sigma"] > 0):
        problem = f"'noise_sigma': expected a positive number, got {rec.get('noise_sigma')!r}"
    if problem:
        raise UserError(f"{path}: not an atom-VAE run record: {problem}")
    return rec


def _saved_model(rec: dict) -> dict:
    """The run's model settings, with the behaviour of older runs for settings they predate."""
    return {**OLD_MODEL_DEFAULTS, **rec["model"]}


def _find_recorded(path: str, run: Path, what: str, must_exist: bool = True, folder: bool = False) -> str:
    """A path recorded in ``run/model.json``: absolute as it is; a relative one (older runs) from the working
    directory, else from each ancestor of the run folder, nearest first."""
    p = Path(path)
    if p.is_absolute():
        return path
    exists = Path.is_dir if folder else Path.is_file
    tried = [Path.cwd(), *Path(os.path.abspath(run)).parents]
    for base in tried:
        if exists(base / p):
            return str(base / p)
    if not must_exist:
        return path
    hint = f"; pass --{what} to say where it is now" if what in ("particles", "datadir") else ""
    raise UserError(f"{Path(run) / 'model.json'}: {what} {path} not found from the working directory or any "
                    f"folder above the run{hint}")


def run_spec(run: str | os.PathLike, rec: dict, particles: str | None = None, datadir: str | None = None,
             need_data: bool = True) -> DataSpec:
    """The run's ``DataSpec`` with its paths found (see :func:`_find_recorded`), ``particles`` / ``datadir``
    replacing the recorded ones when the data have moved. ``need_data=False``: only the starting model must
    be found (the particle files may be gone)."""
    known = {f.name for f in fields(DataSpec)}
    data = {k: v for k, v in rec["data"].items() if k in known}
    if particles is not None:
        data["particles"] = os.path.abspath(particles)
    if datadir is not None:
        data["datadir"] = os.path.abspath(datadir)
    for k in PATH_FIELDS:
        overridden = (k == "particles" and particles is not None) or (k == "datadir" and datadir is not None)
        if data.get(k) is not None and not overridden:
            data[k] = _find_recorded(data[k], Path(run), k, folder=k == "datadir",
                                     must_exist=need_data or k == "structure")
    return DataSpec(**data)


def load_model(run: str | os.PathLike, device: str = "cpu") -> tuple[AtomVAE, dict, Structure]:
    """Rebuild a trained model from its run folder without reading any particle image: (model in eval mode,
    the run record ``model.json``, the selected starting model). Needs the starting model's file."""
    run = Path(run)
    rec = read_record(run)
    cfg = _run_model_config(run, rec)
    has_shape = all(k in rec for k in ("box", "pixel_size", "n_particles"))
    spec = run_spec(run, rec, need_data=not has_shape)
    if has_shape:
        model, s, _ = _model(spec, cfg, rec["box"], rec["pixel_size"], rec["n_particles"], rec["noise_sigma"])
    else:  # runs that predate these records: the particle file's header says
        model, s, _ = build_model(spec, cfg, load_data(spec, pixels="none", need_poses=False),
                                  noise_sigma=rec["noise_sigma"])
    _load_weights(model, run, device)
    return model.to(device).eval(), rec, s


def load_run(run: str | os.PathLike, device: str = "cpu", particles: str | None = None,
             datadir: str | None = None) -> tuple[AtomVAE, dict, ParticleSet, Structure]:
    """:func:`load_model` and the run's particles (for encoding them): (model, record, particles, structure).

    ``particles`` / ``datadir`` replace the recorded particle file / stack folder when the data have moved;
    the particles must still be the run's (same count and box).
    """
    model, rec, s = load_model(run, device)
    spec = run_spec(run, rec, particles, datadir)
    ds = load_data(spec, pixels="none", need_poses=not model.cfg.infer_poses)  # streamed: each image is read once
    for key, now in (("n_particles", len(ds)), ("box", ds.box)):
        if key in rec and rec[key] != now:
            raise UserError(f"{spec.particles}: {key} {now}, but the run {run} was trained on {rec[key]}; "
                            "give the run's particles")
    return model, rec, ds, s


def _run_model_config(run: Path, rec: dict) -> AtomVAEConfig:
    try:
        saved = _saved_model(rec)
        return AtomVAEConfig(**{f.name: saved[f.name] for f in fields(AtomVAEConfig) if f.name in saved})
    except (TypeError, ValueError) as e:
        raise UserError(f"{run / 'model.json'}: bad model settings ({e})") from None


def _load_weights(model: AtomVAE, run: Path, device: str) -> None:
    state = load_checkpoint(run, map_location=device)["model"]
    # runs written before the warm starts (none remembered), their ages (all fresh), the latent's axes (prior
    # N(0, I)) or the nuisance
    for k in ("z_last", "z_seen", "z_visit", "n_whiten", "prior_var", "nuisance"):
        state.setdefault(k, getattr(model, k))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{run / CHECKPOINT}: does not fit the model of {run / 'model.json'} "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
