"""How fast ``cryoem explore`` opens a large run (issue 16: 10^6 particles in under 5 s), in headless Chromium.

    python scripts/bench_explore.py RUN [--n 1000000]

RUN is any trained atom-VAE run (its model decodes; its analysis is not used): a copy of it gets ``--n`` random
latents and k-means labels. The script starts ``cryoem explore`` on it as a user would and prints the time until
the command prints its URL (Python's imports, the model, the latents, PCA), the page's time from navigation to
every point drawn (performance.now() marks, in seconds since navigation), and the time of 20 parallel decodes.
A benchmark, not a test: the numbers depend on the machine (SwiftShader draws on the CPU).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import urlopen

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.cryoem


def fake_run(run: Path, folder: Path, n: int, zdim: int) -> Path:
    """A copy of ``run`` (model only) whose analysis holds ``n`` random latents and 10 k-means clusters."""
    out = folder / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("analysis", "explore", "tb", "*.log"))
    rng = np.random.default_rng(0)
    (out / "analysis").mkdir()
    np.save(out / "analysis" / "latents.npy", rng.standard_normal((n, zdim)).astype(np.float32))
    np.save(out / "analysis" / "kmeans_labels.npy", rng.integers(0, 10, n).astype(np.int64))
    return out


def main() -> None:
    from cryoem.train import read_record
    from tests.cryoem.test_explore import chrome, wait_for

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1_000_000)
    a = p.parse_args()
    zdim = int(read_record(a.run)["model"]["zdim"])
    with tempfile.TemporaryDirectory() as tmp:
        run = fake_run(Path(a.run), Path(tmp), a.n, zdim)
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "cryoem"), "explore", str(run), "--port", "0"],
                                stdout=subprocess.PIPE, text=True)
        try:
            url = next(line.split()[1] for line in proc.stdout if line.startswith("open http"))
            t_cli = time.perf_counter() - t0
            d = chrome()
            try:
                t0 = time.perf_counter()
                d.get(url)
                wait_for(d, "return document.body.dataset.ready === '1'", timeout=300)
                t_page = time.perf_counter() - t0
                drawn = d.execute_script("return window.explorer.drawnPoints()")
                nav = d.execute_script("return performance.timing.navigationStart")
                marks = d.execute_script("return window.explorer.state.timings")
                t_nav = d.execute_script("return performance.timing.domContentLoadedEventEnd") - nav
            finally:
                d.quit()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(20) as pool:
                codes = list(pool.map(lambda i: urlopen(f"{url}api/model?particle={i}").status, range(20)))
            t_decode = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait()
    print(f"{a.n:,} particles (zdim {zdim}): `cryoem explore` printed its URL {t_cli:.2f} s after it started; the "
          f"page then drew all {drawn:,} points in {t_page:.2f} s; open total {t_cli + t_page:.2f} s; "
          f"20 parallel decodes {codes.count(200)}/20 OK in {t_decode:.2f} s")
    print(f"page: DOMContentLoaded at {t_nav / 1000:.2f} s; then (s since navigation) " +
          ", ".join(f"{k} {v / 1000:.2f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])))


if __name__ == "__main__":
    main()
