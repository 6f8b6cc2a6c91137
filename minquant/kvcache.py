"""A quantized KV cache: keys and values kept in int8 or fp8 (e4m3), one scale per head per token.

Derived in notebooks/11_activations_and_kv_cache.ipynb. At long context the cache outweighs the
weights (notebook 01: Llama-2-70B at 32k tokens, batch 8, holds 80 GB of fp16 keys and values), and
every decoding step reads all of it. Storing it in 8 bits halves that. Each new token's key and value
vectors are quantized once, per (batch, kv-head, token) over head_dim, and appended; `update` hands
attention the dequantized keys and values, the new token's included (attention reads a quantized
cache, as it does in serving engines), so a plain forward over a window already measures the cost.

It plugs into transformers' Cache API (a DynamicLayer per decoder layer):

    cache = QuantizedKVCache(model.config, "int8")
    model.generate(ids, cache=cache, max_new_tokens=50)     # past_key_values=cache before transformers 5
    cache.nbytes()                                          # what it holds, scales included
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from minquant.formats import FP8_E4M3

KV_DTYPES = {"int8": (torch.int8, 127.0), "fp8": (getattr(torch, "float8_e4m3fn", None), FP8_E4M3.max)}
# transformers 5 crops by a negative count of tokens to remove, 4.x to an absolute length
_CROP_REMOVES = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


def quantize_kv(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) -> (8-bit values, float32 scales (..., 1)): symmetric, one scale per vector."""
    storage, qmax = KV_DTYPES[dtype]
    scale = (x.float().abs().amax(-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    y = (x.float() / scale).clamp(-qmax, qmax)
    return (torch.round(y) if dtype == "int8" else y).to(storage), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: 8-bit keys/values (batch, kv_heads, tokens, head_dim) and their scales."""
    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, dtype: str = "int8"):
        super().__init__()
        self.kv_dtype = dtype
        self.stored: dict[str, torch.Tensor] = {}  # qk, sk, qv, sv
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None, *args) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[..., :0, :]
        qk, sk = quantize_kv(empty, self.kv_dtype)
        qv, sv = quantize_kv(empty if value_states is None else value_states[..., :0, :], self.kv_dtype)
        self.stored = {"qk": qk, "sk": sk, "qv": qv, "sv": sv}
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens, quantized; return every token's keys and values, dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        qk, sk = quantize_kv(key_states, self.kv_dtype)
        qv, sv = quantize_kv(value_states, self.kv_dtype)
        new = {"qk": qk, "sk": sk, "qv": qv, "sv": sv}
        self.stored = {k: torch.cat([self.stored[k], new[k]], dim=-2) for k in new}
        s = self.stored
        return dequantize_kv(s["qk"], s["sk"], key_states.dtype), dequantize_kv(s["qv"], s["sv"], value_states.dtype)

    def get_seq_length(self, *args) -> int:
        return self.stored["qk"].shape[-2] if self.is_initialized else 0

    def _map(self, fn) -> None:
        if self.is_initialized:
            self.stored = {k: fn(t) for k, t in self.stored.items()}

    def crop(self, n: int) -> None:
        """Drop tokens from the end: -n of them (transformers 5), or down to n tokens (4.x, n >= 0)."""
        length = self.get_seq_length()
        keep = length + n if (n < 0 or _CROP_REMOVES) else min(n, length)
        self._map(lambda t: t[..., :max(keep, 0), :].clone())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.stored, self.is_initialized = {}, False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers store keys and values in int8 or fp8 (`dtype`), scaled per head per token."""

    def __init__(self, config=None, dtype: str = "int8"):
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        if KV_DTYPES[dtype][0] is None:
            raise ValueError(f"an fp8 KV cache needs torch's float8_e4m3fn, which torch {torch.__version__} lacks")
        self.kv_dtype = dtype
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(dtype))
            return
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds - {"full_attention"}:
            raise ValueError(f"the quantized KV cache handles full-attention layers only; this model has {sorted(kinds)}")
        super().__init__(layers=[QuantizedKVLayer(dtype) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held: the 8-bit keys and values and their float32 scales."""
        return sum(layer.nbytes() for layer in self.layers)


def cache_keyword(model) -> str:
    """The forward/generate keyword a cache is passed by: `cache` in transformers 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def dense_cache_nbytes(cache) -> int:
    """Bytes a transformers DynamicCache holds (its keys and values)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))
