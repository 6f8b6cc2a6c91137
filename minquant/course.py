"""Helpers for the notebooks' exercises: check an answer, say what is off, never a bare traceback."""
from __future__ import annotations

import math


def check(answer, expected, rel: float = 1e-3, hint: str = "") -> bool:
    """Compare a learner's `answer` with `expected` (numbers to `rel`, anything else exactly).

    Prints "correct" or what is off; an unanswered exercise (None or ...) is not an error.
    """
    if answer is None or answer is ...:
        print("not answered yet" + (f"; hint: {hint}" if hint else ""))
        return False
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        ok = math.isclose(answer, expected, rel_tol=rel)
    else:
        ok = answer == expected
    if ok:
        print(f"correct: {answer!r}")
    else:
        print(f"not quite: you have {answer!r}" + (f"; hint: {hint}" if hint else ""))
    return ok
