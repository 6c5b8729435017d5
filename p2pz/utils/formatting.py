"""Numbers as people read them: one way to print a duration and one way to print a ratio."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
    """``829`` -> ``"13 min 49 s"``; under a minute ``"42 s"``; whole seconds, minutes floored."""
    total = max(0, round(seconds))
    minutes, rest = divmod(total, 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def format_ratio(ratio: float) -> str:
    """A ratio (a speed-up, "×" goes after it), printed as :func:`format_number` prints any figure."""
    return format_number(ratio)


def format_number(value: float) -> str:
    """A measured figure as people read it: ``1250.3`` -> ``"1,250"``, ``42.17`` -> ``"42.2"``,
    ``3.14159`` -> ``"3.14"``, ``0.0123`` -> ``"0.012"`` (two significant digits below 1), never
    ``1.25e+03``."""
    if not math.isfinite(value):
        return str(value)
    size = abs(value)
    if round(size, 1) >= 100:  # rounded first: 99.96 is "100", not "100.0"
        return f"{value:,.0f}"
    if round(size, 2) >= 10:
        return f"{value:.1f}"
    if round(size, 2) >= 1 or size == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"
