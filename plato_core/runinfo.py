"""Run records and user errors shared by every Plato command (``scene3d`` and ``cryoem``).

Every run writes ``config.json`` with all settings, package versions and the git
commit. Files are written atomically (temporary file, then rename).

Run format 2 (``RUN_FORMAT``): ``config.json`` also names the run's ``kind`` (``gqn``, ``voxel``, ``mesh``,
``nerf``, ``atom-vae``), its ``format`` and the ``model`` class that built it (``module:Class``), so that
``load_run(path)`` rebuilds any run with that class's ``from_run(path)``. Format-1 runs (no ``format`` key)
are recognised by their settings (``run_kind``) and still load.
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


class DataError(UserError):
    """An item of the data that a run cannot use, found while reading it (a NaN image, say). The trainer writes
    a checkpoint first, so the run resumes once the data are fixed."""

    def __str__(self) -> str:
        """The message, without the traceback that a DataLoader worker adds when it passes the error on."""
        text = str(self.args[0]) if self.args else ""
        return text.strip().splitlines()[-1].split("DataError: ", 1)[-1] if "Traceback" in text else text


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


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as ``Type: message`` on one line (third-party messages may span several), cut at ``limit``."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:limit]


def read_json(path: str | os.PathLike) -> object:
    """The parsed JSON of ``path``; a missing, unreadable or damaged (e.g. truncated) file is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({one_line(e)}); the file is damaged (truncated?)") from None


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


# ------------------------------------------------------------------ output folders
def check_out_dir(out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                  run_file: str | None = None) -> Path:
    """The one output-folder rule of every Plato command that writes a folder; call it before writing anything.

    * a missing or empty folder is fine;
    * ``resume``: the folder must hold ``run_file`` (the run to continue, e.g. ``checkpoint.pt``);
    * a non-empty folder is refused unless ``resume`` or ``overwrite`` is given, so that no run, simulation
      or dataset is replaced without asking.

    Checks only; writes nothing. Returns ``out`` as a Path. Raises ``UserError`` (one line).
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError(f"--out {out}: --resume continues the run in it, --overwrite replaces it; give only one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if resume:
        if run_file is None:
            raise UserError(f"--out {out}: this command cannot resume; give --overwrite or a new --out")
        if not (out / run_file).is_file():
            raise UserError(f"--resume: {out} holds no {run_file}, so there is no run to continue")
        return out
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        hint = " --resume to continue the run in it," if run_file and (out / run_file).is_file() else ""
        raise UserError(f"--out {out}: the folder is not empty ({shown}); choose a new folder,{hint} "
                        "or pass --overwrite to replace it")
    return out


def remove_outputs(out: str | os.PathLike, names) -> None:
    """``--overwrite``: delete what an earlier run left under these names in ``out`` (files or folders).

    Only the names a command itself writes, never the rest of the folder (which may hold its inputs).
    """
    import shutil

    for name in names:
        p = Path(out) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def settings_diff(old, new, prefix: str = "") -> list[str]:
    """``"key: run has A, given B"`` for each setting that differs between two nested dicts.

    Keys present on one side only are skipped: the other side predates that setting.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in old:
            if k in new:
                out += settings_diff(old[k], new[k], f"{prefix}{k}.")
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    if old == new or (isinstance(old, float) and isinstance(new, float) and old != old and new != new):
        return []
    return [f"{prefix.rstrip('.')}: run has {old!r}, given {new!r}"]


def write_config(out_dir: str | os.PathLike, settings: dict, name: str = "config.json", model=None) -> Path:
    """Write ``out_dir/config.json``: settings, versions, git commit, command line; with ``model`` (the trained
    module), its ``kind`` and class (run format 2, see the module docstring)."""
    record = {"settings": settings, "versions": versions(), "git_commit": git_commit(),
              "argv": sys.argv, "host": platform.node()}
    if getattr(model, "kind", None) is not None:
        cls = type(model)
        record = {"kind": model.kind, "format": RUN_FORMAT, "model": f"{cls.__module__}:{cls.__qualname__}",
                  **record}
    path = Path(out_dir) / name
    atomic_write(path, json.dumps(record, indent=2, default=str))
    return path


# ------------------------------------------------------------------ run kinds
RUN_FORMAT = 2
RUN_PACKAGES = ("scene3d.", "cryoem.")  # where a run's recorded model class may live
_FORMAT1_MODELS = {"gqn": "scene3d.gqn:GQN", "voxel": "scene3d.autoencoders:SceneAE",
                   "mesh": "scene3d.autoencoders:SceneAE", "nerf": "scene3d.autoencoders:SceneAE",
                   "atom-vae": "cryoem.vae:AtomVAE"}


def _run_config(run: Path) -> dict:
    rec = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    if not isinstance(rec, dict):
        raise UserError(f"{run / 'config.json'}: expected a JSON object")
    return rec


def run_kind(run: str | os.PathLike) -> str:
    """The kind of the run in folder ``run``: ``config.json``'s ``kind`` (format 2), else what its settings
    show (format 1: ``gqn`` or ``ae`` settings, or an atom-VAE ``model.json``). Raises ``UserError``."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: run folder not found")
    rec = _run_config(run)
    if isinstance(rec.get("kind"), str):
        return rec["kind"]
    settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    if "gqn" in settings:
        return "gqn"
    if isinstance(settings.get("ae"), dict) and settings["ae"].get("kind") in ("voxel", "mesh", "nerf"):
        return settings["ae"]["kind"]
    if (run / "model.json").is_file():
        return "atom-vae"
    if (run / "half1" / "model.json").is_file():
        raise UserError(f"{run}: a run of two half-sets; load {run / 'half1'} or {run / 'half2'}")
    raise UserError(f"{run}: not a Plato run folder (no config.json naming a run kind)")


def load_run(run: str | os.PathLike, device: str = "cpu"):
    """Any Plato run folder -> ``(model, settings)``, by the ``from_run`` of the class that trained it.

    The model is in eval mode on ``device``. Format-1 runs (before ``kind`` was recorded) load too.
    """
    import importlib

    kind = run_kind(run)
    target = _run_config(Path(run)).get("model") or _FORMAT1_MODELS.get(kind)
    if not isinstance(target, str) or not target.startswith(RUN_PACKAGES) or target.count(":") != 1:
        raise UserError(f"{run}: a run of kind {kind!r} that this version of Plato cannot load ({target!r})")
    module, name = target.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{run}: its model class {target} is not in this version of Plato ({one_line(e)})") from None
    return cls.from_run(run, device=device)


def auto_threads() -> int:
    """CPU threads for torch: the cores this process may use, minus the load of other work (1-minute load
    average), at least 1. Oversubscribing cores slows torch's CPU kernels several-fold."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load)))


def available_memory() -> int:
    """Bytes of memory available to new allocations now (Linux ``MemAvailable``; elsewhere the free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cli_main(build_parser, argv=None) -> int:
    """Entry point of a CLI whose subcommands set ``func``: parse, run, turn user errors into exit code 2."""
    def _main(argv):
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run_cli(_main, argv)


def run_cli(main_fn, argv=None) -> int:
    """Run a CLI entry point; a ``UserError`` (or a ``settings.SettingError``) becomes one line on stderr and exit
    code 2."""
    from plato_core.settings import SettingError

    try:
        return main_fn(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SettingError as e:  # a model setting's bad value, named by its flag
        print(f"error: {e.flag_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
