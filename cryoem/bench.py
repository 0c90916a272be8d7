"""Benchmarks of cryoem (not tests: a shared machine's load changes the numbers, so compare within one run).

``python -m cryoem.bench [--n 4096] [--atoms 2000] [--box 64] [--threads T]``: the simulator. One table of
particles per second for each stage of ``cryoem.simulate`` (projection, Fourier shift + CTF, noise) and for
the whole simulation, best of ``--repeats`` runs, on the bundled 3O21 model (the first ``--atoms`` heavy atoms).

``python -m cryoem.bench train [--n 1000000] [--small 100000] ...``: training at scale (``cryoem.bench_train``).
"""

from __future__ import annotations

import argparse
import platform

import torch

from cryoem.imaging import add_noise, fourier_filter, project
from cryoem.simulate import ensemble_conformations, random_ctf, random_rotations, simulate
from cryoem.structure import example_structure, read_structure
from renderers.bench import best_of


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from cryoem.bench_train import main as train_main

        return train_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m cryoem.bench", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="particles per timed run (default: 4096)")
    p.add_argument("--atoms", type=int, default=2000, help="atoms in the model (default: 2000)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    s = read_structure(example_structure("3o21"), models="first").select("heavy")
    s = s.subset(slice(0, args.atoms))
    conf = ensemble_conformations(s)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    R = random_rotations(B, g).float()
    shift = torch.randn(B, 2, generator=g) * args.apix
    ctf = random_ctf(B, g, (1.0, 2.5))
    xyz = conf.coords(torch.zeros(B, dtype=torch.long))
    img = project(xyz, conf.amplitudes, conf.sigmas, R, args.apix, args.box)
    stages = [
        ("projection", lambda: project(xyz, conf.amplitudes, conf.sigmas, R, args.apix, args.box), B),
        ("shift + CTF (FFT)", lambda: fourier_filter(img, args.apix, shift, ctf), B),
        ("noise", lambda: add_noise(img, 0.1, g), B),
        ("simulate (all)", lambda: simulate(conf, args.n, args.box, args.apix, 0.1, batch=B, progress=False),
         args.n),
    ]
    print(f"cryoem simulator benchmark: {s.n_atoms} atoms (3O21 heavy atoms), {args.box}^2 px, {args.apix} Å/px, "
          f"batch {B}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'stage':<20} {'particles':>9} {'seconds':>9} {'particles/s':>12}")
    with torch.no_grad():
        for name, fn, n in stages:
            t = best_of(fn, args.repeats)
            print(f"{name:<20} {n:>9d} {t:>9.3f} {n / t:>12.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
