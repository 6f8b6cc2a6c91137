"""llm-compressor's GPTQ, AWQ, SmoothQuant + W8A8 or FP8 dynamic on the same model, calibration windows and
evaluation as `minquant bench gptq|awq|activations`.

Notebooks 07, 08 and 11 compare with it. W8A8 and FP8 are evaluated as llm-compressor leaves the model
after `oneshot`: each linear fake-quantizes its input (compressed-tensors' forward), as vLLM computes.

Run inside llm-compressor's own venv (the bench builds it):
    python -m minquant.bench.peers.llmcompressor_quant --method gptq --bits 4 --group-size 64 --sym --out result.json
Prints nothing the bench needs; writes one JSON object: perplexity, quantization seconds, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="gptq", choices=["gptq", "awq", "smoothquant-w8a8", "smoothquant-gptq-w8a8",
                                                        "fp8-dynamic"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--actorder", default=None, choices=[None, "group", "static", "weight"])
    p.add_argument("--calib", default="c4")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import llmcompressor
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    from minquant.data import calibration_windows
    from minquant.eval import perplexity
    from minquant.models import load_model
    from minquant.meter import PeakMemory

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (for faster copies to a GPU) and pinning
        # raises on a machine without one. Pinning changes no value: skip it there.
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model)
    # llm-compressor re-reads the config from the model's folder, and a GGUF folder has no config.json:
    # hand it the same float weights as an ordinary Hugging Face folder.
    folder = tempfile.mkdtemp(prefix="minquant-peer-")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = calibration_windows(a.calib, tok, n=a.n, seqlen=a.seqlen, seed=a.seed)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym,
                               strategy="group" if a.group_size > 0 else "channel",
                               group_size=a.group_size if a.group_size > 0 else None)
    scheme = {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, "ignore": ["lm_head"]}
    if a.method == "gptq":
        recipe = GPTQModifier(**scheme, block_size=128, dampening_frac=0.01, actorder=a.actorder)
    elif a.method == "awq":  # AWQ only smooths (its defaults: duo scaling, 20-point grid); the quantizer rounds min/max after it
        recipe = [AWQModifier(), QuantizationModifier(**scheme)]
    elif a.method == "fp8-dynamic":  # its FP8_DYNAMIC preset: no calibration data is read
        recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    else:  # its W8A8 int8 example recipe (smoothing strength 0.8, default Llama mappings), with or without GPTQ
        quantizer = GPTQModifier if a.method == "smoothquant-gptq-w8a8" else QuantizationModifier
        recipe = [SmoothQuantModifier(smoothing_strength=0.8), quantizer(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    with PeakMemory(reset=False) as peak:  # since this process started: its model load included
        start = time.perf_counter()
        if a.method == "fp8-dynamic":  # reads no data
            oneshot(model=model, recipe=recipe)
        else:
            oneshot(model=model, processor=tok, dataset=data, recipe=recipe, num_calibration_samples=a.n,
                    max_seq_length=a.seqlen, shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
    peak_rss = peak.bytes
    ppl = perplexity(model, tok, "wikitext2", seqlen=a.eval_seqlen, max_windows=a.eval_windows, progress=False)
    method = {"gptq": "GPTQModifier", "awq": "AWQModifier + QuantizationModifier",
              "smoothquant-w8a8": "SmoothQuantModifier(0.8) + QuantizationModifier(W8A8)",
              "smoothquant-gptq-w8a8": "SmoothQuantModifier(0.8) + GPTQModifier(W8A8)",
              "fp8-dynamic": "QuantizationModifier(FP8_DYNAMIC)"}[a.method]
    result = {"tool": "llm-compressor", "version": llmcompressor.__version__, "method": method,
              "bits": a.bits, "group_size": a.group_size, "sym": a.sym, "actorder": a.actorder,
              "ppl": ppl.ppl, "quantize_seconds": seconds, "peak_rss_bytes": peak_rss,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    shutil.rmtree(folder, ignore_errors=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
