"""Inputs a folder command leaves out: one line each, the rest finished, a non-zero exit at the end.

``p2pz apply`` (images) and ``p2pz eval --pairs`` (pairs in shards) read many inputs. An unusable one
(corrupt, truncated, not an image: the reasons of ``p2pz generate``'s manifest,
:class:`p2pz.data.pairs.inputs.InputSkipped`) costs only itself: it is named on stderr with the
reason, the others are done and written, and the command ends with one ``error:`` line counting
what it left out (exit 2), so that a script notices. When nothing could be read, the command stops
with the error alone, before anything is written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from p2pz.utils.errors import UserError


@dataclass
class Skipped:
    """The inputs left out, as (name, reason); ``what`` names them in messages ("images", "pairs")."""

    what: str
    inputs: list[tuple[str, str]] = field(default_factory=list)
    reported: int = 0  # how many of them are named on stderr already

    def add(self, name: str | os.PathLike, reason: str) -> None:
        self.inputs.append((os.fspath(name), reason))

    def __len__(self) -> int:
        return len(self.inputs)

    def report(self) -> None:
        """Name each input left out since the last report on stderr: ``skipped NAME: REASON``."""
        for name, reason in self.inputs[self.reported :]:
            print(f"skipped {name}: {reason}", file=sys.stderr, flush=True)
        self.reported = len(self.inputs)

    def check_some_usable(self, usable: int) -> None:
        """After reading, before writing: stop when no input is usable (the one input and its reason,
        or each named and how many), else name the ones left out and go on with the rest."""
        if usable == 0 and len(self) == 1:
            name, reason = self.inputs[0]
            raise UserError(f"cannot use {name}: {reason}")
        self.report()
        if usable == 0 and self.inputs:
            raise UserError(f"none of the {len(self)} {self.what} could be used (each named above)")

    def summary(self) -> str:
        """``" (2 skipped)"`` for the command's last line, as ``p2pz generate`` says it; ``""`` if none."""
        return f" ({len(self)} skipped)" if self.inputs else ""

    def raise_if_any(self, done: str) -> None:
        """At the end of a command that finished the rest: the one line that makes its exit non-zero."""
        self.report()
        if self.inputs:
            what = self.what if len(self) > 1 else self.what.removesuffix("s")
            raise UserError(f"{len(self)} {what} skipped (each named above); {done}")
