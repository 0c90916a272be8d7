"""``cryoem``: the command line for cryo-EM. One subcommand per verb; each has ``--help``."""

from __future__ import annotations

import argparse

from cryoem import data_cli, sim_cli, vae_cli
from scene3d.runinfo import cli_main, cmd_info, version_string


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoem", description="Learn conformational distributions of proteins from cryo-EM images.")
    p.add_argument("--version", action="version", version=version_string("cryoem"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="versions and environment check")
    s.set_defaults(func=cmd_info)
    sim_cli.add_subcommands(sub)
    vae_cli.add_subcommands(sub)
    data_cli.add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
