"""`minquant bench activations`: beyond weight-only on SmolLM2 and MiniLM (notebook 11).

W8A8 int8 (per-token dynamic or per-tensor static activations, each with and without SmoothQuant),
FP8 W8A8 dynamic, the microscaling 4-bit weight formats against int4 at the same bits per weight,
and an 8-bit KV cache (at 2048 and at 8192 tokens of context), beside llm-compressor's SmoothQuant
+ W8A8 recipe and its FP8 dynamic scheme on the same calibration and evaluation (the GPTQ sweep's
protocol: 128 x 512 tokens of C4, WikiText-2 test, first 16 windows of 2048). SmolLM2's entries are
a resumable sweep (minquant/bench/sweep.py); MiniLM's cosines and the KV cache's measured bytes are
added at the end, into the same file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from minquant.bench.gptq import PROTOCOL as GPTQ_PROTOCOL
from minquant.bench.results import RESULTS_DIR, load_results, save_results
from minquant.bench.sweep import run_sweep

NAME = "activations_smollm2"
LONG = {"eval_seqlen": 8192, "eval_windows": 2}  # SmolLM2's full context, 2 windows (16k tokens)
PROTOCOL = {**{k: GPTQ_PROTOCOL[k] for k in ("model", "calibration", "eval")},
            "quantized": "every linear of the 30 blocks (lm_head and embeddings stay float)",
            "long_context": f"WikiText-2 test, first {LONG['eval_windows']} windows of {LONG['eval_seqlen']}",
            "smoothquant": "alpha searched per group of linears (0, 0.1, ..., 1) on 512 calibration tokens; folded into "
                           "input_layernorm (q/k/v), post_attention_layernorm (gate/up) and up_proj (down_proj)"}
BYTES_PER_WEIGHT_SCALE = 16  # int4 groups: an fp16 scale each (symmetric: no zero-point), as GPTQ stores it


def entries() -> list[tuple[str, dict]]:
    """Every SmolLM2 measurement of the sweep, by label, in the order it runs."""
    w8a8 = [("W8A8 int8, dynamic per-token", {"method": "w8a8"}),
            ("W8A8 int8, static per-tensor", {"method": "w8a8", "activations": "static"}),
            ("SmoothQuant W8A8 int8, dynamic per-token", {"method": "smoothquant"}),
            ("SmoothQuant W8A8 int8, static per-tensor", {"method": "smoothquant", "activations": "static"}),
            ("FP8 W8A8, dynamic per-token", {"method": "fp8"}),
            ("SmoothQuant FP8 W8A8, dynamic per-token", {"method": "fp8", "smoothquant": True})]
    fp4 = [("MXFP4 weights (4.25 bits)", {"method": "mxfp4"}), ("NVFP4 weights (4.5 bits)", {"method": "nvfp4"}),
           ("int4 g64 sym weights (4.25 bits)", {"method": "rtn", "bits": 4, "group_size": 64, "sym": True}),
           ("int4 g32 sym weights (4.5 bits)", {"method": "rtn", "bits": 4, "group_size": 32, "sym": True})]
    kv = [("KV cache int8", {"method": "fp32", "kv_cache": "int8"}), ("KV cache fp8", {"method": "fp32", "kv_cache": "fp8"}),
          ("fp32, 8192-token windows", {"method": "fp32", **LONG}),
          ("KV cache int8, 8192-token windows", {"method": "fp32", "kv_cache": "int8", **LONG}),
          ("KV cache fp8, 8192-token windows", {"method": "fp32", "kv_cache": "fp8", **LONG})]
    peer = {"method": "peer", "bits": 8, "group_size": -1, "sym": True}
    peers = [("llm-compressor SmoothQuant + W8A8 int8", {**peer, "peer_method": "smoothquant-w8a8"}),
             ("llm-compressor FP8 dynamic", {**peer, "peer_method": "fp8-dynamic"}),
             ("llm-compressor SmoothQuant + GPTQ W8A8 int8", {**peer, "peer_method": "smoothquant-gptq-w8a8"})]
    return [("fp32", {"method": "fp32"}), *w8a8, *fp4, *kv, *peers]


def run(only: list[str] | None = None, redo: bool = False, out: Path | None = None) -> Path:
    """The SmolLM2 sweep (entries matching `only`, or all), then MiniLM and the KV cache's bytes; one results file."""
    path = run_sweep(NAME, PROTOCOL, entries(), only=only, redo=redo, out=out or RESULTS_DIR / f"{NAME}.json")
    record = load_results(path.stem) if out is None else __import__("json").loads(path.read_text())
    results = record["results"]
    if redo or "MiniLM" not in results:
        results["MiniLM"] = minilm()
    if redo or "KV memory" not in results:
        results["KV memory"] = kv_memory()
    return save_results(NAME, record["protocol"], results, path)


