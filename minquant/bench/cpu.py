"""`minquant bench cpu`: 4-bit QuantLinear on this CPU against fp32 and torch's own CPU kernels, and
SmolLM2 decoding speed, written to data/results/cpu_<cpu>.json and the README's CPU table.

Layers: SmolLM2's four shapes (g64) and Llama-2-7B's three (g128), at 1, 4, 16 and 128 rows. Each
method runs over its own copies of the weights, in turn, so that they come from memory as in a
model (SmolLM2: 30 copies, its 30 blocks; Llama-2-7B shapes: copies of at least 512 MB in all, as
a 7B model's weights never fit a cache). The methods take turns within each pass (so a machine
that slows down slows all of them) and a time is the median over passes.

Decoding: greedy `generate` of exactly 48 new tokens after the demo's prompt, fp32 against RTN, GPTQ
(act-order) and AWQ at W4 g64, the runs interleaved, the median of three. The tied fp32 lm_head
(49152 x 576, 113 MB read per token) is measured on its own, and in 8 bits through the same kernel.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minquant.kernels import cpu, reference
from minquant.nn import QuantLinear
from minquant.quant import QuantConfig

LAYERS = [("SmolLM2 q/o_proj", 576, 576, 64), ("SmolLM2 k/v_proj", 576, 192, 64),
          ("SmolLM2 gate/up_proj", 576, 1536, 64), ("SmolLM2 down_proj", 1536, 576, 64),
          ("Llama-2-7B q/k/v/o_proj", 4096, 4096, 128), ("Llama-2-7B gate/up_proj", 4096, 11008, 128),
          ("Llama-2-7B down_proj", 11008, 4096, 128)]
BATCHES = (1, 4, 16, 128)
STREAM_BYTES = 512e6   # each method's copies of a Llama-2-7B layer hold at least this much
NEW_TOKENS = 48
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_name() -> str:
    """A file-name-safe name for this CPU model (cpu_<name>.json)."""
    from minquant.bench.results import machine

    name = machine()["cpu"].lower()
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*$|\d+-core", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def _copies(nbytes: int, smollm2: bool) -> int:
    return 30 if smollm2 else max(1, min(64, math.ceil(STREAM_BYTES / nbytes)))


def _tinygemm_int4(layer: QuantLinear):
    """torch's CPU int4 kernel on the same 4-bit weights: its dequantization is (q - 8) * s + zero_tg, so
    zero_tg = (8 - z) s gives back (q - z) s. Returns a function of x, or None where the op is missing."""
    from minquant.packing import from_gptq

    q, scale, zero, _ = from_gptq(layer.state_dict(), 4)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    except (AttributeError, RuntimeError):
        return None
    sz = torch.stack([scale.t(), ((8 - zero) * scale).t()], -1).contiguous()   # (G, N, 2)
    gs = layer.cfg.group_size
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)


def _int8_per_channel(weight: torch.Tensor):
    """torch's CPU int8 weight-only kernel (per-output-channel scales: its only form)."""
    scale = weight.abs().amax(1).clamp(min=1e-8) / 127
    q = (weight / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, weight.shape[1]), q, scale)
    except (AttributeError, RuntimeError):
        return None
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale)


