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
