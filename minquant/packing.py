"""Bit packing: storing 2-, 3-, 4- and 8-bit integers densely, and the GPTQ checkpoint layout.

Derived in notebooks/05_packing_and_quantlinear.ipynb.

PyTorch has no 4-bit tensors, so n-bit integers are packed into wider words as one continuous
bit stream, lowest bits first. Values of 3 bits straddle word boundaries. Two 4-bit values
per byte, 8 per int32 word:

    values   q0=0b0011  q1=0b1010  q2=...  q7
    int32    bit 31 ........................................ bit 0
             [  q7  ][  q6  ][  q5  ][  q4  ][  q3  ][  q2  ][  q1  ][  q0  ]

Three bits: 32 values fill 3 words exactly, and q10 is split (its low 2 bits end word 0):

    word 0   [q10 lo 2][ q9 ] ... [ q1 ][ q0 ]      word 1   [..][ q11 ][q10 hi 1]

The GPTQ v1 layout ("checkpoint_format": "gptq", read by transformers, GPTQModel and vLLM) of a
linear layer with N outputs, K inputs and group size g:

    qweight  int32  [K * bits / 32, N]   q packed along K (each column is one bit stream)
    qzeros   int32  [K / g, N * bits / 32]   zero-points packed along N, stored as zero - 1
    scales   fp16   [K / g, N]
    g_idx    int32  [K]                  the group of each input channel (k // g without act-order)

Note the transposes: minquant's q, scale and zero are (N, K) and (N, K // g); GPTQ stores
input-major. Packing is exact: `unpack(pack(q)) == q` for every value of every width.
"""
from __future__ import annotations

import math

import torch

from minquant.quant import QuantConfig

SUPPORTED_BITS = (2, 3, 4, 8)


