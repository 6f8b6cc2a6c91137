"""`minquant bench sensitivity`: how well each per-layer proxy predicts a layer's measured cost (notebook 09).

Every block linear's proxies (from the first 16 calibration windows, C4) next to the measured
increase of the mean token NLL when that linear alone is quantized (RTN W3 g64 asym, WikiText-2
*validation* windows, so nothing is tuned on the test set); rank correlations.
"""
from __future__ import annotations

import time
from pathlib import Path

from minquant.bench.gptq import PROTOCOL as GPTQ_PROTOCOL
from minquant.bench.results import RESULTS_DIR, save_results
from minquant.quant import scheme_label

NAME = "sensitivity_smollm2"
SENSITIVITY_SAMPLES = 16  # calibration windows the sensitivity pass (forward and backward) reads


def run(bits: int = 3, group_size: int = 64, eval_windows: int = 2, seqlen: int = 2048,
        names: list[str] | None = None, stats_samples: int = SENSITIVITY_SAMPLES,
        out: Path | None = None) -> Path:
    """Proxies vs measured per-layer NLL increase on SmolLM2; data/results/sensitivity_smollm2.json.

    `names` (default: every block linear) are measured; the proxies cover every layer.
    """
    from minquant.data import calibration_windows, load_text
    from minquant.eval import eval_ids
    from minquant.models import load_model
    from minquant.quant import QuantConfig
    from minquant.sensitivity import (collect_layer_stats, first_order_term, measured_sensitivity, sensitivity_table,
                                      spearman)

    model, tok = load_model("smollm2-135m")
    cal, cfg = GPTQ_PROTOCOL["calibration"], QuantConfig(bits, group_size)
    windows = calibration_windows(cal["source"], tok, n=stats_samples, seqlen=cal["seqlen"], seed=cal["seed"])
    start = time.perf_counter()
    stats = collect_layer_stats(model, windows)
    stats_seconds = time.perf_counter() - start
    label = scheme_label(bits, group_size, False)
    proxies = {f"{proxy} ({method})": {n: row[label] for n, row in
                                       sensitivity_table(model, stats, {label: cfg}, proxy=proxy, method=method).items()}
               for proxy, method in [("fisher", "rtn"), ("output", "rtn"), ("fisher", "gptq")]}
    ids = eval_ids(load_text("wikitext2", "validation"), tok)[0]  # (T,)
    if len(ids) < 2 * eval_windows * seqlen:
        raise ValueError(f"WikiText-2 validation has {len(ids)} tokens, fewer than 2 x {eval_windows} x {seqlen}")
    eval_w = ids[: eval_windows * seqlen].reshape(eval_windows, seqlen)
    start = time.perf_counter()
    base, measured = measured_sensitivity(model, eval_w, cfg, names)
    measured_seconds = time.perf_counter() - start
    names = list(measured)
    # The part of each measured change that is linear in dW (g . dW), which the proxies leave out: on the
    # measured windows, on the next validation windows (same kind of text) and on the C4 stats windows.
    next_w = ids[eval_windows * seqlen: 2 * eval_windows * seqlen]
    first = {where: first_order_term(model, w, cfg, names) for where, w in
             [("measured windows", eval_w), ("next validation windows", next_w.reshape(-1, seqlen)), ("C4", windows)]}
    fo = first["measured windows"]
    proxies |= {"first order (measured windows)": fo,
                "fisher (rtn) + first order (measured windows)": {n: proxies["fisher (rtn)"][n] + fo[n] for n in names},
                "fisher (rtn) + first order (next validation windows)":
                    {n: proxies["fisher (rtn)"][n] + first["next validation windows"][n] for n in names}}
    results = {"base_nll": base, "measured_seconds": measured_seconds, "stats_seconds": stats_seconds,
               "measured": measured, "proxies": proxies,
               "first_order_agreement": {f"measured windows vs {k}": spearman([fo[n] for n in names], [v[n] for n in names])
                                         for k, v in first.items() if k != "measured windows"},
               "spearman": {k: spearman([v[n] for n in names], [measured[n] for n in names]) for k, v in proxies.items()},
               "sum_measured": sum(measured.values()),
               "sum_proxy": {k: sum(v[n] for n in names) for k, v in proxies.items()}}
    protocol = {"model": GPTQ_PROTOCOL["model"], "quantized": f"RTN {label}, one linear at a time",
                "stats": f"first {stats_samples} of the calibration windows ({cal['seqlen']} tokens, C4, seed {cal['seed']})",
                "measured_on": f"WikiText-2 validation, first {eval_windows} windows of {seqlen}"}
    return save_results(NAME, protocol, results, out or RESULTS_DIR / f"{NAME}.json")



def table(record: dict, top: int = 8) -> str:
    """Markdown: how well each proxy ranks the layers by their measured effect."""
    r, p = record["results"], record["protocol"]
    lines = [f"Per-layer sensitivity of SmolLM2-135M: each of its {len(r['measured'])} block linears quantized alone "
             f"({p['quantized']}), the mean token NLL increase measured on {p['measured_on']} "
             f"(float NLL {r['base_nll']:.4f}; {r['measured_seconds'] / 60:.0f} min), against proxies from {p['stats']} "
             f"({r['stats_seconds']:.0f} s). Sum of the measured increases: {r['sum_measured']:.4f} nats.", "",
             "| proxy | Spearman rank correlation with the measured increase | sum over layers |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {r['sum_proxy'][k]:.4g} |" for k, v in r["spearman"].items()]
    if "first_order_agreement" in r:
        lines += ["", "First-order term g . dW (the loss gradient on a text, dotted with the rounding error), rank "
                  "agreement between texts: " + "; ".join(f"{k}: {v:.3f}" for k, v in r["first_order_agreement"].items())
                  + ". The proxies are second order: they leave this term out (about zero on average over data)."]
    names = sorted(r["measured"], key=r["measured"].get, reverse=True)
    rank = {k: {n: i + 1 for i, n in enumerate(sorted(names, key=lambda n: -v[n]))} for k, v in r["proxies"].items()}
    lines += ["", f"The {min(top, len(names))} layers that cost the most, measured, and where each proxy ranks them "
              f"(1 = most sensitive of {len(names)}):", "",
              "| layer | measured (nats) | " + " | ".join(f"rank by {k}" for k in rank) + " |",
              "|---|---:|" + "---:|" * len(rank)]
    lines += [f"| {n} | {r['measured'][n]:.4f} | " + " | ".join(str(rank[k][n]) for k in rank) + " |" for n in names[:top]]
    return "\n".join(lines)
