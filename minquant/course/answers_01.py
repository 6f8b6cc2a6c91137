"""Notebook 01's exercises: the references its check cells compare with (kept out of the notebook).

Every answer comes from `minquant.memory` on the published configs in data/model_configs/.
"""
from minquant import memory
from minquant.course import answer
from minquant.models import load_config

RTX_4090_GB_PER_S = 1008


def _llama8():
    return load_config("meta-llama/Llama-3.1-8B")


def _decode_bound(fmt: str) -> float:  # tokens/s of Llama-3.1-8B on an RTX 4090, batch 1, 4096 tokens of context
    cfg = _llama8()
    read = memory.weight_bytes(cfg, fmt, 128).total + memory.kv_cache_bytes(cfg, context=4096)
    return memory.decode_tokens_per_s(read, RTX_4090_GB_PER_S)


@answer("01.1")
def kv_cache_gb_llama8_128k():
    return memory.kv_cache_bytes(_llama8(), context=131072) / 1e9  # fp16 cache, batch 1


@answer("01.2")
def longest_context_llama70_int4_on_80gb():
    cfg = load_config("meta-llama/Llama-2-70b-hf")
    return (80 * 10**9 - memory.weight_bytes(cfg, "int4", 128).total) // memory.kv_cache_bytes(cfg, context=1)


@answer("01.3")
def llama8_int4_g128_gb():
    return memory.weight_bytes(_llama8(), "int4", 128).total / 1e9


@answer("01.4")
def llama8_int4_decode_bound_on_4090():
    return _decode_bound("int4")


@answer("01.5")
def int4_over_fp16_decode_speedup():
    return _decode_bound("int4") / _decode_bound("fp16")
