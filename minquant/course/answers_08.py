"""Notebook 08's exercises: the references its check cells compare with (kept out of the notebook).

Exercises 1-3 are about section 1's real layer, rebuilt here as the notebook builds it (the same
model, C4 windows and split, so the same bits on the learner's machine), with minquant.awq's searches;
exercise 4's reference is minquant.awq.fold_scale itself, applied to modules holding the given tensors.
"""
import functools

import torch

from minquant.course import answer, cases, layer_inputs
from minquant.quant import QuantConfig, fake_quantize

LAYER = "model.layers.2.mlp.up_proj"
CFG3 = QuantConfig(bits=3, group_size=64)


@functools.cache
def _real_layer():
    """(W, the 16 calibration windows' inputs, the 8 held-out windows' inputs) of notebook 08's LAYER."""
    W, X = layer_inputs("smollm2-135m", LAYER)
    return W, X[:16 * 512], X[16 * 512:]


def _test_error(W_hat):
    W, _, X_test = _real_layer()
    return ((X_test @ (W - W_hat).T) ** 2).mean().item()


def _rtn_error():
    return _test_error(fake_quantize(_real_layer()[0], CFG3))


def _stats():
    from minquant.calibrate import InputStats

    _, X_cal, _ = _real_layer()
    return InputStats(2 * X_cal.T @ X_cal / len(X_cal), X_cal.abs().mean(0), len(X_cal))


@answer("08.1")
def alpha_1_over_rtn():
    W, X_cal, _ = _real_layer()
    s = X_cal.abs().mean(0).pow(1.0).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return _test_error(fake_quantize(W * s, CFG3) / s) / _rtn_error()


@answer("08.2")
def channels_scaled_up():
    from minquant.awq import AWQConfig, search_scale

    s, _, _ = search_scale([_real_layer()[0]], _stats(), AWQConfig(CFG3))
    return int((s > 1).sum())


@answer("08.3")
def clip_alone_over_rtn():
    from minquant.awq import AWQConfig, quantize_shrunk, search_clip

    W = _real_layer()[0]
    shrink = search_clip(W, _stats().H, AWQConfig(CFG3))          # no scale: the inputs' own H
    return _test_error(quantize_shrunk(W, CFG3, shrink)[3]) / _rtn_error()


@answer("08.4")
def fold(prev_weight, next_weight, s):
    from torch import nn

    from minquant.awq import fold_scale

    if prev_weight.ndim == 1:            # a norm's weight (K,)
        prev = nn.RMSNorm(prev_weight.shape[0])
    else:                                # the previous linear's weight (K, M): its K output rows
        prev = nn.Linear(prev_weight.shape[1], prev_weight.shape[0], bias=False)
    nxt = nn.Linear(next_weight.shape[1], next_weight.shape[0], bias=False)
    prev.weight.data, nxt.weight.data = prev_weight.clone(), next_weight.clone()
    fold_scale(prev, [nxt], s)
    return prev.weight.data, nxt.weight.data


@cases("08.4")
def _():
    g = torch.Generator().manual_seed(8)

    def awq_like_scale(K, alpha):      # mean|x|^alpha of uneven channels, centred as AWQ centres it
        s = (torch.rand(K, generator=g) * 5 + 0.05).pow(alpha)
        return s / (s.max() * s.min()).sqrt()

    return [(torch.rand(64, generator=g) + 0.5, torch.randn(96, 64, generator=g) * 0.02, awq_like_scale(64, 0.5)),
            (torch.randn(48, 32, generator=g), torch.randn(40, 48, generator=g), awq_like_scale(48, 1.0)),  # up -> down
            (torch.rand(16, generator=g), torch.randn(8, 16, generator=g), torch.ones(16)),        # s = 1 changes nothing
            (torch.randn(8, 8, generator=g), torch.randn(3, 8, generator=g), torch.rand(8, generator=g) * 40 + 1e-3)]
