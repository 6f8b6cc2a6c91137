"""Notebook 11's exercises: the references its check cells compare with (kept out of the notebook).

Exercise 1 is byte accounting from Llama-2-70B's published config; exercise 2 rebuilds section 1's
real layer inputs as the notebook does (the same 4 C4 windows in one batch, so the same bits on the
learner's machine); exercises 3 and 4 run the learner's function against minquant's own.
"""
import functools

import torch

from minquant.course import answer, cases, layer_inputs

Q_PROJ = "model.layers.12.self_attn.q_proj"


@answer("11.1")
def int8_kv_cache_bytes():
    from minquant.models import load_config

    cfg = load_config("meta-llama/Llama-2-70b-hf")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    vectors = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 32768 * 8  # K and V, per head, token, sequence
    return vectors * (head_dim * 1 + 4)  # int8 values and one float32 scale per vector


@functools.cache
def _real_layer():
    return layer_inputs("smollm2-135m", Q_PROJ, n=4, seqlen=256)


@answer("11.2")
def best_alpha_dynamic():
    W, x = _real_layer()
    y = x @ W.T
    x_max, w_max = x.abs().amax(0), W.abs().amax(0)

    def int8(t, scale):
        return torch.round(t / scale).clamp(-128, 127) * scale

    def error(alpha):
        s = x_max.pow(alpha) / w_max.pow(1 - alpha)
        xs, Ws = x / s, W * s
        y_q = int8(xs, xs.abs().amax(1, keepdim=True) / 127) @ int8(Ws, Ws.abs().amax(1, keepdim=True) / 127).T
        return float((y_q - y).norm() / y.norm())

    alphas = [i / 10 for i in range(11)]
    return min(alphas, key=error)


@answer("11.3")
def smoothing_scales(x_max, w_max, alpha):
    from minquant.smoothquant import smoothing_scales

    return smoothing_scales(x_max, w_max, alpha)


@cases("11.3")
def _():
    g = torch.Generator().manual_seed(11)
    x_max, w_max = torch.rand(64, generator=g) * 20, torch.rand(64, generator=g) * 0.3
    x_max[[3, 9]], w_max[[9, 17]] = 0.0, 0.0  # dead channels: no activation, or no weight
    return [(x_max, w_max, 0.5), (x_max, w_max, 0.0), (x_max, w_max, 1.0), (x_max * 100, w_max, 0.8),
            (torch.rand(8, generator=g) + 0.1, torch.rand(8, generator=g) + 0.1, 0.3)]


@answer("11.4")
def dequantize_nvfp4(packed, block_scale, global_scale):
    from minquant.microscaling import dequantize_nvfp4, unpack_fp4

    return dequantize_nvfp4(unpack_fp4(packed), block_scale, global_scale.reshape(()))


@cases("11.4")
def _():
    from minquant.microscaling import pack_fp4, quantize_nvfp4

    g = torch.Generator().manual_seed(12)
    out = []
    for shape, spread in (((8, 64), 1.0), ((4, 32), 50.0), ((16, 48), 0.01)):
        w = torch.randn(*shape, generator=g) * spread
        codes, block_scale, global_scale = quantize_nvfp4(w)
        out.append((pack_fp4(codes), block_scale, global_scale.reshape(1)))
    return out
