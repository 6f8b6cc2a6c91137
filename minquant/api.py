"""One call to quantize a model: `minquant.quantize(model, method="gptq", bits=4, group_size=128, ...)`.

The methods are built in the notebooks (RTN in 04-05, GPTQ in 07); this is the front door that
checks the arguments once, fetches calibration data, and leaves the model with QuantLinear layers,
ready for `minquant.checkpoint.save_quantized`.
"""
from __future__ import annotations

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
