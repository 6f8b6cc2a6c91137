"""Notebook 04's exercises: the references its check cells compare with (kept out of the notebook)."""
import functools

import torch

from minquant.course import answer, cases, load_model_quietly
from minquant.quant import QuantConfig, fake_quantize


def _sqnr(w, w_hat):
    return (10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum())).item()


@functools.cache
def _up_proj_sqnr_at_3_bits():
    w = load_model_quietly("smollm2-135m")[0].model.layers[5].mlp.up_proj.weight.detach()
    return {"per-tensor": _sqnr(w, fake_quantize(w.reshape(1, -1), QuantConfig(3, -1)).reshape(w.shape)),
            "per-channel": _sqnr(w, fake_quantize(w, QuantConfig(3, -1))),
            "group 64": _sqnr(w, fake_quantize(w, QuantConfig(3, 64))),
            "group 32": _sqnr(w, fake_quantize(w, QuantConfig(3, 32)))}


@answer("04.1")
def w3_g128_float_zero_bits():
    return 3 + (16 + 16) / 128  # an fp16 scale and an fp16 zero-point per group of 128


@answer("04.2")
def best_granularity():
    sq = _up_proj_sqnr_at_3_bits()
    return max(sq, key=sq.get)


@answer("04.3")
def gain_over_per_channel_db():
    sq = _up_proj_sqnr_at_3_bits()
    return max(sq.values()) - sq["per-channel"]


@answer("04.4")
def w3_over_w4_g64():
    from minquant.bench.results import load_results

    ppl = {row["label"]: row["ppl"] for row in load_results("rtn_smollm2")["results"]["smollm2"]}
    return ppl["W3 g64"] / ppl["W4 g64"]


@answer("04.5")
def fake_quant_groups_sym(W, bits, group_size):
    return fake_quantize(W, QuantConfig(bits, group_size, symmetric=True))


@cases("04.5")
def _():
    g = torch.Generator().manual_seed(4)
    heavy = torch.randn(16, 128, generator=g) * 0.02
    heavy[3, 5] = 0.5                                           # one outlier: its group's scale grows
    return [(torch.randn(8, 64, generator=g), 4, 32), (heavy, 3, 64), (torch.randn(4, 96, generator=g), 8, -1),
            (torch.randn(6, 32, generator=g) * 10, 2, 16)]
