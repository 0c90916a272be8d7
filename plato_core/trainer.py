"""The one trainer of Plato: every model (GQN, the voxel/mesh/NeRF autoencoders, the cryo-EM atom VAE) uses it.

The model interface
-------------------
A model is a ``torch.nn.Module`` with one method::

    def loss(self, batch, step: int) -> dict[str, Tensor]:
        '''Named scalar loss terms for one batch; ``out["loss"]`` is the total that is minimised.'''

``batch`` is whatever the default ``DataLoader`` collate makes of the dataset's items
(usually a dict of tensors, already moved to the device); ``step`` is the global
optimisation step, for annealing schedules. Every other term in the dict is only logged.
A model may also define ``check_batch(batch)``, called once before training, that raises
``plato_core.runinfo.UserError`` when data and model disagree (image size, channels ...), and
``after_step(step, optimizer)``, called after each optimiser step (``step`` counts the steps done)
to reparameterise the model between steps; it drops the optimiser state of parameters it changes.
A model with ``set_progress(fraction)`` is told, before each step, the fraction of the budget spent
(:meth:`Trainer.progress`), for schedules that span the budget whatever the machine's speed.

A model that others should reload (``plato_core.runinfo.load_run``) also has a ``kind`` (written to
``config.json``), ``run_settings() -> dict`` (its settings, recorded in config.json and the checkpoint
under its own keys) and a classmethod ``from_run(run, device) -> (model, settings)``.

Typical use::

    cfg = TrainConfig(out="runs/x", minutes=30, batch_size=32, lr=5e-4)
    Trainer(model, dataset, cfg, settings={"model": {...}}).fit()

What the trainer owns
---------------------
* **Budget:** ``epochs``, ``steps`` and/or ``minutes`` (wall clock, summed over resumes);
  training stops at whichever comes first.
* **Optimisation:** Adam, a learning-rate schedule (:func:`lr_factor`), gradient-norm
  clipping, and AMP (float16 autocast + GradScaler) on CUDA.
* **Data order:** each epoch is a permutation drawn from ``(seed, epoch)``; the data
  position is ``(epoch, batch index)``, so a resumed run sees exactly the batches the
  uninterrupted run would. Datasets should be deterministic (put randomness in
  ``model.loss``, which draws from the torch RNG that checkpoints save).
* **Reading:** a dataset with ``read_batch(indices) -> batch`` is read a whole batch per call (memory-mapped
  particle stacks read their images in file order); others item by item, through the collate function.
  With ``workers`` > 0, that many processes read batches ahead (``prefetch`` each) while the step runs. A
  ``runinfo.DataError`` raised while reading (an image that holds NaN, say) stops the run after a checkpoint,
  with the error's one line.
* **Checkpoints:** ``out/checkpoint.pt`` every ``ckpt_every`` steps, at the end, and on
  SIGINT / SIGTERM. ``resume=True`` restores model, optimiser, scheduler, AMP scaler,
  RNG states (torch, CUDA, numpy, python), data position and elapsed time.
  Checkpoints load with ``torch.load(weights_only=True)``. After SIGTERM the process exits
  with code 143 (128 + 15), as other tools do, once the checkpoint is written; after SIGINT
  ``fit`` returns normally (``stopped_by`` says which signal).
* **The output folder:** the rule of ``runinfo.check_out_dir``, applied when the trainer is made,
  before anything is written: a non-empty ``out`` needs ``resume`` (it must hold ``checkpoint.pt``,
  whose settings must equal ``settings`` except ``data``, the location of the data) or ``overwrite``
  (which deletes the previous run's checkpoint, log and TensorBoard files first). ``fit`` checks
  the first batch (``check_batch``) and only then writes ``config.json`` and the caller's ``files``.
* **DDP:** launched by ``torchrun`` (``WORLD_SIZE > 1``), the trainer joins the process
  group (gloo on CPU, nccl on CUDA), and splits each global batch of ``batch_size`` into
  ``batch_size / world`` per process; gradients are averaged, so the run matches a
  single-process run at the same global batch. Only rank 0 writes files.
* **Records:** a tqdm bar with the loss terms, ``out/log.csv`` (the terms, the gradient norm before
  clipping, and the same per top-level child module, ``gnorm_<name>``), TensorBoard events in
  ``out/tb/``, and ``out/config.json`` (settings, versions, git commit).
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from plato_core.runinfo import (
    DataError,
    UserError,
    atomic_path,
    atomic_write,
    check_out_dir,
    remove_outputs,
    settings_diff,
    write_config,
)

CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, "log.csv", "tb", "config.json")  # what fit writes; --overwrite deletes them first
RESUME_MAY_CHANGE = ("data",)  # settings a resumed run may change: where the data lie, not what they are


@dataclass
class TrainConfig:
    """Every setting of a training run (written to ``config.json``)."""

    out: str
    epochs: int | None = None  # budget: stop after this many passes over the data
    steps: int | None = None  # budget: stop after this many optimisation steps
    minutes: float | None = None  # budget: stop after this much wall-clock time (summed over resumes)
    batch_size: int = 32  # global batch (split across DDP processes)
    lr: float = 5e-4
    lr_schedule: str = "constant"  # constant | linear | cosine  (see lr_factor)
    lr_final: float = 5e-5  # end value of the linear / cosine schedules
    lr_anneal_steps: int | None = 10_000  # steps over which lr goes from lr to lr_final; None: the whole budget
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # max global gradient norm; None = off
    amp: bool = True  # float16 autocast + GradScaler, on CUDA only
    seed: int = 0
    ckpt_every: int = 500  # steps
    log_every: int = 10  # steps between CSV / TensorBoard rows
    resume: bool = False
    overwrite: bool = False  # replace the run in a non-empty ``out`` (see runinfo.check_out_dir)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True
    find_unused_parameters: bool = False  # DDP
    workers: int = 0  # DataLoader processes that read batches ahead of the step (0: read in the training process)
    prefetch: int = 2  # batches each worker reads ahead


def lr_factor(step: int, cfg: TrainConfig, progress: float = 0.0) -> float:
    """Multiplier of ``cfg.lr`` at ``step``.

    * ``constant``: 1.
    * ``linear``: GQN's schedule form (Eslami et al. 2018, supplement),
      ``lr_n = max(lr_f + (lr_i - lr_f) (1 - n / N), lr_f)`` with ``N = lr_anneal_steps``.
    * ``cosine``: half a cosine from ``lr`` to ``lr_final`` over ``lr_anneal_steps``, then flat.
    With ``lr_anneal_steps`` None, the anneal spans the run's budget instead: ``n / N`` is ``progress``, the
    fraction of the budget spent (:meth:`Trainer.progress`), so that a ``minutes`` budget ends at ``lr_final``.
    A linear warm-up over ``warmup_steps`` multiplies any of them.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_anneal_steps is None:
        frac = min(max(progress, 0.0), 1.0)
    else:
        frac = min(step / max(cfg.lr_anneal_steps, 1), 1.0)
    final = cfg.lr_final / cfg.lr
    if cfg.lr_schedule == "constant":
        f = 1.0
    elif cfg.lr_schedule == "linear":
        f = final + (1 - final) * (1 - frac)
    elif cfg.lr_schedule == "cosine":
        f = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac))
    else:
        raise UserError(f"lr_schedule: expected constant, linear or cosine, got {cfg.lr_schedule!r}")
    return warm * f


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation of ``range(n)`` from ``(seed, epoch)``, last partial dropped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def rng_state() -> dict:
    """All RNG states (torch, CUDA, numpy, python) as tensors / lists that ``weights_only`` loads."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a trainer checkpoint safely (``weights_only=True``); ``path`` may be the run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint found (train first, or check the run folder)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable Plato checkpoint ({e.__class__.__name__}: {e})") from e


def module_grad_norms(model: nn.Module) -> dict[str, float]:
    """``{"gnorm_<child>": L2 norm}`` of the gradients of each top-level child module that has any.

    Logged every step: a part whose gradient vanishes (the encoder of a collapsing VAE) shows here.
    """
    out = {}
    for name, child in model.named_children():
        grads = [p.grad.detach().float().norm() for p in child.parameters() if p.grad is not None]
        if grads:
            out[f"gnorm_{name}"] = float(torch.stack(grads).norm())
    return out


class _BatchReader(torch.utils.data.Dataset):
    """A dataset with ``read_batch`` as a DataLoader dataset whose keys are whole batches (lists of indices)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        return self.dataset.read_batch(indices)


