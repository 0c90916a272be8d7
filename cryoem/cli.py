"""``cryoem``: the command line for cryo-EM. One subcommand per verb; each has ``--help``."""

from __future__ import annotations

import argparse

from cryoem import cli_data, cli_sim, cli_vae
from plato_core.runinfo import cli_main, cmd_info, version_string


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoem", description="Learn conformational distributions of proteins from cryo-EM images.")
    p.add_argument("--version", action="version", version=version_string("cryoem"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="versions and environment check")
    s.set_defaults(func=cmd_info)
    cli_sim.add_subcommands(sub)
    cli_vae.add_subcommands(sub)
    cli_data.add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
