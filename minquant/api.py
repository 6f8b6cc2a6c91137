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

from minquant.quant import QuantConfig

METHODS = ("rtn", "gptq", "awq")  # weight-only into QuantLinear (the GPTQ format)
# Beyond weight-only (notebook 11), saved in the compressed-tensors format: W8A8 int8 (with or without
# SmoothQuant), FP8 W8A8, and the microscaling 4-bit weight formats.
W8A8_METHODS = {"w8a8": {"dtype": "int8"}, "smoothquant": {"dtype": "int8", "smoothquant": True},
                "fp8": {"dtype": "fp8"}}
FP4_METHODS = ("mxfp4", "nvfp4")
ALL_METHODS = METHODS + tuple(W8A8_METHODS) + FP4_METHODS
# Arguments that are not a method's own settings but its calibration data (RTN reads none), with
# their defaults, to tell "given" apart; and the default of mixed precision's sensitivity windows.
DATA_OPTIONS = {"calib": "c4", "n_samples": 128, "seqlen": 512, "seed": 0, "batch_size": 8}
SENSITIVITY_SAMPLES = 16
# GPTQ through the front door (quantize, the CLI, `make demo`) sweeps columns in act-order with static
# groups unless told otherwise: the best GPTQ measured on SmolLM2 (notebook 07: W4 g64 24.37 against
# 26.82 for the plain sweep, W3 g64 42.93 against 56.46, at the same cost) and a layout every GPTQ
# reader loads like a plain one. GPTQConfig's own defaults stay the paper's algorithm (plain order).
GPTQ_DEFAULTS = {"act_order": True, "static_groups": True}


def method_config(method: str, *, bits: int = 4, group_size: int = 128, sym: bool = False, full_range: bool = False,
                  **options):
    """The config that `method` runs with, validated: QuantConfig (rtn), GPTQConfig (gptq) or AWQConfig (awq).

    bits, group_size, sym and full_range make the grid (a QuantConfig) that every method shares; `options`
    are the method's own fields (GPTQ: damp, block_size, act_order, static_groups, search_range,
    true_sequential; AWQ: n_grid, duo_scaling, clip, clip_grid, max_shrink). An option the method's config
    has no field for is refused, naming it: nothing is silently ignored or written into a checkpoint.
    GPTQ runs with act_order=True, static_groups=True (GPTQ_DEFAULTS) unless given; act_order=False
    alone gives the paper's plain column order.
    """
    from dataclasses import fields

    from minquant.awq import AWQConfig
    from minquant.gptq import GPTQConfig

    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; minquant has: {', '.join(ALL_METHODS)}")
    if method in W8A8_METHODS or method in FP4_METHODS:
        return _beyond_config(method, bits, group_size, sym, full_range, options)
    config_class = {"rtn": None, "gptq": GPTQConfig, "awq": AWQConfig}[method]
    own = {f.name for f in fields(config_class)} - {"quant"} if config_class else set()
    foreign = {k: v for k, v in options.items() if k not in own}
    if foreign:
        raise ValueError(f"{_describe(foreign)}: not option(s) of method={method!r}"
                         + (f" (its options: {', '.join(sorted(own))})" if own else
                            " (RTN rounds each group's min/max range; its only options are the grid's)"))
    quant = QuantConfig(bits=bits, group_size=group_size, symmetric=sym, full_range=full_range)
    if method == "gptq":  # static groups only go with act-order: act_order=False turns both off
        act_order = options.setdefault("act_order", GPTQ_DEFAULTS["act_order"])
        options.setdefault("static_groups", GPTQ_DEFAULTS["static_groups"] and bool(act_order))
    return quant if config_class is None else config_class(quant, **options)


def reads_calibration(method: str, smoothquant: bool = False, activations: str | None = None) -> bool:
    """Does `method` read calibration data? GPTQ, AWQ and SmoothQuant do; W8A8/FP8 only to smooth or for static
    activation scales; RTN and the fp4 formats never. (quantize, the CLI and the benchmark sweeps ask here.)"""
    if method in ("gptq", "awq", "smoothquant"):
        return True
    return method in W8A8_METHODS and (bool(smoothquant) or activations == "static")


