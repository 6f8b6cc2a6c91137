"""A regex matcher for checkpoint module rules that cannot hang.

GPTQ checkpoints carry per-module rules in config.json (quantization_config -> "dynamic") whose
keys are regular expressions, e.g. "+:model\\.layers\\.3\\.mlp\\.down_proj$". Readers (vLLM,
GPTQModel) apply them with `re.match(pattern, module_name)`. Python's `re` is a backtracking
engine: it tries one way to match, and on failure goes back and tries another. For a pattern like
"(.|.)*Z$" there are 2**n ways to split n characters between the two branches, and `re` tries them
all before answering "no". A checkpoint downloaded from the internet can thus freeze the loader.

The fix is the oldest trick in automata theory: instead of following one path at a time, follow
all of them at once. For every piece of the pattern and every start position in the name we
compute the SET of positions where that piece can end. A literal at position i ends at {i+1} or
nowhere; a sequence feeds the end set of one piece in as start positions of the next; an
alternation is the union of its branches; a repeat applies its body again and again until no new
positions appear (a fixpoint). Sets have at most len(name)+1 members, and each (piece, start)
pair is computed once (memoised), so the work is polynomial, never exponential. The pattern
matches (as a prefix, like `re.match`) exactly when the whole pattern can end somewhere from 0.

We do not write our own regex parser: Python's parser (re._parser, or sre_parse on 3.10) turns
the pattern into a tree, and we accept only the node types whose meaning is "regular". Things
that need backtracking to define (backreferences, lookaround, conditionals) are refused.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

try:  # Python >= 3.11
    import re._parser as sre
except ImportError:  # Python 3.10
    import sre_parse as sre  # type: ignore[no-redef]

SAFE_SUBSET = ("literals and escaped characters, '.', character classes ([a-z0-9_], [^...], "
               "\\d \\w \\s \\D \\W \\S), alternation '|', groups ((...), (?:...), (?P<name>...)), "
               "quantifiers * + ? {m} {m,n} {m,} (greedy or lazy), anchors ^ $ \\A \\Z")
MAX_PATTERN_LEN = 200  # real keys are under ~100 characters; longer ones are just a way to burn CPU
MAX_REPEAT_BOUND = 100  # a{1000} would make the pattern tree 1000x bigger in effect
MAX_DEPTH = 50          # nested groups; keeps our recursion far from Python's stack limit

# The character categories \d \w \s as `re` defines them for str patterns (Unicode by default).
_CATEGORIES = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}
# Anchors as tests of (name, position). Without re.MULTILINE, `^` is the start of the string and
# `$` is the end or just before a final "\n" (module names have none, but we stay exact).
_ANCHORS = {
    sre.AT_BEGINNING: lambda s, i: i == 0,
    sre.AT_BEGINNING_STRING: lambda s, i: i == 0,
    sre.AT_END: lambda s, i: i == len(s) or (i == len(s) - 1 and s[i] == "\n"),
    sre.AT_END_STRING: lambda s, i: i == len(s),
}
# Names for the refusals, so the error says what was found.
_REFUSED = {sre.GROUPREF: "backreference (\\1, (?P=name))",
            sre.GROUPREF_EXISTS: "conditional group (?(id)yes|no)",
            getattr(sre, "ATOMIC_GROUP", None): "atomic group (?>...)",
            getattr(sre, "POSSESSIVE_REPEAT", None): "possessive quantifier (*+, ++, ?+)",
            sre.AT_BOUNDARY: "word boundary \\b", sre.AT_NON_BOUNDARY: "non-boundary \\B"}


def _refuse(pattern: str, what: str) -> ValueError:
    return ValueError(f"refusing regex {pattern!r}: {what} is not supported; "
                      f"the safe subset is: {SAFE_SUBSET}")


def _char_class(pattern: str, items) -> Callable[[str], bool]:
    """A predicate for an IN node: a list of LITERAL / RANGE / CATEGORY items, maybe NEGATEd."""
    negate, tests = False, []
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            tests.append(lambda c, cp=av: ord(c) == cp)
        elif op is sre.RANGE:
            tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
        elif op is sre.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise _refuse(pattern, f"character-class item {op} {av}")
    return lambda c: any(t(c) for t in tests) != negate


def _convert(pattern: str, seq, depth: int = 0) -> tuple:
    """Turn the parser's tree into our own small one, refusing anything outside the subset.

    Our nodes: ("char", predicate), ("at", test), ("seq", [nodes]), ("alt", [nodes]),
    ("rep", min, max or None, node). Lazy and greedy repeats become the same node: they differ
    in which match `re` finds first, never in whether one exists.
    """
    if depth > MAX_DEPTH:
        raise _refuse(pattern, f"nesting deeper than {MAX_DEPTH} levels")
    out = []
    for op, av in seq:
        if op is sre.LITERAL:  # the character itself is kept too: plain-text rules compare as strings
            out.append(("char", lambda c, cp=av: ord(c) == cp, chr(av)))
        elif op is sre.NOT_LITERAL:
            out.append(("char", lambda c, cp=av: ord(c) != cp))
        elif op is sre.ANY:  # '.' without re.DOTALL: anything but a newline
            out.append(("char", lambda c: c != "\n"))
        elif op is sre.IN:
            out.append(("char", _char_class(pattern, av)))
        elif op is sre.AT and av in _ANCHORS:
            out.append(("at", _ANCHORS[av]))
        elif op is sre.BRANCH:
            out.append(("alt", [_convert(pattern, b, depth + 1) for b in av[1]]))
        elif op is sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise _refuse(pattern, "scoped inline flags (?flags:...)")
            out.append(_convert(pattern, sub, depth + 1))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            lo, hi, sub = av
            hi = None if hi is sre.MAXREPEAT else hi
            if lo > MAX_REPEAT_BOUND or (hi or 0) > MAX_REPEAT_BOUND:
                raise _refuse(pattern, f"counted repeat {{{lo},{'' if hi is None else hi}}} "
                                       f"with a bound above {MAX_REPEAT_BOUND}")
            out.append(("rep", lo, hi, _convert(pattern, sub, depth + 1)))
        elif op is sre.ASSERT or op is sre.ASSERT_NOT:
            negative = "negative " if op is sre.ASSERT_NOT else ""
            kind = "lookahead (?=...)" if av[0] == 1 else "lookbehind (?<=...)"
            raise _refuse(pattern, f"{negative}{kind} assertion")
        else:
            raise _refuse(pattern, _REFUSED.get(av if op is sre.AT else op, f"construct {op}"))
    return ("seq", out)


class Budget:
    """Steps a caller lets matching take, shared by all the matches it makes (a whole checkpoint's rules).

    Polynomial is not the same as fast: a hostile 200-character pattern can still cost seconds per
    name. So matching counts its steps (each (piece, start) pair computed, each start position fed
    to a piece and each end position it returns: what the set unions really cost) and stops with a
    clear error once the budget is spent; real rules take tens to hundreds of steps per name.
    """

    def __init__(self, steps: int = 1_000_000):
        self.steps, self.left = steps, steps

    def spend(self, n: int, pattern: str) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError(f"refusing regex {pattern!r}: matching it costs more than the {self.steps:,} steps "
                             "allowed (module-name rules need a few hundred); a hostile or broken pattern?")


def _literal(tree: tuple) -> tuple[str, str] | None:
    """(text, how it must end) when the pattern is plain text, maybe with a final `$` or `\\Z` (what
    minquant writes: one rule per layer), so that matching is a string comparison; else None."""
    nodes, end = tree[1], ""
    if nodes and nodes[-1][0] == "at" and nodes[-1][1] in (_ANCHORS[sre.AT_END], _ANCHORS[sre.AT_END_STRING]):
        nodes, end = nodes[:-1], "$" if nodes[-1][1] is _ANCHORS[sre.AT_END] else "\\Z"
    if not all(n[0] == "char" and len(n) == 3 for n in nodes):
        return None
    return "".join(n[2] for n in nodes), end


class Pattern:
    """A compiled safe pattern. `match(name)` answers like `re.match(pattern, name) is not None`."""

    def __init__(self, pattern: str, tree: tuple):
        self.pattern, self._tree, self._literal = pattern, tree, _literal(tree)

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"

    def match(self, name: str, budget: Budget | None = None) -> bool:
        """True when the pattern matches a prefix of `name` (all of it, if the pattern ends in $).
        `budget`: the steps it may take (default: a fresh `Budget()`, under a second's worth)."""
        if self._literal is not None:
            text, end = self._literal  # `$` also matches before a final newline, as in `re`
            return name.startswith(text) if not end else name == text or (end == "$" and name == text + "\n")
        budget = budget or Budget()
        memo: dict = {}  # (id(node), start) -> frozenset of end positions

        def ends(node, i: int) -> frozenset:
            key = (id(node), i)
            if key not in memo:
                budget.spend(1, self.pattern)
                memo[key] = frozenset(compute(node, i))
            return memo[key]

        def step(node, starts) -> set:  # all ends of `node` from any of `starts`
            parts = [ends(node, i) for i in starts]
            budget.spend(len(starts) + sum(map(len, parts)), self.pattern)  # the union's real cost
            return set().union(*parts)

        def compute(node, i: int) -> set:
            kind = node[0]
            if kind == "char":
                return {i + 1} if i < len(name) and node[1](name[i]) else set()
            if kind == "at":
                return {i} if node[1](name, i) else set()
            if kind == "alt":
                return set().union(*(ends(branch, i) for branch in node[1]))
            if kind == "seq":
                positions = {i}
                for child in node[1]:
                    positions = step(child, positions)
                    if not positions:  # no way through: the rest cannot match either
                        break
                return positions
            _, lo, hi, body = node  # "rep"
            positions = {i}
            for _ in range(lo):  # the mandatory copies
                positions = step(body, positions)
            # The optional copies, breadth first: each round only expands positions not seen
            # before, so after at most len(name)+1 rounds nothing is new and we stop. A position
            # first seen in round k needs exactly k optional copies, which keeps {m,n} exact.
            seen, frontier, rounds = set(positions), positions, 0
            while frontier and (hi is None or rounds < hi - lo):
                frontier = step(body, frontier) - seen
                seen |= frontier
                rounds += 1
            return seen

        return bool(ends(self._tree, 0))


def compile_pattern(pattern: str) -> Pattern:
    """Parse `pattern` with Python's regex parser and check it lies in the safe subset."""
    if len(pattern) > MAX_PATTERN_LEN:
        raise _refuse(pattern[:60] + "...", f"a pattern of {len(pattern)} characters "
                                            f"(longer than {MAX_PATTERN_LEN})")
    try:
        parsed = sre.parse(pattern)
    except (re.error, RecursionError) as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None
    if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:  # (?i), (?x), (?s), (?m), (?a) at the start
        raise _refuse(pattern, "inline flags such as (?i)")
    return Pattern(pattern, _convert(pattern, parsed))


@functools.lru_cache(maxsize=256)
def _cached(pattern: str) -> Pattern:
    return compile_pattern(pattern)


def match(pattern: str, name: str, budget: Budget | None = None) -> bool:
    """`re.match(pattern, name) is not None`, but safe: refuses non-regular patterns, never hangs."""
    return _cached(pattern).match(name, budget)
