"""The front door, Hugging Face style: quantize, save, load, evaluate (and `minquant.memory`).

    model = minquant.quantize("smollm2-135m", method="gptq", bits=4, group_size=64)
    minquant.save(model, "smollm2-gptq")
    model = minquant.load("smollm2-gptq")
    print(minquant.evaluate(model, "wikitext2", max_windows=4).ppl)

The methods are built in the notebooks (RTN in 04-05, GPTQ in 07, AWQ in 08, mixed precision in
09); notebook 10 puts them together. `quantize` checks the arguments once, fetches calibration
data, and leaves the model with QuantLinear layers. A model loaded by minquant carries its
tokenizer as `model.tokenizer`, so the calls below need it only for models you built yourself.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from minquant.nn import QuantLinear

METHODS = ("rtn", "gptq", "awq")


@torch.no_grad()
def quantize(model, method: str = "gptq", *, tokenizer=None, bits: int = 4, group_size: int = 128,
             sym: bool = False, full_range: bool = False, act_order: bool = False, static_groups: bool = False,
             search_range: bool = False, damp: float = 0.01, true_sequential: bool = True,
             duo_scaling: bool = False, clip: bool = True, bits_budget: float | None = None, sensitivity_samples: int = 16,
             calib: str | torch.Tensor = "c4", n_samples: int = 128, seqlen: int = 512, seed: int = 0,
             device=None, batch_size: int = 8, progress: bool = True):
    """Quantize `model`'s linear layers in place into QuantLinear (GPTQ layout) and return the model.

    `model`: an nn.Module, or a name to load first (packaged name, local folder or Hub id, fp32).

    method "rtn": min/max round-to-nearest, no data. methods "gptq" and "awq": calibration windows
    from `calib` ("c4", "wikitext2", or token ids (n, seqlen)) via `tokenizer`; block by block on `device`.
    `full_range` (with `sym`): all 2**bits levels, GPTQ's own symmetric grid, not one symmetric
    around 0. `search_range` (GPTQ): each group's range narrowed to the one that rounds it best.
    `true_sequential=False` (GPTQ): each block's groups all calibrated on its float inputs.
    `duo_scaling`, `clip` (AWQ): scales from activations and weights; search each group's range shrink.
    `bits_budget` (GPTQ): mixed precision: bits and group size per layer (2/3/4/8 bits at g32/g64/g128/
    per-channel, or fp16) with the least summed sensitivity (measured on the first `sensitivity_samples`
    calibration windows) at <= that many bits per weight of the block linears, scales and zeros counted;
    `bits`/`group_size`/`sym` then only set the base. The plan is left in `model.mixed_plan`.
    A report (seconds, per-layer loss) is left in `model.quantization_report`; for AWQ, the search
    (scales, clips; `.save(path)`, `minquant.awq.apply_awq`) in `model.awq_search`.
    """
    from minquant.checkpoint import quantization_config
    from minquant.gptq import GPTQConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; minquant has: {', '.join(METHODS)}")
    model = _as_model(model)
    tokenizer = tokenizer_of(model, tokenizer)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized (it has QuantLinear layers); load the float model again")
    gptq_only = {"act_order": act_order, "static_groups": static_groups, "search_range": search_range,
                 "true_sequential=False": not true_sequential}
    if method == "awq" and any(gptq_only.values()):
        raise ValueError(f"{', '.join(k for k, v in gptq_only.items() if v)}: GPTQ option(s), not AWQ's")
    if method != "awq" and (duo_scaling or not clip):
        raise ValueError("duo_scaling and clip are AWQ options")
    if bits_budget is not None and method != "gptq":
        raise ValueError(f"bits_budget (mixed precision) quantizes with GPTQ; method={method!r} has no per-layer plan")
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, full_range=full_range, damp=damp, act_order=act_order,
                     static_groups=static_groups, search_range=search_range)  # validates the numbers for either method
    if method == "awq":
        from minquant.awq import AWQConfig, awq_quantize_model

        if full_range:
            raise ValueError("full_range is a GPTQ/RTN option; AWQ uses the symmetric grid around 0 or a zero-point")
        windows = calibration_data(calib, tokenizer, n_samples, seqlen, seed)
        awq_cfg = AWQConfig(bits=bits, group_size=group_size, sym=sym, duo_scaling=duo_scaling, clip=clip)
        model.awq_search, report = awq_quantize_model(model, windows, awq_cfg, device=device, batch_size=batch_size,
                                                      progress=progress)
        report["calibration"] = _calibration_report(calib, windows, seed)
    elif method == "rtn":
        if search_range or not true_sequential:
            raise ValueError("search_range and true_sequential are GPTQ options; RTN rounds each group's min/max range")
        from minquant.rtn import quantize_model
        import time

        start = time.perf_counter()
        layers = quantize_model(model, cfg.quant, progress=progress)
        report = {"seconds": time.perf_counter() - start, "layers": {r.name: {"mse": r.mse} for r in layers}}
    else:
        from minquant.gptq import gptq_quantize_model

        windows = calibration_data(calib, tokenizer, n_samples, seqlen, seed)
        plan = None
        if bits_budget is not None:
            from minquant.mixed import candidate_configs, plan_model

            if sensitivity_samples < 1:
                raise ValueError(f"sensitivity_samples must be at least 1, got {sensitivity_samples}")
            model.mixed_plan, _ = plan_model(model, windows[:sensitivity_samples], bits_budget,
                                             candidate_configs(symmetric=sym), progress=progress)
            plan = {name: model.mixed_plan.config(name) for name in model.mixed_plan.layers}
        report = gptq_quantize_model(model, windows, cfg, device=device, batch_size=batch_size,
                                     true_sequential=true_sequential, plan=plan, progress=progress)
        report["calibration"] = _calibration_report(calib, windows, seed)
        if plan is not None:
            report["mixed_plan"] = model.mixed_plan.to_json()
    model.config.quantization_config = quantization_config(cfg.quant, ("lm_head",), method=method,
                                                           desc_act=act_order and method == "gptq",
                                                           static_groups=static_groups, damp_percent=damp,
                                                           true_sequential=true_sequential and method == "gptq")
    model.quantization_report = report
    return model


def _calibration_report(calib, windows: torch.Tensor, seed: int) -> dict:
    return {"source": calib if isinstance(calib, str) else "given token ids",
            "n_samples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": seed}


def calibration_data(calib: str | torch.Tensor, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Token ids (n, seqlen) for calibration, from a source name or given directly; clear errors."""
    from minquant.data import calibration_windows

    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0 or calib.is_floating_point():
            raise ValueError(f"calibration token ids must be a non-empty (n, seqlen) integer tensor, got "
                             f"{calib.dtype} of shape {tuple(calib.shape)}")
        return calib
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if tokenizer is None:
        raise ValueError(f"calibrating on {calib!r} text needs the model's tokenizer (tokenizer=...)")
    return calibration_windows(calib, tokenizer, n=n_samples, seqlen=seqlen, seed=seed)


