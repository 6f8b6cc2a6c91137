"""`minquant bench awq`: AWQ vs llm-compressor's AWQ on SmolLM2, next to RTN and GPTQ (read by notebooks 08, 10).

Same protocol as `minquant bench gptq` (calibration 128 x 512 tokens of C4, seed 0; WikiText-2
test, seqlen 2048, first 16 windows), so the table takes RTN's and GPTQ's numbers from that sweep's
file rather than measuring them twice. AWQ is asymmetric (a zero-point per group), as AWQ's
reference code and llm-compressor's W4A16_ASYM. Machinery: `minquant/bench/sweep.py`.
"""
from __future__ import annotations

from pathlib import Path

from minquant.bench.gptq import PROTOCOL as GPTQ_PROTOCOL
from minquant.bench.results import RESULTS_DIR, load_results
from minquant.bench.sweep import run_sweep
from minquant.quant import scheme_label

NAME = "awq_smollm2"
PROTOCOL = {**{k: GPTQ_PROTOCOL[k] for k in ("model", "calibration", "eval", "quantized")},
            "awq": {"alpha_grid": 20, "clip_shrinks": "1, 0.95, ..., 0.55", "clip": "all linears but q_proj, k_proj"}}
SCHEMES = [(4, 64, False), (3, 64, False)]  # K = 576 rules out g128


def entries() -> list[tuple[str, dict]]:
    """Every measurement of the sweep, by label, in the order it runs."""
    out = []
    for bits, g, sym in SCHEMES:
        s, base = scheme_label(bits, g, sym), {"bits": bits, "group_size": g, "sym": sym}
        out += [(f"AWQ {s}", {"method": "awq", **base}),
                (f"llm-compressor AWQ {s}", {"method": "peer", "peer_method": "awq", **base}),
                (f"AWQ {s} duo-scaling", {"method": "awq", **base, "duo_scaling": True}),
                (f"AWQ {s} no-clip", {"method": "awq", **base, "clip": False})]
    return out


def run(only: list[str] | None = None, redo: bool = False, out: Path | None = None) -> Path:
    """Run the AWQ sweep's entries (all, or those matching `only`), saving each to data/results/awq_smollm2.json."""
    return run_sweep(NAME, PROTOCOL, entries(), only=only, redo=redo, out=out or RESULTS_DIR / f"{NAME}.json")


def table(record: dict, gptq: dict | None = None) -> str:
    """Markdown: perplexity (quantization seconds) per scheme; RTN and GPTQ columns from the GPTQ sweep's record
    (`gptq`, by default its file when there is one)."""
    r, p = record["results"], record["protocol"]
    g = (gptq or load_results("gptq_smollm2", missing_ok=True) or {}).get("results", {})
    cell = lambda res, label: f"{res[label]['ppl']:.2f} ({res[label]['quantize_seconds']:.0f} s)" if label in res else "—"
    peak = lambda prefix: [v["peak_rss_bytes"] / 1e9 for k, v in r.items() if k.startswith(prefix) and "peak_rss_bytes" in v]
    gb = lambda xs: f"{min(xs):.1f}-{max(xs):.1f} GB" if xs else "not measured yet"
    lines = [f"SmolLM2-135M, WikiText-2 test perplexity (first {p['eval']['windows']} windows of {p['eval']['seqlen']}) "
             f"and quantization time in seconds; calibration {p['calibration']['n_samples']} x "
             f"{p['calibration']['seqlen']} tokens of C4, seed {p['calibration']['seed']}. "
             + (f"fp32: {g['fp32']['ppl']:.2f}. " if "fp32" in g else "")
             + "RTN and GPTQ from the GPTQ sweep (same protocol). llm-compressor: `AWQModifier` (duo scaling, "
             "20-point grid, no clip search) then min/max rounding." + (
                 f" Measured by `minquant bench awq` on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
                 f"last entry {max(v['measured'] for v in r.values())[:10]}." if "machine" in record and r else "")
             + f" Peak resident memory while quantizing: ours {gb(peak('AWQ'))}, llm-compressor "
             f"{gb(peak('llm-compressor'))}. — = not measured yet.", "",
             "| scheme | RTN | GPTQ | GPTQ act-order (static) | AWQ | AWQ, duo scaling | AWQ, no clip search "
             "| llm-compressor AWQ |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for bits, gs, sym in SCHEMES:
        s = scheme_label(bits, gs, sym)
        cells = [cell(g, f"RTN {s}"), cell(g, f"GPTQ {s}"), cell(g, f"GPTQ {s} act-order static"), cell(r, f"AWQ {s}"),
                 cell(r, f"AWQ {s} duo-scaling"), cell(r, f"AWQ {s} no-clip"), cell(r, f"llm-compressor AWQ {s}")]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
