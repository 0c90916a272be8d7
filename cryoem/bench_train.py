"""Training at scale: ``python -m cryoem.bench train [--n 1000000] [--small 100000] [--steps 200] [--scratch DIR]``.

Generates, once, in ``--scratch`` (outside the repository; about 26 GB at the defaults): 10,000 particles of
the 3O21 -> 6FLR C-alpha morph (``cryoem simulate``, 64 px, 2 Å/px, SNR 0.1), tiled to ``--small`` and ``--n``
particles in float32 stacks of 100,000 with their RELION STAR files, and the float16 caches that
``cryoem downsample --dtype float16`` writes from them. Tiling repeats the images: the benchmark measures
reading and training speed, not what is learnt.

Then it trains the atom VAE with the default settings (batch 64) for ``--steps`` steps on each set, each
run in a fresh process through ``cryoem.train.train`` (the path ``cryoem train`` takes), after dropping the
page cache where the system allows it (cold reads), and prints one table: the start-up (process start to the
first step), particles per second over the last four fifths of the steps, the ratio to the in-memory run (the
compute of a step does not depend on N), the peak memory in use on the machine above what it was before the
run (the training process and its reader, shared pages once, page cache excluded), and the disk traffic per
step over the same steps (MB and read requests, from ``/proc/diskstats``). Last, one process against two
(``torchrun``, gloo) on the small cache, at the same global batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASE_N = 10_000
BATCH = 64  # cryoem train's default --batch-size
STACK = 100_000  # particles per stack file


def _cryoem(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "cryoem.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"cryoem {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()[-500:]}")


def _base(scratch: Path) -> Path:
    """10,000 simulated particles (the tiles) and the starting model."""
    out = scratch / "base"
    if not (out / "particles.star").is_file():
        data = Path(__file__).resolve().parent / "data"
        print(f"simulating {BASE_N} particles into {out}", flush=True)
        _cryoem("simulate", "--morph", data / "3o21.pdb.gz", data / "6flr.pdb.gz", "--atoms", "ca", "--n", BASE_N,
                "--box", 64, "--snr", 0.1, "--quiet", "--out", out)
    return out


def _tiled(scratch: Path, base: Path, n: int) -> Path:
    """``n`` particles: the base set repeated, in float32 stacks of ``STACK``, with a RELION STAR file."""
    from cryoem.formats.mrc import write_mrcs
    from cryoem.formats.star import star_tables, write_star
    from cryoem.particles import load_particles

    out = scratch / f"f32_{n}"
    star = out / "particles.star"
    if star.is_file():
        return star
    print(f"writing {n} particles (float32) into {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    ps = load_particles(base / "particles.star", pixels="none")
    imgs = ps.images(slice(None))[:, 0].numpy()
    tile = np.tile(imgs, (math.ceil(min(n, STACK) / BASE_N), 1, 1))
    names = []
    for c in range(math.ceil(n / STACK)):
        count = min(STACK, n - c * STACK)
        names += [f"{i + 1:06d}@stack_{c:03d}.mrcs" for i in range(count)]
        write_mrcs(out / f"stack_{c:03d}.mrcs", tile[:count], ps.pixel_size)
    m, idx = ps.meta, np.arange(n) % BASE_N
    optics, parts = star_tables(names, ps.pixel_size, ps.box, m.R[idx], m.shift_A[idx], m.ctf[idx])
    write_star(star, optics, parts, decimals=6)
    return star


def _cache(scratch: Path, star: Path, n: int) -> Path:
    from cryoem.downsample import downsample

    out = scratch / f"f16_{n}"
    if not (out / "particles.star").is_file():
        print(f"writing the float16 cache of {n} particles into {out}", flush=True)
        downsample(star, out, dtype="float16", chunk=STACK, overwrite=True, progress=False)
    return out / "particles.star"


def _disk() -> tuple[int, int]:
    """(bytes read, read requests) since boot, summed over the machine's whole disks."""
    disks = {p.name for p in Path("/sys/block").iterdir() if not p.name.startswith(("loop", "ram", "zram"))}
    nbytes = reqs = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] in disks:
            reqs += int(f[3])
            nbytes += int(f[5]) * 512
    return nbytes, reqs


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _one(star: Path, structure: Path, lazy: bool, steps: int, launch: float) -> dict:
    """One training run in this process; returns its measurements."""
    from cryoem.train import DataSpec, train
    from cryoem.vae import AtomVAEConfig
    from plato_core.trainer import TrainConfig, Trainer

    marks = []
    step = Trainer.train_step

    def timed(self, batch):
        marks.append((time.time(), _disk()))
        return step(self, batch)

    Trainer.train_step = timed
    with tempfile.TemporaryDirectory() as tmp:
        spec = DataSpec(str(star), str(structure), atoms="ca", center="none", lazy=lazy)
        tcfg = TrainConfig(out=str(Path(tmp) / "run"), steps=steps, batch_size=BATCH, progress=False,
                           tensorboard=False, ckpt_every=10**9)
        train(spec, AtomVAEConfig(), tcfg)
    # from a fifth of the way in: after the dropped page cache, the libraries' code pages are read in again as
    # the first steps run them, which is no part of reading particles
    w = len(marks) // 5
    (t0, (b0, r0)), (t1, (b1, r1)) = marks[w], marks[-1]
    k = len(marks) - 1 - w
    return {"startup_s": marks[0][0] - launch, "particles_per_s": BATCH * k / (t1 - t0),
            "mb_per_step": (b1 - b0) / k / 1e6,
            "reads_per_step": (r1 - r0) / k}


