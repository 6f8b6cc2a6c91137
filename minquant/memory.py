"""Byte accounting: how many parameters a model has, and how many bytes they take.

Derived step by step in notebooks/01_bytes_and_memory.ipynb.

Everything here works from a Hugging Face config alone (no weights), so it answers "does a
70B model fit on my GPU?" in microseconds and offline. The parameter count is exact: the tests
compare `param_shapes` tensor by tensor against real and randomly initialised models.

`minquant.memory(name_or_config_or_model)` (this module, callable) returns a `MemoryReport`.

Units: bytes are counted exactly; "GB" means 10**9 bytes, as model sizes are usually quoted
(Llama-2-70B: 68.98e9 parameters * 4 bytes = 275.9 GB in fp32, the "280 GB" of folklore).
"""
from __future__ import annotations

import math
import re
import sys
import types
from dataclasses import dataclass

from minquant.quant import groups_per_row

GB = 10**9

# Bits per stored weight value for each format we account for.
FORMAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
SCALE_BITS = 16  # one fp16 scale per group (or per output channel): the GPTQ/AWQ convention


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # the label on the box; usable memory is a little less (CUDA context, allocator)
    bandwidth_gbs: float  # peak memory bandwidth from the vendor's data sheet, GB/s


# One common card for each memory size people ask about: 24, 48, 80 and 141 GB.
GPUS = (
    GPU("RTX 4090", 24, 1008),
    GPU("L40S", 48, 864),
    GPU("H100 SXM", 80, 3350),
    GPU("H200", 141, 4800),
)


# ---------------------------------------------------------------------------------------------
# Parameter shapes, per architecture family
# ---------------------------------------------------------------------------------------------

def _linear(name: str, n_in: int, n_out: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """An nn.Linear's parameters: weight (out, in) and optionally bias (out,)."""
    shapes = {f"{name}.weight": (n_out, n_in)}
    if bias:
        shapes[f"{name}.bias"] = (n_out,)
    return shapes


def _norm(name: str, dim: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), **({f"{name}.bias": (dim,)} if bias else {})}


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _llama_like(cfg) -> tuple[dict, dict]:
    """Llama, Mistral, Qwen2: RMSNorm (no bias), gated MLP, grouped-query attention."""
    H, I, d = cfg.hidden_size, cfg.intermediate_size, _head_dim(cfg)
    n_q, n_kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    if cfg.model_type == "qwen2":  # Qwen2 has biases on q, k, v but not on o
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = getattr(cfg, "attention_bias", False)
        mlp_bias = getattr(cfg, "mlp_bias", False)
    top = {"model.embed_tokens.weight": (cfg.vocab_size, H), **_norm("model.norm", H, False)}
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = (cfg.vocab_size, H)
    block = {
        **_linear("self_attn.q_proj", H, n_q, qkv_bias),
        **_linear("self_attn.k_proj", H, n_kv, qkv_bias),
        **_linear("self_attn.v_proj", H, n_kv, qkv_bias),
        **_linear("self_attn.o_proj", n_q, H, o_bias),
        **_linear("mlp.gate_proj", H, I, mlp_bias),
        **_linear("mlp.up_proj", H, I, mlp_bias),
        **_linear("mlp.down_proj", I, H, mlp_bias),
        **_norm("input_layernorm", H, False),
        **_norm("post_attention_layernorm", H, False),
    }
    return top, {f"model.layers.{{i}}.{k}": v for k, v in block.items()}


