"""The one error type the CLI turns into a one-line message and exit code 2, and the check every
number a user gives goes through."""

from __future__ import annotations

import math


class UserError(Exception):
    """Bad input or a missing precondition the user can fix: what is wrong and how to fix it."""


# Counts a run can really have: larger ones are typos, and would overflow the arithmetic downstream.
MAX_STEPS = 100_000_000
MAX_TOKENS_PER_STEP = 2**34
MAX_MICRO_BATCH = 65_536


def positive(flag: str, value, example: str = "", upper: float | None = None):
    """value if it is a finite number above 0 (and at most `upper`), else a UserError naming the flag.

    nan and inf parse as floats but would silently switch off a cap (every comparison with nan is
    False), so they are refused like 0 and negatives. None (not given) passes through.
    """
    if value is None:
        return None
    hint = f", e.g. {flag} {example}" if example else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} {value}: must be a finite number greater than 0{hint}")
    if upper is not None and value > upper:
        raise UserError(f"{flag} {value}: must be at most {upper:,}{hint}" if isinstance(upper, int)
                        else f"{flag} {value}: must be at most {upper:g}{hint}")
    return value
