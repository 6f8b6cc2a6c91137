"""The quantized KV cache inside transformers: per-vector scales by the formula, decoding step by step equals one
pass (each token is quantized once, on its own), close to the float cache, and the bytes it holds as counted."""
import pytest
import torch
from transformers import DynamicCache

from minquant.formats import FP8_E4M3, round_to_format
from minquant.kvcache import QuantizedKVCache, cache_keyword, dense_cache_nbytes, dequantize_kv, quantize_kv


def test_quantize_kv_matches_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * 4
    q, s = quantize_kv(x, "int8")
    amax = x.double().abs().amax(-1, keepdim=True)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5, 1)
    assert torch.equal(q.double(), torch.round(x.double() / (amax / 127)).clamp(-127, 127))
    q8, s8 = quantize_kv(x, "fp8")
    assert torch.equal(q8.double(), round_to_format(x.double() / (amax / 448), FP8_E4M3))
    assert (dequantize_kv(q, s, torch.float64) - x).abs().max() <= (amax / 127 / 2).max() * (1 + 1e-6)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_step_by_step_equals_one_pass_and_is_close_to_float(tiny_llama, dtype):
    model, ids = tiny_llama, torch.randint(0, 64, (2, 24))
    kw = cache_keyword(model)
    with torch.no_grad():
        ref = model(ids, **{kw: DynamicCache(config=model.config)}).logits
        one = model(ids, use_cache=True, **{kw: QuantizedKVCache(model.config, dtype)}).logits
        cache = QuantizedKVCache(model.config, dtype)
        steps = [model(ids[:, :10], use_cache=True, **{kw: cache}).logits]
        steps += [model(ids[:, t:t + 1], use_cache=True, **{kw: cache}).logits for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), one, rtol=1e-5, atol=1e-5)
    assert 0 < float((one - ref).norm() / ref.norm()) < 0.02
    assert cache.get_seq_length() == 24


def test_generate_and_beam_search_run_on_it(tiny_llama):
    model, ids = tiny_llama, torch.randint(1, 64, (1, 8))
    kw = cache_keyword(model)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = QuantizedKVCache(model.config, "int8")
    ours = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **{kw: cache})
    assert ours.shape == greedy.shape and cache.get_seq_length() == 13
    beams = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0,
                           **{kw: QuantizedKVCache(model.config, "fp8")})
    assert beams.shape == (1, 14)


def test_bytes_held_are_the_8bit_values_and_scales(tiny_llama):
    model, ids = tiny_llama, torch.randint(0, 64, (2, 24))
    kw, cfg = cache_keyword(model), tiny_llama.config
    cache, dense = QuantizedKVCache(cfg, "int8"), DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids, use_cache=True, **{kw: cache})
        model(ids, use_cache=True, **{kw: dense})
    head_dim, vectors = cfg.hidden_size // cfg.num_attention_heads, 2 * cfg.num_key_value_heads * 24 * 2 * cfg.num_hidden_layers
    assert cache.nbytes() == vectors * (head_dim * 1 + 4)  # int8 values, one float32 scale per vector
    assert dense_cache_nbytes(dense) == vectors * head_dim * 4  # the fp32 model's float cache


def test_crop_drops_tokens_from_the_end(tiny_llama):
    model, ids = tiny_llama, torch.randint(0, 64, (1, 12))
    cache = QuantizedKVCache(model.config, "int8")
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_keyword(model): cache})
    cache.crop(-5)
    assert cache.get_seq_length() == 7


def test_bad_input_is_named(tiny_llama):
    with pytest.raises(ValueError, match="int8, fp8"):
        QuantizedKVCache(tiny_llama.config, "int4")
    cfg = tiny_llama.config.__class__(**{**tiny_llama.config.to_dict(), "layer_types": ["sliding_attention"] * 2})
    with pytest.raises(ValueError, match="full-attention layers only"):
        QuantizedKVCache(cfg, "int8")
