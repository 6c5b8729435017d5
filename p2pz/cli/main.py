"""The ``p2pz`` command: one entry point, a subcommand per stage of the pipeline.

Each module of ``p2pz.cli`` registers the subcommands of one stage (``register(subparsers)``).
Heavy imports (torch, diffusers) happen inside the command functions, which keeps ``--help`` fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from p2pz import __version__
from p2pz.cli import app, calibrate, demo, edit, evaluate, pairs, student, teacher, train
from p2pz.cli.options import OneLineParser, progress_bars
from p2pz.cli.quiet import library_noise_filtered
from p2pz.utils.errors import UserError

# Stages that add subcommands, in the order they appear in ``p2pz --help``.
COMMAND_MODULES = [teacher, edit, calibrate, pairs, train, student, evaluate, demo, app]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="p2pz",
        description=(
            "pix2pix-zero edits (cat -> dog, circle -> square) made by a diffusion teacher, "
            "distilled into fast single-pass students. Run 'p2pz demo --out DIR' for the whole "
            "job on the built-in default, or 'p2pz COMMAND --help' for one stage."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        with progress_bars(getattr(args, "progress", True)), library_noise_filtered():
            return int(args.func(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
