"""Re-execute notebooks in place, then clear the outputs of their Solutions cells.

    python notebooks/execute.py notebooks/07_gptq.ipynb [more.ipynb ...]
    python notebooks/execute.py --timings notebooks/*.ipynb    # seconds per section, from the last execution

Outputs are committed (nbval compares them in CI), except under a notebook's "### Solutions" heading:
a solution's output would show the learner every answer. Those cells start with # NBVAL_IGNORE_OUTPUT,
so nbval runs them, and their asserts are their test, without comparing what they print.
Run with MINQUANT_DATA set, from the repository root or anywhere (cells run in notebooks/).
"""
import sys
from datetime import datetime
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ExecutePreprocessor


def clear_solutions(nb) -> int:
    cleared, in_solutions = 0, False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("### Solutions"):
            in_solutions = True
        elif in_solutions and cell.cell_type == "code":
            cleared += bool(cell.outputs)
            cell.outputs, cell.execution_count = [], None
    return cleared


def section_seconds(nb) -> list[tuple[str, float]]:
    """(section heading, seconds its code cells took) from the timestamps the last execution recorded;
    the cells before the first "## " heading count as "setup"."""
    sections = [["setup", 0.0]]
    for cell in nb.cells:
        if cell.cell_type == "markdown":  # a heading may sit under a cell's first lines
            sections += [[line[3:].strip(), 0.0] for line in cell.source.splitlines() if line.startswith("## ")]
        elif cell.cell_type == "code" and "execution" in cell.metadata:
            t = cell.metadata["execution"]
            start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            sections[-1][1] += (end - start).total_seconds()
    return [(name, sec) for name, sec in sections if sec > 0 or name != "setup"]


def timings(paths):
    print("| notebook | seconds per section (setup = the cells before section 1) | total |\n|---|---|---:|")
    for path in map(Path, paths):
        parts = section_seconds(nbformat.read(path, as_version=4))
        short = lambda name: "§" + name.split(".")[0] if name[0].isdigit() else name  # noqa: E731  ("§3" for "3. ...")
        listed = ", ".join(f"{short(name)} {sec:.0f}" for name, sec in parts)
        print(f"| {path.stem} | {listed} | {sum(sec for _, sec in parts):.0f} s |")


def main(paths):
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        ExecutePreprocessor(timeout=1800, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
        cleared = clear_solutions(nb)
        nbformat.write(nb, path)
        print(f"{path}: executed, {cleared} Solutions cell(s) cleared")


if __name__ == "__main__":
    args = sys.argv[1:] or sys.exit(__doc__)
    timings(args[1:]) if args[0] == "--timings" else main(args)