def _chunk(bits: int, word_bits: int) -> tuple[int, int]:
    """Smallest run of values that fills whole words: (values, words). 3-bit in int32: (32, 3)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"can pack {SUPPORTED_BITS} bits, not {bits}")
    total = math.lcm(bits, word_bits)
    return total // bits, total // word_bits


def pack(q: torch.Tensor, bits: int, word_bits: int = 32, dim: int = 0) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers along `dim` into int32 words (word_bits=32) or uint8 bytes (8)."""
    values, words = _chunk(bits, word_bits)
    q = q.movedim(dim, -1).to(torch.int64)
    n = q.shape[-1]
    if n % values:
        raise ValueError(f"cannot pack {n} values of {bits} bits into {word_bits}-bit words: "
                         f"the packed dimension must be a multiple of {values}")
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"values must be in 0..{2**bits - 1} to pack in {bits} bits")
    # one integer per chunk holding all its bits (at most lcm(3, 32) = 96 bits: split in words below)
    chunks = q.reshape(*q.shape[:-1], n // values, values)
    bit_pos = torch.arange(values, device=q.device) * bits  # where each value starts in the chunk's bit stream
    out = torch.zeros(*chunks.shape[:-1], words, dtype=torch.int64, device=q.device)
    for w in range(words):  # each output word takes the slice [32w, 32w + 32) of the stream
        shift = bit_pos - w * word_bits
        lo = torch.where(shift >= 0, chunks << shift.clamp(min=0), chunks >> (-shift).clamp(min=0))
        inside = (bit_pos < (w + 1) * word_bits) & (bit_pos + bits > w * word_bits)
        out[..., w] = (lo * inside).sum(-1) & (2**word_bits - 1)
    out = out.reshape(*q.shape[:-1], n // values * words)
    if word_bits == 8:
        return out.to(torch.uint8).movedim(-1, dim)
    return (out - (out >> 31) * 2**32).to(torch.int32).movedim(-1, dim)  # as signed int32, bits unchanged


def unpack(packed: torch.Tensor, bits: int, word_bits: int = 32, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack`: unsigned integers (uint8) along `dim`."""
    values, words = _chunk(bits, word_bits)
    p = packed.movedim(dim, -1).to(torch.int64) & (2**word_bits - 1)  # int32 -> its 32 unsigned bits
    m = p.shape[-1]
    if m % words:
        raise ValueError(f"{m} packed words is not a whole number of {words}-word chunks for {bits} bits")
    chunks = p.reshape(*p.shape[:-1], m // words, words)
    bit_pos = torch.arange(values, device=p.device) * bits
    q = torch.zeros(*chunks.shape[:-1], values, dtype=torch.int64, device=p.device)
    for w in range(words):
        shift = bit_pos - w * word_bits
        word = chunks[..., w:w + 1]
        part = torch.where(shift >= 0, word >> shift.clamp(min=0), word << (-shift).clamp(min=0))
        inside = (bit_pos < (w + 1) * word_bits) & (bit_pos + bits > w * word_bits)
        q |= part * inside
    q = (q & (2**bits - 1)).reshape(*p.shape[:-1], m // words * values)
    return q.to(torch.uint8).movedim(-1, dim)


# ---------------------------------------------------------------------------------------------
# The GPTQ v1 checkpoint layout
# ---------------------------------------------------------------------------------------------

def check_packable(N: int, K: int, cfg: QuantConfig) -> None:
    """A clear error when a (N, K) layer cannot be stored in the GPTQ layout at cfg.bits."""
    values, _ = _chunk(cfg.bits, 32)
    cfg.groups(K)
    for dim, size, what in (("K (in_features)", K, "qweight"), ("N (out_features)", N, "qzeros")):
        if size % values:
            raise ValueError(f"{what} packs {values} values of {cfg.bits} bits per "
                             f"{32 * cfg.bits // math.gcd(cfg.bits, 32) // 32} int32 word(s): "
                             f"{dim} = {size} must be a multiple of {values}")


FP16_MAX = 65504.0  # the largest finite fp16: scales and biases are stored in fp16


def check_storable(linear: torch.nn.Linear, cfg: QuantConfig) -> None:
    """A clear error, before anything changes, when this nn.Linear cannot become a GPTQ layer at `cfg`:
    a shape that does not pack, NaN/Inf weights, or weights/bias too large for fp16 scales and biases."""
    check_packable(linear.out_features, linear.in_features, cfg)
    w = linear.weight.detach()
    bad = ~torch.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight has {int(bad.sum())} NaN/Inf values (first at row {r}, column {c}); nothing was quantized")
    # The largest scale any group can get: absmax over the smallest step count storable_qparams divides by.
    steps = (2 ** (cfg.bits - 1) - (0.5 if cfg.full_range else 1)) if cfg.symmetric else min(cfg.maxq / 2, cfg.maxq - 1)
    absmax = float(w.abs().max()) if w.numel() else 0.0
    if absmax / steps > FP16_MAX:
        raise ValueError(f"weights up to {absmax:.4g} need scales up to {absmax / steps:.4g}, beyond fp16's largest "
                         f"({FP16_MAX:g}), which the GPTQ format stores scales in; nothing was quantized")
    if linear.bias is not None:
        b = linear.bias.detach()
        if not torch.isfinite(b).all() or float(b.abs().max()) > FP16_MAX:
            raise ValueError(f"bias has values (up to {float(b.abs().max()):.4g}) that fp16, in which the GPTQ format "
                             "stores biases, cannot hold; nothing was quantized")


def contiguous_g_idx(K: int, G: int, device=None) -> torch.Tensor:
    """The group of each input column without act-order: column k is in group k // (K // G)."""
    return (torch.arange(K, device=device) // (K // G)).to(torch.int32)


def to_gptq(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig,
            g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """minquant's (q, scale, zero) of a (N, K) weight -> the GPTQ v1 tensors.

    `g_idx` (K,) gives each input column's group; by default column k is in group k // group_size.
    GPTQ's act-order produces other assignments (each group still holds group_size columns).
    """
    N, K = q.shape
    check_packable(N, K, cfg)
    if not torch.equal(zero, zero.round()):
        raise ValueError("the GPTQ format stores integer zero-points; quantize with integer_zero=True")
    if (zero < 1).any():
        raise ValueError("the GPTQ v1 format stores zero - 1, so a zero-point of 0 cannot be stored; "
                         "use minquant.quant.storable_qparams(), which widens such groups by one step")
    G = cfg.groups(K)
    if g_idx is None:
        g_idx = contiguous_g_idx(K, G, q.device)
    elif g_idx.shape != (K,) or g_idx.min() < 0 or g_idx.max() >= G:
        raise ValueError(f"g_idx must hold K={K} group numbers in [0, {G}), got shape {tuple(g_idx.shape)}")
    return {
        "qweight": pack(q.t(), cfg.bits, dim=0),                                   # [K*bits/32, N]
        "qzeros": pack(zero.t().to(torch.int64) - 1, cfg.bits, dim=1),              # [G, N*bits/32]
        "scales": scale.t().to(torch.float16).contiguous(),                          # [G, N]
        "g_idx": g_idx.to(torch.int32),                                              # [K]
    }


def from_gptq(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ v1 tensors -> (q (N, K) uint8, scale (N, G) fp32, zero (N, G) fp32, g_idx (K,))."""
    q = unpack(tensors["qweight"], bits, dim=0).t()
    zero = unpack(tensors["qzeros"], bits, dim=1).t().float() + 1
    return q.contiguous(), tensors["scales"].t().float().contiguous(), zero.contiguous(), tensors["g_idx"]
