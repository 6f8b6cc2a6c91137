"""Re-execute notebooks in place, then clear the outputs of their Solutions cells.

    python notebooks/execute.py notebooks/07_gptq.ipynb [more.ipynb ...]

Outputs are committed (nbval compares them in CI), except under a notebook's "### Solutions" heading:
a solution's output would show the learner every answer. Those cells start with # NBVAL_IGNORE_OUTPUT,
so nbval runs them, and their asserts are their test, without comparing what they print.
Run with MINQUANT_DATA set, from the repository root or anywhere (cells run in notebooks/).
"""
import sys
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


def main(paths):
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        ExecutePreprocessor(timeout=1800, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
        cleared = clear_solutions(nb)
        nbformat.write(nb, path)
        print(f"{path}: executed, {cleared} Solutions cell(s) cleared")


if __name__ == "__main__":
    main(sys.argv[1:] or sys.exit(__doc__))