def tokenizer_of(model, tokenizer=None):
    """The tokenizer given, else the one minquant's loaders left on the model (`model.tokenizer`)."""
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def _as_model(model_or_name):
    """A module as is; a name (packaged, folder, Hub id) loaded in fp32 with its tokenizer attached."""
    if isinstance(model_or_name, (str, os.PathLike)):
        from minquant.models import load_model

        model, _ = load_model(str(model_or_name))
        return model
    if not isinstance(model_or_name, torch.nn.Module):
        raise TypeError(f"expected a model (torch.nn.Module) or a model name, got {type(model_or_name).__name__}")
    return model_or_name


def save(model, out_dir: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype = torch.float16) -> Path:
    """Save a quantized model as a GPTQ checkpoint folder (transformers, vLLM and GPTQModel read it).

    With its tokenizer (`model.tokenizer` unless given), and what the method leaves beside the
    weights: AWQ's search (`awq_search.safetensors`, re-applicable to the float model) and a mixed
    plan (`mixed_plan.json`, which config each layer got). Float tensors are stored in `dtype`.
    """
    from minquant.checkpoint import save_quantized

    out = save_quantized(model, tokenizer_of(model, tokenizer), out_dir, dtype)
    if getattr(model, "awq_search", None) is not None:
        model.awq_search.save(out / "awq_search.safetensors")
    if getattr(model, "mixed_plan", None) is not None:
        model.mixed_plan.save(out / "mixed_plan.json")
    return out


def load(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a GPTQ checkpoint folder (ours, or any GPTQ v1 one) into QuantLinear layers; the model
    carries its tokenizer as `model.tokenizer`. dtype: of activations and float tensors; default
    fp16 on a GPU, fp32 on a CPU (where fp16 matmuls are slow)."""
    from minquant.checkpoint import load_quantized

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    model, _ = load_quantized(folder, dtype=dtype)
    return model.to(device)


def evaluate(model, data: str | torch.Tensor = "wikitext2", *, tokenizer=None, seqlen: int | None = None,
             max_windows: int | None = None, progress: bool = True):
    """Perplexity of a causal LM with the GPTQ paper's protocol (non-overlapping windows of `seqlen`
    tokens of the WikiText-2 test split, or of a given text or token ids). Returns a
    `minquant.eval.PerplexityResult` (ppl, nll, tokens, windows, seqlen, text); `max_windows`
    scores only the first windows (a quick slice: say so when you quote it)."""
    from minquant.eval import perplexity

    tokenizer = tokenizer_of(model, tokenizer)
    return perplexity(model, tokenizer, data, seqlen=seqlen, max_windows=max_windows, progress=progress)
