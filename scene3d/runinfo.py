"""Run records and user errors shared by every Plato command (``scene3d`` and ``cryoem``).

Every run writes ``config.json`` with all settings, package versions and the git
commit. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("plato3d", "torch", "easypytorch3d", "open3d", "numpy", "scipy", "mrcfile", "starfile",
            "biopython", "einops", "matplotlib", "scikit-learn", "tqdm", "tfrecord")


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """Bad user input. The CLI prints ``error: <message>`` on one line and exits with code 2."""


def versions() -> dict[str, str]:
    """Installed versions of Plato and its main dependencies."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def version_string(prog: str) -> str:
    v = versions()
    deps = ", ".join(f"{k} {val}" for k, val in v.items() if k != "plato3d")
    return f"{prog} (plato3d {v['plato3d']}; {deps})"


def cmd_info(args=None) -> int:
    """``info`` subcommand of both CLIs: versions, CUDA, and whether pytorch3d's compiled part loads."""
    for k, v in versions().items():
        print(f"{k:14s} {v}")
    import torch

    print(f"{'cuda':14s} {torch.cuda.is_available()}")
    import pytorch3d._C  # noqa: F401

    print(f"{'pytorch3d._C':14s} ok")
    return 0


def git_commit() -> str | None:
    """The commit of the Plato checkout this code runs from, with '+dirty' if modified."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    For writers that insist on a file name (mrcfile, matplotlib, open3d).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_config(out_dir: str | os.PathLike, settings: dict, name: str = "config.json") -> Path:
    """Write ``out_dir/config.json``: settings, versions, git commit, command line."""
    record = {"settings": settings, "versions": versions(), "git_commit": git_commit(),
              "argv": sys.argv, "host": platform.node()}
    path = Path(out_dir) / name
    atomic_write(path, json.dumps(record, indent=2, default=str))
    return path


def auto_threads() -> int:
    """CPU threads for torch: the cores this process may use, minus the load of other work (1-minute load
    average), at least 1. Oversubscribing cores slows torch's CPU kernels several-fold."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load)))


def cli_main(build_parser, argv=None) -> int:
    """Entry point of a CLI whose subcommands set ``func``: parse, run, turn user errors into exit code 2."""
    def _main(argv):
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run_cli(_main, argv)


def run_cli(main_fn, argv=None) -> int:
    """Run a CLI entry point; a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        return main_fn(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
