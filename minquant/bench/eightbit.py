"""`minquant bench eightbit`: the "int8" and "fp8" weight formats of benchmark tables, measured (notebook 09)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from minquant.bench.results import RESULTS_DIR, save_results

NAME = "eightbit"


def formats() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """label -> function of a weight (N, K) giving the weight as that format stores it (weight-only, round to nearest)."""
    from minquant.formats import FP8_E4M3, FP8_E5M2, round_to_format, scaled_fp8
    from minquant.quant import QuantConfig, fake_quantize

    def int8_per_tensor(w):  # one absmax scale for the whole matrix
        s = w.abs().max() / 127
        return (torch.round(w / s).clamp(-127, 127) * s).to(w.dtype)

    return {"fp16": lambda w: w.half().to(w.dtype),
            "int8 per-channel sym": lambda w: fake_quantize(w, QuantConfig(8, -1, symmetric=True)),
            "int8 per-channel asym": lambda w: fake_quantize(w, QuantConfig(8, -1)),
            "int8 per-tensor sym": int8_per_tensor,
            "fp8 e4m3 per-channel": lambda w: scaled_fp8(w)[0],
            "fp8 e4m3 per-tensor": lambda w: scaled_fp8(w, per_channel=False)[0],
            "fp8 e5m2 per-channel": lambda w: scaled_fp8(w, fmt=FP8_E5M2)[0],
            "fp8 e4m3 unscaled cast": lambda w: round_to_format(w, FP8_E4M3)}


def run(max_windows: int = 16, out: Path | None = None) -> Path:
    """Each 8-bit weight format on SmolLM2 (WikiText-2 perplexity) and MiniLM (cosine to fp32); data/results/eightbit.json."""
    from minquant.bench.rtn import restore_weights, sentence_embeddings, wikitext_sentences
    from minquant.data import load_text
    from minquant.eval import eval_ids, perplexity
    from minquant.models import load_model
    from minquant.rtn import quantizable_linears

    fmts, results = formats(), {"smollm2": {}, "minilm": {}}
    model, tok = load_model("smollm2-135m")
    ids = eval_ids(load_text("wikitext2", "test"), tok)
    linears = quantizable_linears(model)
    originals = {n: m.weight.data.clone() for n, m in linears.items()}
    results["smollm2"]["fp32"] = perplexity(model, data=ids, max_windows=max_windows, progress=False).ppl
    for label, fn in fmts.items():
        for n, m in linears.items():
            m.weight.data = fn(originals[n])
        results["smollm2"][label] = perplexity(model, data=ids, max_windows=max_windows, progress=False).ppl
        print(f"SmolLM2 {label:24} ppl {results['smollm2'][label]:.3f}", flush=True)
        restore_weights(model, originals)
    encoder, enc_tok = load_model("minilm-l6")
    sentences, skip = wikitext_sentences(256), ("pooler.*",)
    linears = quantizable_linears(encoder, skip)
    originals = {n: m.weight.data.clone() for n, m in linears.items()}
    reference = sentence_embeddings(encoder, enc_tok, sentences)
    for label, fn in fmts.items():
        for n, m in linears.items():
            m.weight.data = fn(originals[n])
        results["minilm"][label] = float((sentence_embeddings(encoder, enc_tok, sentences) * reference).sum(-1).mean())
        print(f"MiniLM  {label:24} mean cosine {results['minilm'][label]:.6f}", flush=True)
        restore_weights(encoder, originals)
    protocol = {"smollm2": {"eval": f"WikiText-2 test, first {max_windows} windows of 2048", "quantized": "every nn.Linear except lm_head"},
                "minilm": {"sentences": len(sentences), "quantized": "every nn.Linear except the pooler"},
                "formats": "weight-only, round to nearest; scales fp32 (one per output row, or one per tensor)"}
    return save_results(NAME, protocol, results, out or RESULTS_DIR / f"{NAME}.json")


def table(record: dict) -> str:
    """Markdown: each 8-bit weight format's SmolLM2 perplexity (and ratio to fp32) and MiniLM cosine."""
    r, p = record["results"], record["protocol"]
    fp32 = r["smollm2"]["fp32"]
    lines = [f"8-bit weights, {p['formats']}. SmolLM2-135M: {p['smollm2']['eval']} (fp32 {fp32:.2f}); MiniLM-L6: mean "
             f"cosine of sentence embeddings to fp32 on {p['minilm']['sentences']} WikiText-2 sentences. Measured by "
             f"`minquant bench eightbit` on {record['machine']['cpu']} ({record['machine']['cores']} cores).", "",
             "| weights | SmolLM2 ppl | vs fp32 | MiniLM cosine |", "|---|---:|---:|---:|"]
    for label, ppl in r["smollm2"].items():
        if label != "fp32":
            lines.append(f"| {label} | {ppl:.2f} | {100 * (ppl / fp32 - 1):+.2f}% | {r['minilm'][label]:.5f} |")
    return "\n".join(lines)
