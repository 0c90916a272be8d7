"""The README's library examples run as written (on a small simulated particle set and scene dataset)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### The library", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_library_examples_run(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) == 2
    for cmd in (["cryoem", "simulate", "--structure", str(DATA / "1ubi.pdb"), "--atoms", "ca", "--n", "128",
                 "--box", "32", "--pixel-size", "2.5", "--snr", "1", "--quiet", "--out", "sim"],
                ["scene3d", "data", "shepard-metzler", "--scenes", "8", "--views", "5", "--size", "32", "--quiet",
                 "--renderer", "pytorch3d", "--no-meshes", "--out", "sm"]):
        exe = Path(sys.executable).parent / cmd[0]
        r = subprocess.run([str(exe), *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    for block in blocks:
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    from cryoem.structure import read_structure
    from scene3d.export import read_geometry

    z0 = read_structure(tmp_path / "z0.pdb")
    assert z0.n_atoms == 76 and z0.coords.shape == (1, 76, 3)  # ubiquitin's C-alphas
    assert (tmp_path / "vae_run" / "checkpoint.pt").is_file() and (tmp_path / "ae_run" / "checkpoint.pt").is_file()
    assert read_geometry(tmp_path / "scene0.ply") is not None