class _LossModule(nn.Module):
    """Routes ``forward`` to ``model.loss`` so DDP's gradient hooks fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, step: int):
        return self.model.loss(batch, step)


class Trainer:
    """Train ``model`` (see the module docstring for its interface) on ``dataset`` under ``cfg``.

    Args:
        model: an ``nn.Module`` with ``loss(batch, step) -> dict`` (``"loss"`` = total).
        dataset: a map-style dataset whose items the default collate can stack.
        cfg: the :class:`TrainConfig`.
        settings: extra settings (data path ...) recorded in config.json and the checkpoint, after the
            model's own ``run_settings()``; a resumed run must have the same ones (except ``data``).
        collate_fn: optional DataLoader collate function.
        files: more run records, ``{file name: text}``, written into ``out`` beside config.json.

    Raises ``UserError`` for bad settings or an output folder that breaks the rule of ``check_out_dir``.
    """

    def __init__(self, model: nn.Module, dataset, cfg: TrainConfig, settings: dict | None = None,
                 collate_fn=None, files: dict[str, str] | None = None):
        if not hasattr(model, "loss"):
            raise TypeError("model: expected an nn.Module with a loss(batch, step) -> dict method")
        self.cfg, self.dataset, self.collate_fn = cfg, dataset, collate_fn
        own = model.run_settings() if hasattr(model, "run_settings") else {}
        self.settings = {**own, **(settings or {})}
        self.files = dict(files or {})
        self.out = Path(cfg.out)
        self._init_distributed()
        if cfg.batch_size % self.world:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {self.world} DDP processes")
        if len(dataset) < cfg.batch_size:
            raise UserError(f"the dataset has {len(dataset)} items, fewer than one batch of {cfg.batch_size}")
        if cfg.epochs is None and cfg.steps is None and cfg.minutes is None:
            raise UserError("give a training budget: epochs, steps or minutes")
        seed_everything(cfg.seed + self.rank)
        self.model = model.to(self.device)
        self._resume_ckpt = self._check_out()  # before DDP's first collective: no rank has written yet
        self.net = _LossModule(self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP cannot broadcast sparse tensors; a model's sparse buffers (the atom decoder's smoothing kernel)
            # are built from its settings, the same on every rank
            sparse = [n for n, b in self.net.named_buffers() if b.is_sparse]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.net, sparse)
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids,
                                                           find_unused_parameters=cfg.find_unused_parameters)
        self.step, self.epoch, self.batch_in_epoch, self.elapsed = 0, 0, 0, 0.0
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)  # PyTorch's betas and eps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg, self.progress(s)))
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self._stop_signal = None

    # ----------------------------------------------------------------- set-up
    def _init_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        want = self.cfg.device
        cuda = torch.cuda.is_available() and want in ("auto", "cuda")
        if want == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available")
        self._owns_group = self.world > 1 and not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _check_out(self) -> dict | None:
        """Apply the output-folder rule; on resume, return the checkpoint after checking that it is this run.

        Raises ``UserError`` naming each setting that differs (``key: run has A, given B``), or when the
        checkpoint's model does not fit the model built from these settings.
        """
        c = self.cfg
        check_out_dir(self.out, c.resume, c.overwrite, run_file=CHECKPOINT)
        if not c.resume:
            return None
        path = self.out / CHECKPOINT
        ckpt = load_checkpoint(path, map_location=self.device)
        old = {k: v for k, v in ckpt.get("settings", {}).items() if k not in RESUME_MAY_CHANGE}
        diff = settings_diff(old, _plain(self.settings))
        if diff:
            raise UserError(f"--resume: {self.out} is a run with other settings: {'; '.join(diff)} "
                            "(resume with the run's settings, or start a new --out)")
        try:
            self.model.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"{path}: the checkpoint's model does not fit the model of these settings "
                            f"({first[:200]})") from e
        return ckpt

    def _write_records(self) -> None:
        """``config.json`` and the caller's ``files`` (rank 0), after every check; --overwrite clears first."""
        if not self.is_main:
            return
        if self.cfg.overwrite:
            remove_outputs(self.out, (*RUN_FILES, *self.files))
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            atomic_write(self.out / name, text)
        write_config(self.out, {"train": asdict(self.cfg), **self.settings,
                                "world_size": self.world, "device": str(self.device)}, model=self.model)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "elapsed": self.elapsed,
                "config": _plain(asdict(self.cfg)), "settings": _plain(self.settings)}

    def save_checkpoint(self) -> Path | None:
        """Write ``out/checkpoint.pt`` atomically (rank 0 only)."""
        if not self.is_main:
            return None
        path = self.out / CHECKPOINT
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.world == 1:
            set_rng_state(ckpt["rng"])
        else:  # each rank has its own stream; re-seed it deterministically from the position
            seed_everything(self.cfg.seed + self.rank + 7919 * ckpt["step"])
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.batch_in_epoch, self.elapsed = ckpt["batch_in_epoch"], ckpt["elapsed"]

    # -------------------------------------------------------------- the loop
    def _batches(self):
        """Yield ``(index in epoch, batches in epoch, batch)`` from the current data position, forever."""
        per_rank = self.cfg.batch_size // self.world
        epoch, start = self.epoch, self.batch_in_epoch
        while True:
            batches = epoch_batches(len(self.dataset), self.cfg.batch_size, self.cfg.seed, epoch)
            mine = [b[self.rank * per_rank:(self.rank + 1) * per_rank] for b in batches[start:]]
            # its own generator: making a DataLoader iterator must not consume the global torch RNG
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            ahead = {"num_workers": self.cfg.workers}
            if self.cfg.workers > 0:
                ahead["prefetch_factor"] = self.cfg.prefetch
            if hasattr(self.dataset, "read_batch"):  # one call per batch; batch_size=None: no collation
                loader = torch.utils.data.DataLoader(_BatchReader(self.dataset), batch_size=None, sampler=mine,
                                                     generator=g, **ahead)
            else:
                loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=mine, collate_fn=self.collate_fn,
                                                     generator=g, **ahead)
            for i, batch in enumerate(loader):
                yield start + i, len(batches), batch
            epoch, start = epoch + 1, 0

    def progress(self, step: int) -> float:
        """The fraction of the budget spent after ``step`` steps: the largest over the budgets given, with steps
        as ``step / steps``, epochs as ``step / (epochs x batches per epoch)`` and minutes by the wall clock
        (the slowest rank's under DDP, see ``_budget_left``)."""
        c, fracs = self.cfg, [0.0]
        if c.steps:
            fracs.append(step / c.steps)
        if c.epochs:  # every epoch has len // batch_size steps (epoch_batches drops the partial one)
            fracs.append(step / (c.epochs * max(len(self.dataset) // c.batch_size, 1)))
        if c.minutes:
            fracs.append(self.elapsed / (60 * c.minutes))
        return max(fracs)

    def _budget_left(self, t0: float, elapsed0: float) -> bool:
        c = self.cfg
        self.elapsed = elapsed0 + time.time() - t0
        if self.world > 1:  # every rank keeps the slowest clock: the same lr (progress) and the same last step
            clock = torch.tensor([self.elapsed], dtype=torch.float64, device=self.device)
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            self.elapsed = float(clock.item())
        done = ((c.steps is not None and self.step >= c.steps) or (c.epochs is not None and self.epoch >= c.epochs)
                or (c.minutes is not None and self.elapsed >= 60 * c.minutes) or self._stop_signal is not None)
        if self.world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(done)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            done = bool(flag.item())
        return not done

    def train_step(self, batch) -> dict[str, float]:
        """One optimisation step; returns the loss terms averaged over DDP processes."""
        batch = _to_device(batch, self.device)
        self.net.train()
        set_progress = getattr(self.model, "set_progress", None)
        if set_progress is not None:
            set_progress(self.progress(self.step))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            terms = self.net(batch, self.step)
        if "loss" not in terms:
            raise TypeError("model.loss must return a dict with the total under 'loss'")
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: the loss is {loss.item()} (lower --lr or check the data)")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        gnorms = module_grad_norms(self.model)  # before clipping: what each part's loss gradient really is
        gnorm = None
        if self.cfg.grad_clip is not None:
            gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        hook = getattr(self.model, "after_step", None)
        if hook is not None:  # e.g. a reparameterisation between steps (cryoem.vae.AtomVAE.after_step)
            hook(self.step, self.opt)
        vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        out = dict(zip(terms.keys(), vals.tolist()))
        if gnorm is not None:
            out["grad_norm"] = float(gnorm)
        out.update(gnorms)
        return out

    def _next_batch(self, batches):
        """The next batch; a ``DataError`` while reading it writes a checkpoint first (at the batch before)."""
        try:
            return next(batches)
        except DataError as e:
            self.save_checkpoint()
            raise DataError(f"{e} (stopped at step {self.step}, checkpoint written: fix or remove that particle, "
                            "then --resume)") from None

    def fit(self) -> dict:
        """Train until the budget is spent or a signal arrives; returns a summary dict."""
        c = self.cfg
        if self._resume_ckpt is not None:
            self.load_state(self._resume_ckpt)
            self._resume_ckpt = None
        batches = self._batches()
        first = next(batches)
        if hasattr(self.model, "check_batch"):  # data and model agree, before anything is written
            self.model.check_batch(_to_device(first[2], self.device))
        self._write_records()
        old = self._install_signal_handlers()
        log = _Log(self.out, c, self.is_main, start_step=self.step)
        t0, elapsed0 = time.time(), self.elapsed
        terms: dict[str, float] = {}
        try:
            while self._budget_left(t0, elapsed0):
                i, n, batch = first if first is not None else self._next_batch(batches)
                first = None
                terms = self.train_step(batch)
                self.batch_in_epoch = i + 1
                if self.batch_in_epoch == n:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                log.row(self.step, self.epoch, self.elapsed, self.sched.get_last_lr()[0], terms)
                if self.step % c.ckpt_every == 0:
                    self.save_checkpoint()
            self.save_checkpoint()
            if self._owns_group:  # leave together: a rank exiting under a live gloo group can abort its peers
                dist.barrier()
                dist.destroy_process_group()
        finally:
            log.close()
            self._restore_signal_handlers(old)
        if self._stop_signal == "SIGTERM":  # the checkpoint is written; exit as a terminated process does
            if self.is_main:
                print(f"SIGTERM: stopped at step {self.step}; {self.out / CHECKPOINT} continues with --resume",
                      file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM)
        stopped = (f"signal {self._stop_signal}" if self._stop_signal else "budget")
        return {"step": self.step, "epoch": self.epoch, "elapsed_s": self.elapsed, "stopped_by": stopped,
                "last": terms}

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            return {}

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for s, h in old.items():
            signal.signal(s, h)


class _Log:
    """tqdm bar + ``log.csv`` + TensorBoard, on rank 0 only."""

    def __init__(self, out: Path, cfg: TrainConfig, enabled: bool, start_step: int):
        self.enabled, self.every = enabled, cfg.log_every
        self.bar = self.tb = None
        self.fields: list[str] | None = None
        if not enabled:
            return
        from tqdm import tqdm

        total = cfg.steps
        # into a log file (not a terminal) tqdm would write a line per step: there, one every 30 s
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                        mininterval=interval)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step if start_step else None)
        self.path = out / "log.csv"
        if start_step == 0 or not self.path.is_file():
            self.path.unlink(missing_ok=True)
        else:  # drop rows past the checkpoint so the log matches the resumed run
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if int(r["step"]) <= start_step]
            if rows:
                self.fields = list(rows[0].keys())
                with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, self.fields)
                    w.writeheader()
                    w.writerows(keep)

    def row(self, step: int, epoch: int, elapsed: float, lr: float, terms: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if step % self.every and step != 1:
            return
        shown = {k: f"{v:.4g}" for k, v in terms.items() if not k.startswith(("grad_norm", "gnorm_"))}
        self.bar.set_postfix(shown, refresh=False)
        rec = {"step": step, "epoch": epoch, "time_s": round(elapsed, 2), "lr": lr, **terms}
        if self.fields is None:
            self.fields = list(rec.keys())
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerow(rec)
        if self.tb is not None:
            for k, v in terms.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _plain(x):
    """Settings as JSON-like python values, so checkpoints load with weights_only=True."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)
