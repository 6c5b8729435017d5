"""CLI subcommands of the data stage: ``p2pz generate`` and ``p2pz shards inspect``."""

from __future__ import annotations


def register(subparsers) -> None:
    from data.generate import register_parser as register_generate
    from data.inspect import register_parser as register_shards

    register_generate(subparsers)
    register_shards(subparsers)
