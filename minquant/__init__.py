"""minquant: LLM weight quantization, built step by step in the notebooks of this repository.

Modules follow the course (see notebooks/ and DESIGN in the README):
    memory  - parameter counts and bytes per format from a config      (notebook 01)
    models  - load packaged offline models, local folders, Hub ids      (notebook 01)
    data    - WikiText-2 and C4 text for evaluation and calibration    (notebooks 04, 07)
    course  - `check(answer, expected)` for the notebooks' exercises
    cli     - the `minquant` command: `minquant memory MODEL`, `minquant demo`
"""
__version__ = "0.1.0"
