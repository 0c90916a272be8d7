"""Settings dataclasses <-> flags (plato_core.settings): one field is one flag, with its type, default and help."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import pytest

from plato_core.settings import add_settings, setting, settings_from_args


@dataclass
class Example:
    width: int = setting(32, "channels")
    rate: float | None = setting(None, "a rate")
    mode: str = setting("fast", "how", choices=("fast", "exact"))
    on: bool = setting(True, "a switch")
    hidden: float = setting(0.5, "internal", cli=False)
    renamed: int = setting(3, "has another flag", flag="--count", aliases=("--old-count",))


def parse(argv):
    p = argparse.ArgumentParser()
    add_settings(p, Example)
    return settings_from_args(Example, p.parse_args(argv))


def test_defaults_types_and_overrides():
    assert parse([]) == Example()
    got = parse(["--width", "7", "--rate", "0.25", "--mode", "exact", "--no-on", "--count", "9"])
    assert asdict(got) == {"width": 7, "rate": 0.25, "mode": "exact", "on": False, "hidden": 0.5, "renamed": 9}
    assert parse(["--old-count", "4"]).renamed == 4


def test_bad_values_and_internal_fields_are_refused_by_argparse():
    for argv in (["--mode", "slow"], ["--width", "x"], ["--hidden", "1"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_help_carries_the_text_and_default():
    p = argparse.ArgumentParser()
    add_settings(p, Example)
    text = p.format_help()
    assert "channels (default: 32)" in text and "--hidden" not in text and "{fast,exact}" in text


def test_a_new_setting_is_one_field():
    @dataclass
    class Grown(Example):
        depth: int = setting(2, "a new setting")

    p = argparse.ArgumentParser()
    add_settings(p, Grown)
    assert settings_from_args(Grown, p.parse_args(["--depth", "5"])).depth == 5


def test_the_atom_vae_flags_are_its_config():
    """Every command-line field of AtomVAEConfig is a `cryoem train` flag with the field's default."""
    from dataclasses import fields

    from cryoem.cli import build_parser
    from cryoem.vae import AtomVAEConfig

    args = build_parser().parse_args(["train", "--particles", "p.star", "--structure", "s.pdb", "--out", "o"])
    assert settings_from_args(AtomVAEConfig, args) == AtomVAEConfig()
    on_cli = [f.name for f in fields(AtomVAEConfig) if f.metadata.get("cli", True)]
    assert len(on_cli) >= 15 and all(hasattr(args, n) for n in on_cli)


@pytest.mark.parametrize("argv,cls,fixed", [
    # GQN's image size comes from the data when --image-size is not given (tests/scene3d/test_gqn.py)
    (["train", "gqn", "--data", "d", "--out", "o"], "scene3d.gqn:GQNConfig", {"image_size": 64}),
    (["train", "voxel", "--data", "d", "--out", "o"], "scene3d.autoencoders:AEConfig", {"kind": "voxel"}),
])
def test_the_scene_model_flags_are_their_configs(argv, cls, fixed):
    """With no model flags, the parsed settings are the config's defaults; a tuple field takes several values."""
    import importlib

    from scene3d.cli import build_parser

    module, name = cls.split(":")
    Config = getattr(importlib.import_module(module), name)
    assert settings_from_args(Config, build_parser().parse_args(argv), **fixed) == Config(**fixed)
    if name == "GQNConfig":
        assert build_parser().parse_args(argv).image_size is None  # left to the data
    if name == "AEConfig":
        args = build_parser().parse_args([*argv, "--contexts", "1", "3", "--latent", "7"])
        cfg = settings_from_args(Config, args)
        assert cfg.contexts == (1, 3) and cfg.latent_dim == 7


def test_a_setting_error_names_flags_on_the_command_line_and_settings_in_the_library(capsys):
    """Library users see setting names; the command line shows the same problem under flags, on one line, exit 2."""
    from plato_core.runinfo import run_cli
    from plato_core.settings import SettingError

    e = SettingError("batch_size", "64 is more than the 40 particles; lower it, or use `infer_poses` less")
    assert isinstance(e, ValueError) and str(e).startswith("batch_size: 64")

    def main(argv):
        raise e

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --batch-size: 64 is more than the 40 particles; lower it, or use --infer-poses less"
