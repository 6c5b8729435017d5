"""The flags every ``p2pz`` command shares, each defined once: name, values, default, help.

The convention (``tests/test_cli_conventions.py`` checks it on every command):

- ``--device auto|cpu|cuda|cuda:N``: default ``auto``, cuda when present, else cpu
  (:func:`p2pz.utils.devices.resolve_device` is the one place that decides);
- ``--dtype float32|float16|bfloat16`` (``fp32``, ``fp16``, ``bf16`` accepted, normalised to the long
  name; ``auto`` where the command picks by device);
- ``--seed N`` (>= 0) wherever the result depends on random draws;
- ``--no-progress``: no progress bars (the command's own, its libraries' and its subprocesses');
- ``--edit SOURCE:TARGET`` for an edit (``p2pz.teacher.edits.parse_edit`` reads it);
- lists are space-separated values after one flag (``--batches 1 4 16``); the flag may be repeated and
  the flags that used to take ``a,b`` still split commas;
- numbers are checked where they enter, by their kind (``p2pz.utils.values``): a bad value is one line,
  ``error: argument --batch-size: must be >= 1, got 0``, and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from p2pz.utils.devices import DTYPES, dtype_name
from p2pz.utils.values import device_name, non_negative_int

DEVICE_HELP = "torch device: auto (cuda when present, else cpu), cpu, cuda or cuda:N (default: auto)"
MARKUP = re.compile(r"``(.+?)``|:[\w:]+:`~?(.+?)`|`([^`\n]+)`")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``error: ...; see 'p2pz edit --help'``), exit 2.

    argparse prints the whole usage before its error; a bad value is easier to see alone. Subparsers
    made from it (``add_subparsers``) are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())}; see '{self.prog} --help'\n")


def plain(text: str) -> str:
    """reStructuredText inline markup (``p2pz x``, :func:`f`, `x`) as plain text for ``--help`` ('p2pz x')."""
    return MARKUP.sub(lambda m: f"'{next(g for g in m.groups() if g is not None)}'", text)


def add_device(parser: Any, what: str = "") -> None:
    """``--device``, default auto; commands resolve it with :func:`p2pz.utils.devices.resolve_device`."""
    help_text = DEVICE_HELP if not what else DEVICE_HELP.replace("torch device", f"torch device of {what}")
    parser.add_argument("--device", type=device_name, default="auto", metavar="DEVICE", help=help_text)


def add_dtype(parser: Any, default: str = "float32", *, auto: bool = False, what: str = "the models") -> None:
    """``--dtype``: float32, float16 or bfloat16 (short names accepted), plus ``auto`` with ``auto``."""
    choices = (("auto",) if auto else ()) + DTYPES
    note = "; auto: float16 on cuda, float32 on cpu" if auto else ""
    parser.add_argument(
        "--dtype",
        type=lambda text: dtype_name(text, allow_auto=auto),
        choices=choices,
        default=default,
        metavar="{" + ",".join(choices) + "}",
        help=f"precision of {what}: {', '.join(choices)} (fp32, fp16, bf16 accepted{note}; "
        f"default: {default})",
    )


def add_seed(parser: Any, what: str = "the random draws") -> None:
    """``--seed N`` (>= 0), default 0."""
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="N", help=f"seed of {what} (default: 0)"
    )


def add_progress(parser: Any) -> None:
    """``--no-progress`` -> ``args.progress`` False; :func:`progress_bars` applies it to the libraries."""
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="show no progress bars (e.g. in logs of batch jobs)",
    )


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, tqdm bars that do not set ``disable`` themselves are off: tqdm reads
    ``TQDM_DISABLE`` when it is first imported, which a command does after this (the libraries' bars,
    and those of subprocesses started meanwhile). The command turns off its own through ``args.progress``."""
    if enabled:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def edit_spec(text: str) -> str:
    """``--edit``'s value: checked by the one edit parser (:func:`p2pz.teacher.edits.parse_edit`),
    kept as written (``cat:dog``)."""
    from p2pz.teacher.edits import parse_edit
    from p2pz.utils.errors import UserError

    try:
        parse_edit(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"edit {text!r} ")) from None
    return text.strip()


