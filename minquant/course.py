"""Helpers for the notebooks: check a learner's answer, and hold a measured number to a stated tolerance.

`check` is for exercises: it prints "correct" or what is off, never a bare traceback.
`check_close` is for the notebooks' own results. The last digits of a float computed by torch depend on
the CPU (AVX2 and AVX-512 machines run other vector kernels), so a cell that prints such numbers is
kept out of nbval's output comparison (`# NBVAL_IGNORE_OUTPUT`) and asserts them with `check_close`
instead: the numbers are still checked, to a tolerance every CPU meets (see notebooks/README.md).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def check(answer, expected, rel: float = 1e-3, hint: str = "") -> bool:
    """Compare a learner's `answer` with `expected` (numbers to `rel`, anything else exactly).

    Prints "correct" or what is off; an unanswered exercise (None or ...) is not an error. A correct
    float is not printed back: its last digits can differ between CPUs, and the learner has it already.
    """
    if answer is None or answer is ...:
        print("not answered yet" + (f"; hint: {hint}" if hint else ""))
        return False
    numbers = _is_number(expected) and _is_number(answer)
    ok = math.isclose(answer, expected, rel_tol=rel) if numbers else answer == expected
    if ok and numbers and (isinstance(answer, float) or isinstance(expected, float)):
        print("correct" + (f" (to {rel * 100:g}%)" if rel else ""))
    elif ok:
        print(f"correct: {answer!r}")
    else:
        print(f"not quite: you have {answer!r}" + (f"; hint: {hint}" if hint else ""))
    return ok


def check_close(value, expected, rel: float | None = None, abs: float | None = None, what: str = "value") -> None:
    """Assert that a measured number, or each number of a dict or list, is `expected` within `rel`/`abs`.

    With neither tolerance given, rel = 1e-3. Keys, lengths and non-numbers must match exactly. Raises
    AssertionError naming the first entry that is off, by how much; silent when everything agrees.
    """
    if rel is None and abs is None:
        rel = 1e-3
    rel, abs_tol = rel or 0.0, abs or 0.0
    if rel < 0 or abs_tol < 0:
        raise ValueError(f"tolerances must be >= 0, got rel={rel}, abs={abs_tol}")
    for name, got, want in _pairs(value, expected, what):
        if _is_number(want) and _is_number(got):
            if not math.isclose(got, want, rel_tol=rel, abs_tol=abs_tol):
                off = f"{got - want:+.3g}" + (f" ({(got - want) / want:+.2%})" if want else "")
                raise AssertionError(f"{name} is {got!r}, expected {want!r} within rel={rel:g}, abs={abs_tol:g}: "
                                     f"off by {off}")
        elif got != want:
            raise AssertionError(f"{name} is {got!r}, expected {want!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pairs(value, expected, name: str):
    """(name, value, expected) for every leaf of two nested dicts/lists of the same shape."""
    if hasattr(value, "tolist") and not isinstance(expected, (Mapping, str)):
        value = value.tolist()            # tensors and numpy arrays compare as nested lists
    if isinstance(expected, Mapping):
        if not isinstance(value, Mapping) or set(value) != set(expected):
            got = sorted(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
            raise AssertionError(f"{name}: expected the keys {sorted(map(str, expected))}, got {got}")
        for key in expected:
            yield from _pairs(value[key], expected[key], f"{name}[{key!r}]")
    elif isinstance(expected, Sequence) and not isinstance(expected, str):
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(expected):
            got = len(value) if isinstance(value, Sequence) and not isinstance(value, str) else type(value).__name__
            raise AssertionError(f"{name}: expected {len(expected)} entries, got {got}")
        for i, (v, e) in enumerate(zip(value, expected)):
            yield from _pairs(v, e, f"{name}[{i}]")
    else:
        yield name, value, expected
