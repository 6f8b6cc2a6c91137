"""A 4-bit tensor-core kernel for small batches (about 5 to 64 rows): each word loaded once, no converts.

Derived in notebooks/06_dequant_matmul_kernels.ipynb. Between the GEMV (1-4 rows) and a large batch
(where cuBLAS on dequantized weights wins), a few rows of x still make the layer memory-bound, but
8 to 64 multiply-adds per weight are too many for the CUDA cores: the tensor cores do them.

Which operand goes on the MMA's tall side? Marlin and tinygemm put the weights there (out^T = W x^T)
because an MMA is 16 rows tall (64 on Hopper's wgmma) and 8 rows of x would fill half of it. In
Triton the same swap measured worse: the weights, unpacked along N in registers, then reach the
MMA's A operand through shared memory 2 bytes at a time (9.1 against 4.7 SASS instructions per
weight at M = 16 on sm_90, minquant.bench.sass). So x stays the A operand and Triton uses 16-row MMAs.

Each int32 word is loaded once, as a (CHUNK_W, BLOCK_N) tile of 16-byte loads along N. Its nibble j
holds the weights of inputs k = 8 kw + j, for every word row kw of the tile. A dot product may sum
over K in any order, as long as both operands use the same one, so instead of interleaving the 8
nibbles back into K order the kernel does 8 dots of depth CHUNK_W: nibble j of the weights against
inputs 8 kw + j of x (x loaded 16 bytes at a time, then split into the 8 planes in registers). Unpacking is the GEMV's magic-number
trick (q - zero exactly, no convert from integer), then one fp32 -> fp16 pack per two weights for
the MMA. A step covers 8 x CHUNK_W = 128 inputs inside one group, so the scale multiplies the
partial product once per column per step.

Needs groups of at least 128 inputs (a dot is at least 16 deep, 16 words x 8 = 128): g128 and
per-channel. Smaller groups take the fused kernel (triton_w4a16.py) or dequantize + cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minquant.kernels.triton_gemv import MAGIC, NIBBLE_SHIFT, minus_zero

CHUNK_W = 16  # words of K per step: the dots' depth


@triton.jit
def _nibble_minus_zero(w, p: tl.constexpr, magic, zero):
    """q - zero for nibble p (0-4) of every word: OR it into the mantissa of 2**(23-4p), subtract 2**(23-4p) + zero."""
    m = magic - ((4 * p) << 23)                   # the bits of 2**(23 - 4p)
    return minus_zero(w, 0xF << (4 * p), m, m.to(tl.float32, bitcast=True) + zero)


@triton.jit
def _x_planes(x_ptr, kw, offs_m, stride_xm, mask_m):
    """x's 128 inputs of this step as 8 planes (BLOCK_M, 16): plane j holds inputs 8 kw + j. One
    contiguous load (16 bytes per row and word), then split in registers."""
    eight = tl.arange(0, 8)
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + (kw * 8)[None, :, None] + eight[None, None, :],
                mask=mask_m[:, None, None], other=0.0)                      # (BLOCK_M, 16, 8)
    x = tl.reshape(x, (x.shape[0], 16, 2, 2, 2))                          # j = 4a + 2b + c
    lo_c, hi_c = tl.split(x)                                              # c = 0, 1
    c0b0, c0b1 = tl.split(lo_c)
    c1b0, c1b1 = tl.split(hi_c)
    x0, x4 = tl.split(c0b0)
    x2, x6 = tl.split(c0b1)
    x1, x5 = tl.split(c1b0)
    x3, x7 = tl.split(c1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def tc_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr,
    M, N, n_chunks, magic, shift, stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m, mask_n = offs_m < M, offs_n < N
    if EVEN_N:
        nn = offs_n
    else:                                      # ragged N: read a valid column, never store it
        nn = tl.minimum(offs_n, N - 1)
    words = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt = x_ptr.dtype.element_ty
    for c in range(pid_k, n_chunks, SPLIT_K):
        g = c // GROUP_CHUNKS
        s = tl.load(scales_ptr + g * stride_sg + nn).to(tl.float32)[None, :]
        zw = tl.load(qzeros_ptr + g * stride_zg + nn // 8)
        z = minus_zero(zw >> ((nn % 8) * 4), 0xF, magic, 8388607.0)[None, :]
        kw = c * 16 + words
        w = tl.load(qweight_ptr + kw[:, None] * stride_qk + nn[None, :], eviction_policy="evict_first")  # (16, BLOCK_N)
        wh = w >> shift
        planes = _x_planes(x_ptr, kw, offs_m, stride_xm, mask_m)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):  # nibble j: inputs 8 kw + j; nibbles 5-7 from the shifted word
            if j < 5:
                q_minus_zero = _nibble_minus_zero(w, j, magic, z)
            else:
                q_minus_zero = _nibble_minus_zero(wh, j - 3, magic, z)
            part = tl.dot(planes[j], q_minus_zero.to(dt), part, input_precision=PRECISION)
        acc += s * part                                           # q - zero are integers: exact in fp16/bf16
    if HAS_BIAS:
        acc += tl.load(bias_ptr + nn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages). One stage: the weights are unpacked in registers
# on their way to the MMA, and the pipeliner's asynchronous copies would route them through shared
# memory as 4-byte pieces (more instructions per weight, measured with minquant.bench.sass).
CONFIGS = [(16, 128, 1, 4, 1), (16, 256, 1, 4, 1), (16, 256, 1, 8, 1), (32, 128, 1, 4, 1), (32, 256, 1, 8, 1),
           (64, 128, 1, 8, 1), (16, 128, 2, 4, 1), (16, 128, 4, 4, 1)]  # (64, 256, ...) and (64, 128, 1, 4) spill
DEFAULT_CONFIG = CONFIGS[0]


def first_config(M: int):
    """The first configuration without split-K whose BLOCK_M covers M (what the figures are quoted for)."""
    return next(c for c in CONFIGS if c[0] >= M and c[2] == 1)


def supports(M: int, K: int, group_size: int | None) -> bool:
    """Contiguous groups of >= 128 inputs made of whole 16-word steps, K a multiple of 128."""
    if group_size is None or K % 128:
        return False
    return group_size == -1 or group_size >= K or group_size % 128 == 0


def launch_args(M: int, K: int, N: int, group_size: int, config) -> dict:
    block_m, block_n, split, warps, stages = config
    n_chunks = K // 128
    per_group = n_chunks if group_size == -1 or group_size >= K else group_size // 128
    return {"n_chunks": n_chunks, "grid": (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split),
            "num_warps": warps, "num_stages": stages,
            "constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_CHUNKS": per_group, "SPLIT_K": split,
                           "EVEN_N": N % block_n == 0}}


def w4_tc_matmul(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int, out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """x2 (M, K) fp16/bf16/fp32 @ dequant(W)^T (+ bias) -> (M, N); W 4-bit GPTQ v1 with contiguous groups."""
    from minquant.kernels.triton_gemv import output_buffers

    M, K = x2.shape
    N = scales.shape[1]
    if not supports(M, K, group_size):
        raise ValueError(f"the tensor-core kernel needs K and the groups in multiples of 128 inputs, not K={K}, "
                         f"group_size={group_size}")
    config = config or (tuned_config(x2, qweight, qzeros, scales, group_size) if x2.is_cuda else DEFAULT_CONFIG)
    a = launch_args(M, K, N, group_size, config)
    out, acc = output_buffers(M, N, x2.dtype, x2.device, config[2], out)
    tc_kernel[a["grid"]](x2, qweight, qzeros, scales, bias if bias is not None else scales, acc, M, N, a["n_chunks"],
                         MAGIC, NIBBLE_SHIFT, x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                         acc.stride(0), **a["constexprs"], HAS_BIAS=bias is not None,
                         PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",  # fp32 x: no TF32 rounding
                         num_warps=a["num_warps"], num_stages=a["num_stages"])
    if acc is not out:
        out.copy_(acc)
    return out


_BEST: dict = {}


def tuned_config(x2, qweight, qzeros, scales, group_size: int):
    """The fastest of CONFIGS for this shape and power of two of M, timed once (CUDA graphs), cached."""
    from minquant.kernels.timing import fastest

    (M, K), N = x2.shape, scales.shape[1]
    key = (triton.next_power_of_2(M), K, N, group_size, x2.dtype, x2.device)
    if key not in _BEST:
        candidates = {c: (lambda c=c: w4_tc_matmul(x2, qweight, qzeros, scales, None, group_size, config=c))
                      for c in CONFIGS}
        _BEST[key] = fastest(candidates, f"tensor-core configuration for M={M}, K={K}, N={N}")
    return _BEST[key]
