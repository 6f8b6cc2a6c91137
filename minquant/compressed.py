"""Save and load W8A8 and FP4 models in the compressed-tensors format: what llm-compressor writes and vLLM serves.

Derived in notebooks/11_activations_and_kv_cache.ipynb. As with GPTQ (checkpoint.py), the layers'
buffers are already the tensors the format names, so a checkpoint is the state dict plus one block
in config.json:

    W8A8 int8   "int-quantized"         weight int8 (N, K), weight_scale (N, 1)[, input_scale (1,) if static]
    W8A8 fp8    "float-quantized"       weight float8_e4m3fn (N, K), weight_scale (N, 1)
    NVFP4       "nvfp4-pack-quantized"  weight_packed uint8 (N, K/2), weight_scale float8_e4m3fn (N, K/16),
                                        weight_global_scale float32 (1,) (a divisor: w = fp4 * scale / global)
    MXFP4       "mxfp4-pack-quantized"  weight_packed uint8 (N, K/2), weight_scale uint8 E8M0 (N, K/32)

    "quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {...}, "input_activations": {...}}}}

transformers (with the `compressed-tensors` package) loads such a folder and, on each linear, fake-
quantizes the input as the config says; vLLM runs it on int8/fp8 tensor cores. Where conventions
differ, the stored numbers still mean the same weights: compressed-tensors' own int8 scales are
max|x| / 127.5 on -128..127 and ours max|x| / 127 on -127..127 (vLLM's runtime int8 quantizer uses
/127 too), so only dynamically quantized activations round a little differently there.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from minquant.microscaling import BLOCK, FP4Linear
from minquant.w8a8 import W8A8Linear

FORMAT_OF = {"int8": "int-quantized", "fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized",
             "mxfp4": "mxfp4-pack-quantized"}
KEEP_DTYPE = ("weight_global_scale",)  # stored float32 whatever the model dtype


def _args(num_bits: int, kind: str, strategy: str, dynamic, group_size=None, scale_dtype=None, observer=None) -> dict:
    """One QuantizationArgs block, with every key compressed-tensors writes."""
    return {"num_bits": num_bits, "type": kind, "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": group_size, "scale_dtype": scale_dtype, "zp_dtype": None, "observer": observer,
            "observer_kwargs": {}, "actorder": None, "block_structure": None}


def _scheme(layer: nn.Module) -> tuple[str, dict, dict | None]:
    """(format, weight args, input args or None) of one of our layers."""
    if isinstance(layer, W8A8Linear):
        kind = "int" if layer.dtype == "int8" else "float"
        static = layer.input_scale is not None
        inputs = _args(8, kind, "tensor" if static else "token", not static, observer="minmax" if static else None)
        return FORMAT_OF[layer.dtype], _args(8, kind, "channel", False, observer="memoryless_minmax"), inputs
    scale_dtype = "torch.float8_e4m3fn" if layer.scheme == "nvfp4" else "torch.uint8"
    strategy = "tensor_group" if layer.scheme == "nvfp4" else "group"
    return FORMAT_OF[layer.scheme], _args(4, "float", strategy, False, BLOCK[layer.scheme], scale_dtype,
                                          "memoryless_minmax"), None


def compressed_config(model: nn.Module) -> dict:
    """The config.json block for a model whose quantized layers share one scheme."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear | FP4Linear)}
    if not layers:
        raise ValueError("the model has no W8A8Linear or FP4Linear layers: quantize it first (method='w8a8', "
                         "'smoothquant', 'fp8', 'mxfp4' or 'nvfp4')")
    schemes = {_scheme_key(m) for m in layers.values()}
    if len(schemes) > 1:
        raise ValueError(f"the model mixes {len(schemes)} schemes ({', '.join(sorted(map(str, schemes)))}); "
                         "minquant writes one compressed-tensors scheme per checkpoint")
    fmt, weights, inputs = _scheme(next(iter(layers.values())))
    ignore = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)  # "Linear" targets every other linear
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                          "output_activations": None, "format": fmt}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "quantized_by": "minquant", "minquant_method": _method(model)}


def _scheme_key(m: nn.Module) -> tuple:
    return ("fp4", m.scheme) if isinstance(m, FP4Linear) else ("w8a8", m.dtype, m.input_scale is not None)


def _method(model) -> str:
    return (getattr(model, "quantization_report", None) or {}).get("method") or \
        (getattr(model.config, "quantization_config", None) or {}).get("minquant_method", "unknown")


def is_compressed(model: nn.Module) -> bool:
    """Does the model hold W8A8Linear or FP4Linear layers (saved in the compressed-tensors format)?"""
    return any(isinstance(m, W8A8Linear | FP4Linear) for m in model.modules())


