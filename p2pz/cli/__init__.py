"""The top layer: the ``p2pz`` command, one module per stage (``main`` builds the parser)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_passthrough_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    func: Callable[[list[str]], int],
    *,
    help: str,
    description: str,
) -> None:
    """A subcommand whose own parser (jsonargparse, LightningCLI) reads everything after its name.

    ``--help`` and ``--config`` included: with a prefix character no argument starts with, argparse
    sees no options here and one REMAINDER positional takes the rest of the line, handed to ``func``.
    """
    parser = subparsers.add_parser(
        name, help=help, description=description, add_help=False, prefix_chars="\0"
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=lambda args: func(list(args.rest)))
