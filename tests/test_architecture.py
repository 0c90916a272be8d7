"""Imports go only renderers <- plato_core <- scene3d <- cryoem; the CLIs answer --help and --version."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"renderers": 0, "plato_core": 1, "scene3d": 2, "cryoem": 3}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("pkg", sorted(LEVEL))
def test_no_upward_imports(pkg):
    bad = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        for name in imported_packages(f) & set(LEVEL):
            if LEVEL[name] > LEVEL[pkg]:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "upward imports: " + "; ".join(bad)


def test_checker_catches_upward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom cryoem.io import x\n")
    assert "cryoem" in imported_packages(f)


@pytest.mark.parametrize("prog", ["scene3d", "cryoem"])
def test_cli_help_and_version(prog):
    exe = Path(sys.executable).parent / prog
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "torch 2.12" in out.stdout and "open3d 0.20.0" in out.stdout


def test_compiled_dependencies_import():
    code = "import pytorch3d._C, open3d, mrcfile, Bio.PDB, einops, starfile"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
