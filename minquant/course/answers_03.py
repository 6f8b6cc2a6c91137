"""Notebook 03's exercises: the references its check cells compare with (kept out of the notebook).

The references are `minquant.quant`'s (per channel: group_size=-1) and a float64 formula.
"""
import math

import torch

from minquant.course import answer, cases
from minquant.quant import QuantConfig, choose_qparams, fake_quantize, quantize


@answer("03.1")
def absmax_4bit_of_0_25_in_pm_0_7():
    return fake_quantize(torch.tensor([[0.25, 0.7, -0.7]]), QuantConfig(4, -1, symmetric=True))[0, 0].item()


@answer("03.2")
def zero_point_q_of_0_3():
    cfg = QuantConfig(4, -1)                      # asymmetric, integer zero-point
    w = torch.tensor([[-0.2, 1.0, 0.3]])          # a range of [-0.2, 1.0]
    scale, zero = choose_qparams(w, cfg)
    return int(quantize(w, scale, zero, cfg)[0, 2])


@answer("03.3")
def db_from_2_to_3_bits():
    # noise power ~ s^2 with s = range / (2^bits - 1): the gain is 20 log10 of the ratio of the steps
    return 20 * math.log10(QuantConfig(3, -1).maxq / QuantConfig(2, -1).maxq)


@answer("03.4")
def zero_point_quantize(W, bits):
    cfg = QuantConfig(bits, group_size=-1)        # asymmetric, one scale and zero-point per row
    scale, zero = choose_qparams(W, cfg)          # (N, 1) each
    return quantize(W, scale, zero, cfg), scale, zero


@cases("03.4")
def _():
    g = torch.Generator().manual_seed(3)
    edge = torch.rand(4, 32, generator=g) * 0.5   # all positive: the range is stretched down to 0, zero = 0
    edge[1] = 0.0                                  # a row of zeros: scale 1, zero 0
    edge[2] = -0.3                                 # a constant negative row: all of it on q = 0
    return [(torch.randn(8, 64, generator=g) * 0.02, 4),
            (torch.rand(16, 128, generator=g) * 0.11 - 0.02, 3),   # lopsided, as in section 2
            (torch.randn(5, 48, generator=g), 8),
            (edge, 2)]
