"""`minquant bench mixed`: mixed-precision GPTQ against uniform GPTQ and AWQ on SmolLM2 (notebooks 09, 10).

Same protocol as `minquant bench gptq` (calibration 128 x 512 tokens of C4, seed 0; WikiText-2 test,
seqlen 2048, first 16 windows). GPTQ with bits and group size per layer at the bits per weight of
uniform W3 g64 and W4 g64 (and a few budgets between, for the curve), both with GPTQ's defaults and
with act-order on static groups (07's best setting), next to uniform GPTQ at other group sizes;
uniform GPTQ's numbers at W3/W4 g64 come from the GPTQ sweep's file, AWQ's from the AWQ sweep's.
"""
from __future__ import annotations

from pathlib import Path

from minquant.bench.gptq import PROTOCOL as GPTQ_PROTOCOL
from minquant.bench.results import RESULTS_DIR, load_results
from minquant.bench.sensitivity import SENSITIVITY_SAMPLES
from minquant.bench.sweep import run_sweep
from minquant.quant import scheme_label

NAME = "mixed_smollm2"
W3_G64, W4_G64 = 3 + 19 / 64, 4 + 20 / 64  # bits per weight of uniform asym g64: values + fp16 scale + zero per 64
BUDGETS = [2.5, 3.0, W3_G64, 3.75, W4_G64, 5.0]
SMOLLM2_BLOCK = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),  # (N, K) of its linears
                 "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
PROTOCOL = {**{k: GPTQ_PROTOCOL[k] for k in ("model", "calibration", "eval")},
            "mixed": {"options": "2/3/4/8 bits at g32/g64/g128/per-channel (asym), or fp16",
                      "proxy": "fisher (K-FAC diagonal), RTN weights", "sensitivity_samples": SENSITIVITY_SAMPLES,
                      "tied": "q/k/v and gate/up share a config",
                      "quantizer": "GPTQ, defaults; and GPTQ act-order with static groups (labels '... act-order static')"}}
ACT_ORDER = {"act_order": True, "static_groups": True}


def budget_label(bpw: float, act_order: bool = False) -> str:
    named = {W3_G64: " (= W3 g64)", W4_G64: " (= W4 g64)"}
    return f"mixed {bpw:.3f} bpw{named.get(bpw, '')}" + (" act-order static" if act_order else "")


def entries() -> list[tuple[str, dict]]:
    """Every measurement of the mixed sweep, by label, in the order it runs."""
    out = [(budget_label(b), {"method": "gptq", "bits": 4, "group_size": 64, "sym": False, "bits_budget": b,
                              "sensitivity_samples": SENSITIVITY_SAMPLES}) for b in (W3_G64, W4_G64)]
    for bits, g in [(3, 32), (4, 32), (2, 64), (2, 32), (8, -1)]:  # uniform points the GPTQ sweep does not have
        out.append((f"GPTQ {scheme_label(bits, g, False)}", {"method": "gptq", "bits": bits, "group_size": g, "sym": False}))
    out += [(budget_label(b), {"method": "gptq", "bits": 4, "group_size": 64, "sym": False, "bits_budget": b,
                               "sensitivity_samples": SENSITIVITY_SAMPLES}) for b in BUDGETS if b not in (W3_G64, W4_G64)]
    # the same with act-order on static groups: the named budgets first, then the uniform points, then the curve
    budgets = [W3_G64, W4_G64] + [b for b in BUDGETS if b not in (W3_G64, W4_G64)]
    out += [(budget_label(b, True), {"method": "gptq", "bits": 4, "group_size": 64, "sym": False, "bits_budget": b,
                                     "sensitivity_samples": SENSITIVITY_SAMPLES, **ACT_ORDER}) for b in budgets[:2]]
    for bits, g in [(3, 32), (4, 32)]:
        out.append((f"GPTQ {scheme_label(bits, g, False)} act-order static",
                    {"method": "gptq", "bits": bits, "group_size": g, "sym": False, **ACT_ORDER}))
    out += [(budget_label(b, True), {"method": "gptq", "bits": 4, "group_size": 64, "sym": False, "bits_budget": b,
                                     "sensitivity_samples": SENSITIVITY_SAMPLES, **ACT_ORDER}) for b in budgets[2:]]
    return out


def run(only: list[str] | None = None, redo: bool = False, out: Path | None = None) -> Path:
    """Run the mixed sweep's entries (all, or those matching `only`), saving each to data/results/mixed_smollm2.json."""
    return run_sweep(NAME, PROTOCOL, entries(), only=only, redo=redo, out=out or RESULTS_DIR / f"{NAME}.json")


def table(record: dict, gptq: dict | None = None, awq: dict | None = None) -> str:
    """Markdown: perplexity at each bits per weight: mixed, and every uniform method measured on the same
    protocol (this sweep's GPTQ, the GPTQ sweep's plain and act-order rows, the AWQ sweep's), so that
    mixed precision is read against the strongest uniform baseline at equal bytes."""
    from minquant.mixed import uniform_bits_per_weight
    from minquant.quant import QuantConfig

    r, p = record["results"], record["protocol"]
    g = (gptq or load_results("gptq_smollm2", missing_ok=True) or {}).get("results", {})  # uniform GPTQ, same protocol
    a = (awq or load_results("awq_smollm2", missing_ok=True) or {}).get("results", {})    # uniform AWQ, same protocol

    def uniform_bpw(bits, gs):  # over one SmolLM2 block's linears (every block is the same)
        return float(uniform_bits_per_weight(SMOLLM2_BLOCK, QuantConfig(bits, gs)))

    rows = []
    uniform = {f"GPTQ {scheme_label(b, gs, False)}{variant}" for b in (3, 4) for gs in (64, -1)
               for variant in ("", " act-order static")}
    for label, v in {**{k: v for k, v in g.items() if k in uniform},
                     **{k: v for k, v in a.items() if k in {f"AWQ {scheme_label(b, 64, False)}" for b in (3, 4)}},
                     **r}.items():
        bpw = v.get("bits_per_weight") or uniform_bpw(v["bits"], v["group_size"])
        counts = ", ".join(f"{label}: {n}" for label, n in v["plan_counts"].items()) if "plan_counts" in v else ""
        rows.append((bpw, label, v["ppl"], v["quantize_seconds"], counts))
    lines = [f"SmolLM2-135M, WikiText-2 test perplexity (first {p['eval']['windows']} windows of {p['eval']['seqlen']}) "
             f"vs bits per weight of the block linears (values, fp16 scales and zero-points counted as "
             f"`minquant.memory` counts them). Every method calibrated on {p['calibration']['n_samples']} x "
             f"{p['calibration']['seqlen']} tokens of C4; mixed: {p['mixed']['options']}, chosen per layer by the "
             f"{p['mixed']['proxy']} proxy from {p['mixed']['sensitivity_samples']} windows; {p['mixed']['tied']}. "
             + (f"The Q4_1 baseline (SmolLM2 dequantized from its Q4_1 file, the \"fp32\" rows): {g['fp32']['ppl']:.2f}. "
                if "fp32" in g else "")
             + (f"Measured by `minquant bench mixed` on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
                f"last entry {max(v['measured'] for v in r.values())[:10]}." if r else ""), "",
             "| bits per weight | scheme | perplexity | seconds | layers per config (mixed) |", "|---:|---|---:|---:|---|"]
    lines += [f"| {bpw:.3f} | {label} | {ppl:.2f} | {sec:.0f} | {counts} |" for bpw, label, ppl, sec, counts in sorted(rows)]
    return "\n".join(lines)