def _opt(cfg) -> tuple[dict, dict]:
    """OPT: LayerNorm with bias, learned positions (with an offset of 2), optional projections."""
    H, F, E, b = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim, cfg.enable_bias
    p = "model.decoder"
    # OPT's learned positional embedding reserves 2 extra rows (a fairseq legacy of padding).
    top = {f"{p}.embed_tokens.weight": (cfg.vocab_size, E),
           f"{p}.embed_positions.weight": (cfg.max_position_embeddings + 2, H)}
    if E != H:  # e.g. OPT-350m embeds in 512 dims and projects to 1024 and back
        top |= _linear(f"{p}.project_out", H, E, False) | _linear(f"{p}.project_in", E, H, False)
    if cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False):
        top |= _norm(f"{p}.final_layer_norm", H, cfg.layer_norm_elementwise_affine)
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = (cfg.vocab_size, E)
    affine = cfg.layer_norm_elementwise_affine
    block = {
        **_linear("self_attn.k_proj", H, H, b), **_linear("self_attn.v_proj", H, H, b),
        **_linear("self_attn.q_proj", H, H, b), **_linear("self_attn.out_proj", H, H, b),
        **_norm("self_attn_layer_norm", H, affine),
        **_linear("fc1", H, F, b), **_linear("fc2", F, H, b),
        **_norm("final_layer_norm", H, affine),
    }
    return top, {f"{p}.layers.{{i}}.{k}": v for k, v in block.items()}


def _gpt_neox(cfg) -> tuple[dict, dict]:
    """GPT-NeoX (Pythia): fused query_key_value, LayerNorm with bias, untied output by default."""
    H, I, b = cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "attention_bias", True)
    top = {"gpt_neox.embed_in.weight": (cfg.vocab_size, H), **_norm("gpt_neox.final_layer_norm", H, True)}
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = (cfg.vocab_size, H)
    block = {
        **_norm("input_layernorm", H, True), **_norm("post_attention_layernorm", H, True),
        **_linear("attention.query_key_value", H, 3 * H, b), **_linear("attention.dense", H, H, b),
        **_linear("mlp.dense_h_to_4h", H, I, True), **_linear("mlp.dense_4h_to_h", I, H, True),
    }
    return top, {f"gpt_neox.layers.{{i}}.{k}": v for k, v in block.items()}