def add_edit(parser: Any, *, many: bool = False, help: str, **kwargs: Any) -> None:
    """``--edit SOURCE:TARGET`` (one, or with ``many`` a list: ``--edit a:b c:d``, also repeatable)."""
    if many:
        kwargs.update(nargs="+", action=ExtendList)
    parser.add_argument("--edit", type=edit_spec, metavar="SOURCE:TARGET", help=help, **kwargs)


def add_source_target(parser: Any) -> None:
    """``--source`` / ``--target``: the older spelling of ``--edit SOURCE:TARGET`` (direction, edit)."""
    parser.add_argument(
        "--source", metavar="WORD", help="concept to edit away from, e.g. cat (or use --edit)"
    )
    parser.add_argument("--target", metavar="WORD", help="concept to edit towards, e.g. dog (or use --edit)")


def source_target(args: argparse.Namespace, required: bool = True) -> tuple[str | None, str | None]:
    """The edit's (source, target) from ``--edit`` or ``--source``/``--target``; one line when both or
    (``required``) neither are given."""
    from p2pz.teacher.edits import parse_edit
    from p2pz.utils.errors import UserError

    if args.edit is not None:
        if args.source is not None or args.target is not None:
            raise UserError("give the edit once: --edit SOURCE:TARGET or --source and --target, not both")
        edit = parse_edit(args.edit)
        return edit.source, edit.target
    if required and (args.source is None or args.target is None):
        raise UserError("give the edit: --edit SOURCE:TARGET (e.g. --edit cat:dog), or --source and --target")
    return args.source, args.target


class ExtendList(argparse.Action):
    """A list flag: space-separated values (``--batches 1 4 16``), the flag repeatable (its values add
    up), and with ``split_commas`` each value split at commas too (``--batches 1,4,16``, the older form),
    each part then read by ``item_type`` and checked against ``item_choices``. The first use on the
    command line replaces the default."""

    def __init__(
        self,
        *args: Any,
        split_commas: bool = False,
        item_type: Callable[[str], Any] = str,
        item_choices: tuple[Any, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        self.split_commas, self.item_type, self.item_choices = split_commas, item_type, item_choices
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items: list[Any] = []
        for value in values:
            if self.split_commas and isinstance(value, str):
                items += [self._convert(parser, part.strip()) for part in value.split(",") if part.strip()]
            else:
                items.append(value)
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *items])

    def _convert(self, parser: argparse.ArgumentParser, text: str) -> Any:
        flag = "/".join(self.option_strings)
        try:
            value = self.item_type(text)
        except (argparse.ArgumentTypeError, ValueError) as err:
            parser.error(f"argument {flag}: {err}")
        if self.item_choices is not None and value not in self.item_choices:
            parser.error(
                f"argument {flag}: must be one of {', '.join(map(str, self.item_choices))}, got {text!r}"
            )
        return value


def add_list(
    parser: Any,
    flag: str,
    item_type: Callable[[str], Any] = str,
    *,
    nargs: str = "+",
    choices: tuple[Any, ...] | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """A list flag of ``item_type`` values (one of ``choices``) in the one list syntax (see
    :class:`ExtendList`); values given as ``a,b`` are split too, so older command lines keep working."""
    return parser.add_argument(
        flag,
        nargs=nargs,
        action=ExtendList,
        split_commas=True,
        item_type=item_type,
        item_choices=choices,
        **kwargs,
    )


def list_items(values: Any) -> list[Any]:
    """A list flag's value as a list (its default may be a list or None)."""
    return [] if values is None else list(values)


def hidden_alias(parser: Any, flag: str, dest: str, **kwargs: Any) -> None:
    """An older spelling of a renamed flag: accepted, not shown in ``--help``."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
