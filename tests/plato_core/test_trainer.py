"""The shared trainer: exact resume after a kill, DDP (2 gloo processes) == single process, logs."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from plato_core.runinfo import UserError
from plato_core.trainer import TrainConfig, Trainer, load_checkpoint, lr_factor

ROOT = Path(__file__).resolve().parents[2]


class Toy(nn.Module):
    """Noisy linear regression: the noise comes from the torch RNG, so resume must restore it."""

    def __init__(self, noise: float = 0.1, sleep: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.noise, self.sleep = noise, sleep

    def loss(self, batch, step):
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"] + self.noise * torch.randn_like(batch["x"])
        mse = ((self.lin(x) - batch["y"]) ** 2).mean()
        return {"loss": mse, "mse": mse.detach(), "step_x2": torch.tensor(2.0 * step)}


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.randn(4, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def make(out, steps=30, noise=0.1, sleep=0.0, resume=False, batch_size=8, **kw):
    torch.manual_seed(0)
    kw = {"progress": False, "tensorboard": False, **kw}
    cfg = TrainConfig(out=str(out), steps=steps, batch_size=batch_size, lr=0.3, lr_schedule="linear",
                      lr_anneal_steps=20, lr_final=0.03, warmup_steps=3, ckpt_every=7, log_every=1,
                      resume=resume, **kw)
    return Trainer(Toy(noise, sleep), ToyData(), cfg, settings={"toy": True})


def run_main():
    """Entry point for the subprocess runs (killed run, torchrun)."""
    out, steps, noise, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    make(out, steps, noise, sleep).fit()


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_uninterrupted_run_writes_records(tmp_path):
    tr = make(tmp_path / "a", steps=12, tensorboard=True)
    summary = tr.fit()
    assert summary["step"] == 12 and summary["stopped_by"] == "budget"
    rows = read_log(tmp_path / "a/log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert {"loss", "mse", "lr", "epoch", "grad_norm"} <= set(rows[0])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert (tmp_path / "a/config.json").is_file() and list((tmp_path / "a/tb").iterdir())
    ck = load_checkpoint(tmp_path / "a")
    assert ck["step"] == 12 and ck["epoch"] == 2  # 40 items / batch 8 = 5 steps per epoch
    with pytest.raises(UserError, match="--resume"):
        make(tmp_path / "a", steps=12).fit()


def test_killed_run_resumes_exactly(tmp_path):
    ref = make(tmp_path / "ref", steps=30)
    ref.fit()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "from tests.plato_core.test_trainer import run_main; run_main()"
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cut"), "30", "0.1", "0.05"], cwd=ROOT,
                         env=env)
    log = tmp_path / "cut/log.csv"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.is_file() and len(read_log(log)) >= 10):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 143  # 128 + SIGTERM, as a terminated process, after writing the checkpoint
    stopped = load_checkpoint(tmp_path / "cut")["step"]
    assert 10 <= stopped < 30, stopped
    tr = make(tmp_path / "cut", steps=30, resume=True)
    tr.fit()
    for a, b in zip(ref.model.parameters(), tr.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["loss"] for r in read_log(log)] == [r["loss"] for r in read_log(tmp_path / "ref/log.csv")]


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    single = make(tmp_path / "single", steps=6, noise=0.0)
    single.fit()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "entry.py"
    script.write_text("from tests.plato_core.test_trainer import run_main\nrun_main()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "ddp"), "6", "0.0", "0.0"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_log(tmp_path / "single/log.csv"), read_log(tmp_path / "ddp/log.csv")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert abs(float(ra["loss"]) - float(rb["loss"])) < 1e-5 * max(1.0, float(ra["loss"]))
    ddp_state = load_checkpoint(tmp_path / "ddp")["model"]
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6)
    assert "world_size" in (tmp_path / "ddp/config.json").read_text()


def test_budget_by_epochs_and_minutes(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "e"), epochs=2, batch_size=8, progress=False, tensorboard=False)
    assert Trainer(Toy(), ToyData(), cfg).fit()["step"] == 10
    cfg = TrainConfig(out=str(tmp_path / "m"), minutes=0.0, batch_size=8, progress=False, tensorboard=False)
    assert Trainer(Toy(), ToyData(), cfg).fit()["step"] == 0


def test_lr_schedules():
    cfg = TrainConfig(out="x", lr=1.0, lr_final=0.1, lr_anneal_steps=10, lr_schedule="linear")
    assert lr_factor(0, cfg) == 1.0 and abs(lr_factor(5, cfg) - 0.55) < 1e-9 and abs(lr_factor(50, cfg) - 0.1) < 1e-9
    cfg.lr_schedule = "cosine"
    assert abs(lr_factor(5, cfg) - 0.55) < 1e-9 and abs(lr_factor(10, cfg) - 0.1) < 1e-9
    cfg.lr_schedule = "bogus"
    with pytest.raises(UserError):
        lr_factor(0, cfg)


@pytest.mark.parametrize("budget", [{"steps": 20}, {"epochs": 4}])  # 40 items / batch 8: 4 epochs = 20 steps
def test_lr_anneal_over_the_budget(tmp_path, budget):
    """lr_anneal_steps None: the cosine spans the budget, ending at lr_final on its last step."""
    cfg = TrainConfig(out=str(tmp_path / "r"), batch_size=8, lr=1.0, lr_final=0.1, lr_schedule="cosine",
                      lr_anneal_steps=None, log_every=1, progress=False, tensorboard=False, **budget)
    Trainer(Toy(), ToyData(), cfg).fit()
    rows = read_log(tmp_path / "r" / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    for r in rows:  # the lr logged after step n is the one the next step uses: progress n / 20
        n = int(r["step"])
        assert float(r["lr"]) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * n / 20)), rel=1e-9)
    assert float(rows[-1]["lr"]) == pytest.approx(0.1)


def test_lr_anneal_over_minutes(tmp_path):
    """A minutes budget anneals by the wall clock: the lr falls as the time is spent, to lr_final at the end."""
    cfg = TrainConfig(out=str(tmp_path / "r"), minutes=0.02, batch_size=8, lr=1.0, lr_final=0.1,
                      lr_schedule="cosine", lr_anneal_steps=None, log_every=1, progress=False, tensorboard=False)
    Trainer(Toy(sleep=0.05), ToyData(), cfg).fit()
    rows = read_log(tmp_path / "r" / "log.csv")
    lrs, times = [float(r["lr"]) for r in rows], [float(r["time_s"]) for r in rows]
    assert len(rows) >= 5 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    for lr, t in zip(lrs, times):  # progress: the clock at the step's start, up to a step (50 ms) before t (to 0.01 s)
        lo = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((t + 0.005) / 1.2, 1)))
        hi = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * max(t - 0.2, 0) / 1.2))
        assert lo - 1e-9 <= lr <= hi + 1e-9


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="budget"):
        Trainer(Toy(), ToyData(), TrainConfig(out=str(tmp_path)))
    with pytest.raises(UserError, match="fewer than one batch"):
        Trainer(Toy(), ToyData(4), TrainConfig(out=str(tmp_path), steps=1, batch_size=8))


def test_after_step_hook_sees_each_step_and_can_reset_optimizer_state(tmp_path):
    calls = []

    class Hooked(Toy):
        def after_step(self, step, optimizer):
            calls.append((step, len(optimizer.state)))
            optimizer.state.pop(self.lin.bias, None)  # what a reparameterisation does to a parameter it changes

    torch.manual_seed(0)
    cfg = TrainConfig(out=str(tmp_path / "r"), steps=5, batch_size=8, lr=0.1, progress=False, tensorboard=False)
    Trainer(Hooked(), ToyData(), cfg).fit()
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]  # called after each optimiser step, with the steps done
    assert all(n == 2 for _, n in calls)  # Adam re-creates the state it lost: weight and bias both present


def test_set_progress_tells_the_model_the_share_of_the_budget_spent(tmp_path):
    seen = []

    class Told(Toy):
        def set_progress(self, progress):
            seen.append(progress)

    cfg = TrainConfig(out=str(tmp_path / "r"), steps=4, batch_size=8, lr=0.1, progress=False, tensorboard=False)
    Trainer(Told(), ToyData(), cfg).fit()
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])  # before each step: steps done / steps budgeted


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``: to show that nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_empty_out_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "config.json").write_text("a simulation's settings")
    before = snapshot(out)
    with pytest.raises(UserError, match="not empty.*--overwrite") as e:
        make(out, steps=3)
    assert "\n" not in str(e.value) and snapshot(out) == before
    with pytest.raises(UserError, match="no checkpoint.pt"):
        make(out, steps=3, resume=True)
    with pytest.raises(UserError, match="only one"):
        make(out, steps=3, resume=True, overwrite=True)
    assert snapshot(out) == before
    make(out, steps=3, overwrite=True).fit()
    assert load_checkpoint(out)["step"] == 3 and "a simulation" not in (out / "config.json").read_text()
    (out / "tb").mkdir()
    (out / "tb" / "old.events").write_text("x")
    make(out, steps=2, overwrite=True).fit()  # a fresh run: the old checkpoint and records are gone
    assert load_checkpoint(out)["step"] == 2 and not (out / "tb").exists()
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2]


def test_resume_with_other_settings_names_each_difference(tmp_path):
    make(tmp_path / "r", steps=3).fit()
    before = snapshot(tmp_path / "r")
    cfg = TrainConfig(out=str(tmp_path / "r"), steps=6, batch_size=8, resume=True, progress=False, tensorboard=False)
    with pytest.raises(UserError) as e:
        Trainer(Toy(), ToyData(), cfg, settings={"toy": False, "data": "elsewhere"})
    assert "toy: run has True, given False" in str(e.value) and "data:" not in str(e.value)
    assert "\n" not in str(e.value)

    class Wider(Toy):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

    with pytest.raises(UserError, match="does not fit"):
        Trainer(Wider(), ToyData(), cfg, settings={"toy": True})
    assert snapshot(tmp_path / "r") == before
    Trainer(Toy(), ToyData(), cfg, settings={"toy": True, "data": "moved"}).fit()  # where the data lie may change
    assert load_checkpoint(tmp_path / "r")["step"] == 6


def test_a_batch_the_model_refuses_writes_nothing(tmp_path):
    class Picky(Toy):
        def check_batch(self, batch):
            raise UserError("data: images are 8 px, the model expects 16")

    cfg = TrainConfig(out=str(tmp_path / "p"), steps=3, batch_size=8, progress=False, tensorboard=False)
    with pytest.raises(UserError, match="8 px"):
        Trainer(Picky(), ToyData(), cfg, files={"model.json": "{}"}).fit()
    assert not (tmp_path / "p").exists()
    Trainer(Toy(), ToyData(), cfg, files={"model.json": "{}"}).fit()
    assert (tmp_path / "p" / "model.json").read_text() == "{}" and (tmp_path / "p" / "config.json").is_file()


class Tilted(nn.Module):
    """loss = w . (3, 4): the gradient is (3, 4) at every step, of norm 5."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def loss(self, batch, step):
        return {"loss": (self.w * torch.tensor([3.0, 4.0])).sum() + 0 * batch["x"].sum()}


@contextmanager
def grad_norms_seen_by_optimizers():
    """Yields a list that gets the global gradient norm of every optimizer step taken while it is open."""
    norms = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.stack([g.norm() for g in grads]).norm()))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield norms
    finally:
        handle.remove()


@pytest.mark.parametrize("clip,expected", [(None, 5.0), (0.05, 0.05), (10.0, 5.0)])
def test_grad_clip_bounds_the_gradient_norm_the_optimizer_sees(tmp_path, clip, expected):
    """TrainConfig.grad_clip (``--grad-clip``): each step's gradient reaches the optimizer with norm
    min(norm, clip); None leaves it alone."""
    cfg = TrainConfig(out=str(tmp_path / "r"), steps=3, batch_size=8, lr=0.01, grad_clip=clip, progress=False,
                      tensorboard=False)
    with grad_norms_seen_by_optimizers() as norms:
        Trainer(Tilted(), ToyData(), cfg).fit()
    assert len(norms) == 3
    assert norms == pytest.approx([expected] * 3, rel=1e-5)
