"""The torch reference for y = x @ dequant(W)^T with W in the GPTQ layout: unpack, scale, matmul.

Derived in notebooks/05_packing_and_quantlinear.ipynb; the fused Triton kernel of notebook 06 must
match it. It works in chunks of output columns, so it never holds more than one chunk of float
weights: a 4096 x 4096 int4 layer needs 8 MB of packed weights, not 64 MB of fp32 ones.
"""
from __future__ import annotations

import torch

from minquant.packing import unpack

CHUNK_ELEMENTS = 2**22  # float weights materialised at once (16 MB in fp32)


def dequantize_columns(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, cols: slice, dtype: torch.dtype) -> torch.Tensor:
    """Float weights W^T[:, cols], shape (K, n): (q - zero[g_idx]) * scale[g_idx]."""
    q = unpack(qweight[:, cols], bits, dim=0).to(dtype)        # (K, n)
    g = g_idx.long()
    return (q - zeros[g, cols].to(dtype)) * scales[g, cols].to(dtype)


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N), in x's dtype."""
    K, N = g_idx.numel(), scales.shape[1]
    zeros = unpack(qzeros, bits, dim=1).to(torch.int32) + 1      # (G, N): v1 stores zero - 1
    step = max(1, CHUNK_ELEMENTS // K)
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, step):
        cols = slice(n0, min(n0 + step, N))
        out[..., cols] = x @ dequantize_columns(qweight, zeros, scales, g_idx, bits, cols, x.dtype)
    return out if bias is None else out + bias.to(x.dtype)
