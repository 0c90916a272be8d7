"""Settings dataclasses <-> command-line flags: the one way every Plato command exposes a model's settings.

A setting is one dataclass field. Its flag is ``--field-name`` with the field's type and default; the help,
the choices and any other flag name come from the field's metadata, written with :func:`setting`::

    @dataclass
    class MyConfig:
        width: int = setting(32, "channels of the first stage")
        mode: str = setting("fast", "how to run", choices=("fast", "exact"))
        internal: float = setting(0.5, "not on the command line", cli=False)

    add_settings(parser, MyConfig)          # --width, --mode
    cfg = settings_from_args(MyConfig, args)

So adding a setting to a model takes one field: the flag, its help and its default follow.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

__all__ = ["setting", "SettingError", "add_settings", "settings_from_args", "add_run_args", "run_config"]

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


class SettingError(ValueError):
    """A bad value of a settings-dataclass field, raised by model code (a ``ValueError`` for library users).

    The command line (``runinfo.run_cli``) reports it under the field's flag, ``--field-name: problem``, on one
    line with exit code 2, so model code never has to know flag names. Other settings named in ``problem`` in
    backquotes (```infer_poses```) become flags there too (``--infer-poses``).
    """

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting}: {problem}")
        self.setting, self.problem = setting, problem

    def flag_message(self) -> str:
        import re

        problem = re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + m[1].replace("_", "-"), self.problem)
        return f"--{self.setting.replace('_', '-')}: {problem}"


def setting(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
            aliases: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A dataclass field with its command-line description.

    Args:
        default: the default value (an immutable value; tuples, not lists).
        help: one line for ``--help``; the default is appended.
        choices: the allowed values, if limited.
        flag: the flag's name when it is not ``--field-name``.
        aliases: older flag names that still work (hidden from ``--help``'s usage line only by convention).
        cli: False keeps the field off the command line (an internal setting recorded in config.json).
    """
    meta = {"help": help, "choices": choices, "flag": flag, "aliases": tuple(aliases), "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def _flag_type(annotation: str | type) -> tuple[type, bool]:
    """A field's annotation (a string under ``from __future__ import annotations``) -> (type, optional): a scalar
    type, or ``tuple[scalar, ...]`` for a variable-length tuple."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if text.startswith("tuple[") and text.endswith(", ...]"):  # a variable-length tuple: nargs="+"
        kind, optional = _flag_type(text[len("tuple["):-len(", ...]")])
        return tuple[kind, ...], optional
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    if len(names) != 1 or names[0] not in _SCALARS:
        raise TypeError(f"settings: cannot make a flag for a field of type {text!r}")
    return _SCALARS[names[0]], optional


def add_settings(parser, cls: type,
                 skip: typing.Iterable[str] = ()) -> None:
    """Add one flag per command-line field of the settings dataclass ``cls`` to ``parser`` (an argparse parser
    or argument group).

    Booleans become ``--name / --no-name``. ``dest`` is the field name, so :func:`settings_from_args` finds it.
    """
    skip = set(skip)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        kind, optional = _flag_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        text = meta.get("help", "")
        text = f"{text} (default: {default})" if default is not None else text
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": text.replace("%", "%%")}
        if kind is bool and not optional:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(type=typing.get_args(kind)[0], nargs="+")
        else:
            kw["type"] = kind
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        parser.add_argument(*names, **kw)


def settings_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of the settings dataclass ``cls`` from parsed ``args`` (fields without a flag keep their
    defaults), with ``overrides`` applied last."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}  # nargs="+" gives lists
    return cls(**{**given, **overrides})


def add_run_args(parser, *, batch_size: int, lr: float | None, lr_help: str = "learning rate") -> None:
    """The flags every training command shares, in one group: the budget (``--minutes``, ``--steps``,
    ``--epochs``; whichever is reached first stops the run), ``--batch-size``, ``--lr``, ``--seed``,
    ``--device``, ``--threads``, ``--quiet``, ``--resume`` and ``--overwrite``. Read them with :func:`run_config`.
    """
    g = parser.add_argument_group("run (budget: the first of --minutes / --steps / --epochs reached stops)")
    g.add_argument("--minutes", type=float, help="wall-clock budget, summed over resumes")
    g.add_argument("--steps", dest="train_steps", type=int, help="budget in optimisation steps")
    g.add_argument("--epochs", type=int, help="budget in passes over the data")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"(default: {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=lr_help + (f" (default: {lr:g})" if lr is not None else ""))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto, CUDA if any)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: the free cores, from the load)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar (into a log file rather than a terminal, the bar updates every 30 s)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (same settings)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --out (its files only; without this, a non-empty --out "
                        "is refused)")


def run_config(args: argparse.Namespace, require_budget: bool = True, **fixed: Any):
    """The ``plato_core.trainer.TrainConfig`` of :func:`add_run_args`' flags (and ``args.out``), with ``fixed``
    settings applied. Sets torch's CPU threads (and says how many) and seeds torch with ``--seed``, so call it
    before building the model. A missing budget or a bad value is a UserError."""
    import torch

    from plato_core.runinfo import UserError, auto_threads
    from plato_core.trainer import TrainConfig

    if require_budget and args.minutes is None and args.train_steps is None and args.epochs is None:
        raise UserError("give a training budget: --minutes M, --steps S or --epochs N (the first reached stops)")
    for name in ("minutes", "train_steps", "epochs", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = "--" + name.replace("train_", "").replace("_", "-")
            raise UserError(f"{flag}: expected a positive number, got {value}")
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)  # the model built next starts from the same weights for the same --seed
    if not args.quiet:
        print(f"{threads} CPU thread(s) for torch" + ("" if args.threads else " (the free cores; --threads N to "
                                                                              "choose)"))
    given = dict(out=args.out, minutes=args.minutes, steps=args.train_steps, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, resume=args.resume,
                 overwrite=args.overwrite, progress=not args.quiet)
    return TrainConfig(**{**given, **fixed})
