"""minquant: LLM weight quantization, built step by step in the notebooks of this repository.

The front door (notebook 10), Hugging Face style:
    model = minquant.quantize("smollm2-135m", method="awq", bits=4, group_size=64)
    minquant.save(model, "out");  model = minquant.load("out")
    minquant.evaluate(model, "wikitext2", max_windows=4).ppl
    print(minquant.memory("meta-llama/Llama-2-70b-hf"))

Modules follow the course (each module's docstring names the notebook that derives it):
    memory  - parameter counts and bytes per format from a config      (notebook 01)
    models  - load packaged offline models, local folders, Hub ids      (notebook 01)
    formats - fp32/fp16/bf16/fp8/int/NF4 as data, rounding to each      (notebook 02)
    quant   - QuantConfig and min/max quantize/dequantize, error metrics (notebooks 03, 04)
    rtn     - round-to-nearest on every linear layer of a model         (notebook 04)
    eval    - perplexity with the GPTQ protocol                         (notebook 04)
    packing - 2/3/4/8-bit packing and the GPTQ checkpoint layout        (notebook 05)
    nn      - QuantLinear: packed weights, forward through `kernels`    (notebook 05)
    checkpoint - save/load GPTQ checkpoints that other tools read       (notebook 05)
    kernels - the fused Triton W4A16 dequant-matmul                     (notebook 06)
    data    - WikiText-2 and C4 text for evaluation and calibration    (notebooks 04, 07)
    calibrate - the block-by-block driver over calibration data        (notebook 07)
    gptq    - GPTQ: Hessian-guided column-by-column rounding            (notebook 07)
    awq     - AWQ: activation-aware scaling, folded into the op before  (notebook 08)
    sensitivity, mixed - per-layer sensitivity; bits per layer under a budget (notebook 09)
    api     - quantize / save / load / evaluate                         (notebook 10)
    compare - one model quantized several ways, measured alike; the demo (notebook 10)
    bench*, sweep, paper - benchmarks that write data/results/*.json  (`minquant bench`)
    course  - `check(answer, expected)` for the notebooks' exercises
    cli     - the `minquant` command: quantize, eval, generate, memory, bench, demo
"""
__version__ = "0.1.0"

from minquant import memory  # noqa: E402, F401  (callable: minquant.memory("smollm2-135m") -> MemoryReport)
from minquant.api import evaluate, load, quantize, save  # noqa: E402, F401
from minquant.models import load_model  # noqa: E402, F401
