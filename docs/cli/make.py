"""Write each ``p2pz`` command's ``--help`` into docs/cli/<command>.txt (``python docs/cli/make.py``).

The help is rendered in-process through the real entry point (``p2pz.cli.main.main``), 100 columns
wide whatever the terminal, so the files change only when the commands do. ``--check`` writes nothing
and exits 1 naming the stale files; ``tests/test_docs.py`` runs the same comparison.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH = "100"

# Every top-level command, plus the subcommands with their own flags. `train` is a LightningCLI:
# its top-level help lists fit / validate / ...; `p2pz train fit --help` lists every Trainer option
# of the installed Lightning, so it is left to the terminal.
COMMANDS: list[list[str]] = [
    [],
    ["make-tiny"],
    ["direction"],
    ["edit"],
    ["calibrate"],
    ["generate"],
    ["shards"],
    ["shards", "inspect"],
    ["shards", "filter"],
    ["train"],
    ["export"],
    ["apply"],
    ["bench"],
    ["eval"],
    ["demo"],
    ["app"],
]


def file_name(command: list[str]) -> str:
    return "-".join(["p2pz", *command]) + ".txt"


def render(command: list[str]) -> str:
    """``p2pz COMMAND --help``'s output, as 100 columns show it."""
    from p2pz.cli.main import main

    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*command, "--help"])
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    text = out.getvalue()
    if not text.strip():
        raise RuntimeError(f"'p2pz {' '.join(command)} --help' printed nothing")
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def render_all() -> dict[str, str]:
    """Every file's text, by file name."""
    return {file_name(c): render(c) for c in COMMANDS}


def stale(folder: Path = HERE, rendered: dict[str, str] | None = None) -> list[str]:
    """The files of ``folder`` that differ from the commands' help now (``rendered``: render_all()'s
    result, if already made), missing ones included, and any left from a command that is gone."""
    rendered = render_all() if rendered is None else rendered
    wrong = [name for name, text in rendered.items() if _read(folder / name) != text]
    return wrong + sorted(p.name for p in folder.glob("p2pz*.txt") if p.name not in rendered)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def main(argv: list[str]) -> int:
    if "--check" in argv:
        wrong = stale()
        for name in wrong:
            print(f"stale: docs/cli/{name} (run: python docs/cli/make.py)")
        return 1 if wrong else 0
    for old in HERE.glob("p2pz*.txt"):
        old.unlink()
    for name, text in render_all().items():
        (HERE / name).write_text(text)
        print(f"docs/cli/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
