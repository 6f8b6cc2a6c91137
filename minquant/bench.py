"""Benchmarks: scripts that measure and save numbers to data/results/, never tests.

    minquant bench rtn                    # RTN on SmolLM2 (perplexity) and MiniLM (embedding cosine)
    minquant bench packing                # bytes on disk: a 4096^2 layer, SmolLM2 fp32/fp16/int4
    minquant bench gptq                   # GPTQ vs RTN vs llm-compressor on SmolLM2 (bench_gptq.py)
    minquant bench readme                 # rewrite the README's results tables from data/results/

Every results file records the command, date, machine and versions next to the numbers, so a
notebook or the README can quote it without retyping anything.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from minquant.quant import QuantConfig

RESULTS_DIR = Path(__file__).resolve().parent.parent / "data" / "results"

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


def machine() -> dict:
    """What ran it: CPU model and cores, and the GPU if one was used."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import transformers

    import minquant

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "minquant": minquant.__version__}


def save_results(name: str, protocol: dict, results: dict, out: Path | None = None) -> Path:
    out = out or RESULTS_DIR / f"{name}.json"
    # `minquant ...`, `python -m minquant ...` (argv[0] is minquant/__main__.py) and minquant/cli.py are one command
    cli = sys.argv[0].endswith(("minquant", "minquant/__main__.py", "minquant/cli.py"))
    record = {"command": " ".join(["minquant", *sys.argv[1:]]) if cli else " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(), "protocol": protocol, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_results(name: str) -> dict:
    """A results file written by `save_results`, by name (e.g. "rtn_smollm2")."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}; run the benchmark that writes it (see data/results/README.md)")
    return json.loads(path.read_text())


def rtn_table(record: dict) -> str:
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


def packing_table(record: dict) -> str:
    """Bytes on disk (README table), from a `packing_smollm2` record."""
    layer = record["results"]["layer_4096"]
    lines = [f"Bytes of saved safetensors files, measured {record['date'][:10]} by `{record['command']}`, next to "
             "`minquant.memory`'s accounting (int4: linear layers in 4 bits with an fp16 scale and 4-bit zero per "
             f"group of 64, the rest fp16). One 4096 x 4096 layer at 4-bit g128: {layer['int4_g128_bytes']:,} bytes, "
             f"{layer['ratio_to_fp16']:.4f}x its fp16 size.", "",
             "| SmolLM2-135M | file MB | accounting MB | file / fp16 file |", "|---|---:|---:|---:|"]
    for r in record["results"]["smollm2"]:
        lines.append(f"| {r['format']} | {r['file_bytes'] / 1e6:.2f} | {r['analytic_bytes'] / 1e6:.2f} | "
                     f"{r['ratio_to_fp16']:.3f}x |")
    return "\n".join(lines)


def bench_packing(out: Path | None = None) -> Path:
    """Bytes on disk: a 4096x4096 layer at 4-bit g128, and SmolLM2 in fp32, fp16 and int4 g64."""
    import copy
    import tempfile

    from safetensors.torch import save_file

    from minquant.checkpoint import save_quantized
    from minquant.memory import weight_bytes
    from minquant.models import load_model
    from minquant.nn import QuantLinear
    from minquant.rtn import quantize_model

    tmp = Path(tempfile.mkdtemp())
    layer = QuantLinear.from_linear(torch.nn.Linear(4096, 4096, bias=False), QuantConfig(4, 128))
    save_file(layer.state_dict(), tmp / "layer.safetensors")
    layer_bytes, fp16_bytes = (tmp / "layer.safetensors").stat().st_size, 4096 * 4096 * 2

    model, tokenizer = load_model("smollm2-135m")
    files = {}
    for fmt, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, tmp / f"{fmt}.safetensors")
        files[fmt] = (tmp / f"{fmt}.safetensors").stat().st_size
    int4 = copy.deepcopy(model)
    quantize_model(int4, QuantConfig(4, 64))
    save_quantized(int4, tokenizer, tmp / "int4")
    files["int4 g64"] = (tmp / "int4" / "model.safetensors").stat().st_size
    analytic = {"fp32": weight_bytes(model.config, "fp32").total, "fp16": weight_bytes(model.config, "fp16").total,
                "int4 g64": weight_bytes(model.config, "int4", 64, linears_only=True).total}
    smollm2 = [{"format": f, "file_bytes": files[f], "analytic_bytes": analytic[f],
                "ratio_to_fp16": files[f] / files["fp16"]} for f in files]
    for r in smollm2:
        print(f"SmolLM2 {r['format']:9} file {r['file_bytes'] / 1e6:8.2f} MB   accounting {r['analytic_bytes'] / 1e6:8.2f} MB")
    protocol = {"layer": "nn.Linear(4096, 4096) at QuantConfig(4, 128), its QuantLinear state_dict in safetensors",
                "smollm2": "state_dict in safetensors (tied lm_head once); int4: minquant.checkpoint.save_quantized"}
    results = {"layer_4096": {"int4_g128_bytes": layer_bytes, "fp16_bytes": fp16_bytes,
                              "ratio_to_fp16": layer_bytes / fp16_bytes}, "smollm2": smollm2}
    return save_results("packing_smollm2", protocol, results, out)


def _gptq_table(record: dict) -> str:
    from minquant.bench_gptq import gptq_table

    return gptq_table(record)


def _awq_table(record: dict) -> str:
    from minquant.bench_awq import awq_table

    gptq = RESULTS_DIR / "gptq_smollm2.json"
    return awq_table(record, json.loads(gptq.read_text()) if gptq.is_file() else None)


def _mixed_table(record: dict) -> str:
    from minquant.bench_mixed import mixed_table

    gptq = RESULTS_DIR / "gptq_smollm2.json"
    return mixed_table(record, json.loads(gptq.read_text()) if gptq.is_file() else None)


def _sensitivity_table(record: dict) -> str:
    from minquant.bench_mixed import sensitivity_table_md

    return sensitivity_table_md(record)


def _calibration_table(record: dict) -> str:
    from minquant.bench_mixed import calibration_table

    return calibration_table(record)


def _eightbit_table(record: dict) -> str:
    from minquant.bench_mixed import eightbit_table

    return eightbit_table(record)


def _claims_table(record: dict) -> str:
    from minquant.bench_mixed import claims_table

    return claims_table(record)


# results file -> its README table
def _demo_table(record: dict) -> str:
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


TABLES = {"demo_smollm2": _demo_table, "rtn_smollm2": rtn_table, "packing_smollm2": packing_table, "gptq_smollm2": _gptq_table,
          "awq_smollm2": _awq_table, "mixed_smollm2": _mixed_table, "sensitivity_smollm2": _sensitivity_table,
          "calibration_smollm2": _calibration_table, "eightbit": _eightbit_table,
          "claims": _claims_table}
README = RESULTS_DIR.parent.parent / "README.md"


def _table_for(name: str):
    if name.startswith("kernels_"):  # one file per GPU: kernels_<gpu>.json
        from minquant.kernels.benchmark import kernels_table

        return kernels_table
    if name.startswith("cpu_"):  # one file per CPU model: cpu_<cpu>.json
        from minquant.bench_cpu import cpu_table

        return cpu_table
    if name == "sass_kernels":
        from minquant.kernels.benchmark import sass_table

        return sass_table
    if name.startswith("paper_"):  # one file per model: paper_<model>.json
        from minquant.paper import paper_table

        return paper_table
    return TABLES[name]


def readme_block(name: str) -> str:
    return f"<!-- results:{name} -->\n{_table_for(name)(load_results(name))}\n<!-- /results:{name} -->"


def update_readme(path: Path = README) -> None:
    """Rewrite each results block of the README from its results file (never typed by hand)."""
    text = path.read_text()
    for name in [*TABLES, "sass_kernels", *(p.stem for pattern in ("kernels_*.json", "paper_*.json", "cpu_*.json") for p in sorted(RESULTS_DIR.glob(pattern)))]:
        if not (RESULTS_DIR / f"{name}.json").is_file():
            continue
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        if start in text:
            head, rest = text.split(start, 1)
            text = head + readme_block(name) + rest.split(end, 1)[1]
    path.write_text(text)


def _restore(model, originals: dict) -> None:
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


def bench_rtn(max_windows: int | None = 16, seqlen: int = 2048, device: str = "cpu",
              out: Path | None = None) -> Path:
    """RTN at each of RTN_CONFIGS: SmolLM2 WikiText-2 perplexity, MiniLM embedding cosine vs fp32."""
    from minquant.data import load_text
    from minquant.eval import eval_ids, perplexity
    from minquant.models import load_model
    from minquant.rtn import quantizable_linears, rtn_quantize_model

    model, tokenizer = load_model("smollm2-135m", device=device)
    ids = eval_ids(load_text("wikitext2", "test"), tokenizer)
    originals = {n: m.weight.data.clone() for n, m in quantizable_linears(model).items()}
    smollm2 = []
    for label, cfg in RTN_CONFIGS:
        _restore(model, originals)
        start = time.perf_counter()
        if cfg is not None:
            rtn_quantize_model(model, cfg)
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
        _restore(encoder, originals)
        rtn_quantize_model(encoder, cfg, skip=skip)
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
    return save_results("rtn_smollm2", protocol, {"smollm2": smollm2, "minilm": minilm}, out)
