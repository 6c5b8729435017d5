"""What an edit is called: ``cat:dog`` on the command line, ``cat-to-dog`` in keys and file names.

The one parser and the one name of an edit; every layer above (shards, the shapes world, model
packages, benchmarks) uses these two instead of splitting strings itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pz.utils.errors import UserError

NAME_SEPARATOR = "-to-"


def slug(text: str) -> str:
    """A word as it may appear in a sample key or file name: letters, digits, ``_`` and ``-`` only."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip()).strip("_")
    return cleaned or "x"


@dataclass(frozen=True)
class Edit:
    """Replace the concept ``source`` by ``target`` (a word or a phrase: ``cat wearing a hat``)."""

    source: str
    target: str

    @property
    def name(self) -> str:
        """``cat-to-dog``: the edit's name in sample keys, shard folders, file names and benchmark keys."""
        return f"{slug(self.source)}{NAME_SEPARATOR}{slug(self.target)}"

    @property
    def spec(self) -> str:
        """``cat:dog``: how the edit is written on the command line."""
        return f"{self.source}:{self.target}"


def parse_edit(spec: str) -> Edit:
    """``cat:dog`` (or an edit's name, ``cat-to-dog``) -> ``Edit("cat", "dog")``; one-line error otherwise."""
    text = spec.strip()
    source, sep, target = text.partition(":")
    if not sep and NAME_SEPARATOR in text:
        source, sep, target = text.partition(NAME_SEPARATOR)
    source, target = source.strip(), target.strip()
    if not sep or not source or not target or ":" in target:
        raise UserError(f"edit {spec!r} is not SOURCE:TARGET (for example cat:dog or circle:square)")
    if source.lower() == target.lower():
        raise UserError(f"edit {spec!r} changes nothing; give two different words")
    return Edit(source, target)
