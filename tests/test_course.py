"""minquant.course: `check` (the notebooks' exercise cells) and `check_close` (their measured results)."""
import configparser
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minquant.course import check, check_close


def test_check_accepts_right_answers(capsys):
    assert check(4.1723, 4.172365824) is True  # within the default 1e-3
    assert check(134773, 134773, rel=0) is True
    assert check("int4", "int4") is True
    assert capsys.readouterr().out.count("correct") == 3


def test_check_prints_no_float_digits_that_could_differ_between_cpus(capsys):
    check(60.732427991623105, 60.7324279916231)
    check(0.2, 0.2, rel=0)
    check(134773, 134773, rel=0)
    assert capsys.readouterr().out.splitlines() == ["correct (to 0.1%)", "correct", "correct: 134773"]


def test_check_rejects_wrong_answers_with_the_hint(capsys):
    assert check(4.0, 4.172365824, hint="count the zeros") is False
    assert check(134772, 134773, rel=0) is False
    assert "not quite: you have 4.0; hint: count the zeros" in capsys.readouterr().out


def test_unanswered_is_not_an_error(capsys):
    assert check(None, 1.0, hint="start from the config") is False
    assert check(..., 1.0) is False
    assert capsys.readouterr().out.splitlines() == ["not answered yet; hint: start from the config",
                                                    "not answered yet"]


def test_check_close_accepts_cpu_rounding_and_rejects_a_real_change(capsys):
    # the FIELD-NOTES pair: one perplexity on an AVX-512 and an AVX2 machine
    check_close(14.085038, 14.084923)
    check_close(14.085038, 14.09, rel=1e-3)
    with pytest.raises(AssertionError, match=r"perplexity is 14\.2, expected 14\.09 .*\+0\.78%"):
        check_close(14.2, 14.09, what="perplexity")
    assert capsys.readouterr().out == ""  # silent when it passes: nothing machine-dependent printed


def test_check_close_abs_and_rel_tolerances():
    check_close(2.7e-7, 0.0, abs=1e-6)            # a max error that only has to be small
    with pytest.raises(AssertionError):
        check_close(2.7e-7, 0.0, rel=0.5)         # no relative tolerance makes 0 close to anything else
    check_close(100.4, 100.0, rel=0, abs=0.5)
    with pytest.raises(AssertionError):
        check_close(100.6, 100.0, rel=0, abs=0.5)
    with pytest.raises(ValueError, match="tolerances"):
        check_close(1.0, 1.0, rel=-1)


def test_check_close_walks_dicts_lists_and_tensors_naming_the_entry():
    ppl = {"fp32": 14.085, "RTN W4 g64": [19.68, 19.70]}
    check_close(ppl, {"fp32": 14.09, "RTN W4 g64": [19.68, 19.69]})
    with pytest.raises(AssertionError, match=r"ppl\['RTN W4 g64'\]\[1\] is 19\.7, expected 19\.6"):
        check_close(ppl, {"fp32": 14.09, "RTN W4 g64": [19.68, 19.6]}, what="ppl")
    with pytest.raises(AssertionError, match="keys"):
        check_close({"fp32": 1.0}, {"fp16": 1.0})
    with pytest.raises(AssertionError, match="3 entries, got 2"):
        check_close([1.0, 2.0], [1.0, 2.0, 3.0])
    check_close(torch.tensor([0.5, 0.25]), [0.5, 0.25], rel=0)
    check_close(np.float32(0.1), 0.1, rel=1e-6)
    check_close(torch.tensor(3), 3, rel=0)
    check_close(["self_attn.o_proj", 7], ["self_attn.o_proj", 7])   # non-numbers compare exactly
    with pytest.raises(AssertionError, match="'mlp.up_proj', expected 'self_attn.o_proj'"):
        check_close("mlp.up_proj", "self_attn.o_proj")


# The notebooks' output rule (notebooks/README.md): what nbval compares must be the same on every CPU.
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
SANITIZE = Path(__file__).parent / "nbval_sanitize.cfg"


def _code_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_notebook_is_found():
    assert len(NOTEBOOKS) >= 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_uncompared_cells_say_why_and_still_check_their_numbers(path):
    for source in _code_cells(path):
        lines = [line.strip() for line in source.splitlines()]
        if "# NBVAL_IGNORE_OUTPUT" not in lines:
            continue
        why = lines[lines.index("# NBVAL_IGNORE_OUTPUT") + 1]
        assert why.startswith("# ("), f"{path.name}: say why under # NBVAL_IGNORE_OUTPUT:\n{source[:300]}"
        only_timings = any(word in why for word in ("timing", "progress bar"))
        checked = any(s in source for s in ("check_close(", "assert", "check("))
        assert only_timings or checked, f"{path.name}: an uncompared cell must assert its numbers:\n{source[:300]}"


def test_the_sanitizer_blurs_no_digits():
    # a pattern that rewrites digits would hide a CPU-dependent output instead of fixing its cell
    patterns = [(m["regex"], m["replace"]) for m in _sections(SANITIZE.read_text())]
    text = "perplexity 14.09, error 2.7e-07, 0.031415898352861404, 134,515,008 bytes, SQNR 20.8 dB"
    for regex, replace in patterns:
        assert re.sub(regex, replace, text) == text, regex


def _sections(cfg: str):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(cfg)
    return [parser[s] for s in parser.sections()]


# --- exercises whose answers are computed by minquant.course, never shown in the notebook -----------

from minquant import course  # noqa: E402
from minquant.course import check_answer, check_function  # noqa: E402


@course.answer("test.1")
def _toy_reference(x, scale):  # the shape of a real answer module: a reference and its hidden cases
    return (x / scale).round(), x.abs().amax()