def minilm(n_sentences: int = 256) -> dict:
    """Mean cosine of MiniLM's sentence embeddings to fp32's, for each scheme that applies to an encoder."""
    import copy

    import minquant
    from minquant.bench.rtn import sentence_embeddings, wikitext_sentences
    from minquant.data import calibration_windows
    from minquant.models import load_model

    encoder, tok = load_model("minilm-l6")
    sentences = wikitext_sentences(n_sentences)
    reference = sentence_embeddings(encoder, tok, sentences)
    calib = calibration_windows("c4", tok, n=32, seqlen=128, seed=0)
    schemes = {"W8A8 int8, dynamic per-token": ("w8a8", {}), "W8A8 int8, static per-tensor": ("w8a8", {"activations": "static"}),
               "SmoothQuant W8A8 int8, dynamic per-token": ("smoothquant", {}),
               "SmoothQuant W8A8 int8, static per-tensor": ("smoothquant", {"activations": "static"}),
               "FP8 W8A8, dynamic per-token": ("fp8", {}), "MXFP4 weights (4.25 bits)": ("mxfp4", {}),
               "NVFP4 weights (4.5 bits)": ("nvfp4", {}),
               "int4 g64 sym weights (4.25 bits)": ("rtn", {"bits": 4, "group_size": 64, "sym": True}),
               "int4 g32 sym weights (4.5 bits)": ("rtn", {"bits": 4, "group_size": 32, "sym": True})}
    out = {"sentences": len(sentences), "calibration": "32 x 128 tokens of C4, seed 0 (static scales, SmoothQuant)"}
    for label, (method, options) in schemes.items():
        model = copy.deepcopy(encoder)
        data = {"calib": calib} if method == "smoothquant" or options.get("activations") == "static" else {}
        minquant.quantize(model, method, progress=False, **options, **data)
        out[label] = float((sentence_embeddings(model, tok, sentences) * reference).sum(-1).mean())
        print(f"MiniLM {label:42} mean cosine {out[label]:.5f}", flush=True)
    return out


@torch.no_grad()
def kv_memory(contexts: tuple[int, ...] = (2048, 8192)) -> dict:
    """Bytes SmolLM2's KV cache holds after a forward over `contexts` tokens: fp16 (counted from the float cache),
    int8 and fp8 (measured), and minquant.memory's formula for fp16."""
    from transformers import DynamicCache

    from minquant.kvcache import QuantizedKVCache, cache_keyword, dense_cache_nbytes
    from minquant.memory import kv_cache_bytes
    from minquant.models import load_model

    model, _ = load_model("smollm2-135m")
    kw, out = cache_keyword(model), {}
    for n in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        dense = DynamicCache(config=model.config)
        model(ids, use_cache=True, **{kw: dense})
        row = {"fp16": dense_cache_nbytes(dense) // 2, "fp16 formula": kv_cache_bytes(model.config, n, 1, 2)}
        del dense
        for dtype in ("int8", "fp8"):
            cache = QuantizedKVCache(model.config, dtype)
            model(ids, use_cache=True, **{kw: cache})
            row[dtype] = cache.nbytes()
        out[str(n)] = row
        print(f"KV cache at {n} tokens: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in row.items()), flush=True)
    return out


def table(record: dict) -> str:
    """Markdown: SmolLM2 perplexity and MiniLM cosine per scheme, llm-compressor beside; the KV cache's bytes."""
    r, p = record["results"], record["protocol"]
    fp32, mini = r.get("fp32", {}).get("ppl"), r.get("MiniLM", {})
    rel = lambda label: f"{100 * (r[label]['ppl'] / fp32 - 1):+.1f}%" if fp32 and label in r else ""
    lines = [f"SmolLM2-135M (Q4_1-dequantized, see notebook 04), WikiText-2 test perplexity, first {p['eval']['windows']} "
             f"windows of {p['eval']['seqlen']} (fp32 {fp32:.2f}); calibration {p['calibration']['n_samples']} x "
             f"{p['calibration']['seqlen']} tokens of C4. MiniLM-L6 (a true fp32 model): mean cosine of sentence embeddings "
             f"to fp32 on {mini.get('sentences', '—')} WikiText-2 sentences. {p['quantized'].capitalize()}. SmoothQuant: "
             f"{p['smoothquant']}. Measured by `minquant bench activations` on {record['machine']['cpu']} "
             f"({record['machine']['cores']} cores). — = not measured yet.", "",
             "| scheme | SmolLM2 ppl | vs fp32 | MiniLM cosine |", "|---|---:|---:|---:|"]
    for label, _ in entries():
        if label == "fp32" or "8192" in label or "KV" in label or label not in r:
            continue
        cosine = f"{mini[label]:.4f}" if label in mini else "—"
        lines.append(f"| {label} | {r[label]['ppl']:.2f} | {rel(label)} | {cosine} |")
    long_fp32 = r.get("fp32, 8192-token windows", {}).get("ppl")
    lines += ["", f"KV cache in 8 bits (one scale per head per token; weights fp32). Perplexity at 2048-token windows "
                  f"(as above) and at {p['long_context']}; bytes held by the cache at batch 1, measured:", "",
              "| KV cache | ppl, 2048 | ppl, 8192 | MiB at 2048 tokens | MiB at 8192 tokens |", "|---|---:|---:|---:|---:|"]
    mem = r.get("KV memory", {})
    for dtype in ("fp16", "int8", "fp8"):
        short = r.get(f"KV cache {dtype}", {}).get("ppl") if dtype != "fp16" else fp32
        long = r.get(f"KV cache {dtype}, 8192-token windows", {}).get("ppl") if dtype != "fp16" else long_fp32
        mib = [f"{mem[n][dtype] / 2**20:.1f}" if n in mem else "—" for n in ("2048", "8192")]
        fmt = lambda x: f"{x:.3f}" if x else "—"
        lines.append(f"| {dtype if dtype != 'fp16' else 'float (fp16 bytes)'} | {fmt(short)} | {fmt(long)} | {mib[0]} | {mib[1]} |")
    return "\n".join(lines)
