"""How money, time and large counts are shown, everywhere: one definition each."""

from __future__ import annotations

import time
from typing import Optional


def usd(x: Optional[float]) -> str:
    """Cents for real runs, more digits for the fractions of a cent of a tiny local run; '-' if unknown."""
    if x is None:
        return "-"
    if 0 < abs(x) < 0.01:
        return f"${x:.4f}"
    return f"${x:,.2f}"


def duration(seconds: Optional[float]) -> str:
    """'42 s', '12.5 min', '24.9 h', '3.2 d'; '-' if unknown."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def hours(h: Optional[float]) -> str:
    return duration(None if h is None else h * 3600)


def human(n: float) -> str:
    """1234567 -> '1.23M' (tokens, tokens/s)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def when(t: float) -> str:
    """A moment (time.time()) in local time, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
