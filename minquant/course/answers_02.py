"""Notebook 02's exercises: the references its check cells compare with (kept out of the notebook).

Every answer comes from `minquant.formats` (its grids, `encode` and `round_to_format`).
"""
import itertools

import torch

from minquant.course import answer
from minquant.formats import FP8_E4M3, FP8_E5M2, FP16, encode, grid, round_to_format


@answer("02.1")
def fp16_bits_of_minus_2_5():
    return encode(torch.tensor([-2.5]), FP16).item()


@answer("02.2")
def e4m3_of_300():
    return round_to_format(torch.tensor([300.0]), FP8_E4M3).item()


@answer("02.3")
def fp16_counts_exactly_up_to():
    values = set(grid(FP16).tolist())
    return next(n for n in itertools.count() if n + 1 not in values)


@answer("02.4")
def e5m2_finite_values():
    return len(grid(FP8_E5M2))  # +0 and -0 counted once
