"""Reproduce a published row: `minquant bench paper --model facebook/opt-125m`.

The GPTQ paper (Frantar et al. 2022, Table 3) reports OPT WikiText-2 perplexities; its protocol,
which notebooks 04 and 07 follow in small:
    calibration  128 random windows of 2048 tokens from the first C4 training shard, seed 0
    quantized    every linear of the decoder layers (not the LM head), per output channel
                 (no groups), asymmetric min/max grid; GPTQ with damp 0.01, blocks of 128 columns,
                 no act-order, all linears of a layer calibrated on the layer's float inputs
                 (the reference code's OPT script: `true_sequential=False` here)
    evaluated    WikiText-2 test joined with "\\n\\n", non-overlapping 2048-token windows, all of
                 them, the model in fp16 on a GPU (fp32 on a CPU, where fp16 is slow)
The same command is the recipe for other models (Llama-3.2-1B, Qwen2.5-0.5B): no published row
to compare with there, so it records ours. Needs the model from the Hub (or a local folder) and the
data (MINQUANT_DATA or the Hub); a GPU makes it minutes instead of hours.
"""
from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import torch

# The paper's numbers (GPTQ, Table 3: OPT, WikiText-2 perplexity), by model.
PAPER_ROWS = {
    "facebook/opt-125m": {"fp16": 27.65, "RTN W4": 37.28, "GPTQ W4": 31.12, "GPTQ W3": 53.85},
}
# Models people ask for that have no row in the paper: the same protocol, our numbers only.
RECIPES = ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B")
ENTRIES = (("RTN W4", "rtn", 4), ("GPTQ W4", "gptq", 4), ("RTN W3", "rtn", 3), ("GPTQ W3", "gptq", 3))


def results_name(model: str) -> str:
    """data/results/paper_<model>.json, e.g. paper_facebook_opt_125m."""
    return "paper_" + re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")


def run(model: str = "facebook/opt-125m", *, device=None, n_samples: int = 128, seqlen: int | None = None,
        max_windows: int | None = None, out: Path | None = None, progress: bool = True) -> Path:
    """Run the paper's protocol on `model` (Hub id or folder) and save ours beside the paper's numbers.

    `max_windows`: score only the first windows of WikiText-2 test (None or 0: all of them, as the paper)."""
    max_windows = max_windows or None
    import minquant
    from minquant.api import calibration_data
    from minquant.bench.results import RESULTS_DIR, save_results
    from minquant.eval import default_seqlen

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_dtype = torch.float16 if device.type == "cuda" else torch.float32
    float_model, tokenizer = minquant.load_model(model)  # fp32, as the reference code quantizes
    seqlen = seqlen or default_seqlen(float_model)
    windows = calibration_data("c4", tokenizer, n_samples, seqlen, seed=0)
    paper = PAPER_ROWS.get(model, {})
    results = {}

    def evaluate(m) -> float:
        m = m.to(device=device, dtype=eval_dtype)
        ppl = minquant.evaluate(m, "wikitext2", tokenizer=tokenizer, seqlen=seqlen, max_windows=max_windows,
                                progress=progress).ppl
        m.to("cpu")
        return ppl

    fp_label = "fp16" if eval_dtype == torch.float16 else "fp32"
    results[fp_label] = {"ppl": evaluate(copy.deepcopy(float_model)), "paper": paper.get("fp16")}
    for label, method, bits in ENTRIES:
        q = copy.deepcopy(float_model)
        start = time.perf_counter()
        # the paper's GPTQ: plain column order (the front door's default is act-order)
        options = {"damp": 0.01, "true_sequential": False, "act_order": False} if method == "gptq" else {}
        options |= {"calib": windows} if method != "rtn" else {}  # RTN takes no calibration data
        minquant.quantize(q, method, tokenizer=tokenizer, bits=bits, group_size=-1, sym=False,
                          device=device, progress=progress, **options)
        seconds = time.perf_counter() - start
        results[label] = {"ppl": evaluate(q), "paper": paper.get(label), "quantize_seconds": seconds}
        print(f"{label}: {results[label]['ppl']:.2f}" + (f" (paper {paper[label]})" if label in paper else ""))
    protocol = {"model": model, "reference": "GPTQ (Frantar et al. 2022), Table 3" if paper else "none published",
                "calibration": {"source": "c4", "n_samples": n_samples, "seqlen": seqlen, "seed": 0},
                "quantized": "every linear of the decoder layers; per channel, asymmetric; GPTQ damp 0.01, "
                             "block 128, no act-order, not true-sequential",
                "eval": {"text": "wikitext2/test joined with \"\\n\\n\"", "seqlen": seqlen,
                         "windows": max_windows or "all", "dtype": str(eval_dtype).removeprefix("torch."),
                         "device": device.type}}
    return save_results(results_name(model), protocol, results, out or RESULTS_DIR / f"{results_name(model)}.json")


def table(record: dict) -> str:
    """Ours beside the paper's, as markdown."""
    p = record["protocol"]
    lines = [f"{p['model']}, WikiText-2 perplexity ({p['eval']['windows']} windows of {p['eval']['seqlen']}, "
             f"{p['eval']['dtype']} on {p['eval']['device']}); reference: {p['reference']}", "",
             "| | minquant | paper |", "|---|---|---|"]
    for label, r in record["results"].items():
        lines.append(f"| {label} | {r['ppl']:.2f} | {r['paper'] if r['paper'] is not None else '-'} |")
    return "\n".join(lines)
