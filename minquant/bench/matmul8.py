"""`minquant bench matmul8`: where W8A8 wins and where W4A16 wins, on a GPU (notebook 11).

One 8192 x 8192 linear at M = 1 ... 2048 rows: fp16 (cuBLAS), int8 x int8 -> int32 (`torch._int_mm`)
with the per-token and per-channel scales applied after, fp8 e4m3 (`torch._scaled_mm`, row-wise
scales, Hopper and later), and minquant's W4A16 QuantLinear (g128). The 8-bit timings include
quantizing the activations (what a W8A8 layer does on every call). Timed as CUDA graphs
(minquant.kernels.timing). Writes data/results/matmul8_<gpu>.json. Needs a CUDA GPU.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

BATCHES = (1, 16, 128, 512, 2048)


def run(out: Path | None = None, size: int = 8192, batches=BATCHES) -> Path:
    """Time each path at each M on the current CUDA device; save the ratios to fp16 measured in this run."""
    if not torch.cuda.is_available():
        raise RuntimeError("`minquant bench matmul8` needs a CUDA GPU: it times int8 and fp8 tensor-core matmuls")
    from minquant.bench.results import RESULTS_DIR, save_results
    from minquant.kernels.timing import graph_time_ms
    from minquant.nn import QuantLinear
    from minquant.quant import QuantConfig
    from minquant.w8a8 import W8A8Linear

    torch.manual_seed(0)
    name = "matmul8_" + re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    linear = torch.nn.Linear(size, size, bias=False, device="cuda", dtype=torch.float16).requires_grad_(False)
    layers = {"fp16": linear, "W8A8 int8": W8A8Linear.from_linear(linear, "int8"),
              "W4A16 g128": QuantLinear.from_linear(linear.float(), QuantConfig(4, 128)).cuda()}
    linear.half()
    if torch.cuda.get_device_capability() >= (8, 9):
        layers["W8A8 fp8"] = W8A8Linear.from_linear(linear, "fp8")
    results = {}
    for M in batches:
        x = torch.randn(M, size, device="cuda", dtype=torch.float16)
        row = {}
        for label, layer in layers.items():
            try:
                with torch.no_grad():
                    row[label] = graph_time_ms(lambda: layer(x))
            except Exception as e:  # a path this GPU or build cannot run: recorded, not hidden
                row[label] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        results[str(M)] = row
        print(f"M={M:5}: " + ", ".join(f"{k} {v:.4f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    protocol = {"shape": f"{size} x {size}", "batches": list(batches), "timer": "CUDA graphs, median of 5 replays",
                "w8a8": "activations quantized per token inside each call; int8 via torch._int_mm, fp8 via torch._scaled_mm"}
    return save_results(name, protocol, results, out or RESULTS_DIR / f"{name}.json")


def table(record: dict) -> str:
    """Markdown: milliseconds per call and the speed-up over fp16, per path and batch."""
    r = record["results"]
    labels = [k for k in next(iter(r.values())) if k != "fp16"]
    lines = [f"{record['machine'].get('gpu', 'GPU')}, one {record['protocol']['shape']} linear, "
             f"{record['protocol']['timer']}; {record['protocol']['w8a8']}. Speed-up over fp16 in the same run.", "",
             "| M | fp16 ms | " + " | ".join(labels) + " |", "|---:|---:|" + "---:|" * len(labels)]
    for M, row in r.items():
        cells = [f"{row['fp16'] / row[k]:.2f}x" if isinstance(row[k], float) else "failed" for k in labels]
        lines.append(f"| {M} | {row['fp16']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
