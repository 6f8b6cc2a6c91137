"""minquant.patterns: agrees with re.match on the safe subset, never hangs, refuses the rest."""
import random
import re
import time

import pytest

from minquant.patterns import MAX_DEPTH, MAX_PATTERN_LEN, Budget, compile_pattern, match

SUFFIXES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
MODULES = [f"model.layers.{i}.{s}" for i in range(30) for s in SUFFIXES]  # 210 names
NAMES = MODULES[::11] + ["model.decoder.layers.0.fc1", "model.decoder.layers.11.fc2", "lm_head",
                         "model.embed_tokens", "", "model", "transformer.h.3.attn.c_attn",
                         "model.layers.12.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
REALISTIC = [
    r".*\.1[0-9]\..*", r".*(q|k|v)_proj$", r"model\.layers\.(3|4)\.mlp\..*", r"^model",
    r"[^.]+\.layers\.\d+\.mlp\.down_proj$", r"model\.layers\.3\.mlp\.down_proj$", r".*mlp.*",
    r"(?:ab)*c", r"a{2,3}b", r"a{2,}b", r"a{,2}b", r"a{3}", r".*?proj", r"model\.layers\.\d+?\.",
    r"(?:\w+\.)+?fc\d", r"(|a)b", r"(a|)*b", r"((a|b)(c|(d|)))*e", r"(?P<layer>\d+)", r".*\.(1|2)\d\.",
    r"\w+\.\w+\.\d{1,2}\.self_attn\.[qkv]_proj\Z", r"\Amodel", r"[a-z_]+$", r"[\w.]*$",
    r".*[^\d]$", r"\S+\s?", r"[^a-z]", r"(model|transformer)\.(layers|h)\.[0-9]+\.", r"",
    r"lm_head", r"model\.layers\.(?:[0-9]|1[0-5])\.", r".*\.(2[0-9]|29)\..*_proj$", r"$", r"^$",
]
CASES = [(p, n) for p in REALISTIC for n in NAMES] + [
    (r"(|a)b", "b"), (r"(|a)b", "ab"), (r"(?:ab)*c", "ababc"), (r"(?:ab)*c", "abac"),
    (r"a{2,3}b", "ab"), (r"a{2,3}b", "aaab"), (r"a{2,3}b", "aaaab"), (r"a+?b", "aaab"),
    (r"a$", "a\n"), (r"a\Z", "a\n"), (r"a$\n", "a\n"), (r".", "\n"), (r"[^a]", "\n"),
    (r"\d", "\u0663"), (r"\w", "\u00e9"), (r"\s", "\u2003"), (r"[\u00e0-\u00ff]x", "\u00e9x"),
    (r"[^\u00e0-\u00ff]", "\u00e9"), (r"\W", "\u00e9"), (r"\D", "7"), (r"[\d_]+$", "12_3"),
]


@pytest.mark.parametrize("pattern", REALISTIC)
def test_realistic_patterns_agree_with_re(pattern):
    compiled = compile_pattern(pattern)
    for p, name in CASES:
        if p == pattern:
            assert compiled.match(name) == (re.match(pattern, name) is not None), (pattern, name)


def test_edge_cases_agree_with_re():
    for pattern, name in CASES[len(REALISTIC) * len(NAMES):]:
        assert match(pattern, name) == (re.match(pattern, name) is not None), (pattern, name)


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    """A random regex from the safe subset over the alphabet 'ab.' (plus anchors and classes)."""
    atoms = ["a", "b", r"\.", ".", "[ab]", "[^a]", "[a-b.]", r"\w", r"\W", "^", "$", r"\A", r"\Z"]
    parts = []
    for _ in range(rng.randint(0, 3)):
        if depth < 3 and rng.random() < 0.3:
            inner = "|".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3)))
            atom = rng.choice(["(%s)", "(?:%s)"]) % inner
        else:
            atom = rng.choice(atoms)
        if atom not in ("^", "$", r"\A", r"\Z") and rng.random() < 0.4:
            atom += rng.choice(["*", "+", "?", "{2}", "{0,2}", "{1,3}", "{2,}"]) + rng.choice(["", "?"])
        parts.append(atom)
    return "".join(parts)


