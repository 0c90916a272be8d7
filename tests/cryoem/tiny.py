"""What the command-line tests share: the ``cryoem`` executable, a tiny C-alpha ubiquitin simulation (32 px,
SNR 1) and a few-step run on it."""

import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
BIN = Path(sys.executable).parent


def cryoem(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "cryoem", *map(str, args)], capture_output=True, text=True, **kw)


def simulate_ubiquitin(out: Path, n: int, seed: int) -> Path:
    """``n`` particles of 1UBI's 76 C-alpha atoms at 32 px, 2.5 Å/px, SNR 1 into ``out``."""
    r = cryoem("simulate", "--structure", DATA / "1ubi.pdb", "--atoms", "ca", "--n", n, "--box", 32,
               "--pixel-size", 2.5, "--snr", 1.0, "--seed", seed, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def train_tiny(sim: Path, out: Path, zdim: int) -> Path:
    """4 training steps of batch 16 on ``sim`` (a C-alpha model, coordinates already centred) into ``out``."""
    r = cryoem("train", "--particles", sim / "particles.star", "--structure", sim / "gt_models.pdb", "--atoms", "ca",
               "--center", "none", "--zdim", zdim, "--steps", 4, "--batch-size", 16, "--out", out)
    assert r.returncode == 0, r.stderr
    return out
