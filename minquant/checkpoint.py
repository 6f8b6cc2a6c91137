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


def method_quantization_config(method: str, cfg) -> dict:
    """The block `minquant.quantize` records for RTN (cfg a QuantConfig), GPTQ (a GPTQConfig) or AWQ (an AWQConfig):
    the grid, and how GPTQ swept and damped; `save` then reads the layers' format on top of it."""
    gptq = method == "gptq"
    quant = cfg if method == "rtn" else cfg.quant
    return quantization_config(quant, ("lm_head",), method=method, desc_act=gptq and cfg.act_order,
                               static_groups=gptq and cfg.static_groups, damp_percent=cfg.damp if gptq else 0.01,
                               true_sequential=gptq and cfg.true_sequential)


def _dynamic(model, base: QuantConfig) -> dict[str, dict]:
    """GPTQModel's per-module overrides (`dynamic`, which vLLM also reads): for each QuantLinear stored
    differently from `base`, "+:<its name>$" -> its bits/group_size/sym; for each linear of a block left
    float, "-:<its name>$" (not quantized). Keys are regular expressions matched from the module name's start."""
    from minquant.models import ARCHITECTURES

    dynamic = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.cfg != base:
            dynamic[f"+:{re.escape(name)}$"] = {"bits": m.cfg.bits, "group_size": m.cfg.group_size, "sym": m.cfg.symmetric}
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if arch is not None:
        prefix, blocks = arch.locate_blocks(model)
        for name, m in blocks.named_modules(prefix=prefix):
            if type(m) is torch.nn.Linear:
                dynamic[f"-:{re.escape(name)}$"] = {}
    return dynamic


def module_config(qc: dict, name: str, budget=None) -> QuantConfig | None:
    """The config a checkpoint's `quantization_config` gives module `name`: the first `dynamic` rule that
    matches it (None for a "-:" rule: not quantized), else the base one. The same reading as vLLM's,
    but the rules are matched by `minquant.patterns` (a file from a stranger cannot make it hang):
    `budget`, a `patterns.Budget`, bounds the steps all of a load's matches may take together."""
    from minquant.patterns import match

    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if match(pattern[2:], name, budget):
                return None
        elif match(pattern.removeprefix("+:"), name, budget):
            return _rule_config(qc, override)
    return _rule_config(qc)


def _rule_config(qc: dict, override: dict | None = None) -> QuantConfig:
    """The base config of `quantization_config`, with a `dynamic` rule's bits/group_size/sym over it."""
    override = override or {}
    return QuantConfig(bits=override.get("bits", qc.get("bits")), group_size=override.get("group_size", qc.get("group_size")),
                       symmetric=bool(override.get("sym", qc.get("sym", False))))  # QuantConfig names a bad value


def save_quantized(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float16, *,
                   overwrite: bool = False) -> Path:
    """Write `model` (with QuantLinear layers) and its tokenizer as a GPTQ checkpoint folder, atomically.

    The folder ends up holding the new checkpoint whole, or (after any failure, a kill included) the
    old one whole: see minquant/atomic.py. It is replaced, never merged into; a non-empty folder
    that is not a minquant checkpoint is refused unless `overwrite`. What the method leaves beside
    the weights is saved too: AWQ's search (`awq_search.safetensors`) and a mixed plan
    (`mixed_plan.json`). The model is left unchanged; float tensors are stored in `dtype`.
    """
    from minquant.atomic import new_folder
    from minquant.models import check_usable

    check_usable(model)
    counts = Counter(m.cfg for m in model.modules() if isinstance(m, QuantLinear))
    if not counts:
        raise ValueError("the model has no QuantLinear layers: quantize it first (minquant.quantize)")
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config_of(model, counts.most_common(1)[0][0])
    config.dtype = dtype
    with new_folder(out_dir, overwrite) as tmp:  # checks the destination before any tensor is converted
        write_model_files(tmp, _storable_state(model, dtype), config, model, tokenizer)
        if getattr(model, "awq_search", None) is not None:
            model.awq_search.save(tmp / "awq_search.safetensors")
        if getattr(model, "mixed_plan", None) is not None:
            model.mixed_plan.save(tmp / "mixed_plan.json")
    return Path(out_dir)