def storable_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict as the format stores it: float tensors (scales included) in `dtype`, except the 8-bit
    floats and the fp32 global scales; a value `dtype` cannot hold is named."""
    state = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.element_size() > 1 and not name.endswith(KEEP_DTYPE):
            stored = t.to(dtype)
            if not torch.isfinite(stored).all():
                raise ValueError(f"cannot store {name} in {dtype}: it has values up to {float(t.abs().max()):.4g}; "
                                 "save with dtype=torch.float32 or torch.bfloat16")
            t = stored
        state[name] = t.contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_compressed(model: nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, *,
                    overwrite: bool = False) -> Path:
    """Write the model as a compressed-tensors checkpoint folder, atomically (see minquant/atomic.py)."""
    from minquant.atomic import new_folder
    from minquant.checkpoint import write_model_files
    from minquant.models import check_usable

    check_usable(model)
    config = copy.deepcopy(model.config)
    config.quantization_config = compressed_config(model)
    config.dtype = dtype
    with new_folder(out_dir, overwrite) as tmp:
        write_model_files(tmp, storable_state(model, dtype), config, model, tokenizer)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# Loading: our layers rebuilt from the config, every tensor checked before it is copied in.
# ---------------------------------------------------------------------------------------------

def _layer_for(linear: nn.Linear, qc: dict, fmt: str) -> nn.Module:
    inputs = qc["config_groups"]["group_0"].get("input_activations")
    if fmt in ("int-quantized", "float-quantized"):
        static = bool(inputs) and not inputs.get("dynamic", True)
        return W8A8Linear(linear.in_features, linear.out_features, "int8" if fmt == "int-quantized" else "fp8", static,
                          bias=linear.bias is not None)
    return FP4Linear(linear.in_features, linear.out_features, "nvfp4" if fmt.startswith("nvfp4") else "mxfp4",
                     bias=linear.bias is not None)


def read_compressed_config(folder: Path, qc: dict) -> str:
    """The format of a compressed-tensors block that minquant can load (one group, symmetric, targets Linear)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if fmt not in FORMAT_OF.values() or not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{folder}: a compressed-tensors checkpoint of format {fmt!r} with "
                         f"{len(groups) if isinstance(groups, dict) else 'no'} config group(s); minquant loads one group "
                         f"of {', '.join(FORMAT_OF.values())}")
    group = next(iter(groups.values()))
    if group.get("targets") != ["Linear"] or not group.get("weights", {}).get("symmetric", False):
        raise ValueError(f"{folder}: minquant loads symmetric schemes that target every Linear; this one targets "
                         f"{group.get('targets')!r}")
    inputs = group.get("input_activations")
    if fmt.endswith("pack-quantized") and inputs:
        raise ValueError(f"{folder}: {fmt} with quantized activations (W4A4) is not a scheme minquant computes; "
                         "it loads the weight-only (A16) one")
    if qc.get("quantization_status") != "compressed":
        raise ValueError(f"{folder}: quantization_status {qc.get('quantization_status')!r}; expected 'compressed'")
    return fmt


def load_compressed(folder: str | Path, qc: dict, dtype: torch.dtype = torch.float32):
    """Rebuild (model, tokenizer) from a compressed-tensors folder of one of minquant's schemes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minquant.checkpoint import load_tokenizer, read_safetensors

    folder = Path(folder)
    fmt = read_compressed_config(folder, qc)
    tensors, origin = read_safetensors(folder)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ignore = set(qc.get("ignore") or [])
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name not in ignore:
            model.set_submodule(name, _layer_for(m, qc, fmt))
    _load_checked(model, tensors, origin, folder)
    model.config.quantization_config = qc
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    model.tokenizer = tokenizer
    return model.eval(), tokenizer


def _load_checked(model: nn.Module, tensors: dict, origin: dict, folder: Path) -> None:
    """Every tensor present, of the layer's shape; quantized ones of exactly their dtype; floats finite."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: " + (f"missing tensor(s) {', '.join(missing[:5])}" if missing else
                                           f"unexpected tensor(s) {', '.join(unexpected[:5])}"))
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape:
            raise ValueError(f"{origin[name]}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        exact = not want.is_floating_point() or want.element_size() == 1  # codes, 8-bit floats: casting changes the bits' meaning
        if exact and t.dtype != want.dtype:
            raise ValueError(f"{origin[name]}: tensor {name} is {t.dtype}, expected {want.dtype}")
        if not exact and not t.is_floating_point():
            raise ValueError(f"{origin[name]}: tensor {name} is {t.dtype}, expected a floating-point tensor")
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise ValueError(f"{origin[name]}: tensor {name} has NaN/Inf values")
    model.load_state_dict(tensors, strict=False)
    if tied:
        model.tie_weights()