def _time_methods(methods: dict, passes: int) -> dict:
    """methods: name -> list of zero-argument calls (one per copy). Median seconds per call, the methods
    taking turns within each pass."""
    times = {name: [] for name in methods}
    for calls in methods.values():
        calls[0]()  # warm: buffers allocated, the path chosen
    for _ in range(passes):
        for name, calls in methods.items():
            start = time.perf_counter()
            for call in calls:
                call()
            times[name].append((time.perf_counter() - start) / len(calls))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def bench_layer(label: str, K: int, N: int, group_size: int, batches=BATCHES) -> list[dict]:
    torch.manual_seed(0)
    smollm2 = label.startswith("SmolLM2")
    linear = torch.nn.Linear(K, N, bias=False)
    layer = QuantLinear.from_linear(linear, QuantConfig(4, group_size))
    weight = layer.dequantize_weight()  # fp32 and int8 start from the 4-bit weights: every method multiplies W
    p = cpu.prepare_cpu(layer)
    n_q, n_f = _copies(p.qweight.numel() * 4, smollm2), _copies(K * N * 4, smollm2)
    preps = [dataclasses.replace(p, qweight=p.qweight.clone()) for _ in range(n_q)]
    weights = [weight.clone() for _ in range(n_f)]
    buffers = [(layer.qweight.clone(), layer.qzeros, layer.scales, layer.g_idx) for _ in range(2)]
    # the slow methods (milliseconds to seconds a call: compute-bound, where caches hardly matter) on 2 copies
    int4 = [_tinygemm_int4(layer) for _ in range(2)]
    int8 = [_int8_per_channel(weight) for _ in range(2)]
    rows = []
    for M in batches:
        x = torch.randn(M, K)
        fast = {"fp32": [lambda w=w: torch.nn.functional.linear(x, w) for w in weights],
                "minquant": [lambda q=q: cpu.matmul(x, q) for q in preps],
                "minquant gemv": [lambda q=q: cpu.matmul(x, q, path="gemv") for q in preps],
                "minquant dequant": [lambda q=q: cpu.matmul(x, q, path="dequant") for q in preps]}
        slow = {"reference": [lambda b=b: reference.dequant_matmul(x, *b, 4) for b in buffers[:2]]}
        if int4[0] is not None:
            slow["torch int4"] = [lambda f=f: f(x) for f in int4]
        if int8[0] is not None:
            slow["torch int8"] = [lambda f=f: f(x) for f in int8]
        seconds = _time_methods(fast, passes=15 if smollm2 else 7)
        seconds |= _time_methods(slow, passes=1)
        ref = x.double() @ weight.double().t()
        errors = {name: ((calls[0]().double() - ref).abs().max() / ref.abs().max()).item()
                  for name, calls in {**fast, **slow}.items() if name != "torch int8"}
        choice = cpu.choose_path(x, preps[0])  # what the "minquant" row took (measured during its warm-up)
        rows.append({"layer": label, "K": K, "N": N, "group_size": group_size, "M": M, "copies": {"4-bit": n_q, "fp32": n_f},
                     "us": {k: v * 1e6 for k, v in seconds.items()}, "path": choice,
                     "relative_error_vs_float64": errors})
        us = rows[-1]["us"]
        print(f"{label:26s} M={M:<4d} fp32 {us['fp32']:9.1f} us  minquant {us['minquant']:9.1f} ({choice}, "
              f"x{us['fp32'] / us['minquant']:.2f})  ref {us['reference']:9.1f}  "
              + "  ".join(f"{k} {us[k]:.1f}" for k in ("torch int4", "torch int8") if k in us), flush=True)
    return rows


def first_use_seconds() -> dict:
    """Compiling the C kernels into an empty cache, and loading them from the cache, each in a fresh
    process; plus deriving the CPU view of one Llama-2-7B gate_proj (its first forward)."""
    code = ("import time; from minquant.kernels import cpu; t = time.perf_counter(); cpu.library(); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**__import__("os").environ, "MINQUANT_CACHE": cache}
        runs = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for _ in range(2)]
    layer = QuantLinear.from_linear(torch.nn.Linear(4096, 11008, bias=False), QuantConfig(4, 128))
    start = time.perf_counter()
    cpu.prepare_cpu(layer)
    return {"compile_s": runs[0], "cached_load_s": runs[1], "prepare_4096x11008_s": time.perf_counter() - start}