@course.cases("test.1")
def _toy_cases():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 8, generator=g), 0.1), (torch.zeros(3), 1.0)]


@course.answer("test.2")
def _toy_value():
    return 0.5 * 3


def test_check_function_accepts_a_right_function_and_keeps_inputs_fresh(capsys):
    def right(x, scale):
        out = (x / scale).round(), x.abs().amax()
        x.zero_()  # a learner's function that scribbles on its input: the reference still gets the original
        return out
    assert check_function("test.1", right) is True
    assert capsys.readouterr().out == "correct: all 2 cases agree\n"


def test_check_function_reports_what_is_off_without_the_expected_value(capsys):
    assert check_function("test.1", lambda x, s: ((x / s).floor(), x.abs().amax()), hint="round") is False
    out = capsys.readouterr().out
    assert out.startswith("not quite: case 1 of 2 ((4, 8), 0.1), output 0: ") and "the largest by 1" in out
    assert out.rstrip().endswith("hint: round")
    assert check_function("test.1", lambda x, s: (x / s).round()) is False
    assert "returned 1 value(s), expected 2" in capsys.readouterr().out
    assert check_function("test.1", lambda x, s: ((x / s).round().T, x.abs().amax())) is False
    assert "has shape (8, 4), expected (4, 8)" in capsys.readouterr().out
    assert check_function("test.1", lambda x, s: 1 / 0) is False
    assert "raised ZeroDivisionError" in capsys.readouterr().out


def test_a_stub_is_not_answered_yet(capsys):
    def stub(x, scale):
        raise NotImplementedError
    assert check_function("test.1", stub, hint="divide, then round") is False
    assert check_answer("test.2", None) is False
    assert capsys.readouterr().out.splitlines() == ["not answered yet; hint: divide, then round",
                                                    "not answered yet"]


def test_check_answer_compares_with_the_hidden_value(capsys):
    assert check_answer("test.2", 1.5) is True
    assert check_answer("test.2", 1.6) is False
    with pytest.raises(KeyError, match="no exercise '99.9'"):
        check_answer("99.9", 1.0)


def _sections_of(path):
    """(exercise cells, solution cells) of a notebook: the code cells under its Exercises heading
    up to its Solutions heading, and those after it."""
    cells = json.loads(path.read_text())["cells"]
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"]
    first = {i: "".join(cells[i]["source"]).splitlines()[0] for i in heads if cells[i]["source"]}
    ex = [i for i, line in first.items() if re.match(r"^## (\d+\. )?Exercises", line)]
    sol = [i for i, line in first.items() if line.startswith("### Solutions")]
    assert len(ex) == 1 and len(sol) == 1 and ex[0] < sol[0], \
        f"{path.name}: one '## Exercises' heading, then one '### Solutions' heading"
    code = lambda lo, hi: [c for c in cells[lo:hi] if c["cell_type"] == "code"]  # noqa: E731
    return code(ex[0], sol[0]), code(sol[0], len(cells))


CHECKED = re.compile(r"""check_(answer|function)\(\s*["'](\d\d\.\d+)["']""")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_cells_never_hold_their_answers(path):
    exercises, solutions = _sections_of(path)
    for cell in exercises:
        source = "".join(cell["source"])
        # `check(answer, expected)` would put the expected value in the learner's view
        assert not re.search(r"(?<![\w.])check\(", source), \
            f"{path.name}: an exercise checks with check_answer/check_function, whose answers are hidden:\n{source[:300]}"
    asked = {m[1] for c in exercises for m in CHECKED.findall("".join(c["source"]))}
    solved = {m[1] for c in solutions for m in CHECKED.findall("".join(c["source"]))}
    assert asked, f"{path.name}: no checked exercise"
    assert asked == solved, f"{path.name}: exercises {sorted(asked)} but solutions check {sorted(solved)}"
    for cell in solutions:
        assert not cell.get("outputs"), f"{path.name}: a Solutions cell is committed without outputs " \
            f"(python notebooks/execute.py {path.relative_to(path.parent.parent)}):\n{''.join(cell['source'])[:200]}"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2] >= "03"], ids=lambda p: p.stem)
def test_from_notebook_03_on_the_learner_writes_a_function(path):
    exercises, _ = _sections_of(path)
    sources = ["".join(c["source"]) for c in exercises]
    assert any("raise NotImplementedError" in s for s in sources), f"{path.name}: no function stub to fill in"
    assert any("check_function(" in s for s in sources), f"{path.name}: no check_function exercise"


def _exercise_ids(kind):
    found = set()
    for path in NOTEBOOKS:
        for source in _code_cells(path):
            found |= {m[1] for m in CHECKED.findall(source) if m[0] == kind}
    return sorted(found)


def _perturbed(x):
    if isinstance(x, (tuple, list)):
        return type(x)(_perturbed(v) for v in x)
    return x + 1 if isinstance(x, torch.Tensor) and x.dtype != torch.bool else ~x if isinstance(x, torch.Tensor) else x + 1


@pytest.mark.parametrize("exercise", _exercise_ids("function"))
def test_each_function_exercise_passes_its_reference_and_fails_a_wrong_one(exercise, capsys):
    reference = course._lookup(course._ANSWERS, exercise)
    cases = course._lookup(course._CASES, exercise)
    assert len(cases()) >= 2, "try the learner's function on more than one case"
    for a, b in zip(cases(), cases()):  # seeded: the same cases every run
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert check_function(exercise, reference) is True
    assert check_function(exercise, lambda *args: _perturbed(reference(*args))) is False
    assert "not quite" in capsys.readouterr().out


@pytest.mark.parametrize("exercise", _exercise_ids("answer"))
def test_each_answer_exercise_has_a_value(exercise):
    value = course._lookup(course._ANSWERS, exercise)()
    assert value is not None and value is not ...
