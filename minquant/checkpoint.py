"""Save and load quantized models as GPTQ checkpoints that other tools read.

Derived in notebooks/05_packing_and_quantlinear.ipynb. A checkpoint is a Hugging Face model folder:
`model.safetensors` with each quantized linear's qweight/qzeros/scales/g_idx (see packing.py) and
everything else in fp16, and a `config.json` whose `quantization_config` is the block that
transformers, GPTQModel and vLLM look for:

    {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": false, "sym": false,
     "checkpoint_format": "gptq", ...}
"""
from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minquant.nn import QuantLinear
from minquant.quant import QuantConfig


def quantization_config(cfg: QuantConfig, skip: tuple[str, ...] = (), *, method: str = "rtn", desc_act: bool = False,
                        static_groups: bool = False, damp_percent: float = 0.01, true_sequential: bool = True) -> dict:
    """The `quantization_config` block of config.json for GPTQ v1 checkpoints (also for RTN/AWQ weights:
    the format is the same, `minquant_method` says how the integers were chosen; not "method", which
    GPTQModel reads as its own quantization method)."""
    return {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": desc_act,
            "sym": cfg.symmetric, "static_groups": static_groups, "true_sequential": true_sequential,
            "checkpoint_format": "gptq", "damp_percent": damp_percent, "modules_in_block_to_quantize": None,
            "quantized_by": "minquant", "minquant_method": method, "skipped_modules": list(skip)}


def _dynamic(model, base: QuantConfig) -> dict[str, dict]:
    """GPTQModel's per-module overrides (`dynamic`, which vLLM also reads): for each QuantLinear stored
    differently from `base`, "+:<its name>$" -> its bits/group_size/sym; for each linear of a block left
    float, "-:<its name>$" (not quantized). Keys are regular expressions matched from the module name's start."""
    from minquant.models import ARCHITECTURES, find_blocks

    dynamic = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.cfg != base:
            dynamic[f"+:{re.escape(name)}$"] = {"bits": m.cfg.bits, "group_size": m.cfg.group_size, "sym": m.cfg.symmetric}
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if arch is not None:
        blocks = find_blocks(model, arch)
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        for name, m in blocks.named_modules(prefix=prefix):
            if type(m) is torch.nn.Linear:
                dynamic[f"-:{re.escape(name)}$"] = {}
    return dynamic


def module_config(qc: dict, name: str) -> QuantConfig | None:
    """The config a checkpoint's `quantization_config` gives module `name`: the first `dynamic` rule that
    matches it (None for a "-:" rule: not quantized), else the base one. The same reading as vLLM's."""
    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return QuantConfig(bits=override.get("bits", qc["bits"]), group_size=override.get("group_size", qc["group_size"]),
                               symmetric=bool(override.get("sym", qc.get("sym", False))))
    return QuantConfig(bits=qc["bits"], group_size=qc["group_size"], symmetric=bool(qc.get("sym", False)))


def save_quantized(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `model` (with QuantLinear layers) and its tokenizer as a GPTQ checkpoint folder.

    The model itself is left unchanged; the float tensors (embeddings, norms) are saved in `dtype`.
    """
    counts = Counter(m.cfg for m in model.modules() if isinstance(m, QuantLinear))
    if not counts:
        raise ValueError("the model has no QuantLinear layers: quantize it first (minquant.quantize)")
    cfg = counts.most_common(1)[0][0]  # the base config; the others go in `dynamic` (mixed precision)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    known = getattr(model.config, "quantization_config", None)  # set by minquant.quantize: how it was made
    made_by_us = isinstance(known, dict) and known.get("quantized_by") == "minquant"
    extra = {"method": known["minquant_method"], "static_groups": known["static_groups"],
             "damp_percent": known["damp_percent"]} if made_by_us else {}
    permuted = any(m.act_order for m in model.modules() if isinstance(m, QuantLinear))
    config.quantization_config = quantization_config(cfg, ("lm_head",), desc_act=permuted or bool(made_by_us and known["desc_act"]), **extra)
    dynamic = _dynamic(model, cfg)
    if dynamic:
        config.quantization_config["dynamic"] = dynamic
    config.dtype = dtype
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


FORMAT_HINTS = {  # quant_method / format found -> how to say what it is
    "awq": "an AWQ checkpoint",
    "bitsandbytes": "a bitsandbytes checkpoint",
    "compressed-tensors": "a compressed-tensors checkpoint (llm-compressor / vLLM)",
    "gguf": "a GGUF file",
    "fp8": "an FP8 checkpoint",
    "gptq_v2": "a GPTQ v2 checkpoint (GPTQModel's internal format)",
}


def read_quantization_config(folder: str | Path) -> dict:
    """The folder's quantization_config, checked to be GPTQ v1, or an error naming what was found."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    qc = json.loads(path.read_text()).get("quantization_config")
    if qc is None:
        raise ValueError(f"{folder} is not a quantized checkpoint: config.json has no quantization_config")
    method = qc.get("quant_method", "unknown")
    fmt = qc.get("checkpoint_format", "gptq")
    if method != "gptq" or fmt != "gptq":
        found = FORMAT_HINTS.get(method if method != "gptq" else fmt, f"quant_method={method!r}")
        raise ValueError(f"{folder} holds {found} (quant_method={method!r}, checkpoint_format={fmt!r}); "
                         "minquant loads GPTQ v1 checkpoints (quant_method 'gptq', checkpoint_format 'gptq')")
    return qc


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float16):
    """Rebuild `(model, tokenizer)` from a GPTQ v1 checkpoint folder, with QuantLinear layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    qc = read_quantization_config(folder)
    tensors = _read_safetensors(folder)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config  # we build the layers ourselves; transformers must not try to
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        linear, cfg = model.get_submodule(name), module_config(qc, name)
        if cfg is None:
            raise ValueError(f"{folder}: {name} has packed weights but the quantization_config's dynamic rules say it is not quantized")
        model.set_submodule(name, QuantLinear(linear.in_features, linear.out_features, cfg, bias=f"{name}.bias" in tensors))
    _load_checked(model, tensors, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    model.tokenizer = tokenizer  # as minquant.models.load_model does: the API calls find it here
    return model.eval(), tokenizer


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files: every .safetensors but what methods leave beside them (AWQ's search)."""
    return [f for f in sorted(Path(folder).glob("*.safetensors")) if f.name != "awq_search.safetensors"]


def disk_bytes(folder: str | Path) -> int:
    """Bytes the checkpoint's weight files take on disk (what a user downloads)."""
    return sum(f.stat().st_size for f in weight_files(folder))


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {folder}")
    tensors = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            tensors |= {k: st.get_tensor(k) for k in st.keys()}
    return tensors


def _load_checked(model, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy every tensor in; a missing, unexpected or mis-shaped one is named in the error."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    if missing:
        raise ValueError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)
    if tied:
        model.tie_weights()
