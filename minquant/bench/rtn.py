"""`minquant bench rtn`: RTN at each granularity on SmolLM2 (perplexity) and MiniLM (embedding cosine), notebook 04."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from minquant.bench.results import save_results
from minquant.quant import QuantConfig

NAME = "rtn_smollm2"
# (label, config or None for the unquantized model): asymmetric with an integer zero unless named.
RTN_CONFIGS = [
    ("fp32", None),
    ("W8 per-channel", QuantConfig(8, -1)),
    ("W4 per-channel", QuantConfig(4, -1)),
    ("W4 g64", QuantConfig(4, 64)),
    ("W4 g32", QuantConfig(4, 32)),
    ("W4 g32 float zero", QuantConfig(4, 32, integer_zero=False)),
    ("W3 g64", QuantConfig(3, 64)),
    ("W3 per-channel", QuantConfig(3, -1)),
    ("W2 g32", QuantConfig(2, 32)),
]



def restore_weights(model, originals: dict) -> None:
    """Put back the weights saved as {module name: weight}, copied (so they can be restored again)."""
    for name, w in originals.items():
        model.get_submodule(name).weight.data = w.clone()


def wikitext_sentences(n: int = 256, min_words: int = 6) -> list[str]:
    """The first `n` sentences of WikiText-2 test (headings skipped) with at least `min_words` words."""
    from minquant.data import load_rows

    sentences = []
    for row in load_rows("wikitext2", "test"):
        if not row.strip() or row.strip().startswith("="):
            continue
        for s in row.strip().split(" . "):
            if len(s.split()) >= min_words:
                sentences.append(s.strip() + " .")
                if len(sentences) == n:
                    return sentences
    return sentences


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean of the token states, normalised. (n, hidden)"""
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def run(max_windows: int | None = 16, seqlen: int = 2048, device: str = "cpu",
        out: Path | None = None) -> Path:
    """RTN at each of RTN_CONFIGS: SmolLM2 WikiText-2 perplexity, MiniLM embedding cosine vs fp32."""
    from minquant.data import load_text
    from minquant.eval import eval_ids, perplexity
    from minquant.models import load_model
    from minquant.rtn import quantizable_linears, fake_quantize_model

    model, tokenizer = load_model("smollm2-135m", device=device)
    ids = eval_ids(load_text("wikitext2", "test"), tokenizer)
    originals = {n: m.weight.data.clone() for n, m in quantizable_linears(model).items()}
    smollm2 = []
    for label, cfg in RTN_CONFIGS:
        restore_weights(model, originals)
        start = time.perf_counter()
        if cfg is not None:
            fake_quantize_model(model, cfg)
        rtn_s = time.perf_counter() - start
        r = perplexity(model, data=ids, seqlen=seqlen, max_windows=max_windows or None)
        smollm2.append({"label": label, "config": cfg and cfg.__dict__, "ppl": r.ppl, "nll": r.nll,
                        "windows": r.windows, "tokens": r.tokens, "rtn_seconds": round(rtn_s, 3)})
        print(f"SmolLM2 {label:20} ppl {r.ppl:8.3f}   RTN {rtn_s:5.2f} s", flush=True)
    del model

    encoder, enc_tok = load_model("minilm-l6", device=device)
    sentences = wikitext_sentences(256)
    skip = ("pooler.*",)  # the pooler is not used by mean pooling
    originals = {n: m.weight.data.clone() for n, m in quantizable_linears(encoder, skip).items()}
    reference = sentence_embeddings(encoder, enc_tok, sentences)
    minilm = []
    for label, cfg in RTN_CONFIGS[1:]:
        restore_weights(encoder, originals)
        fake_quantize_model(encoder, cfg, skip=skip)
        cos = (sentence_embeddings(encoder, enc_tok, sentences) * reference).sum(-1)
        minilm.append({"label": label, "config": cfg.__dict__, "mean_cosine": float(cos.mean()),
                       "min_cosine": float(cos.min())})
        print(f"MiniLM  {label:20} mean cosine to fp32 {cos.mean():.5f}", flush=True)

    protocol = {"smollm2": {"model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
                            "text": 'wikitext2/test joined with "\\n\\n"', "seqlen": seqlen,
                            "windows": smollm2[0]["windows"], "quantized": "every nn.Linear except lm_head",
                            "device": device},
                "minilm": {"model": "minilm-l6 (all-MiniLM-L6-v2, fp32)", "sentences": len(sentences),
                           "embedding": "mean pooling, L2-normalised", "quantized": "every nn.Linear except the pooler"}}
    return save_results(NAME, protocol, {"smollm2": smollm2, "minilm": minilm}, out)


def table(record: dict) -> str:
    """The RTN results as a Markdown table (for the README), from a `rtn_smollm2` record."""
    smol, cos = record["results"]["smollm2"], {r["label"]: r["mean_cosine"] for r in record["results"]["minilm"]}
    p = record["protocol"]["smollm2"]
    fp32 = smol[0]["ppl"]
    lines = [f"RTN, asymmetric with an integer zero-point unless named. SmolLM2-135M: WikiText-2 test "
             f"perplexity, first {p['windows']} windows of {p['seqlen']} tokens. MiniLM-L6: mean cosine "
             f"similarity of sentence embeddings to fp32 on {record['protocol']['minilm']['sentences']} "
             f"WikiText-2 sentences. Measured {record['date'][:10]} on {record['machine']['cpu']} "
             f"({record['machine']['cores']} cores) by `{record['command']}`.", "",
             "| config | SmolLM2 ppl | ppl / fp32 | MiniLM cosine |", "|---|---:|---:|---:|"]
    for r in smol:
        c = f"{cos[r['label']]:.4f}" if r["label"] in cos else "1"
        ratio = r["ppl"] / fp32
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {ratio:.3f}x | {c} |" if ratio < 10 else
                     f"| {r['label']} | {r['ppl']:.0f} | {ratio:.0f}x | {c} |")
    return "\n".join(lines)