def test_random_patterns_agree_with_re():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        pattern = random_pattern(rng)
        while len(pattern) > MAX_PATTERN_LEN:  # longer ones are refused (tested below)
            pattern = random_pattern(rng)
        compiled = compile_pattern(pattern)
        for _ in range(8):
            name = "".join(rng.choice("ab.") for _ in range(rng.randint(0, 7)))
            if rng.random() < 0.1:
                name += "\n"  # `$` also matches before a final newline; we stay exact
            assert compiled.match(name) == (re.match(pattern, name) is not None), (pattern, name)
            checked += 1
    assert checked == 3200


CATASTROPHIC = ["(.|.)*Z$", "(a*)*b", "(a|a)*$x", "(a+)+$", "(a+)+b", "((a*)*|b)*c", "(.*)*\\.Z"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_finish_fast(pattern):
    # re.match would take longer than the age of the universe on "a" * 60; we must not.
    compiled = compile_pattern(pattern)
    start = time.perf_counter()
    results = [compiled.match("a" * 60)] + [compiled.match(name) for name in MODULES]
    assert time.perf_counter() - start < 1.0
    assert results[0] == (pattern == "(a+)+$")  # the only one of these that matches all-"a"s


@pytest.mark.parametrize("pattern, construct", [
    (r"(a)\1", "backreference"), (r"(?P<x>a)(?P=x)", "backreference"),
    (r"(?=a)", "lookahead"), (r"(?!a)", "negative lookahead"), (r"(?<=a)b", "lookbehind"),
    (r"(?<!a)b", "negative lookbehind"), (r"\bq", "word boundary"), (r"q\B", "boundary"),
    (r"(?i)a", "inline flags"), (r"(?i:a)b", "inline flags"), (r"(?x)a b", "inline flags"),
    (r"a{1000}", "bound above 100"), (r"a{3,101}", "bound above 100"), ("a" * (MAX_PATTERN_LEN + 1), f"{MAX_PATTERN_LEN + 1} characters"),
    (r"(a)(?(1)a|b)", "conditional"), (r"(?>a)", "atomic group"), (r"a++", "possessive"),
    (r"(?(1)a|b)", "invalid regex"), ("(", "invalid regex"), ("a**", "invalid regex"),
    ("(" * (MAX_DEPTH + 2) + "a" + ")" * (MAX_DEPTH + 2), "nesting deeper"),
])
def test_refused_constructs(pattern, construct):
    with pytest.raises(ValueError) as info:
        compile_pattern(pattern)
    message = str(info.value)
    assert construct in message
    assert repr(pattern[:60])[:-1] in message  # the pattern (or its start, if long) is named
    if "invalid" not in construct:
        assert "safe subset" in message


def test_match_caches_compiled_patterns():
    assert match(r"model\.layers\.\d+\.mlp\.", "model.layers.7.mlp.up_proj")
    assert not match(r"model\.layers\.\d+\.mlp\.", "model.layers.7.self_attn.q_proj")
    with pytest.raises(ValueError, match="backreference"):
        match(r"(a)\1", "aa")


def test_a_budget_stops_a_pattern_that_is_polynomial_but_slow():
    """Polynomial is not fast: 48 nested-able `(.*)` under a star cost seconds per name; the budget
    refuses it after its steps, well under a second, and a real rule fits in it many times over."""
    hostile = "(?:" + "(.*)" * 48 + ")*Z"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="costs more than the 20,000 steps"):
        compile_pattern(hostile).match("model.layers.12.self_attn.q_proj", Budget(20_000))  # it needs about 425,000
    assert time.perf_counter() - start < 1.0
    budget = Budget(20_000)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(30)]
    assert sum(compile_pattern(r".*\.1[0-9]\..*").match(n, budget) for n in names) == 10
    assert budget.left > 10_000


def test_plain_text_rules_compare_as_strings():
    """What minquant writes (`re.escape(name)$`): no matching machinery, and the same answers as re."""
    for pattern in [re.escape("model.layers.3.mlp.down_proj") + "$", re.escape("model.layers.3") + r"\Z", "model"]:
        p = compile_pattern(pattern)
        assert p._literal is not None
        for name in ["model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj\n", "model.layers.3", "mode"]:
            assert p.match(name) == (re.match(pattern, name) is not None), (pattern, name)
