"""`minquant bench gptq`: GPTQ vs RTN vs llm-compressor's GPTQ on SmolLM2, side by side in one run.

Its results are read by notebooks 07 and 10.

Act-order comes in two flavours: groups formed along the sweep order (`g_idx` permuted; GPTQ's
desc_act) and static groups, whose ranges are fixed on the original contiguous groups first.
llm-compressor 0.14 has only the second (actorder="static", its default; "group" is refused).

Protocol (the project's quick CPU protocol): calibration 128 windows x 512 tokens from the C4
slice, seed 0; WikiText-2 test, seqlen 2048, first 16 windows. The sweep machinery (entries saved
as measured, `--only`, `--redo`, peers in their own venvs, peak memory) is `minquant/bench/sweep.py`.
"""
from __future__ import annotations

from pathlib import Path

from minquant.bench.results import RESULTS_DIR
from minquant.bench.sweep import PEERS, run_sweep
from minquant.quant import scheme_label

NAME = "gptq_smollm2"
PROTOCOL = {"model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
            "calibration": {"source": "c4", "n_samples": 128, "seqlen": 512, "seed": 0},
            "eval": {"text": 'wikitext2/test joined with "\\n\\n"', "seqlen": 2048, "windows": 16},
            "quantized": "every linear of the 30 blocks; embeddings and lm_head (tied) stay float",
            "damp": 0.01, "block_size": 128}
# (bits, group_size, sym): each with RTN, GPTQ, and GPTQ with act-order. K = 576 rules out g128.
SCHEMES = [(4, 64, True), (4, 64, False), (4, -1, True), (4, -1, False), (3, 64, True), (3, 64, False)]
HQQ_VERSION = PEERS["hqq"][1][0].split("==")[1]


def entries() -> list[tuple[str, dict]]:
    """Every measurement of the sweep, by label, in the order it runs."""
    out = [("fp32", {"method": "fp32"})]
    for bits, g, sym in SCHEMES:
        s = scheme_label(bits, g, sym)
        out += [(f"RTN {s}", {"method": "rtn", "bits": bits, "group_size": g, "sym": sym}),
                (f"GPTQ {s}", {"method": "gptq", "bits": bits, "group_size": g, "sym": sym}),
                (f"GPTQ {s} act-order", {"method": "gptq", "bits": bits, "group_size": g, "sym": sym, "act_order": True}),
                (f"GPTQ {s} act-order static", {"method": "gptq", "bits": bits, "group_size": g, "sym": sym,
                                                 "act_order": True, "static_groups": True}),
                (f"llm-compressor GPTQ {s}", {"method": "peer", "bits": bits, "group_size": g, "sym": sym}),
                (f"llm-compressor GPTQ {s} act-order static", {"method": "peer", "bits": bits, "group_size": g,
                                                               "sym": sym, "actorder": "static"})]
        if not sym:  # HQQ has no symmetric mode (its zero point is a float)
            out.append((f"HQQ {s}", {"method": "peer", "tool": "hqq", "bits": bits, "group_size": g, "sym": sym}))
    return out + option_entries()


def option_entries() -> list[tuple[str, dict]]:
    """GPTQ's options, after the main sweep: `full_range` (sym: GPTQ's and llm-compressor's 16-level
    grid, so the like-for-like match of their symmetric scheme), `search_range`, and
    `true_sequential=False` (every group of a block calibrated on its float inputs, as llm-compressor does)."""
    out = []
    for bits, g, sym in SCHEMES:
        s, base = scheme_label(bits, g, sym), {"bits": bits, "group_size": g, "sym": sym}
        static = {"act_order": True, "static_groups": True}
        if sym:
            out += [(f"RTN {s} full-range", {"method": "rtn", **base, "full_range": True}),
                    (f"GPTQ {s} full-range", {"method": "gptq", **base, "full_range": True}),
                    (f"GPTQ {s} full-range act-order static", {"method": "gptq", **base, "full_range": True, **static})]
        out += [(f"GPTQ {s} range-search", {"method": "gptq", **base, "search_range": True}),
                (f"GPTQ {s} range-search act-order static", {"method": "gptq", **base, "search_range": True, **static}),
                (f"GPTQ {s} not-true-sequential", {"method": "gptq", **base, "true_sequential": False})]
    return out