def write_model_files(folder: Path, state: dict[str, torch.Tensor], config, model, tokenizer) -> None:
    """A Hugging Face model folder's files: model.safetensors, config.json, generation config, tokenizer."""
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    write_metadata(folder, config, getattr(model, "generation_config", None), tokenizer)


def write_metadata(folder: Path, config, generation_config, tokenizer) -> None:
    """The files beside the weights: config.json, generation config, tokenizer (stream.py writes the weights itself)."""
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _storable_state(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with float tensors in `dtype` (lm_head once, as the embedding, when tied)."""
    state = storable_tensors(model.state_dict(), dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    return state


def storable_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors in `dtype`, all contiguous; a clear error for one that does not fit (1e5 in fp16)."""
    state = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            stored = t.to(dtype)
            if not all(torch.isfinite(c).all() for c in stored.reshape(-1).split(1 << 22)):  # (a few MB at a time)
                why = "NaN/Inf values" if not torch.isfinite(t).all() else \
                    f"values up to {float(t.abs().max()):.4g}, beyond {dtype}'s largest ({torch.finfo(dtype).max:.5g})"
                raise ValueError(f"cannot store {name} in {dtype}: it has {why}; save with dtype=torch.float32 "
                                 "(or torch.bfloat16) if the values are meant")
            t = stored
        state[name] = t.contiguous()
    return state


def quantization_config_of(model, base: QuantConfig, permuted: bool | None = None) -> dict:
    """config.json's block: the format read off the layers, how it was made from what quantize (or a load) left.
    `permuted`: whether any layer's columns are in act-order (read off the layers when not given)."""
    known = getattr(model.config, "quantization_config", None)  # set by minquant.quantize or load_quantized
    made_by_us = isinstance(known, dict) and known.get("quantized_by") == "minquant"
    how = {k: known[key] for k, key in (("method", "minquant_method"), ("static_groups", "static_groups"),
                                          ("damp_percent", "damp_percent"), ("true_sequential", "true_sequential"))
           if key in known} if made_by_us else {}
    if permuted is None:
        permuted = any(m.act_order for m in model.modules() if isinstance(m, QuantLinear))
    qc = quantization_config(base, ("lm_head",), desc_act=permuted or bool(made_by_us and known.get("desc_act")), **how)
    dynamic = _dynamic(model, base)
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


FORMAT_HINTS = {  # quant_method / format found -> how to say what it is
    "awq": "an AWQ checkpoint",
    "bitsandbytes": "a bitsandbytes checkpoint",
    "compressed-tensors": "a compressed-tensors checkpoint (llm-compressor / vLLM)",
    "gguf": "a GGUF file",
    "fp8": "an FP8 checkpoint",
    "gptq_v2": "a GPTQ v2 checkpoint (GPTQModel's internal format)",
}


def read_json(path: Path) -> dict:
    """A JSON object from `path`; an unreadable or malformed file is named in the error."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_quantization_config(folder: str | Path) -> dict:
    """The folder's quantization_config, checked to be GPTQ v1 (and sane), or an error naming what was found."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    qc = read_json(path).get("quantization_config")
    if qc is None:
        raise ValueError(f"{folder} is not a quantized checkpoint: config.json has no quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: quantization_config is a {type(qc).__name__}, expected an object")
    method = qc.get("quant_method", "unknown")
    fmt = qc.get("checkpoint_format", "gptq")
    if method != "gptq" or fmt != "gptq":
        found = FORMAT_HINTS.get(method if method != "gptq" else fmt, f"quant_method={method!r}")
        raise ValueError(f"{folder} holds {found} (quant_method={method!r}, checkpoint_format={fmt!r}); "
                         "minquant loads GPTQ v1 checkpoints (quant_method 'gptq', checkpoint_format 'gptq')")
    _check_quantization_config(qc, path)
    return qc


def _check_quantization_config(qc: dict, path: Path) -> None:
    """bits, group_size, sym and every `dynamic` rule valid (patterns in the safe subset), else named."""
    from minquant.packing import SUPPORTED_BITS
    from minquant.patterns import compile_pattern

    try:
        if qc.get("bits") not in SUPPORTED_BITS:
            raise ValueError(f"bits {qc.get('bits')!r}: the GPTQ layout packs 2, 3, 4 or 8 bits")
        _rule_config(qc)
        dynamic = qc.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ValueError(f"dynamic must map patterns to overrides, got a {type(dynamic).__name__}")
        for pattern, override in dynamic.items():
            if not isinstance(override, dict):
                raise ValueError(f"dynamic rule {pattern!r} maps to a {type(override).__name__}, expected an object")
            compile_pattern(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern)
            if not pattern.startswith("-:"):
                _rule_config(qc, override)
    except ValueError as e:
        raise ValueError(f"{path}: quantization_config: {e}") from None


def rules_budget(n_modules: int):
    """The steps a load's `dynamic` rules may take to match its modules' names: real rules take a few
    hundred a name; a hostile pattern is refused after ~0.1 s (SmolLM2's 210 linears)."""
    from minquant.patterns import Budget

    return Budget(300_000 + 1_500 * n_modules)


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float16):
    """Rebuild `(model, tokenizer)` from a GPTQ v1 checkpoint folder, with QuantLinear layers.

    Nothing in the folder is trusted: every tensor's dtype, shape and values (g_idx a valid group
    assignment, no NaN/Inf) are checked, with the file and tensor named in the error; only the
    weight files the folder's index lists (or `model.safetensors`) are read. The model keeps the
    checkpoint's `quantization_config` (and a mixed plan or AWQ search saved beside it), so saving
    it again writes the same checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from minquant.atomic import recover

    folder = Path(folder)
    recover(folder, clean=False)  # a save killed between its two renames: the old checkpoint is put back
    qc = read_quantization_config(folder)
    tensors, origin = read_safetensors(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: transformers cannot read it ({e})") from None
    del config.quantization_config  # we build the layers ourselves; transformers must not try to
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    packed = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    budget = rules_budget(len(packed))
    for name in packed:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{origin[name + '.qweight']}: {name}.qweight names no layer of this {config.model_type} model") from None
        try:
            cfg = module_config(qc, name, budget)
        except ValueError as e:
            raise ValueError(f"{folder / 'config.json'}: quantization_config: dynamic: {e}") from None
        if cfg is None:
            raise ValueError(f"{folder}: {name} has packed weights but the quantization_config's dynamic rules say it is not quantized")
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{origin[name + '.qweight']}: {name} is a {type(linear).__name__}, not a linear layer")
        try:
            qlinear = QuantLinear(linear.in_features, linear.out_features, cfg, bias=f"{name}.bias" in tensors)
        except ValueError as e:
            raise ValueError(f"{folder / 'config.json'}: {name} cannot be stored as configured: {e}") from None
        model.set_submodule(name, qlinear)
    _load_checked(model, tensors, origin, folder)
    model.config.quantization_config = qc  # how it was made: saving again writes the same block
    _load_extras(model, folder)
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    model.tokenizer = tokenizer  # as minquant.models.load_model does: the API calls find it here
    return model.eval(), tokenizer


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # tokenizers raises its own exception types for a damaged tokenizer.json
        raise ValueError(f"{folder}: its tokenizer files cannot be read ({type(e).__name__}: {e})") from None


def _load_extras(model, folder: Path) -> None:
    """What the method left beside the weights: a mixed plan, AWQ's search (kept so a save writes them again)."""
    from minquant.awq import AWQSearch
    from minquant.mixed import MixedPlan

    if (folder / "mixed_plan.json").is_file():
        try:
            model.mixed_plan = MixedPlan.from_json(read_json(folder / "mixed_plan.json"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'mixed_plan.json'} is not a mixed plan minquant wrote ({type(e).__name__}: {e})") from None
    if (folder / "awq_search.safetensors").is_file():
        try:
            model.awq_search = AWQSearch.load(folder / "awq_search.safetensors")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{folder / 'awq_search.safetensors'} cannot be read ({type(e).__name__}: {e})") from None


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files, as transformers finds them: those `model.safetensors.index.json`
    lists (sharded), else `model.safetensors`. Other .safetensors beside them are not weights."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        names = sorted(set(map(str, weight_map.values())))
        for name in names:
            if Path(name).name != name or name in (".", ".."):
                raise ValueError(f"{index} lists {name!r}: weight files must lie in the checkpoint folder itself")
            if not (folder / name).is_file():
                raise ValueError(f"{index} lists {name}, which is not in {folder}")
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    others = sorted(f.name for f in folder.glob("*.safetensors"))
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {folder}"
                            + (f"; found {', '.join(others)}, which no index lists" if others else ""))