def _beyond_config(method: str, bits, group_size, sym, full_range, options: dict):
    """W8A8Config for w8a8/smoothquant/fp8 (options: activations, alpha, n_grid, smoothquant for fp8); the scheme
    name for mxfp4/nvfp4 (no options). Their grids are fixed, so a weight-only grid setting is refused."""
    from dataclasses import fields

    from minquant.w8a8 import W8A8Config

    grid = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym, full_range=full_range).items()
            if v != {"bits": 4, "group_size": 128, "sym": False, "full_range": False}[k] and not (k == "bits" and v == 8
                                                                                                and method in W8A8_METHODS)}
    fixed = {"mxfp4": "fp4 e2m1 values with a power-of-two scale per 32 inputs",
             "nvfp4": "fp4 e2m1 values with an fp8 scale per 16 inputs and one per tensor"}.get(
        method, "8-bit weights with one scale per output channel, 8-bit activations")
    if grid:
        raise ValueError(f"{_describe(grid)}: not option(s) of method={method!r} (its grid is fixed: {fixed})")
    if method in FP4_METHODS:
        if options:
            raise ValueError(f"{_describe(options)}: not option(s) of method={method!r} ({fixed}; it has no options)")
        return method
    own = {f.name for f in fields(W8A8Config)} - {"dtype"} - ({"smoothquant"} if method != "fp8" else set())
    foreign = {k: v for k, v in options.items() if k not in own}
    if foreign:
        raise ValueError(f"{_describe(foreign)}: not option(s) of method={method!r} (its options: {', '.join(sorted(own))})")
    return W8A8Config(**W8A8_METHODS[method], **options)


def _describe(options: dict) -> str:
    return ", ".join(f"{k}=" + (f"<token ids {tuple(v.shape)}>" if isinstance(v, torch.Tensor) else repr(v))
                     for k, v in options.items())


