"""Notebook 05's exercises: the references the check cells compare with (kept out of the notebook)."""
import torch

from minquant.course import answer, cases
from minquant.nn import QuantLinear
from minquant.packing import contiguous_g_idx, from_gptq, pack, unpack
from minquant.quant import QuantConfig, dequantize, quantize_storable


@answer("05.1")
def words_per_column_3_bits():
    return pack(torch.zeros(576, 1, dtype=torch.uint8), 3, dim=0).shape[0]   # qweight's rows for K = 576


@answer("05.2")
def nibbles_of_the_word():
    word = torch.tensor([[0xF00000A3 - 2**32]], dtype=torch.int32)           # as the int32 a checkpoint stores
    return unpack(word, 4, dim=0)[:, 0].tolist()


@answer("05.3")
def bytes_of_a_4096_layer():
    big = QuantLinear(4096, 4096, QuantConfig(4, 128))
    return sum(t.numel() * t.element_size() for t in big.state_dict().values())


@answer("05.4")
def dequantize_gptq(qweight, qzeros, scales, g_idx, bits):
    # minquant's own reading of the buffers, as QuantLinear.dequantize_weight does it
    q, scale, zero, g = from_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, bits)
    return dequantize(q, scale, zero, dtype=torch.float32, g_idx=g)


def _buffers(layer: QuantLinear) -> tuple:
    return layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.cfg.bits


def _rtn_layer(g: torch.Generator, N: int, K: int, cfg: QuantConfig, positive_group: bool = False) -> tuple:
    linear = torch.nn.Linear(K, N, bias=False)
    w = torch.randn(N, K, generator=g) * 0.05
    if positive_group:  # a group with no negative weight: zero-point 1, stored as 0
        w[0, :cfg.group_size] = w[0, :cfg.group_size].abs()
    linear.weight.data = w
    return _buffers(QuantLinear.from_linear(linear, cfg))


def _act_order_layer(g: torch.Generator, N: int, K: int, cfg: QuantConfig) -> tuple:
    # GPTQ's act-order: the columns are quantized in the order `perm`, and each run of group_size of
    # that order is a group, so g_idx is not sorted
    w = torch.randn(N, K, generator=g) * 0.05
    perm = torch.randperm(K, generator=g)
    q_p, scale, zero = quantize_storable(w[:, perm], cfg)
    q = torch.empty_like(q_p)
    q[:, perm] = q_p
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = contiguous_g_idx(K, cfg.groups(K))
    return _buffers(QuantLinear.from_quantized(q, scale, zero, g_idx, cfg))


@cases("05.4")
def _():
    g = torch.Generator().manual_seed(5)
    return [_rtn_layer(g, 64, 256, QuantConfig(4, 64), positive_group=True),   # 4-bit, groups of 64
            _act_order_layer(g, 32, 128, QuantConfig(4, 32)),                  # 4-bit, act-order g_idx
            _rtn_layer(g, 32, 256, QuantConfig(8, 128)),                       # 8 bits: 4 values a word
            _rtn_layer(g, 48, 64, QuantConfig(2, -1))]                         # 2 bits, per-channel (one group)
