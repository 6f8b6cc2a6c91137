"""The shape of minquant's imports, read from the source with `ast` (nothing is imported or run).

Three rules, each cheap to break by accident and hard to notice in review:
  no circles      a module must not (even lazily, inside a function) import one that imports it back
  no private use  `_names` are a module's own business; another module reaching for one is coupled to
                  internals that may change without notice
  no benchmarks   the library never imports minquant.bench: the benchmarks use the library, not the
                  other way round (only the CLI, which dispatches to them, may)

Every import statement counts, at module level or inside a function, class or `if`: a lazy import still
ties the two modules together, it only moves the failure from import time to call time.
"""
from __future__ import annotations

import ast
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "minquant"
BENCH = "minquant.bench"
# May import the benchmarks: `minquant bench ...` is the CLI's job, so the CLI (and `python -m minquant`,
# which is the CLI) has to reach them. Nothing else in the library may.
BENCH_ALLOWED = frozenset({"minquant.cli", "minquant.__main__"})


@dataclass(frozen=True)
class Import:
    """One imported module or name: `importer` (at file:line) imports `target`, or the name `name` from it."""
    importer: str
    file: str
    line: int
    target: str  # the module: the submodule itself, or the module a name is taken from
    name: str | None = None  # the name taken from target; None when a module is imported


# ---------------------------------------------------------------------------------------------
# Building the graph: every import of every module of a package under a root folder.
# ---------------------------------------------------------------------------------------------

def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package by dotted name: pkg/a/b.py -> pkg.a.b, pkg/a/__init__.py -> pkg.a."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def importable_names(modules) -> set[str]:
    """The modules and every package above them, a folder without __init__.py (namespace package) included."""
    return {".".join(m.split(".")[:n]) for m in modules for n in range(1, m.count(".") + 2)}


