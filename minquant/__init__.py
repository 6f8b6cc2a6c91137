"""minquant: LLM weight quantization, built step by step in the notebooks of this repository.

Modules follow the course (see notebooks/ and DESIGN in the README):
    memory  - parameter counts and bytes per format from a config      (notebook 01)
    models  - load packaged offline models, local folders, Hub ids      (notebook 01)
    formats - fp32/fp16/bf16/fp8/int/NF4 as data, rounding to each      (notebook 02)
    quant   - QuantConfig and min/max quantize/dequantize, error metrics (notebooks 03, 04)
    rtn     - round-to-nearest on every linear layer of a model         (notebook 04)
    eval    - perplexity with the GPTQ protocol                         (notebook 04)
    packing - 2/3/4/8-bit packing and the GPTQ checkpoint layout        (notebook 05)
    nn      - QuantLinear: packed weights, forward through `kernels`    (notebook 05)
    checkpoint - save/load GPTQ checkpoints that other tools read       (notebook 05)
    data    - WikiText-2 and C4 text for evaluation and calibration    (notebooks 04, 07)
    calibrate - the block-by-block driver over calibration data        (notebook 07)
    gptq    - GPTQ: Hessian-guided column-by-column rounding            (notebook 07)
    api     - `minquant.quantize(model, method="gptq", ...)`
    bench   - benchmarks that write data/results/*.json                 (`minquant bench`)
    course  - `check(answer, expected)` for the notebooks' exercises
    cli     - the `minquant` command: `minquant memory MODEL`, `minquant demo`
"""
__version__ = "0.1.0"

from minquant.api import quantize  # noqa: E402, F401  (the front door: minquant.quantize(model, ...))
