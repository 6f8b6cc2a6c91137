"""`minquant bench demo`: what `make demo` measures, saved for notebook 10 and the README."""
from __future__ import annotations

import tempfile
from pathlib import Path

from minquant.bench.results import save_results

NAME = "demo_smollm2"


def run(model: str = "smollm2-135m", max_windows: int | None = None, out: Path | None = None) -> Path:
    """The demo's table, generations and per-layer errors (`minquant.compare.demo`) into data/results/demo_smollm2.json."""
    from minquant.compare import demo

    record = demo(model, tempfile.mkdtemp(prefix="minquant-bench-demo-"), eval_windows=max_windows or 4)
    protocol = {k: record.pop(k) for k in ("model", "bits", "group_size", "calibration", "eval")}
    return save_results(NAME, protocol, record, out)


def table(record: dict) -> str:
    p, r = record["protocol"], record["results"]
    lines = [f"`make demo` on {record['machine']['cores']} CPU cores ({r['seconds'] / 60:.1f} min in all): {p['model']}, "
             f"W{p['bits']} g{p['group_size']} asymmetric, calibration C4 {p['calibration']['n_samples']} x "
             f"{p['calibration']['seqlen']} tokens, perplexity on the first {p['eval']['windows']} WikiText-2 test "
             f"windows of {p['eval']['seqlen']} tokens; peak = the process's peak RSS while quantizing, float model included.",
             "", "| | model MB | block linears MB | perplexity | quantize s | peak GB |", "|---|---|---|---|---|---|"]
    for e in r["entries"]:
        peak = f"{e['peak_bytes'] / 1e9:.2f}" if e["peak_bytes"] else "-"
        lines.append(f"| {e['label']} | {e['model_bytes'] / 1e6:.1f} | {e['linear_bytes'] / 1e6:.1f} | {e['ppl']:.2f} | "
                     f"{e['seconds']:.1f} | {peak} |")
    lines += ["", f"Best: {r['best']}, {r['checkpoint_bytes'] / 1e6:.1f} MB on disk. Greedy generations "
              f"({r['max_new_tokens']} new tokens), prompt \"{r['prompt']}\":", ""]
    lines += [f"- **{label}**: {text}" for label, text in r["generations"].items()]
    return "\n".join(lines)