def run(only: list[str] | None = None, redo: bool = False, out: Path | None = None) -> Path:
    """Run the GPTQ sweep's entries (all, or those matching `only`), saving each to data/results/gptq_smollm2.json."""
    return run_sweep(NAME, PROTOCOL, entries(), only=only, redo=redo, out=out or RESULTS_DIR / f"{NAME}.json")


def table(record: dict) -> str:
    """Markdown: perplexity (and quantization seconds) per scheme and method, with the protocol above it."""
    r, p = record["results"], record["protocol"]
    cell = lambda label: (f"{r[label]['ppl']:.2f} ({r[label]['quantize_seconds']:.0f} s)" if label in r else "—")
    peak = lambda prefix: [v["peak_rss_bytes"] / 1e9 for k, v in r.items() if k.startswith(prefix) and "peak_rss_bytes" in v]
    gb = lambda xs: f"{min(xs):.1f}-{max(xs):.1f} GB" if xs else "not measured yet"
    ours, theirs, hqq = peak("GPTQ"), peak("llm-compressor"), peak("HQQ")
    lines = [f"SmolLM2-135M, WikiText-2 test perplexity (first {p['eval']['windows']} windows of {p['eval']['seqlen']}) "
             f"and quantization time in seconds. GPTQ calibration: {p['calibration']['n_samples']} x "
             f"{p['calibration']['seqlen']} tokens of C4, seed {p['calibration']['seed']}, damp {p['damp']}; "
             f"llm-compressor's `GPTQModifier` on the same windows and the same evaluation; HQQ {HQQ_VERSION} "
             f"(weights only, its default proximal solver, float zero points). fp32: "
             f"{r['fp32']['ppl']:.2f}." if "fp32" in r else "", "" if "fp32" in r else None,
             f"Measured by `minquant bench gptq` on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
             f"last entry {max(v['measured'] for v in r.values())[:10]}. Peak resident memory while quantizing: "
             f"ours {gb(ours)} (the bench's process, float model included), llm-compressor {gb(theirs)}, HQQ {gb(hqq)}. "
             "— = not measured yet.", "",
             "| scheme | RTN | GPTQ | act-order | act-order, static groups | llm-compressor GPTQ "
             "| llm-compressor act-order (static groups) | HQQ (no calibration) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for bits, g, sym in SCHEMES:
        s = scheme_label(bits, g, sym)
        labels = [f"RTN {s}", f"GPTQ {s}", f"GPTQ {s} act-order", f"GPTQ {s} act-order static",
                  f"llm-compressor GPTQ {s}", f"llm-compressor GPTQ {s} act-order static"]
        hqq = "n/a" if sym else cell(f"HQQ {s}")  # HQQ's zero point is a float: no symmetric mode
        lines.append(f"| {s} | " + " | ".join(cell(label) for label in labels) + f" | {hqq} |")
    lines += ["", "GPTQ's options, same protocol. *Full range* (symmetric only): all 16 (8) levels, "
              "s = 2 max|w| / 15, as GPTQ's reference code and llm-compressor's symmetric scheme (the table above "
              "uses 15 levels symmetric around 0). *Range search*: each group's range p (min, max) with the p in "
              "1, 0.99, ..., 0.21 that minimises sum |w - q|^2.4 (the reference code's `--mse`). *Not true "
              "sequential*: all of a block's linears calibrated on the block's float inputs (llm-compressor's way).", "",
              "| scheme | RTN full range | GPTQ full range | full range, act-order (static) | GPTQ range search "
              "| range search, act-order (static) | GPTQ, not true sequential |", "|---|---:|---:|---:|---:|---:|---:|"]
    for bits, g, sym in SCHEMES:
        s = scheme_label(bits, g, sym)
        full = [cell(f"RTN {s} full-range"), cell(f"GPTQ {s} full-range"), cell(f"GPTQ {s} full-range act-order static")]
        search = [cell(f"GPTQ {s} range-search"), cell(f"GPTQ {s} range-search act-order static"),
                  cell(f"GPTQ {s} not-true-sequential")]
        lines.append(f"| {s} | " + " | ".join((full if sym else ["n/a"] * 3) + search) + " |")
    return "\n".join(line for line in lines if line is not None)