def disk_bytes(folder: str | Path) -> int:
    """Bytes the checkpoint's weight files take on disk (what a user downloads)."""
    return sum(f.stat().st_size for f in weight_files(folder))


def read_safetensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the weight files, and the file each came from; a damaged file is named."""
    tensors, origin = {}, {}
    for f in weight_files(folder):
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    if k in tensors:
                        raise ValueError(f"tensor {k} is stored twice (also in {origin[k].name})")
                    tensors[k], origin[k] = st.get_tensor(k), f
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None
        except Exception as e:  # safetensors' own SafetensorError: a truncated or damaged file
            raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, origin


# What each tensor of a QuantLinear must be. g_idx may be int64 (lossless) but never float.
PACKED_DTYPES = {"qweight": (torch.int32,), "qzeros": (torch.int32,), "g_idx": (torch.int32, torch.int64)}


def _load_checked(model, tensors: dict[str, torch.Tensor], origin: dict[str, Path], folder: Path) -> None:
    """Copy every tensor in; a missing, unexpected, mis-shaped, mistyped or non-finite one is named."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    if missing:
        raise ValueError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for name, t in tensors.items():
        _check_tensor(name, t, expected[name], origin[name])
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            _check_g_idx(f"{name}.g_idx", tensors[f"{name}.g_idx"], m, origin[f"{name}.g_idx"])
    model.load_state_dict(tensors, strict=False)
    if tied:
        model.tie_weights()