@torch.no_grad()
def quantize(model, method: str = "gptq", *, tokenizer=None, bits: int = 4, group_size: int = 128, sym: bool = False,
             calib: str | torch.Tensor = "c4", n_samples: int = 128, seqlen: int = 512, seed: int = 0,
             bits_budget: float | None = None, sensitivity_samples: int = SENSITIVITY_SAMPLES, device=None,
             batch_size: int = 8, progress: bool = True, out_dir: str | os.PathLike | None = None,
             overwrite: bool = False, max_shard_size: int | str = "2GB", hidden_states_device=None,
             hidden_states_dtype: torch.dtype | None = None, **options):
    """Quantize `model`'s linear layers in place into QuantLinear (GPTQ layout) and return the model.

    `model`: an nn.Module, or a name to load first (packaged name, local folder or Hub id, fp32).

    With `out_dir` (and `model` a name): streamed, for models bigger than memory. The float model is
    never whole anywhere: each block is read from its safetensors shards, quantized, and written to
    the checkpoint at `out_dir` (shards of at most `max_shard_size`, atomic as a whole; `overwrite`
    as in `save`), then freed; the folder's Path is returned. The tensors are those `quantize` +
    `save` write in memory, bit for bit. rtn, gptq and awq (not mixed precision); see minquant/stream.py.
    `hidden_states_device` / `hidden_states_dtype` (gptq, awq): where the calibration activations between
    blocks are kept ("cpu" to spare the GPU) and in what dtype (torch.float16 halves them).

    method "rtn": min/max round-to-nearest, no data. methods "gptq" and "awq": calibration windows
    from `calib` ("c4", "wikitext2", or token ids (n, seqlen)) via `tokenizer`; block by block on `device`.
    bits, group_size, sym and `full_range` (with `sym`: all 2**bits levels, GPTQ's own symmetric
    grid, not one symmetric around 0) make the grid every method shares. `options` are the method's
    own settings, the fields of its config (`method_config`):
        gptq  damp (0.01, added to H's diagonal as a fraction of its mean), act_order and static_groups
              (both True by default: the best GPTQ measured here; act_order=False: the paper's plain order),
              search_range (each group's range narrowed to the one that rounds it best),
              true_sequential (False: each block's groups all calibrated on its float inputs), block_size
        awq   duo_scaling (scales from activations and weights), clip (search each group's range
              shrink), n_grid, clip_grid, max_shrink
    `bits_budget` (GPTQ): mixed precision: bits and group size per layer (2/3/4/8 bits at g32/g64/g128/
    per-channel, or fp16) with the least summed sensitivity (measured on the first `sensitivity_samples`
    calibration windows) at <= that many bits per weight of the block linears, scales and zeros counted;
    `bits`/`group_size`/`sym` then only set the base. The plan is left in `model.mixed_plan`.
    A report (seconds, per-layer loss) is left in `model.quantization_report`; for AWQ, the search
    (scales, clips; `.save(path)`, `minquant.awq.apply_awq`) in `model.awq_search`.

    Everything that can be checked is checked before the model changes (an option of another method,
    a budget, token ids outside the vocabulary, windows longer than the model's positions, weights
    too large for fp16 scales, the device). If the method still fails part-way, blocks already done
    stay overwritten: the model is then marked, and every later forward, quantize or save refuses it.
    """
    from minquant.checkpoint import method_quantization_config
    from minquant.models import check_float, check_usable, mark_unusable

    placement = {k: v for k, v in (("hidden_states_device", hidden_states_device),
                                   ("hidden_states_dtype", hidden_states_dtype)) if v is not None}
    if out_dir is not None:
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"streaming (out_dir=...) reads the model from its files: give its folder, packaged name or "
                            f"Hub id, not a {type(model).__name__} (for a model in memory: quantize, then minquant.save)")
        path, _ = quantize_streamed(model, out_dir, method, tokenizer=tokenizer, bits=bits, group_size=group_size,
                                    sym=sym, calib=calib, n_samples=n_samples, seqlen=seqlen, seed=seed, device=device,
                                    batch_size=batch_size, overwrite=overwrite, max_shard_size=max_shard_size,
                                    progress=progress, bits_budget=bits_budget, **placement, **options)
        return path
    if overwrite or max_shard_size != "2GB":
        raise ValueError("overwrite and max_shard_size are options of a streamed quantize (out_dir=...); "
                         "for a model in memory, give them to minquant.save")
    if placement and method not in ("gptq", "awq"):
        raise ValueError(f"{', '.join(placement)}: options of the block-by-block methods gptq and awq, not {method!r}")
    cfg = method_config(method, bits=bits, group_size=group_size, sym=sym, **options)  # validates every number
    data = dict(calib=calib, n_samples=n_samples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    _check_data_options(method, data, bits_budget, sensitivity_samples,
                        reads_calibration(method, options.get("smoothquant"), options.get("activations")))
    model = as_model(model)
    check_usable(model)
    if not hasattr(model, "config"):
        raise TypeError(f"minquant.quantize takes a Hugging Face model (one with .config), got a {type(model).__name__}; "
                        "for plain modules use minquant.rtn.quantize_to_quantlinear")
    tokenizer = tokenizer_of(model, tokenizer)
    check_float(model)
    device = check_device(device)
    if method not in METHODS:  # notebook 11's W8A8 and fp4 methods
        return _quantize_beyond(model, method, cfg, tokenizer=tokenizer, data=data, device=device, progress=progress)
    quant = cfg if method == "rtn" else cfg.quant
    _check_weights(model, method, quant, bits_budget)
    if bits_budget is not None:
        from minquant.mixed import candidate_configs, check_budget, layer_shapes, plan_model
        from minquant.sensitivity import layer_names

        configs = candidate_configs(symmetric=sym)
        check_budget(bits_budget, layer_shapes(model, layer_names(model)), configs)
    windows = None
    if method != "rtn":
        if isinstance(calib, str):  # before tokenizing 128 x 100000 tokens of text for nothing
            from minquant.models import check_positions

            check_positions(model, seqlen, "calibration windows")
        windows = calibration_data(calib, tokenizer, n_samples, seqlen, seed)
        check_windows(model, windows)
    plan = None
    if bits_budget is not None:
        model.mixed_plan, _ = plan_model(model, windows[:sensitivity_samples], bits_budget, configs, progress=progress)
        plan = {name: model.mixed_plan.config(name) for name in model.mixed_plan.layers}
    try:  # from here on the model changes
        report = _run_method(model, method, cfg, windows, plan, device=device, batch_size=batch_size, progress=progress,
                             **placement)
    except BaseException as e:
        mark_unusable(model, f"this model is neither float nor quantized: minquant.quantize(method={method!r}) failed "
                             f"part-way ({type(e).__name__}: {e}) after overwriting some of its layers; load the float "
                             "model again")
        raise
    if windows is not None:
        report["calibration"] = _calibration_report(calib, windows, seed)
    if plan is not None:
        report["mixed_plan"] = model.mixed_plan.to_json()
    model.config.quantization_config = method_quantization_config(method, cfg)
    model.quantization_report = report
    return model


def quantize_streamed(model: str | os.PathLike, out_dir: str | os.PathLike, method: str = "gptq", *, tokenizer=None,
                      bits: int = 4, group_size: int = 128, sym: bool = False, calib: str | torch.Tensor = "c4",
                      n_samples: int = 128, seqlen: int = 512, seed: int = 0, device=None, batch_size: int = 8,
                      bits_budget: float | None = None, **options) -> tuple[Path, dict]:
    """`quantize(model, ..., out_dir=...)`, returning (the folder, the report): the arguments checked here, the
    work done block by block from the model's shards by minquant/stream.py. `options` are the method's own
    and stream.py's (dtype, save_dtype, hidden_states_device/dtype, max_shard_size, overwrite, replay)."""
    from minquant import stream

    if bits_budget is not None:
        raise ValueError("bits_budget (mixed precision) is not streamed: its plan needs every layer's sensitivity on "
                         "the float model before the first block is quantized; quantize in memory for mixed precision")
    placement = {k: options.pop(k) for k in ("dtype", "save_dtype", "hidden_states_device", "hidden_states_dtype",
                                             "max_shard_size", "overwrite", "replay", "progress") if k in options}
    if method not in stream.STREAMED_METHODS:
        raise ValueError(f"method={method!r} is not streamed (streamed: {', '.join(stream.STREAMED_METHODS)}); quantize "
                         "it in memory: minquant.quantize(model, method) then minquant.save")
    cfg = method_config(method, bits=bits, group_size=group_size, sym=sym, **options)
    data = dict(calib=calib, n_samples=n_samples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    _check_data_options(method, data, None, SENSITIVITY_SAMPLES, reads_calibration(method))

    def windows_for(tokenizer, meta) -> torch.Tensor:
        windows = calibration_data(calib, tokenizer, n_samples, seqlen, seed)
        check_windows(meta, windows)
        return windows

    return stream.quantize_streamed(model, out_dir, method, cfg, windows_for=None if method == "rtn" else windows_for,
                                    tokenizer=tokenizer, device=check_device(device) or torch.device("cpu"),
                                    batch_size=batch_size, **placement)


def _quantize_beyond(model, method: str, cfg, *, tokenizer, data: dict, device, progress: bool):
    """quantize() for the W8A8 and fp4 methods, after its common checks: every linear of the blocks converted
    (lm_head stays float). Both conversions put the model back as it was if they fail part-way."""
    from minquant.models import architecture, check_positions, check_token_ids

    arch = architecture(model)
    windows = None
    if method in W8A8_METHODS and reads_calibration(method, cfg.smoothquant, cfg.activations):
        windows = calibration_data(data["calib"], tokenizer, data["n_samples"], data["seqlen"], data["seed"])
        check_token_ids(model, windows, "calibration token ids")  # (check_windows' warnings are about GPTQ's Hessian)
        check_positions(model, windows.shape[1], "calibration windows")
    if method in FP4_METHODS:
        from minquant.microscaling import fp4_quantize_model

        report = fp4_quantize_model(model, arch, cfg, progress=progress)
    else:
        from minquant.smoothquant import w8a8_quantize_model

        report = w8a8_quantize_model(model, windows, cfg, device=device, batch_size=data["batch_size"], progress=progress)
    if windows is not None:
        report["calibration"] = _calibration_report(data["calib"], windows, data["seed"])
    report["method"] = method
    model.quantization_report = report
    return model


def _check_data_options(method: str, data: dict, bits_budget, sensitivity_samples, reads_data: bool) -> None:
    """Calibration data only for the methods that read it; mixed precision only for GPTQ; sane counts."""
    given = {k: v for k, v in data.items() if isinstance(v, torch.Tensor) or v != DATA_OPTIONS[k]}
    why = {"rtn": "RTN rounds each group's min/max range, with no calibration data"}.get(method) or \
        ("it converts each layer on its own, with no calibration data" if method in FP4_METHODS else
         "dynamic per-token activations without SmoothQuant need no calibration data")
    if not reads_data and given:
        raise ValueError(f"{_describe(given)}: not option(s) of method={method!r} ({why})")
    if bits_budget is not None and method != "gptq":
        raise ValueError(f"bits_budget={bits_budget!r}: not option(s) of method={method!r} (mixed precision is planned "
                         "for GPTQ)")
    if bits_budget is None and sensitivity_samples != SENSITIVITY_SAMPLES:
        raise ValueError(f"sensitivity_samples={sensitivity_samples!r} is read only with bits_budget (mixed precision)")
    if not (isinstance(sensitivity_samples, int) and sensitivity_samples >= 1):
        raise ValueError(f"sensitivity_samples must be a positive integer, got {sensitivity_samples!r}")
    if not (isinstance(data["batch_size"], int) and data["batch_size"] >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {data['batch_size']!r}")


def _run_method(model, method: str, cfg, windows, plan, *, device, batch_size, progress, **placement) -> dict:
    if method == "rtn":
        import time

        from minquant.rtn import quantize_to_quantlinear

        start = time.perf_counter()
        layers = quantize_to_quantlinear(model, cfg, progress=progress)
        return {"seconds": time.perf_counter() - start, "layers": {r.name: {"mse": r.mse} for r in layers}}
    if method == "awq":
        from minquant.awq import awq_quantize_model

        model.awq_search, report = awq_quantize_model(model, windows, cfg, device=device, batch_size=batch_size,
                                                      progress=progress, **placement)
        return report
    from minquant.gptq import gptq_quantize_model

    return gptq_quantize_model(model, windows, cfg, device=device, batch_size=batch_size, plan=plan, progress=progress,
                               **placement)


def _check_weights(model, method: str, quant: QuantConfig, bits_budget) -> None:
    """Every layer the method will change can be stored (shape, finite, fp16 scales and biases), up front."""
    from minquant.calibrate import check_linears
    from minquant.models import ARCHITECTURES, architecture

    for name, p in model.named_parameters():  # a NaN norm would only show as NaN activations, blocks later
        bad = ~torch.isfinite(p)
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} NaN/Inf values; nothing was quantized")
    if method == "rtn" and getattr(model.config, "model_type", None) not in ARCHITECTURES:
        return  # RTN quantizes any nn.Linear and checks them all itself before changing one
    if method != "rtn" or bits_budget is None:
        check_linears(model, architecture(model), quant)


def check_device(device) -> torch.device | None:
    """`device` as a torch.device, or a clear error when this machine or torch build has no such device."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: " + ("this torch build has no CUDA (a CPU build)" if torch.version.cuda is None
                         else "no CUDA GPU is visible (torch.cuda.is_available() is False)"))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': MPS is not available on this machine")
    return device


def check_windows(model, windows: torch.Tensor) -> None:
    """Calibration ids the model can take (within its vocabulary and positions); warnings where they are poor."""
    import warnings

    from minquant.models import check_positions, check_token_ids

    check_token_ids(model, windows, "calibration token ids")
    check_positions(model, windows.shape[1], "calibration windows")
    widest = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    if windows.numel() < widest:
        warnings.warn(f"only {windows.numel()} calibration tokens for layers {widest} inputs wide: H = 2 X X^T / n has "
                      f"rank at most {windows.numel()}, so the result will likely be worse than RTN; use at least "
                      f"{widest} tokens (the quick protocol: 128 x 512)", stacklevel=4)
    if (windows == windows.flatten()[0]).all():
        warnings.warn(f"every calibration token is id {int(windows.flatten()[0])}: the statistics describe one repeated token, not "
                      "text; the result will likely be poor", stacklevel=4)


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


def as_model(model_or_name):
    """A module as is; a name (packaged, folder, Hub id) loaded in fp32 with its tokenizer attached."""
    if isinstance(model_or_name, (str, os.PathLike)):
        from minquant.models import load_model

        model, _ = load_model(str(model_or_name))
        return model
    if not isinstance(model_or_name, torch.nn.Module):
        raise TypeError(f"expected a model (torch.nn.Module) or a model name, got {type(model_or_name).__name__}")
    return model_or_name


def save(model, out_dir: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype = torch.float16,
         overwrite: bool = False) -> Path:
    """Save a quantized model as a GPTQ checkpoint folder (transformers, vLLM and GPTQModel read it); W8A8, FP8
    and fp4 models (notebook 11) as a compressed-tensors folder (transformers + compressed-tensors, vLLM).

    With its tokenizer (`model.tokenizer` unless given), and what the method leaves beside the
    weights: AWQ's search (`awq_search.safetensors`, re-applicable to the float model) and a mixed
    plan (`mixed_plan.json`, which config each layer got). Float tensors are stored in `dtype`.
    Atomic: the folder holds the old checkpoint or the new one, whole, whatever happens; it is
    replaced, never merged into; a non-empty folder that is no minquant checkpoint needs `overwrite=True`.
    """
    from minquant.checkpoint import save_quantized
    from minquant.compressed import is_compressed, save_compressed

    if is_compressed(model):  # W8A8 / FP8 / fp4 layers: the compressed-tensors format (llm-compressor, vLLM)
        return save_compressed(model, tokenizer_of(model, tokenizer), out_dir, dtype, overwrite=overwrite)
    return save_quantized(model, tokenizer_of(model, tokenizer), out_dir, dtype, overwrite=overwrite)


def load(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a GPTQ checkpoint folder (ours, or any GPTQ v1 one) into QuantLinear layers, or a compressed-tensors
    one of minquant's schemes (W8A8 int8/fp8, NVFP4/MXFP4 weight-only) into W8A8Linear / FP4Linear; the model
    carries its tokenizer as `model.tokenizer`. dtype: of activations and float tensors; default
    fp16 on a GPU, fp32 on a CPU (where fp16 matmuls are slow)."""
    from minquant.checkpoint import load_quantized, read_json

    device = check_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    config = Path(folder) / "config.json"
    qc = read_json(config).get("quantization_config") if config.is_file() else None
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        from minquant.compressed import load_compressed

        model, _ = load_compressed(folder, qc, dtype=dtype)
        return model.to(device)
    model, _ = load_quantized(folder, dtype=dtype)
    return model.to(device)


def evaluate(model, data: str | torch.Tensor = "wikitext2", *, tokenizer=None, seqlen: int | None = None,
             max_windows: int | None = None, progress: bool = True):
    """Perplexity of a causal LM with the GPTQ paper's protocol (non-overlapping windows of `seqlen`
    tokens of the WikiText-2 test split, or of a given text or token ids). Returns a
    `minquant.eval.PerplexityResult` (ppl, nll, tokens, windows, seqlen, text); `max_windows`
    scores only the first windows (a quick slice: say so when you quote it)."""
    from minquant.eval import perplexity
    from minquant.models import check_usable

    check_usable(model)
    tokenizer = tokenizer_of(model, tokenizer)
    return perplexity(model, tokenizer, data, seqlen=seqlen, max_windows=max_windows, progress=progress)
