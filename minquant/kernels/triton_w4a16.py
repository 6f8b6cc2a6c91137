"""A fused W4A16 dequantize-and-multiply kernel in Triton: y = x @ dequant(qweight)^T.

Derived in notebooks/06_dequant_matmul_kernels.ipynb (coming). What you will learn here:
    * how a kernel reads GPTQ's packed int32 words and unpacks 4-bit weights in registers,
    * why it never writes the float weights to memory (the point of weight-only quantization:
      decoding is memory-bound, so bytes read are time),
    * how scales and zero-points are gathered per input row through g_idx (so act-order works too).

The blocked algorithm, for one (BLOCK_M x BLOCK_N) tile of the output:

    acc = zeros(BLOCK_M, BLOCK_N)                          # fp32 accumulator
    for k0 in range(0, K, BLOCK_K):
        x  = X[m-tile, k0:k0+BLOCK_K]                      # activations, fp16/bf16/fp32
        qw = qweight[(k0:k0+BLOCK_K) // 8, n-tile]         # each int32 holds 8 inputs of one column
        q  = (qw >> 4 * (k % 8)) & 0xF                     # the 4-bit integers, (BLOCK_K, BLOCK_N)
        g  = g_idx[k0:k0+BLOCK_K]                          # the group of each input row
        s  = scales[g, n-tile];  z = unpack(qzeros[g, n-tile // 8]) + 1
        acc += x @ ((q - z) * s)                           # tl.dot on the tensor cores
    Y[m-tile, n-tile] = acc

The same kernel serves decoding (M = 1..16: BLOCK_M = 16, a tile streams its packed weights once)
and prefill (larger M: bigger tiles reuse each unpacked weight for more rows).
Run on CPU with TRITON_INTERPRET=1 set before this module is imported (tests do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def w4a16_kernel(
    # pointers
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    # dimensions
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        qw = tl.load(qweight_ptr + (k[:, None] // 8) * stride_qk + offs_n[None, :] * stride_qn, mask=mask_kn, other=0)
        q = (qw >> ((k[:, None] % 8) * 4)) & 0xF
        g = tl.load(g_idx_ptr + k, mask=mask_k, other=0)
        s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask_kn, other=0.0)
        zw = tl.load(qzeros_ptr + g[:, None] * stride_zg + (offs_n[None, :] // 8) * stride_zn, mask=mask_kn, other=0)
        z = ((zw >> ((offs_n[None, :] % 8) * 4)) & 0xF) + 1  # GPTQ v1 stores zero - 1
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, w)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Autotune lists, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps). tl.dot needs every block >= 16.
# Decoding (M <= 16): one row-block, wide K steps: each program streams its packed columns once.
SKINNY_CONFIGS = [(16, 64, 64, 4), (16, 128, 64, 4), (16, 64, 128, 4), (16, 32, 128, 2)]
# Prefill: square-ish tiles reuse every unpacked weight for many rows.
GEMM_CONFIGS = [(64, 64, 32, 4), (64, 128, 32, 4), (128, 128, 32, 8), (128, 64, 64, 4)]


def block_sizes(M: int) -> tuple[int, int, int]:
    """The fixed blocks used where there is no autotuning (the CPU interpreter): the lists' first."""
    return (SKINNY_CONFIGS if M <= 16 else GEMM_CONFIGS)[0][:3]


def _autotuned(configs):
    return triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                            for m, n, k, w in configs], key=["N", "K"])(w4a16_kernel)


_TUNED = {}  # "skinny" / "gemm" -> autotuned kernel, built on first GPU use


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T -> (..., N) in x's dtype, W in the 4-bit GPTQ v1 layout."""
    # (1) check
    K, N = g_idx.numel(), scales.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects K = {K}")
    if qweight.shape != (K // 8, N) or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 of shape ({K // 8}, {N}) for 4 bits, got {tuple(qweight.shape)} {qweight.dtype}")
    if qzeros.shape != (scales.shape[0], N // 8):
        raise ValueError(f"qzeros must have shape ({scales.shape[0]}, {N // 8}), got {tuple(qzeros.shape)}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    # (2) allocate
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # (3) launch: autotuned on a GPU, fixed blocks in the interpreter
    args = (x2, qweight, qzeros, scales, g_idx, out, M, N, K, x2.stride(0), x2.stride(1), qweight.stride(0),
            qweight.stride(1), qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1))
    if x.is_cuda:
        path = "skinny" if M <= 16 else "gemm"
        if path not in _TUNED:
            _TUNED[path] = _autotuned(SKINNY_CONFIGS if path == "skinny" else GEMM_CONFIGS)
        _TUNED[path][lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](*args)
    else:
        BM, BN, BK = block_sizes(M)
        w4a16_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](*args, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], N)
