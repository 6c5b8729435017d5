"""The one definition of each kind of value a setting takes: its range, and its message when out of it.

Each checker takes the text of a flag (or the number a config or a caller gives) and returns the value,
or raises ``argparse.ArgumentTypeError`` with the reason in a few words (``must be >= 1, got 0``):
argparse turns that into ``error: argument --batch-size: must be >= 1, got 0`` and exit status 2, and a
settings dataclass's validation (``p2pz generate``) wraps it in a :class:`~p2pz.utils.errors.UserError`.
The command line uses them as ``type=`` (``p2pz.cli.options``), so every command checks a count, a
seed or a scale the same way, before any model loads.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

# The devices a flag accepts: ``auto`` (cuda when present, else cpu; see p2pz.utils.devices) or a torch
# device name.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _number(value: Any, kind: type) -> int | float:
    """``value`` (a flag's text or a number) as ``kind``; a short reason when it is not one."""
    if isinstance(value, bool):  # True is an int to Python, not a count to a user
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def int_at_least(low: int) -> Callable[[Any], int]:
    """A whole number ``>= low``."""

    def check(value: Any) -> int:
        number = _number(value, int)
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
        return number

    check.__name__ = {1: "positive_int", 0: "non_negative_int"}.get(low, f"int_at_least_{low}")
    return check


positive_int = int_at_least(1)  # counts: batch sizes, steps, scenes, pairs
non_negative_int = int_at_least(0)  # seeds, warm-up calls, "0 for none"


def finite_float(value: Any) -> float:
    """Any finite number (not nan, not inf)."""
    return float(_number(value, float))


def non_negative_float(value: Any) -> float:
    """A finite number ``>= 0`` (guidance scales and steps: 0 turns the guidance off)."""
    number = finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number:g}")
    return number


def positive_float(value: Any) -> float:
    """A finite number ``> 0``."""
    number = finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {number:g}")
    return number


def probability(value: Any) -> float:
    """A finite number in ``[0, 1]``."""
    number = finite_float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {number:g}")
    return number


def device_name(value: Any) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps`` ... (checked by its form: no torch import here)."""
    text = str(value).strip().lower()
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return text
