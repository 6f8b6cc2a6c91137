"""One model quantized several ways, each measured the same way; and the demo built on it.

Notebook 10 (the capstone) and `make demo` / `minquant demo` use it. For each method, on one
float model, with one set of calibration windows shared by the methods that need them:

    bytes      what the model really holds afterwards (parameters + buffers, measured), and the
               block linears' share of it (what quantization shrinks)
    ppl        perplexity on the first windows of WikiText-2 test (the GPTQ protocol, a quick slice)
    seconds    wall time of quantizing (calibration forward passes included)
    peak       peak memory while quantizing: the CUDA allocator's peak on a GPU; on Linux the
               process's peak RSS (VmHWM, reset before each method), float model included
    errors     per linear: relative output error |y_q - y| / |y| against the float model on the same
               tokens, inside the whole quantized model (so it includes what earlier layers passed on;
               outputs that AWQ scaled by 1/s are scaled back first)
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from minquant.memory import module_bytes
from minquant.meter import PeakMemory
from minquant.quant import scheme_label

DEMO_PROMPT = "Explain in one sentence why a 70B-parameter model does not fit on one 24 GB GPU."


@dataclass
class Entry:
    label: str  # "fp32", "RTN W4 g64", ...
    method: str  # fp32 (or fp16, bf16: the float model), rtn, gptq, awq
    model_bytes: int
    linear_bytes: int  # of the linears inside the decoder blocks
    ppl: float
    seconds: float = 0.0
    peak_bytes: int | None = None
    errors: dict[str, float] = field(default_factory=dict)


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from minquant.models import ARCHITECTURES, architecture

    # a quantized model's blocks no longer pass architecture()'s check (QuantLinear is not nn.Linear)
    known = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    return (known or architecture(model)).locate_blocks(model)  # architecture() names what is unsupported


def block_linear_bytes(model: nn.Module) -> int:
    """Bytes of the linears inside the decoder blocks (float weights, or QuantLinear buffers)."""
    from minquant.nn import QuantLinear

    _, blocks = _blocks(model)
    return sum(module_bytes(m) for m in blocks.modules() if isinstance(m, (nn.Linear, QuantLinear)))


@torch.inference_mode()
def layer_outputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every linear inside the decoder blocks for token ids (1, T), keyed by module name."""
    from minquant.nn import QuantLinear

    prefix, blocks = _blocks(model)
    outputs, hooks = {}, []
    for name, m in blocks.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, key=f"{prefix}.{name}": outputs.__setitem__(key, out.float())))
    try:
        model(ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def layer_errors(reference: dict[str, torch.Tensor], model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Relative output error of each linear of `model` against the float model's `reference` outputs.

    AWQ folds 1/s into the output rows of some linears (v_proj, up_proj feed the next linear scaled
    inputs); their outputs are multiplied back by s (`model.awq_search.scales`) before comparing."""
    outputs = layer_outputs(model, ids)
    search = getattr(model, "awq_search", None)
    for name, s in (search.scales.items() if search is not None else ()):
        if name in outputs:
            outputs[name] = outputs[name] * s.to(outputs[name])
    return {name: ((outputs[name] - ref).norm() / ref.norm()).item() for name, ref in reference.items()}


def compare(model, tokenizer=None, methods=("rtn", "gptq", "awq"), *, bits: int = 4, group_size: int = 64,
            sym: bool = False, calib: str = "c4", n_samples: int = 32, seqlen: int = 128, eval_windows: int = 4,
            eval_seqlen: int | None = None, error_tokens: int = 256, seed: int = 0, device=None,
            progress: bool = True) -> tuple[list[Entry], nn.Module]:
    """Quantize copies of the float `model` with each method; returns the entries (float first)
    and the quantized model with the lowest perplexity. The float model is left unchanged."""
    import minquant
    from minquant.api import calibration_data, tokenizer_of
    from minquant.data import load_text
    from minquant.eval import default_seqlen, eval_ids

    tokenizer = tokenizer_of(model, tokenizer)
    if tokenizer is None:
        raise ValueError("compare needs the model's tokenizer (tokenizer=...)")
    unknown = [m for m in methods if m not in minquant.api.METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(minquant.api.METHODS)}; got {list(methods)}")
    eval_seqlen = eval_seqlen or default_seqlen(model)
    ids = eval_ids(load_text("wikitext2", "test"), tokenizer)[:, :eval_windows * eval_seqlen]
    if ids.shape[1] < eval_windows * eval_seqlen:
        raise ValueError(f"WikiText-2 test has {ids.shape[1]} tokens, fewer than {eval_windows} windows of {eval_seqlen}")
    error_ids = ids[:, :error_tokens]
    windows = calibration_data(calib, tokenizer, n_samples, seqlen, seed) if set(methods) - {"rtn"} else None

    def score(m: nn.Module) -> float:
        return minquant.evaluate(m, ids, seqlen=eval_seqlen, progress=progress).ppl

    reference = layer_outputs(model, error_ids)
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[next(model.parameters()).dtype]
    entries = [Entry(dtype, dtype, module_bytes(model), block_linear_bytes(model), score(model))]
    best = None
    for method in methods:
        q = copy.deepcopy(model)
        label = f"{method.upper()} {scheme_label(bits, group_size)}{' sym' if sym else ''}" + \
            (" act-order" if method == "gptq" else "")  # minquant.quantize's default GPTQ: act-order, static groups
        if progress:
            print(f"{label} ...", flush=True)
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            data = {} if method == "rtn" else {"calib": windows if windows is not None else calib, "seed": seed}
            minquant.quantize(q, method, tokenizer=tokenizer, bits=bits, group_size=group_size, sym=sym,
                              device=device, progress=progress, **data)  # RTN takes no calibration data
            seconds = time.perf_counter() - start
        entry = Entry(label, method, module_bytes(q), block_linear_bytes(q), score(q), seconds, peak.bytes,
                      layer_errors(reference, q, error_ids))
        entries.append(entry)
        if best is None or entry.ppl < best[0].ppl:
            best = (entry, q)
        del q
    return entries, best[1]


def table(entries: list[Entry]) -> str:
    """The comparison as plain text: one row per method."""
    lines = [f"{'method':<24}{'model MB':>10}{'linears MB':>12}{'ppl':>9}{'quantize s':>12}{'peak GB':>9}"]
    for e in entries:
        peak = f"{e.peak_bytes / 1e9:.2f}" if e.peak_bytes else "-"
        lines.append(f"{e.label:<24}{e.model_bytes / 1e6:>10.1f}{e.linear_bytes / 1e6:>12.1f}{e.ppl:>9.2f}"
                     f"{e.seconds:>12.1f}{peak:>9}")
    return "\n".join(lines)


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str = DEMO_PROMPT, max_new_tokens: int = 48, chat: bool = True,
             streamer=None) -> str:
    """Greedy completion of `prompt`, through the chat template when the tokenizer has one (and `chat`);
    `streamer` (a transformers TextStreamer) shows the tokens as they come."""
    if tokenizer is None:
        raise ValueError("generating needs the model's tokenizer")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                         pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def demo(model_name: str = "smollm2-135m", out_dir: str = "minquant-demo", *, methods=("rtn", "gptq", "awq"),
         bits: int = 4, group_size: int = 64, n_samples: int = 32, seqlen: int = 128, eval_windows: int = 4,
         eval_seqlen: int | None = None, prompt: str = DEMO_PROMPT, max_new_tokens: int = 48,
         device=None, progress: bool = True) -> dict:
    """What `make demo` runs: compare the methods, save the best, reload it from disk, and generate
    from it beside the float model. Prints as it goes; returns everything measured (JSON-able).

    Calibration 32 windows of 128 C4 tokens: notebook 09's calibration study found short windows
    as good as long ones for GPTQ on SmolLM2 (better, at W3) and AWQ within a few percent, at a
    quarter of the time, which keeps the demo near 5 minutes on 2 cores."""
    import minquant
    from minquant.api import as_model
    from minquant.checkpoint import disk_bytes
    from minquant.eval import default_seqlen

    start = time.perf_counter()
    print(f"loading {model_name} ...", flush=True)
    model = as_model(model_name)
    entries, best = compare(model, methods=methods, bits=bits, group_size=group_size, n_samples=n_samples,
                            seqlen=seqlen, eval_windows=eval_windows, eval_seqlen=eval_seqlen, device=device,
                            progress=progress)
    best_entry = min(entries[1:], key=lambda e: e.ppl)  # the entry of the model compare returned
    seqlen_used = eval_seqlen or default_seqlen(model)
    print(f"\n{model_name}: {scheme_label(bits, group_size)}, calibration C4 {n_samples}x{seqlen} (RTN uses none), "
          f"perplexity on the first {eval_windows} WikiText-2 test windows of {seqlen_used} tokens\n")
    print(table(entries))

    out = minquant.save(best, out_dir)
    disk = disk_bytes(out)
    reloaded = minquant.load(out)
    probe = minquant.api.calibration_data("wikitext2", model.tokenizer, 1, 64, 0)
    with torch.inference_mode():
        drift = (reloaded(probe).logits - best(probe).logits).abs().max().item()
    print(f"\nbest: {best_entry.label}, saved to {out} ({disk / 1e6:.1f} MB on disk), reloaded "
          f"(max |logit change| {drift:.3g}: its norms and embeddings are stored in fp16)")
    print(f"\nprompt: {prompt}")
    generations = {}
    for label, m in ((entries[0].label, model), (f"{best_entry.label} (reloaded)", reloaded)):
        generations[label] = generate(m, model.tokenizer, prompt, max_new_tokens)
        print(f"\n{label}: {generations[label]}")
    seconds = time.perf_counter() - start
    print(f"\n(demo: {seconds:.0f} s)")
    return {"model": model_name, "bits": bits, "group_size": group_size,
            "calibration": {"source": "c4", "n_samples": n_samples, "seqlen": seqlen, "seed": 0},
            "eval": {"text": "wikitext2/test", "windows": eval_windows, "seqlen": seqlen_used},
            "entries": [asdict(e) for e in entries], "best": best_entry.label, "checkpoint_bytes": disk,
            "reload_max_logit_change": drift, "prompt": prompt, "max_new_tokens": max_new_tokens,
            "generations": generations, "seconds": seconds}