def _tokens_per_s(model, tokenizer, new_tokens: int) -> float:
    """Greedy decoding of exactly `new_tokens` tokens after the demo's chat prompt (min_new_tokens: a model
    that says EOS early would otherwise look faster)."""
    from minquant.compare import DEMO_PROMPT

    ids = tokenizer.apply_chat_template([{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / seconds


@torch.no_grad()
def bench_decode(model_name: str = "smollm2-135m", n_samples: int = 16, seqlen: int = 128, runs: int = 3) -> dict:
    """Decoding tokens/s, fp32 vs W4 g64 RTN / GPTQ (act-order) / AWQ, and what the fp32 lm_head costs."""
    import minquant
    from minquant.compare import generate
    from minquant.models import load_model

    model, tokenizer = load_model(model_name)
    options = {"RTN W4 g64": dict(method="rtn"), "GPTQ W4 g64 act-order": dict(method="gptq", act_order=True),
               "AWQ W4 g64": dict(method="awq")}
    models = {"fp32": model}
    for label, kw in options.items():
        calib = {} if kw["method"] == "rtn" else dict(n_samples=n_samples, seqlen=seqlen)
        models[label] = minquant.quantize(copy.deepcopy(model), bits=4, group_size=64, tokenizer=tokenizer,
                                          progress=False, **kw, **calib)
    # the RTN model with an 8-bit lm_head (untied from the embedding, which stays fp32 for lookups)
    head8 = copy.deepcopy(models["RTN W4 g64"])
    head8.lm_head = QuantLinear.from_linear(model.lm_head, QuantConfig(8, 64))
    models["RTN W4 g64 + 8-bit lm_head"] = head8
    texts = {label: generate(m, tokenizer, max_new_tokens=NEW_TOKENS) for label, m in models.items()}  # warm
    speeds = {label: [] for label in models}
    for _ in range(runs):
        for label, m in models.items():
            speeds[label].append(_tokens_per_s(m, tokenizer, NEW_TOKENS))
    tokens_per_s = {label: statistics.median(s) for label, s in speeds.items()}
    # today's path, for the record: the reference (a few tokens: it runs about 1 token/s)
    cpu.enabled = False
    try:
        tokens_per_s["RTN W4 g64, reference path"] = _tokens_per_s(models["RTN W4 g64"], tokenizer, 8)
    finally:
        cpu.enabled = True
    # the lm_head alone, per token
    x = torch.randn(1, 1, model.config.hidden_size)
    head16 = model.lm_head.weight.detach().half()
    head_ms = _time_methods({"fp32": [lambda: model.lm_head(x)],
                             "fp16": [lambda: torch.nn.functional.linear(x.half(), head16)],
                             "8-bit g64 (minquant)": [lambda: head8.lm_head(x)]}, passes=20)
    return {"model": model_name, "new_tokens": NEW_TOKENS, "runs": runs,
            "calibration": {"n_samples": n_samples, "seqlen": seqlen, "data": "c4"},
            "tokens_per_s": tokens_per_s, "lm_head_ms": {k: v * 1e3 for k, v in head_ms.items()},
            "lm_head_MB": model.lm_head.weight.numel() * 4 / 1e6,
            "same_text_as_rtn": {label: texts[label] == texts["RTN W4 g64"] for label in texts}}


def targets(layers: list[dict], decode: dict) -> dict:
    """The issue's targets, each as {value, target, met}."""
    def row(label, M):
        return next(r for r in layers if r["layer"] == label and r["M"] == M)["us"]

    big = row("Llama-2-7B q/k/v/o_proj", 1)
    prefill = row("Llama-2-7B q/k/v/o_proj", 128)
    tps = decode["tokens_per_s"]
    found = {"4096x4096 g128 batch 1: fp32 / minquant": (big["fp32"] / big["minquant"], 3.0),
             "4096x4096 g128 batch 1: torch int4 / minquant": (big.get("torch int4", math.nan) / big["minquant"], 3.0),
             "4096x4096 g128 batch 128: minquant / fp32 (at most)": (prefill["minquant"] / prefill["fp32"], 1.2),
             "SmolLM2 W4 g64 decoding: tokens/s / fp32's": (tps["RTN W4 g64"] / tps["fp32"], 1.5)}
    return {k: {"value": v, "target": t, "met": bool(v <= t if "at most" in k else v >= t)} for k, (v, t) in found.items()}


def run(out: Path | None = None, layers=LAYERS, batches=BATCHES, decode: bool = True) -> Path:
    from minquant.bench.results import save_results

    flags = cpu.cpu_flags()
    protocol = {"layers": "4-bit RTN asymmetric, x fp32; methods take turns per pass, median over passes; "
                          "SmolLM2 shapes over 30 copies, Llama-2-7B shapes over copies of >= 512 MB per method",
                "threads": torch.get_num_threads(), "cpu_flags": {f: f in flags for f in FLAGS},
                "kernel_vector_width": cpu.vector_width(), "batches": list(batches),
                "torch int4": "aten._weight_int4pack_mm_for_cpu on the same 4-bit weights (zero folded into its "
                              "(q - 8) s + zero form)",
                "torch int8": "aten._weight_int8pack_mm, per-channel int8 of the same weights (its only form)"}
    rows = [r for spec in layers for r in bench_layer(*spec, batches=batches)]
    results = {"layers": rows, "first_use": first_use_seconds()}
    print(results["first_use"], flush=True)
    if decode:
        results["decode"] = bench_decode()
        print(results["decode"], flush=True)
        results["targets"] = targets(rows, results["decode"])
    return save_results(f"cpu_{cpu_name()}", protocol, results, out)


def table(record: dict) -> str:
    p, r = record["protocol"], record["results"]
    flags = ", ".join(f for f, on in p["cpu_flags"].items() if on)
    lines = [f"QuantLinear on {record['machine']['cpu']} ({p['threads']} threads; {flags}; `minquant bench cpu`, "
             f"{record['date'][:10]}), W4 RTN, x fp32, microseconds per call (median; weights streamed from memory):",
             "", "| layer | rows | fp32 | minquant (path) | x fp32 | reference | torch int4 | torch int8 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["layers"]:
        us = row["us"]
        cells = [f"{us[k]:,.0f}" if k in us else "-" for k in ("reference", "torch int4", "torch int8")]
        lines.append(f"| {row['layer']} {row['K']}x{row['N']} g{row['group_size']} | {row['M']} | {us['fp32']:,.0f} | "
                     f"{us['minquant']:,.0f} ({row['path']}) | {us['fp32'] / us['minquant']:.2f} | " + " | ".join(cells) + " |")
    f = r["first_use"]
    lines += ["", f"First use: compiling the C kernels {f['compile_s']:.1f} s, then {f['cached_load_s']:.2f} s from "
                  f"the disk cache; deriving a 4096x11008 layer's CPU view {f['prepare_4096x11008_s']:.2f} s."]
    if "decode" in r:
        d = r["decode"]
        lines += ["", f"Decoding {d['model']} ({d['new_tokens']} new tokens, greedy, median of {d['runs']}):", "",
                  "| model | tokens/s | x fp32 |", "|---|---:|---:|"]
        base = d["tokens_per_s"]["fp32"]
        lines += [f"| {k} | {v:.1f} | {v / base:.2f} |" for k, v in d["tokens_per_s"].items()]
        h = d["lm_head_ms"]
        lines += ["", f"The tied fp32 lm_head reads {d['lm_head_MB']:.0f} MB a token: {h['fp32']:.2f} ms "
                      f"(fp16 {h['fp16']:.2f} ms, 8-bit g64 through the same kernel {h['8-bit g64 (minquant)']:.2f} ms)."]
        lines += ["", "| target | measured | goal | met |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v['value']:.2f} | {v['target']} | {'yes' if v['met'] else 'no'} |" for k, v in r["targets"].items()]
    return "\n".join(lines)
