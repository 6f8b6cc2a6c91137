"""Dequantize-and-multiply kernels for QuantLinear, and the choice between them.

    reference.py     the torch reference: unpack a chunk, scale, matmul (any device, any bits)
    triton_w4a16.py  a fused Triton kernel for 4-bit weights (notebook 06), imported only when used

`dequant_matmul` picks the fused kernel for 4-bit CUDA tensors when Triton is installed, and the
reference otherwise; `backend=` forces one (tests and benchmarks).
"""
from __future__ import annotations

import importlib.util

import torch

from minquant.kernels import reference

BACKENDS = ("torch", "triton")


def choose_backend(x: torch.Tensor, bits: int) -> str:
    fused = x.is_cuda and bits == 4 and importlib.util.find_spec("triton") is not None
    return "triton" if fused else "torch"


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                   backend: str | None = None, group_size: int | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T (+ bias) -> (..., N), W in the GPTQ layout (see minquant.packing).

    group_size (-1: per-channel) promises that g_idx is the contiguous k // group_size (no act-order);
    the fused kernel then skips g_idx. Leave it None when unsure: g_idx is always honoured."""
    backend = backend or choose_backend(x, bits)
    if backend == "torch":
        return reference.dequant_matmul(x, qweight, qzeros, scales, g_idx, bits, bias)
    if backend == "triton":
        if bits != 4:
            raise ValueError(f"the Triton kernel handles 4-bit weights, not {bits}-bit; use backend='torch'")
        from minquant.kernels.triton_w4a16 import w4a16_matmul  # GPU-only code stays out of CPU imports

        return w4a16_matmul(x, qweight, qzeros, scales, g_idx, bias, group_size=group_size)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
