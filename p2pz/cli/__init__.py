"""The top layer: the ``p2pz`` command, one module per stage (``main`` builds the parser)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path


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


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv``'s ``--config FILE`` / ``--config=FILE`` options (up to a ``--``), and the rest in order."""
    configs: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--config" and i + 1 < len(argv):
            configs += argv[i : i + 2]
            i += 2
            continue
        (configs if arg.startswith("--config=") else rest).append(arg)
        i += 1
    return configs, rest


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config FILE`` or ``--config=FILE`` in ``argv`` (up to a ``--``)."""
    configs, _ = split_config_args(argv)
    return [arg.removeprefix("--config=") for arg in configs if arg != "--config"]


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config`` file of ``argv`` through :func:`check_config_file`."""
    for path in config_files(argv):
        if not path.lstrip().startswith("{"):  # jsonargparse also takes inline JSON there
            check_config_file(path)


def check_config_file(path: str | os.PathLike, flag: str = "--config") -> dict:
    """A YAML config file's settings; a one-line UserError naming it when it cannot be one.

    Missing, a folder, empty, not text, not valid YAML, or not a mapping of ``setting: value``: the
    commands' own parsers (jsonargparse, LightningCLI) print their usage and a traceback or several
    lines for these, so the ``p2pz`` commands that take a config check it first.
    """
    import yaml

    from p2pz.utils.errors import UserError

    path = Path(path)
    fix = "give a YAML file of 'setting: value' lines (the shipped ones are in configs/)"
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; check the path, or {fix}")
    if not path.is_file():
        raise UserError(f"{flag} {path} is a folder, not a file; {fix}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be read ({err.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not a text file (not UTF-8); {fix}") from None
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(
            f"{flag} {path} is not valid YAML ({where}{problem}); fix it or start again from a shipped config"
        ) from None
    if settings is None:
        raise UserError(f"{flag} {path} is empty (or only comments); {fix}, or leave out {flag}")
    if not isinstance(settings, dict):
        kind = type(settings).__name__
        raise UserError(f"{flag} {path} holds a YAML {kind}, not a mapping of 'setting: value' lines; {fix}")
    return settings