def _check_tensor(name: str, t: torch.Tensor, want: torch.Tensor, file: Path) -> None:
    if t.shape != want.shape:
        raise ValueError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
    allowed = PACKED_DTYPES.get(name.rsplit(".", 1)[-1]) if not want.is_floating_point() else None
    if allowed is not None and t.dtype not in allowed:
        raise ValueError(f"{file}: tensor {name} is {t.dtype}, expected {allowed[0]} (the GPTQ layout; casting would "
                         "change what the bits mean)")
    if want.is_floating_point():
        if not t.is_floating_point():
            raise ValueError(f"{file}: tensor {name} is {t.dtype}, expected a floating-point tensor")
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ValueError(f"{file}: tensor {name} has {int(bad.sum())} NaN/Inf values")
    elif allowed is None and t.dtype != want.dtype:
        raise ValueError(f"{file}: tensor {name} is {t.dtype}, expected {want.dtype}")


def _check_g_idx(name: str, g_idx: torch.Tensor, layer: QuantLinear, file: Path) -> None:
    """g_idx must give each group exactly K / G input columns (any order: act-order permutes them)."""
    K, G = layer.in_features, layer.cfg.groups(layer.in_features)
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= G:
        raise ValueError(f"{file}: tensor {name} holds group numbers from {lo} to {hi}; this layer has groups 0..{G - 1}")
    sizes = torch.bincount(g_idx.long(), minlength=G)
    if not (sizes == K // G).all():
        g = int((sizes != K // G).nonzero()[0])
        raise ValueError(f"{file}: tensor {name} puts {int(sizes[g])} columns in group {g}; every group of this "
                         f"layer has {K // G} (group_size {layer.cfg.group_size})")
