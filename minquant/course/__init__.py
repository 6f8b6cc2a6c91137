"""Helpers for the notebooks: check a learner's answer, and hold a measured number to a stated tolerance.

`check_answer` and `check_function` are for exercises: the expected answer is computed here, by the
notebook's answer module (`minquant/course/answers_NN.py`), so a check cell never shows it; they print
"correct" or what is off, never the answer and never a bare traceback. `check` compares with an
expected value the cell already has (a number the learner computed two ways, say).
`check_close` is for the notebooks' own results. The last digits of a float computed by torch depend on
the CPU (AVX2 and AVX-512 machines run other vector kernels), so a cell that prints such numbers is
kept out of nbval's output comparison (`# NBVAL_IGNORE_OUTPUT`) and asserts them with `check_close`
instead: the numbers are still checked, to a tolerance every CPU meets (see notebooks/README.md).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence

# exercise id ("07.2": notebook 07, exercise 2) -> its answer, registered by the answer modules
_ANSWERS: dict[str, Callable] = {}
_CASES: dict[str, Callable] = {}


def answer(exercise: str):
    """Register the function that computes an exercise's expected answer (an answer module's decorator).

    For `check_answer` it takes no arguments and returns the value; for `check_function` it is the
    reference the learner's function is run against, called with the same arguments."""
    def register(fn):
        _ANSWERS[exercise] = fn
        return fn
    return register


def cases(exercise: str):
    """Register the inputs a `check_function` exercise is tried on: a function returning a list of
    argument tuples (fresh seeded random data, edge cases), never shown to the learner."""
    def register(fn):
        _CASES[exercise] = fn
        return fn
    return register


def _lookup(table: dict, exercise: str) -> Callable:
    if exercise not in table:  # answer modules are imported on first use: notebooks 01-02 need no torch model
        try:
            importlib.import_module(f"minquant.course.answers_{exercise.split('.')[0]}")
        except ModuleNotFoundError:
            pass
    if exercise not in table:
        raise KeyError(f"no exercise {exercise!r} in minquant.course")
    return table[exercise]


def layer_inputs(name: str, layer: str, n: int = 24, seqlen: int = 512, seed: int = 0) -> tuple:
    """(weight, inputs (n * seqlen, in_features)) of one linear of a packaged model, on n C4 windows:
    how notebooks 07 and 08 build their real layer, for their answer modules. The forward pass stops
    at the layer (StopForward), so only the blocks before it run."""
    key = (name, layer, n, seqlen, seed)
    if key not in _LAYER_INPUTS:
        import torch

        from minquant.calibrate import StopForward
        from minquant.data import calibration_windows

        model, tok = load_model_quietly(name)
        xs = []

        def grab(module, args):
            xs.append(args[0].reshape(-1, args[0].shape[-1]))
            raise StopForward
        handle = model.get_submodule(layer).register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                for batch in calibration_windows("c4", tok, n=n, seqlen=seqlen, seed=seed).split(8):
                    try:
                        model(batch, use_cache=False)
                    except StopForward:
                        pass
        finally:
            handle.remove()
        _LAYER_INPUTS[key] = (model.get_submodule(layer).weight.data.clone(), torch.cat(xs))
    return _LAYER_INPUTS[key]


_LAYER_INPUTS: dict = {}


def check_answer(exercise: str, answer, rel: float = 1e-3, hint: str = "") -> bool:
    """Compare a learner's `answer` with exercise `exercise`'s expected value, computed here and not shown."""
    expected = _lookup(_ANSWERS, exercise)
    if answer is None or answer is ...:  # no need to compute the expected value (it may load a model)
        return check(answer, None, hint=hint)
    return check(answer, expected(), rel=rel, hint=hint)


_MODELS: dict = {}


def load_model_quietly(name: str):
    """`minquant.models.load_model(name)`, loaded once per process and without progress bars: for answer
    modules that need a notebook's model, so a check cell prints only its verdict."""
    if name not in _MODELS:
        from transformers.utils import logging

        from minquant.models import load_model

        was_on = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            _MODELS[name] = load_model(name)
        finally:
            if was_on:
                logging.enable_progress_bar()
    return _MODELS[name]


def check_function(exercise: str, fn: Callable, rtol: float = 1e-5, atol: float = 1e-6, hint: str = "") -> bool:
    """Run the learner's `fn` on the exercise's hidden cases and compare each result with the reference's.

    A stub that raises NotImplementedError is "not answered yet"; an exception or a wrong shape says
    which case and what went wrong; a wrong value says by how much (the largest difference), never
    the expected value itself. Tensors (or tuples of them) compare with torch.testing's rtol/atol."""
    import torch

    reference, inputs = _lookup(_ANSWERS, exercise), _lookup(_CASES, exercise)()
    for i, args in enumerate(inputs, 1):
        case = f"case {i} of {len(inputs)} ({_shapes(args)})"
        try:
            got = fn(*_clone(args))
        except NotImplementedError:
            print("not answered yet" + (f"; hint: {hint}" if hint else ""))
            return False
        except Exception as e:  # the learner's bug, reported as such
            print(f"not quite: {case} raised {type(e).__name__}: {e}" + (f"; hint: {hint}" if hint else ""))
            return False
        want = reference(*_clone(args))
        got_t, want_t = _as_tuple(got), _as_tuple(want)
        if len(got_t) != len(want_t):
            print(f"not quite: {case} returned {len(got_t)} value(s), expected {len(want_t)}")
            return False
        for j, (g, w) in enumerate(zip(got_t, want_t)):
            what = f"{case}, output {j}" if len(want_t) > 1 else case
            if not isinstance(g, torch.Tensor):
                g = torch.as_tensor(g)
            w = torch.as_tensor(w)
            if tuple(g.shape) != tuple(w.shape):
                print(f"not quite: {what} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
                return False
            g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
            if not torch.allclose(g64, w64, rtol=rtol, atol=atol, equal_nan=True):
                diff = (g64 - w64).abs()
                bad = int((diff > atol + rtol * w64.abs()).sum())
                print(f"not quite: {what}: {bad} of {w64.numel()} entries off, the largest by {diff.max().item():.3g}"
                      + (f"; hint: {hint}" if hint else ""))
                return False
    print(f"correct: all {len(inputs)} cases agree")
    return True


def _clone(args: tuple) -> tuple:  # the learner's function may change its inputs in place; the reference gets fresh ones
    import torch

    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _shapes(args: tuple) -> str:
    import torch

    return ", ".join(f"{tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args)


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
