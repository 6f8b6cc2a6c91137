"""Dequantize 4-bit GPTQ weights to fp16/bf16 in one pass, for large batches: then cuBLAS multiplies.

At large M a matmul is compute-bound: the tensor cores, not memory, set its time, and cuBLAS uses
them better than a fused kernel that must also unpack. Writing W^T (K x N, 2 bytes a weight) once
per call costs about 2.5x the weight reads of the fused kernel, a small price next to a GEMM of
hundreds of rows. minquant.kernels measures both on first use and keeps the faster per shape.
The output buffer is reused across calls (one per shape and dtype), so nothing is allocated per call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_zero(qzeros_ptr, scales_ptr, g, offs_n, mask, stride_zg, stride_sg):
    """Scale (fp32) and zero (int) of group rows g for the tile's columns."""
    s = tl.load(scales_ptr + g * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    zw = tl.load(qzeros_ptr + g * stride_zg + (offs_n // 8)[None, :], mask=mask, other=0)
    return s, ((zw >> ((offs_n % 8) * 4)[None, :]) & 0xF) + 1                    # GPTQ v1 stores zero - 1


@triton.jit
def dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, K, N, group_k, stride_qk, stride_zg, stride_sg,
                   stride_ok, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_WORDS: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    kw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (kw < K // 8)[:, None] & (offs_n < N)[None, :]
    w = tl.load(qweight_ptr + kw[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
    if WHOLE_WORDS:  # groups of a multiple of 8 inputs: a word's 8 weights share one scale and zero
        s, z = _scale_zero(qzeros_ptr, scales_ptr, (kw * 8 // group_k)[:, None], offs_n, mask, stride_zg, stride_sg)
    for j in tl.static_range(8):
        k = kw * 8 + j
        if not WHOLE_WORDS:
            s, z = _scale_zero(qzeros_ptr, scales_ptr, (k // group_k)[:, None], offs_n, mask, stride_zg, stride_sg)
        q = (w >> (4 * j)) & 0xF
        tl.store(out_ptr + k[:, None] * stride_ok + offs_n[None, :],
                 ((q - z).to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)


_BUFFERS: dict = {}


def dequantize_t(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
    """W^T (K, N) in dtype from 4-bit GPTQ v1 buffers whose groups are contiguous runs of group_size.

    reuse: write into one buffer kept per (K, N, dtype, device), overwritten by the next call."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    key = (K, N, dtype, qweight.device)
    out = _BUFFERS.get(key) if reuse else None
    if out is None:
        out = torch.empty(K, N, dtype=dtype, device=qweight.device)
        if reuse:
            _BUFFERS[key] = out
    group_k = K if group_size == -1 or group_size >= K else group_size
    BLOCK_KW, BLOCK_N = 8, 128
    dequant_kernel[(triton.cdiv(K // 8, BLOCK_KW), triton.cdiv(N, BLOCK_N))](
        qweight, qzeros, scales, out, K, N, group_k, qweight.stride(0), qzeros.stride(0), scales.stride(0),
        out.stride(0), BLOCK_KW=BLOCK_KW, BLOCK_N=BLOCK_N, WHOLE_WORDS=group_k % 8 == 0)
    return out
