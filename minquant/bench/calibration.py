"""`minquant bench calibration`: what calibration data matters (source, number of windows, length), notebook 09."""
from __future__ import annotations

from pathlib import Path

from minquant.bench.gptq import PROTOCOL as GPTQ_PROTOCOL
from minquant.bench.results import RESULTS_DIR
from minquant.bench.sweep import run_sweep

NAME = "calibration_smollm2"
SCHEME = {"bits": 3, "group_size": 64, "sym": False}  # W3: where calibration matters most visibly
SEEDS = (0, 1, 2)
PROTOCOL = {"model": GPTQ_PROTOCOL["model"], "calibration": GPTQ_PROTOCOL["calibration"],
                  "eval": {**GPTQ_PROTOCOL["eval"], "windows": 4},  # 4 windows per run: many runs, seeds give the spread
                  "quantized": "W3 g64 asym, plain GPTQ (the paper's column order), GPTQ act-order with static groups (the front door's default), and AWQ (defaults)"}
# label prefix -> minquant.quantize method and options; act-order on static groups is 07's best GPTQ
METHODS = {"GPTQ": ("gptq", {}), "GPTQ act-order static": ("gptq", {"act_order": True, "static_groups": True}),
           "AWQ": ("awq", {})}


def entries() -> list[tuple[str, dict]]:
    """Each (method, source, windows, length) at 3 seeds; the baseline is C4, 128 windows of 512 tokens."""
    out = [("RTN (no calibration)", {"method": "rtn", **SCHEME})]
    points = ([("c4", 128, 512), ("wikitext2", 128, 512), ("random", 128, 512)]
              + [("c4", n, 512) for n in (8, 32)] + [("c4", 32, L) for L in (128, 2048)])
    for prefix, (method, options) in METHODS.items():
        for source, n, seqlen in points:
            for seed in SEEDS:
                out.append((f"{prefix} {source} {n}x{seqlen} seed {seed}",
                            {"method": method, **SCHEME, **options,
                             "calib": {"source": source, "n_samples": n, "seqlen": seqlen, "seed": seed}}))
    # Windows of 2048 can only come from the few C4 documents that long (32 of 1000 in the slice): the
    # same short windows drawn from those documents only separate "which text" from "how long".
    for prefix, (method, options) in METHODS.items():
        for seed in SEEDS:
            out.append((f"{prefix} c4 long-documents 32x128 seed {seed}",
                        {"method": method, **SCHEME, **options,
                         "calib": {"source": "c4", "n_samples": 32, "seqlen": 128, "seed": seed, "min_doc_tokens": 2048}}))
    return out


def run(only: list[str] | None = None, redo: bool = False, out: Path | None = None) -> Path:
    """The calibration study's entries (resumable), saved to data/results/calibration_smollm2.json."""
    return run_sweep(NAME, PROTOCOL, entries(), only=only, redo=redo,
                     out=out or RESULTS_DIR / f"{NAME}.json")


def summary(record: dict) -> dict[str, dict]:
    """Per (method, source, windows x length): mean, min and max perplexity over the seeds measured."""
    groups: dict[str, list[float]] = {}
    for label, v in record["results"].items():
        key = label.rsplit(" seed ", 1)[0]
        groups.setdefault(key, []).append(v["ppl"])
    return {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "seeds": len(v)} for k, v in groups.items()}


def table(record: dict) -> str:
    """Markdown: mean perplexity and its range over seeds, per calibration choice."""
    p = record["protocol"]
    lines = [f"SmolLM2-135M {p['quantized']}: WikiText-2 test perplexity (first {p['eval']['windows']} windows of "
             f"{p['eval']['seqlen']}) by calibration data, mean and range over the seeds measured. "
             f"Measured by `minquant bench calibration` on {record['machine']['cpu']} ({record['machine']['cores']} cores).",
             "", "| method and calibration (windows x tokens) | mean ppl | range over seeds | seeds |", "|---|---:|---:|---:|"]
    for k, s in summary(record).items():
        lines.append(f"| {k} | {s['mean']:.2f} | {s['min']:.2f} - {s['max']:.2f} | {s['seeds']} |")
    return "\n".join(lines)