def _in_use() -> int:
    """Bytes of memory in use on the machine that the kernel cannot reclaim (MemTotal - MemAvailable): the
    processes' own memory, each page once (a forked reader shares its parent's), without the page cache."""
    from plato_core.runinfo import available_memory

    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 - available_memory()
    raise OSError("no MemTotal in /proc/meminfo")


def _run(star: Path, structure: Path, lazy: bool, steps: int) -> dict:
    """One run in a fresh process, with the machine's peak memory in use above what it was before."""
    import threading

    cold = _drop_caches()
    base, peak, done = _in_use(), [0], threading.Event()

    def watch():
        while not done.wait(0.05):
            peak[0] = max(peak[0], _in_use() - base)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    cmd = [sys.executable, "-m", "cryoem.bench", "train", "--one", str(star), "--structure", str(structure),
           "--steps", str(steps), "--launch", repr(time.time())] + (["--lazy"] if lazy else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    done.set()
    t.join()
    if r.returncode:
        raise SystemExit(f"training on {star} failed: {r.stderr.strip()[-2000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "cold": cold, "memory_gb": peak[0] / 1e9}


def _ranks(star: Path, structure: Path, steps: int, world: int) -> float:
    """Particles/s of ``cryoem train`` with ``world`` processes (one thread each) or one (two threads)."""
    import csv

    with tempfile.TemporaryDirectory() as tmp:
        args = ["train", "--particles", str(star), "--structure", str(structure), "--atoms", "ca", "--center", "none",
                "--steps", str(steps), "--batch-size", str(BATCH), "--quiet", "--out", str(Path(tmp) / "run")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if world > 1 else dict(os.environ)
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   "-m", "cryoem.cli", *args, "--threads", "1"]
        else:
            cmd = [sys.executable, "-m", "cryoem.cli", *args, "--threads", "2"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"{world}-process training failed: {r.stderr.strip()[-2000:]}")
        with open(Path(tmp) / "run/log.csv") as f:
            rows = list(csv.DictReader(f))
    a, b = rows[1], rows[-1]  # from the second logged step: start-up and the first step's warm-up excluded
    return BATCH * (int(b["step"]) - int(a["step"])) / (float(b["time_s"]) - float(a["time_s"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cryoem.bench train", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="particles of the large set (default: 1,000,000)")
    p.add_argument("--small", type=int, default=100_000, help="particles of the set that fits in memory "
                                                               "(default: 100,000)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run (default: 200)")
    p.add_argument("--scratch", type=Path, default=Path.home() / ".cache/plato3d/bench-train",
                   help="folder for the generated sets, kept for the next run (default: ~/.cache/plato3d/bench-train)")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--structure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lazy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launch", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:  # a child: one run, one JSON line
        print(json.dumps(_one(a.one, a.structure, a.lazy, a.steps, a.launch)))
        return 0
    a.scratch.mkdir(parents=True, exist_ok=True)
    base = _base(a.scratch)
    structure = base / "gt_models.pdb"
    small, large = _tiled(a.scratch, base, a.small), _tiled(a.scratch, base, a.n)
    small16, large16 = _cache(a.scratch, small, a.small), _cache(a.scratch, large, a.n)
    runs = [("in memory", a.small, small, False), ("streamed float32", a.small, small, True),
            ("streamed cache (float16)", a.small, small16, True),
            ("streamed float32", a.n, large, True), ("streamed cache (float16)", a.n, large16, True)]
    import torch

    print(f"\ncryoem training at scale: atom VAE defaults, 3O21 C-alpha ({BASE_N} simulated particles tiled), 64 px, "
          f"batch {BATCH}, {a.steps} steps per run, torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'data':<26} {'N':>9} {'start-up s':>10} {'particles/s':>11} {'ratio':>6} {'memory GB':>9} "
          f"{'disk MB/step':>12} {'reads/step':>10} {'cache':>5}")
    ref = None
    for name, n, star, lazy in runs:
        m = _run(star, structure, lazy, a.steps)
        ref = ref or m["particles_per_s"]
        print(f"{name:<26} {n:>9,d} {m['startup_s']:>10.1f} {m['particles_per_s']:>11.0f} "
              f"{m['particles_per_s'] / ref:>6.2f} {m['memory_gb']:>9.2f} "
              f"{m['mb_per_step']:>12.2f} {m['reads_per_step']:>10.1f} {'cold' if m['cold'] else 'warm':>5}",
              flush=True)
    one, two = _ranks(small16, structure, a.steps, 1), _ranks(small16, structure, a.steps, 2)
    print(f"\nprocesses on the {a.small:,d}-particle cache (global batch {BATCH}): 1 process x 2 threads {one:.0f} "
          f"particles/s; 2 processes x 1 thread (torchrun, gloo) {two:.0f} particles/s ({two / one:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
