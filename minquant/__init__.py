"""minquant: LLM weight quantization, built step by step in the notebooks of this repository.

The front door (notebook 10), Hugging Face style:
    model = minquant.quantize("smollm2-135m", method="awq", bits=4, group_size=64)
    minquant.save(model, "out");  model = minquant.load("out")
    minquant.evaluate(model, "wikitext2", max_windows=4).ppl
    print(minquant.memory("meta-llama/Llama-2-70b-hf"))

Modules follow the course (each module's docstring names the notebook that derives it; the
number at the end of a line). The library never imports `minquant.bench`.

minquant/                 the library the course builds (one idea per module; docstrings name the notebook)
  memory.py               parameter counts, bytes per format, KV cache, bandwidth bound      (01)
  models.py               load packaged / local / Hub models; the architecture table        (01)
  formats.py              fp32/fp16/bf16/fp8/fp4/int/NF4 as data, rounding to each          (02, 11)
  quant.py                QuantConfig; qparams, round_to_grid, quantize, dequantize, errors (03-05)
  rtn.py                  round-to-nearest over a model (fake or into QuantLinear)          (04-05)
  eval.py                 perplexity, GPTQ protocol                                         (04)
  data.py                 WikiText-2 and C4 (MINQUANT_DATA, then the Hub)                   (04, 07)
  packing.py              2/3/4/8-bit packing, the GPTQ v1 layout                           (05)
  nn.py                   QuantLinear                                                       (05)
  checkpoint.py           save/load GPTQ checkpoints other tools read                       (05)
  atomic.py               checkpoint folders written whole or not at all                    (05)
  patterns.py             layer-name patterns of mixed-precision checkpoints                (05, 09)
  kernels/                what QuantLinear.forward runs                                     (06)
    __init__.py           backend dispatch: Triton on CUDA, C on CPU, torch reference
    reference.py          torch dequantize + matmul
    prepare.py            the kernels' view of a layer (act-order sorted once), cached
    triton_gemv.py        batch-1..4 GEMV
    triton_tc.py          small-batch tensor-core kernel
    triton_w4a16.py       the fused tiled W4A16 kernel
    triton_dequant.py     dequantize to fp16 for large batches
    timing.py             CUDA-graph timing for the tuners
    cpu.py, cpu_kernels.c the CPU path: a C kernel built on first use
  calibrate.py            the block-by-block calibration driver                             (07)
  gptq.py                 GPTQ                                                              (07)
  awq.py                  AWQ                                                               (08)
  sensitivity.py          per-layer sensitivity proxies                                     (09)
  mixed.py                bits per layer under a budget (exact knapsack)                    (09)
  api.py                  quantize / save / load / evaluate, method_config                  (10)
  compare.py              one model quantized several ways, measured alike; the demo        (10)
  stream.py               quantize a model bigger than memory: shards in, shards out        (10)
  shards.py               safetensors read and written a tensor at a time; sharded output    (10)
  w8a8.py                 W8A8Config, W8A8Linear: int8 / fp8 weights and activations        (11)
  smoothquant.py          SmoothQuant; a whole model converted to W8A8                      (11)
  microscaling.py         MXFP4 and NVFP4 (fp4 e2m1 with block scales), FP4Linear           (11)
  kvcache.py              a quantized KV cache for transformers' generate                   (11)
  compressed.py           save/load the compressed-tensors format (llm-compressor, vLLM)    (11)
  meter.py                peak memory while code runs
  cache.py                where built things are kept (MINQUANT_CACHE)
  course/                 the notebooks' exercise checks (__init__.py: check_answer, check_function)
    answers_01.py answers_02.py answers_03.py answers_04.py answers_05.py
    answers_06.py answers_07.py answers_08.py answers_09.py answers_10.py
    answers_11.py                                                            each notebook's hidden answers
  cli.py, __main__.py     the `minquant` command
  bench/                  benchmarks: never imported by the library
    registry.py           every benchmark by name, for the CLI and the README writer
    results.py            data/results/*.json with provenance; the README's tables
    rtn.py packing.py gptq.py awq.py sensitivity.py mixed.py calibration.py eightbit.py activations.py
    claims.py paper.py kernels.py cpu.py demo.py matmul8.py scale.py
                          one benchmark each: run() and table(record)
    sweep.py              the resumable model sweeps (gptq, awq, mixed, calibration)
    sass.py               GPU kernels' SASS, compiled and read without a GPU
    peers/                llmcompressor_quant.py, hqq_quant.py: other tools' runners (their own venvs)
"""
__version__ = "0.1.0"

from minquant import memory  # noqa: E402, F401  (callable: minquant.memory("smollm2-135m") -> MemoryReport)
from minquant.api import evaluate, load, quantize, save  # noqa: E402, F401
from minquant.models import load_model  # noqa: E402, F401
