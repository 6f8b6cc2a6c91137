"""Dequantize-and-multiply kernels for QuantLinear, and the choice between them.

    reference.py      the torch reference: unpack a chunk, scale, matmul (any device, any bits)
    cpu.py            QuantLinear on CPU: cpu_kernels.c (GEMV from the packed words; dequantize + BLAS), built on first use
    triton_gemv.py    4-bit GEMV for 1-4 rows (decoding): each word read once, 3 instructions a weight
    triton_tc.py      4-bit tensor-core kernel for about 5-64 rows: words loaded once, magic-number unpack
    triton_w4a16.py   4-bit fused kernel for any group size and act-order g_idx (the first kernel)
    triton_dequant.py 4-bit weights to fp16 in one pass, for cuBLAS at large batches
    prepare.py        what the kernels derive once per layer (act-order sorted to contiguous groups)
    timing.py         GPU time from CUDA graphs (kernels, autotuning, decode steps)
    sass.py           compile for an NVIDIA GPU without one and count the SASS (tests, benchmark)
    benchmark.py      `minquant bench kernels`

`dequant_matmul` picks the Triton kernels for 4-bit CUDA tensors when Triton is installed, and the
reference otherwise; `backend=` forces one (tests and benchmarks). Among the Triton paths: the GEMV
for up to 4 rows, and for more rows the fastest of the tensor-core kernel, the fused kernel and
dequantize-then-cuBLAS, measured once per shape on the GPU at hand (so no batch size is much slower
than the best of them).
"""
from __future__ import annotations

import importlib.util

import torch

from minquant.kernels import reference

BACKENDS = ("torch", "triton")
PATHS = ("gemv", "tc", "fused", "dequant")


def choose_backend(x: torch.Tensor, bits: int) -> str:
    fused = x.is_cuda and bits == 4 and importlib.util.find_spec("triton") is not None
    return "triton" if fused else "torch"


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                   backend: str | None = None, group_size: int | None = None, perm: torch.Tensor | None = None,
                   path: str | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T (+ bias) -> (..., N), W in the GPTQ layout (see minquant.packing).

    group_size (-1: per-channel) promises that g_idx is the contiguous k // group_size (no act-order);
    the Triton kernels then skip g_idx. Leave it None when unsure: g_idx is always honoured.
    perm: qweight's rows were sorted by group (minquant.kernels.prepare): row i is input perm[i].
    path: force one Triton path ("gemv", "tc", "fused", "dequant") instead of choosing (tests, benchmarks)."""
    backend = backend or choose_backend(x, bits)
    if backend == "torch":
        if perm is not None:
            raise ValueError("perm (sorted act-order rows) is for the Triton kernels; the reference takes g_idx")
        return reference.dequant_matmul(x, qweight, qzeros, scales, g_idx, bits, bias)
    if backend == "triton":
        if bits != 4:
            raise ValueError(f"the Triton kernels handle 4-bit weights, not {bits}-bit; use backend='torch'")
        return _triton_matmul(x, qweight, qzeros, scales, g_idx, bias, group_size, perm, path)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def _triton_matmul(x, qweight, qzeros, scales, g_idx, bias, group_size, perm, path):
    # GPU-only code stays out of CPU imports
    from minquant.kernels import triton_gemv
    from minquant.kernels.triton_w4a16 import w4a16_matmul

    K, N = g_idx.numel(), scales.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects K = {K}")
    if perm is not None and group_size is None:
        raise ValueError("perm needs the group_size its sorted rows form")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if path is None:
        path = "gemv" if triton_gemv.supports(M, K, group_size) else large_m_path(x2, qweight, qzeros, scales, g_idx,
                                                                                 group_size, perm)
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")
    if path == "gemv":
        if not triton_gemv.supports(M, K, group_size):
            raise ValueError(f"the GEMV takes 1-{triton_gemv.MAX_M} rows and whole-word groups, not M={M}, "
                             f"group_size={group_size}")
        out = triton_gemv.w4_gemv(x2, qweight, qzeros, scales, bias, group_size, perm)
        return out.reshape(*x.shape[:-1], N)
    if perm is not None:
        x2 = x2[:, perm]  # one gather per call puts x in the sorted rows' order
    if path == "tc":
        from minquant.kernels.triton_tc import w4_tc_matmul

        out = w4_tc_matmul(x2, qweight, qzeros, scales, bias, group_size)
    elif path == "fused":
        out = w4a16_matmul(x2, qweight, qzeros, scales, g_idx, bias, group_size=group_size)
    else:
        if group_size is None:
            raise ValueError("the dequantize path needs contiguous groups (a group_size)")
        from minquant.kernels.triton_dequant import dequantize_t

        out = x2 @ dequantize_t(qweight, qzeros, scales, group_size, x2.dtype)
        if bias is not None:
            out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], N)


_LARGE: dict = {}  # (M bucket, K, N, group_size, dtype, device) -> "tc", "fused" or "dequant"


def large_m_path(x2, qweight, qzeros, scales, g_idx, group_size, perm) -> str:
    """For more rows than the GEMV takes: the fastest of the tensor-core kernel (groups of >= 128),
    the fused kernel and dequantize + cuBLAS, timed once per power of two of M and layer shape (CUDA
    graphs), then remembered. Without a GPU (the interpreter): the tensor-core kernel where it applies
    and M <= 64, else the fused one. Without contiguous groups only the fused kernel is right."""
    from minquant.kernels import triton_tc

    (M, K), N = x2.shape, scales.shape[1]
    tc = triton_tc.supports(M, K, group_size)
    if group_size is None:
        return "fused"
    if not x2.is_cuda:
        return "tc" if tc and M <= 64 else "fused"
    import triton

    from minquant.kernels.timing import graph_time_ms

    key = (triton.next_power_of_2(M), K, N, group_size, x2.dtype, x2.device)
    if key not in _LARGE:
        candidates = ("tc", "fused", "dequant") if tc else ("fused", "dequant")
        times = {p: graph_time_ms(lambda p=p: _triton_matmul(x2, qweight, qzeros, scales, g_idx, None, group_size,
                                                             perm, p), warmup=2)
                 for p in candidates}
        _LARGE[key] = min(times, key=times.get)
    return _LARGE[key]
