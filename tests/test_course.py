"""minquant.course.check: what the notebooks' exercise cells rely on."""
from minquant.course import check


def test_check_accepts_right_answers(capsys):
    assert check(4.1723, 4.172365824) is True  # within the default 1e-3
    assert check(134773, 134773, rel=0) is True
    assert check("int4", "int4") is True
    assert capsys.readouterr().out.count("correct") == 3


def test_check_rejects_wrong_answers_with_the_hint(capsys):
    assert check(4.0, 4.172365824, hint="count the zeros") is False
    assert check(134772, 134773, rel=0) is False
    assert "not quite: you have 4.0; hint: count the zeros" in capsys.readouterr().out


def test_unanswered_is_not_an_error(capsys):
    assert check(None, 1.0, hint="start from the config") is False
    assert check(..., 1.0) is False
    assert capsys.readouterr().out.splitlines() == ["not answered yet; hint: start from the config",
                                                    "not answered yet"]