FAMILIES = {"llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
            "opt": _opt, "gpt_neox": _gpt_neox}


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, as `model.named_parameters()` would list them (tied once).

    The families in FAMILIES are derived by hand (the course's way); any other architecture that
    transformers knows is built on the meta device, which gives shapes without allocating memory.
    """
    if cfg.model_type not in FAMILIES:
        return _meta_shapes(cfg)
    top, block = FAMILIES[cfg.model_type](cfg)
    shapes = dict(top)
    for i in range(cfg.num_hidden_layers):
        shapes |= {name.format(i=i): shape for name, shape in block.items()}
    return shapes


def _meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers

    arch = (getattr(cfg, "architectures", None) or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    try:
        with torch.device("meta"):
            if model_class is not None:
                model = model_class(cfg)
            else:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # transformers raises many kinds for configs it cannot build
        raise ValueError(f"cannot count the parameters of model_type={cfg.model_type!r}: "
                         f"transformers could not build it ({type(e).__name__}: {e})") from e
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def count_params(cfg) -> int:
    """Exact number of parameters of the model that `cfg` describes (tied embeddings once)."""
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightBytes:
    fmt: str
    params: int
    weights: int  # bytes of the stored values themselves
    overhead: int  # bytes of the per-group scales and zero-points that integer formats need

    @property
    def total(self) -> int:
        return self.weights + self.overhead


def _check_format(fmt: str) -> int:
    if fmt not in FORMAT_BITS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMAT_BITS)}")
    return FORMAT_BITS[fmt]


_BLOCK = re.compile(r"\.\d+\.")  # a numbered block: model.layers.3., transformer.h.3., encoder.layer.3.


def weight_bytes(cfg, fmt: str, group_size: int = 128, symmetric: bool = False,
                 linears_only: bool = False) -> WeightBytes:
    """Bytes to store the model's weights in `fmt`, overhead of scales/zeros on its own line.

    Float formats of 16 bits and more store everything as is. For fp8 and the integer formats,
    the 2-D weight matrices are stored in `fmt` and the 1-D vectors (norms, biases) in fp16, as
    every quantization tool does; integer formats add one fp16 scale per group of `group_size`
    input columns (per output row if group_size is -1) and, unless `symmetric`, one zero-point
    of `bits` bits (GPTQ packs zeros at the weight's bit width). A group size must divide every
    quantized matrix's row length (as in `minquant.quant`), else a ValueError names the tensor
    and the group sizes that fit. fp8 adds one fp16 scale per output row. With `linears_only`, only the
    linear layers inside the decoder blocks take `fmt`; embeddings and lm_head stay fp16.
    """
    bits = _check_format(fmt)
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be a positive integer or -1 (per channel), got {group_size}")
    params = value_bits = overhead_bits = 0
    for name, shape in param_shapes(cfg).items():
        n = math.prod(shape)
        params += n
        in_block = _BLOCK.search(name) is not None
        quantized = bits < 16 and len(shape) == 2 and (in_block or not linears_only)
        if not quantized:
            value_bits += n * (bits if bits >= 16 else 16)
            continue
        value_bits += n * bits
        rows, cols = shape
        if fmt == "fp8":
            overhead_bits += rows * SCALE_BITS
        else:
            try:
                overhead_bits += linear_bits(rows, cols, bits, group_size, symmetric) - n * bits
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    return WeightBytes(fmt, params, math.ceil(value_bits / 8), math.ceil(overhead_bits / 8))


def linear_bits(N: int, K: int, bits: int, group_size: int = 128, symmetric: bool = False) -> int:
    """Bits to store one (N, K) weight matrix as `bits`-bit integers: the values, plus per group of
    `group_size` inputs (per row if -1) an fp16 scale and, unless `symmetric`, a `bits`-bit zero-point.
    bits >= 16 means the matrix stays in that float format, no overhead."""
    if bits >= 16:
        return N * K * bits
    return N * K * bits + N * groups_per_row(K, group_size) * (SCALE_BITS + (0 if symmetric else bits))


def kv_cache_bytes(cfg, context: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of the key/value cache: 2 (K and V) x layers x kv_heads x head_dim x tokens x batch."""
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * n_kv * _head_dim(cfg) * context * batch * bytes_per_value


def decode_tokens_per_s(bytes_per_step: int, bandwidth_gbs: float, batch: int = 1) -> float:
    """Upper bound on decode speed while memory-bound: each step reads every weight and the whole
    KV cache (`bytes_per_step`) once and yields one token for each of the `batch` sequences."""
    return batch * bandwidth_gbs * GB / bytes_per_step


def gpus_needed(total_bytes: int, gpu: GPU) -> int:
    """How many of `gpu` it takes to hold `total_bytes` (weights split evenly, no other overhead)."""
    return math.ceil(total_bytes / (gpu.memory_gb * GB))


def module_bytes(module) -> int:
    """Bytes a real model holds in its parameters and buffers (tied tensors once), measured."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# The table that `minquant memory MODEL` prints
# ---------------------------------------------------------------------------------------------

def fitting_group_size(cfg, linears_only: bool = False, preferred: tuple[int, ...] = (128, 64, 32)) -> int:
    """The first of `preferred` group sizes that divides every quantized matrix's rows (-1 if none):
    128 for most models, 64 for SmolLM2 (hidden 576)."""
    cols = {shape[1] for name, shape in param_shapes(cfg).items()
            if len(shape) == 2 and (_BLOCK.search(name) is not None or not linears_only)}
    return next((g for g in preferred if all(k % g == 0 for k in cols)), -1)


def _check_sizes(context: int, batch: int) -> None:
    for what, v in (("context", context), ("batch", batch)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{what} must be a positive number of tokens/sequences, got {v!r}")


def memory_table(cfg, name: str = "", group_size: int | None = None, context: int = 4096, batch: int = 1,
                 linears_only: bool = False, gpu_for_speed: GPU = GPUS[2]) -> str:
    """A plain-text table: bytes per format, scale/zero overhead, GPUs needed, decode bound.
    `group_size` None: 128, or the largest of 64/32 that divides the model's rows (`fitting_group_size`)."""
    _check_sizes(context, batch)
    chosen = group_size is None
    group_size = fitting_group_size(cfg, linears_only) if chosen else group_size
    kv = kv_cache_bytes(cfg, context, batch)
    unit, div = ("GB", GB) if count_params(cfg) * 2 >= GB else ("MB", 10**6)  # readable for small models
    lines = [
        f"{name or cfg.model_type}: {count_params(cfg):,} parameters "
        f"({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})",
        f"integer formats: group size {group_size}" + (" (the first of 128/64/32 that divides every row)" if chosen else "")
        + ", fp16 scale + zero per group"
        + ("; embeddings and lm_head stay fp16" if linears_only else ""),
        "",
        f"{'format':<7}{'bits':>5}{'weights ' + unit:>12}{'scale+zero ' + unit:>15}{'total ' + unit:>10}"
        + "".join(f"{f'{g.memory_gb:g}GB GPUs':>12}" for g in GPUS)
        + f"   decode tok/s <= ({gpu_for_speed.name})",
    ]
    for fmt in FORMAT_BITS:
        wb = weight_bytes(cfg, fmt, group_size, linears_only=linears_only)
        lines.append(f"{fmt:<7}{FORMAT_BITS[fmt]:>5}{wb.weights / div:>12.2f}{wb.overhead / div:>15.3f}"
                     f"{wb.total / div:>10.2f}"
                     + "".join(f"{gpus_needed(wb.total + kv, g):>12}" for g in GPUS)
                     + f"{decode_tokens_per_s(wb.total + kv, gpu_for_speed.bandwidth_gbs, batch):>12,.0f}")
    lines += ["", f"KV cache (fp16, context {context}, batch {batch}): {kv / div:.3f} {unit}; "
              "the GPU counts and the decode bound include it",
              f"decode bound = bandwidth ({gpu_for_speed.bandwidth_gbs:g} GB/s) / bytes read per step "
              f"(all weights + KV cache) x batch {batch}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `minquant.memory(...)`: the module is also callable, as the front door's fifth verb
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryReport:
    name: str
    params: int
    formats: dict[str, WeightBytes]  # predicted bytes per format, from the config alone
    kv_cache: int  # bytes at the report's context and batch
    table: str  # what `minquant memory MODEL` prints
    measured: int | None = None  # bytes a given model really holds (parameters + buffers)

    def __str__(self) -> str:
        if self.measured is None:
            return self.table
        return self.table + f"\nmeasured: the given model holds {self.measured:,} bytes in parameters and buffers"

    def _repr_pretty_(self, printer, cycle) -> None:  # Jupyter shows the table, not a dataclass dump
        printer.text(str(self))


def report(config_or_model, group_size: int | None = None, context: int = 4096, batch: int = 1,
           linears_only: bool = False) -> MemoryReport:
    """Bytes per format for a model name (packaged, folder, Hub id), an HF config, or a loaded model;
    a loaded model (float or quantized) also gets its measured bytes. Printing it shows the table.
    `group_size` None: 128, or the largest of 64/32 that divides the model's rows."""
    _check_sizes(context, batch)
    measured = None
    if isinstance(config_or_model, str):
        from minquant.models import load_config

        name, cfg = config_or_model, load_config(config_or_model)
    elif hasattr(config_or_model, "parameters") and hasattr(config_or_model, "config"):
        name, cfg, measured = "", config_or_model.config, module_bytes(config_or_model)
    elif hasattr(config_or_model, "model_type"):
        name, cfg = "", config_or_model
    else:
        raise TypeError(f"expected a model name, a transformers config or a model, got {type(config_or_model).__name__}")
    table = memory_table(cfg, name, group_size, context, batch, linears_only)
    group_size = fitting_group_size(cfg, linears_only) if group_size is None else group_size
    formats = {fmt: weight_bytes(cfg, fmt, group_size, linears_only=linears_only) for fmt in FORMAT_BITS}
    return MemoryReport(name or getattr(cfg, "_name_or_path", "") or cfg.model_type, count_params(cfg), formats,
                        kv_cache_bytes(cfg, context, batch),
                        table, measured)


class _CallableModule(types.ModuleType):
    """`minquant.memory("meta-llama/Llama-2-70b-hf")` calls `report`, while `minquant.memory.weight_bytes`
    and `from minquant.memory import ...` keep working: one name for the idea, module and verb."""

    def __call__(self, *args, **kwargs) -> MemoryReport:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
