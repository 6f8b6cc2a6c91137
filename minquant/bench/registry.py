"""Every benchmark by name: the one table `minquant bench NAME` and the README writer read.

A benchmark is a module of minquant.bench with `run(...) -> Path` (measure, save
data/results/<results>.json) and `table(record) -> str` (the Markdown table of such a file).
Modules are imported only when used: the GPU ones need Triton, the sweeps a model.
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from minquant.bench import results


@dataclass(frozen=True)
class Benchmark:
    module: str  # minquant.bench.<module>: its run() measures, its table(record) renders
    results: str  # the results file it writes, by name; a pattern where there is one per GPU, CPU or model
    about: str  # one line for `minquant bench --help`
    options: tuple[str, ...] = ()  # the command-line options its run() takes

    def load(self) -> ModuleType:
        return importlib.import_module(f"minquant.bench.{self.module}")


SWEEP = ("only", "redo")  # resumable: entries saved as measured; --only picks some, --redo measures again
BENCHMARKS = {
    "rtn": Benchmark("rtn", "rtn_smollm2", "RTN on SmolLM2 (perplexity) and MiniLM (cosine)",
                     ("max_windows", "seqlen", "device")),
    "packing": Benchmark("packing", "packing_smollm2", "bytes on disk"),
    "gptq": Benchmark("gptq", "gptq_smollm2", "GPTQ vs RTN vs llm-compressor and HQQ on SmolLM2", SWEEP),
    "awq": Benchmark("awq", "awq_smollm2", "AWQ vs llm-compressor's AWQ on SmolLM2", SWEEP),
    "sensitivity": Benchmark("sensitivity", "sensitivity_smollm2", "per-layer proxies vs measured loss"),
    "mixed": Benchmark("mixed", "mixed_smollm2", "mixed-precision GPTQ vs uniform", SWEEP),
    "calibration": Benchmark("calibration", "calibration_smollm2", "GPTQ/AWQ by calibration data", SWEEP),
    "eightbit": Benchmark("eightbit", "eightbit", "int8 and fp8 weights"),
    "activations": Benchmark("activations", "activations_smollm2", "W8A8 (SmoothQuant), FP8, MXFP4/NVFP4, KV cache vs "
                             "llm-compressor", SWEEP),
    "claims": Benchmark("claims", "claims", "the course's claims vs our numbers"),
    "kernels": Benchmark("kernels", "kernels_*", "the W4A16 kernels on a GPU"),
    "matmul8": Benchmark("matmul8", "matmul8_*", "W8A8 int8/fp8 vs fp16 vs W4A16 matmuls on a GPU, by batch"),
    "sass": Benchmark("sass", "sass_kernels", "the GPU kernels' SASS figures for sm_80/sm_90, compiled here (no GPU needed)"),
    "cpu": Benchmark("cpu", "cpu_*", "4-bit layers against fp32 and torch's int4/int8 on this CPU, and SmolLM2 decoding"),
    "paper": Benchmark("paper", "paper_*", "the GPTQ paper's protocol on --model (a Table 3 row for OPT-125M)",
                       ("model", "device", "n_samples", "seqlen", "max_windows")),
    "demo": Benchmark("demo", "demo_smollm2", "what make demo measures", ("model", "max_windows")),
    "scale": Benchmark("scale", "scale_*", "a model bigger than memory: streamed quantization, peak memory, bit for bit",
                       ("shape", "device", "methods", "n_samples", "seqlen", "blocks", "tokenizer")),
}


def run(name: str, **options) -> Path:
    """Run benchmark `name` with the options it takes (None = its default); returns the results file."""
    bench = BENCHMARKS[name]
    unknown = sorted(k for k, v in options.items() if v is not None and v is not False and k not in bench.options)
    if unknown:
        raise ValueError(f"minquant bench {name} takes no {', '.join('--' + k.replace('_', '-') for k in unknown)}"
                         + (f"; it takes {', '.join('--' + k.replace('_', '-') for k in bench.options)}" if bench.options else ""))
    return bench.load().run(**{k: v for k, v in options.items() if v is not None and k in bench.options})


def table_for(results_name: str):
    """The `table(record)` function that renders results file `results_name` (e.g. "cpu_intel-xeon")."""
    for bench in BENCHMARKS.values():
        if fnmatch.fnmatchcase(results_name, bench.results):
            return bench.load().table
    raise KeyError(f"no benchmark writes a results file named {results_name!r}")


def table(results_name: str) -> str:
    """The Markdown table of one results file, e.g. table("gptq_smollm2")."""
    return table_for(results_name)(results.load_results(results_name))


def results_names() -> list[str]:
    """The results files present in data/results/ that a benchmark wrote, in the order of BENCHMARKS."""
    present = sorted(p.stem for p in results.RESULTS_DIR.glob("*.json"))
    return [n for bench in BENCHMARKS.values() for n in present if fnmatch.fnmatchcase(n, bench.results)]


def update_readme(path: Path = results.README) -> None:
    """Rewrite every results table of the README from data/results/ (`minquant bench readme`)."""
    results.update_readme(results_names(), table_for, path)