def from_module(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a `from X import ...` reads from, with relative imports (`from .x`, `from ..`) resolved."""
    if node.level == 0:
        return node.module
    # `.` is the importer's own package: the module itself for an __init__, else its parent.
    parts = (importer if is_package else importer.rpartition(".")[0]).split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(importer: str, path: Path, root: Path, names: set[str]) -> list[Import]:
    """The imports of one module that land in the package, each resolved to the module it reaches.

    An import of a name that is no module of ours (another library, or one of ours that no longer exists)
    is left out rather than pinned on a parent package, which would invent an edge.
    """
    file = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=file)):  # walk: nested imports too
        if isinstance(node, ast.Import):  # `import pkg.a.b`: the module named, not its parents' __init__s
            found += [Import(importer, file, node.lineno, alias.name) for alias in node.names if alias.name in names]
        elif isinstance(node, ast.ImportFrom):
            base = from_module(importer, path.name == "__init__.py", node)
            for alias in node.names:
                if f"{base}.{alias.name}" in names:  # `from pkg.kernels import cpu`: a submodule
                    found.append(Import(importer, file, node.lineno, f"{base}.{alias.name}"))
                elif base in names:  # a name defined in (or re-exported by) base
                    found.append(Import(importer, file, node.lineno, base, alias.name))
    return found


def build_imports(root: Path, package: str) -> list[Import]:
    """Every import, anywhere in any module of `package` (the folder root/package), that reaches the package."""
    modules = module_files(root, package)
    names = importable_names(modules)
    return [imp for module, path in modules.items() for imp in imports_of(module, path, root, names)]


# ---------------------------------------------------------------------------------------------
# The three checks: each returns its findings as readable lines, empty when all is well.
# ---------------------------------------------------------------------------------------------

def import_graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """importer -> {imported module: its first import}. A module naming itself is no circle: left out."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target != imp.importer:
            graph.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    return graph


def shortest_cycle(graph, start: str) -> list[str] | None:
    """The shortest path start -> ... -> start (breadth first), or None when start is on no circle."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for nxt in sorted(graph.get(module, {})):
            if nxt == start:
                path = [module]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if nxt not in parent:
                parent[nxt] = module
                queue.append(nxt)
    return None


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), {}):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def find_cycles(imports: list[Import]) -> list[str]:
    """One circle per group of modules that all reach each other (strongly connected), with where each edge is."""
    graph = import_graph(imports)
    reported, found = set(), []
    for module in sorted(graph):
        if module in reported or not (cycle := shortest_cycle(graph, module)):
            continue
        # The rest of the group (each member reaches module and back) is the same circle problem: say it once.
        reported |= {m for m in reachable(graph, module) if module in reachable(graph, m)}
        where = ", ".join(f"{graph[a][b].file}:{graph[a][b].line}" for a, b in zip(cycle, cycle[1:]))
        found.append(f"{' -> '.join(cycle)}   [{where}]")
    return found


def private_imports(imports: list[Import]) -> list[str]:
    """`from pkg.x import _name` from another module; dunders (__version__) are public by convention."""
    return [f"{imp.file}:{imp.line} imports {imp.name} from {imp.target}" for imp in imports
            if imp.name and imp.name.startswith("_") and not imp.name.startswith("__") and imp.target != imp.importer]


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def bench_imports(imports: list[Import], bench: str, allowed=frozenset()) -> list[str]:
    """Imports of the bench package (or anything in it) by modules outside it, other than those allowed."""
    found = [f"{imp.file}:{imp.line} imports {imp.target}" for imp in imports
             if in_package(imp.target, bench) and not in_package(imp.importer, bench) and imp.importer not in allowed]
    return list(dict.fromkeys(found))  # `from pkg.bench import a, b` is one line, not two


# ---------------------------------------------------------------------------------------------
# The tests: minquant itself, and the checker on a small package built to break every rule.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minquant_imports():
    return build_imports(ROOT, PACKAGE)


def test_no_import_circles(minquant_imports):
    cycles = find_cycles(minquant_imports)
    assert not cycles, "import circles (one per group of modules that import each other):\n" + "\n".join(cycles)


def test_no_private_names_imported_across_modules(minquant_imports):
    found = private_imports(minquant_imports)
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_the_library_never_imports_the_benchmarks(minquant_imports):
    # the notebooks' answer modules are the hidden half of the notebooks, which read data/results/ through
    # minquant.bench: they may too (nothing in the library imports them)
    answers = {imp.importer for imp in minquant_imports if imp.importer.startswith("minquant.course.answers_")}
    found = bench_imports(minquant_imports, BENCH, BENCH_ALLOWED | answers)
    assert not found, f"library modules importing {BENCH} (only {sorted(BENCH_ALLOWED)} may):\n" + "\n".join(found)


BROKEN_PACKAGE = {  # every rule broken once, and each allowed form used once beside it
    "__init__.py": "__version__ = '0'\n",
    "a.py": """\
        def f():
            from pkg.b import g  # a -> b, inside a function
            import pkg.bench  # library code reaching the benchmarks
            return g
        """,
    "b.py": """\
        from pkg import __version__  # a dunder: public
        def g():
            from . import a  # relative, a submodule: b -> a closes the circle
            from .a import _private
        """,
    "cli.py": "from pkg.bench import run  # the CLI is allowed\n",
    "bench/run.py": "import pkg  # the benchmarks may use the library\n",  # bench/ has no __init__.py: still a package
}


def test_the_checker_finds_what_it_checks_for(tmp_path):
    for name, text in BROKEN_PACKAGE.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(textwrap.dedent(text))
    imports = build_imports(tmp_path, "pkg")
    assert [c.split("   ")[0] for c in find_cycles(imports)] == ["pkg.a -> pkg.b -> pkg.a"]
    assert private_imports(imports) == ["pkg/b.py:4 imports _private from pkg.a"]
    assert bench_imports(imports, "pkg.bench", {"pkg.cli"}) == ["pkg/a.py:3 imports pkg.bench"]
    assert len(bench_imports(imports, "pkg.bench")) == 2  # without the allow-list the CLI is found too


def test_the_layout_in_readme_and_init_names_every_module():
    """README's "Repository layout" and minquant/__init__'s docstring list every file of the package."""
    import re

    import minquant

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Repository layout", 1)[1].split("```")[1]
    files = sorted({p.name for p in (ROOT / PACKAGE).rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts})
    for text, where in ((block, "README's Repository layout"), (minquant.__doc__, "minquant/__init__.py's docstring")):
        named = set(re.findall(r"[\w]+\.(?:py|c)\b", text))
        assert not set(files) - named, f"{where} does not name {sorted(set(files) - named)}"
