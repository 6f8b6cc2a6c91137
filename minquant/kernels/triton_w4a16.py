"""A fused W4A16 dequantize-and-multiply kernel in Triton: y = x @ dequant(qweight)^T.

Derived in notebooks/06_dequant_matmul_kernels.ipynb. What you will learn here:
    * how a kernel reads GPTQ's packed int32 words and unpacks 8 weights from each in registers,
    * why it never writes the float weights to memory (the point of weight-only quantization:
      decoding is memory-bound, so bytes read are time),
    * why the scale and zero-point are applied to the *product*, per output column, not to every weight
      on the tensor-core path (fewer instructions per weight: unpacking competes with memory for time),
    * split-K: at batch 1 there are too few output tiles to keep every SM streaming, so several
      programs share one tile's K range and add their partial sums atomically,
    * how act-order (a permuted g_idx) still works: scales and zeros gathered per input row.

The blocked algorithm, for one (BLOCK_M x BLOCK_N) tile of the output and one of SPLIT_K slices of K:

    acc = zeros                                               # fp32 accumulator
    for k0 in this slice's K-steps (every SPLIT_K-th block of BLOCK_K inputs):
        qw = qweight[k // 8, n-tile] for k in k0..k0+BLOCK_K  # each int32 holds 8 inputs of one column
        q  = (qw >> 4 * (k % 8)) & 0xF                        # the 4-bit integers, (BLOCK_K, BLOCK_N)
        s, z = scales, zeros of the step's group              # one row when groups are contiguous runs
                                                              # (no act-order); else gathered via g_idx
        if BLOCK_M == 1:  acc += x[k, None] * ((q - z) * s)   # CUDA cores; sum over K at the end
        else:             acc += (x @ q - rowsum(x) * z) * s  # tensor cores; = x @ ((q - z) * s)
    Y[m-tile, n-tile] (+)= acc                                # atomic add when SPLIT_K > 1

Two autotuned paths share the kernel: decoding (M <= 16: one-row programs or BLOCK_M = 16, split-K,
each weight read once per program) and prefill (larger M: bigger tiles reuse each unpacked weight
for more rows, tl.dot).
Run on CPU with TRITON_INTERPRET=1 set before this module is imported (tests do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from minquant.kernels.timing import graph_time_ms


@triton.jit(do_not_specialize=["M", "m_bucket"])  # one compiled kernel for every batch size, not M == 1 apart
def w4a16_kernel(
    # pointers
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
    # dimensions; group_k: inputs per group when GROUPED (per-channel: K); m_bucket: the autotune key for M
    M, N, K, group_k, m_bucket,
    # strides
    stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, stride_om, stride_on,
    # meta-parameters
    GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    zero_shift = (offs_n % 8) * 4                                    # qzeros packs 8 output columns per word
    if BLOCK_M == 1:  # one row of x: multiply-add on the CUDA cores, reduce over K once at the end
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:             # several rows: tl.dot on the tensor cores
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        mask_kn = mask_k[:, None] & mask_n[None, :]
        # each int32 holds 8 inputs of one column: the 8 rows k of a word load the same address (one
        # memory transaction, served by L1), and each shifts its own nibble out
        qw = tl.load(qweight_ptr + (k[:, None] // 8) * stride_qk + offs_n[None, :] * stride_qn, mask=mask_kn, other=0)
        q = (qw >> ((k[:, None] % 8) * 4)) & 0xF                                      # (BLOCK_K, BLOCK_N)
        if GROUPED:  # the whole K-step lies in one group: scale and zero are one row
            g = k0 // group_k
            s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            zw = tl.load(qzeros_ptr + g * stride_zg + (offs_n // 8) * stride_zn, mask=mask_n, other=0)
            z = (((zw >> zero_shift) & 0xF) + 1).to(tl.float32)[None, :]              # GPTQ v1 stores zero - 1
        else:        # act-order: every input row has its own group
            g = tl.load(g_idx_ptr + k, mask=mask_k, other=0)
            s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask_kn, other=0.0)
            zw = tl.load(qzeros_ptr + g[:, None] * stride_zg + (offs_n[None, :] // 8) * stride_zn, mask=mask_kn, other=0)
            s, z = s.to(tl.float32), (((zw >> zero_shift[None, :]) & 0xF) + 1).to(tl.float32)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + pid_m * stride_xm + k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            acc += x[:, None] * ((q.to(tl.float32) - z) * s)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if GROUPED:  # x @ ((q - z) * s) = (x @ q - rowsum(x) z) * s: unpack only, scale per column
                x_sum = tl.sum(x.to(tl.float32), axis=1)[:, None]
                acc += (tl.dot(x, q.to(x.dtype)) - x_sum * z) * s                      # q in 0..15: exact
            else:
                acc += tl.dot(x, ((q.to(tl.float32) - z) * s).to(x.dtype))
    if BLOCK_M == 1:
        result = tl.sum(acc, axis=0)[None, :]                                         # (1, BLOCK_N)
    else:
        result = acc
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:            # the output was zeroed; each K-slice adds its part
        tl.atomic_add(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_out)


# Autotune lists, (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages).
# Decoding (M <= 16). BLOCK_M = 1: one program per row of x, multiply-adds on the CUDA cores, many
# small K-slices (as GemLite's GEMV does): thousands of programs keep every SM streaming weights.
# BLOCK_M = 16: tl.dot (blocks >= 16), all rows at once, each weight read once.
SKINNY_CONFIGS = [(1, 128, 32, 32, 4, 1), (1, 256, 32, 16, 4, 2), (1, 64, 64, 16, 2, 2),
                  (16, 64, 64, 8, 4, 3), (16, 128, 64, 4, 4, 3), (16, 64, 128, 4, 4, 3)]
# Prefill: square-ish tiles reuse every unpacked weight for many rows.
GEMM_CONFIGS = [(64, 64, 32, 1, 4, 3), (64, 128, 32, 1, 4, 3), (128, 128, 32, 1, 8, 3),
                (128, 64, 64, 1, 4, 3), (64, 128, 64, 1, 4, 4), (128, 256, 64, 1, 8, 3)]
SKINNY_MAX_M = 16


def block_sizes(M: int) -> tuple[int, int, int]:
    """The fixed blocks used where there is no autotuning (the CPU interpreter): the lists' first."""
    return (SKINNY_CONFIGS if M <= SKINNY_MAX_M else GEMM_CONFIGS)[0][:3]


def fast_path_block_k(group_size: int | None, K: int) -> int:
    """The largest BLOCK_K (a power of two, 16..256) that stays inside one group, or 0: use g_idx.

    group_size None means act-order (or unknown): groups are not contiguous runs. Per-channel
    (group_size -1, or >= K) puts all of K in one group, so any BLOCK_K does."""
    if group_size is None:
        return 0
    if group_size == -1 or group_size >= K:
        return 256
    bk = 256
    while bk >= 16 and group_size % bk:
        bk //= 2
    return bk if bk >= 16 else 0


def _zero_out(nargs):
    nargs["out_ptr"].zero_()  # split-K programs add into the output: it must start at zero


def _autotune_bench(kernel_call, quantiles):
    """The autotuner's timer: graph-timed, so configurations are ranked by GPU time, not launch overhead."""
    try:
        ms = graph_time_ms(kernel_call)
    except Exception as e:  # compile failures go back to the autotuner (it skips that config)
        if type(e).__name__ in ("OutOfResources", "CompileTimeAssertionFailure", "PTXASError"):
            raise
        ms = triton.testing.do_bench(kernel_call)  # a launch that cannot be captured: time it eagerly
    return [ms] * len(quantiles) if quantiles else ms


def _autotuned(configs, max_block_k: int):
    """An autotuned kernel over `configs` with BLOCK_K capped (one group per K-step); duplicates dropped."""
    seen, tconfigs = set(), []
    for m, n, k, split, warps, stages in configs:
        k = min(k, max_block_k) if max_block_k else k
        if (m, n, k, split, warps, stages) in seen:
            continue
        seen.add((m, n, k, split, warps, stages))
        tconfigs.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split},
                                      num_warps=warps, num_stages=stages,
                                      pre_hook=_zero_out if split > 1 else None))
    return triton.autotune(tconfigs, key=["m_bucket", "N", "K", "GROUPED"], do_bench=_autotune_bench)(w4a16_kernel)


_TUNED = {}  # (path, BLOCK_K cap) -> autotuned kernel, built on first GPU use


def tuned_config(M: int, K: int, group_size: int | None):
    """The configuration the autotuner last ran for calls like this one (None before any GPU call)."""
    kernel = _TUNED.get(("skinny" if M <= SKINNY_MAX_M else "gemm", fast_path_block_k(group_size, K)))
    return getattr(kernel, "best_config", None)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 group_size: int | None = None, blocks: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T -> (..., N) in x's dtype, W in the 4-bit GPTQ v1 layout.

    group_size: pass it (-1 for per-channel) only when g_idx is the contiguous k // group_size (no
    act-order, as QuantLinear checks): the kernel then reads one row of scales per K-step and skips
    g_idx. Without it the kernel gathers scales through g_idx, which is always correct.
    blocks: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) instead of autotuning (tests run every autotune
    configuration this way in the interpreter; BLOCK_K is still capped to stay inside one group)."""
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
    block_k_cap = fast_path_block_k(group_size, K)
    group_k = K if group_size in (-1, None) or group_size >= K else group_size
    # (2) allocate. Split-K adds partial sums into the output; in bf16 (8 bits of mantissa) each add
    # rounds, so bf16 decoding accumulates in an fp32 buffer and casts once at the end.
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    may_split = (blocks[3] > 1) if blocks else (x.is_cuda and M <= SKINNY_MAX_M)
    acc_out = torch.empty(M, N, dtype=torch.float32, device=x.device) if may_split and x.dtype == torch.bfloat16 else out
    # (3) launch: autotuned on a GPU, fixed blocks in the interpreter
    m_bucket = triton.next_power_of_2(M)  # retune per power of two of M, not for every prompt length
    args = (x2, qweight, qzeros, scales, g_idx, acc_out, M, N, K, group_k, m_bucket, x2.stride(0), x2.stride(1),
            qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1), scales.stride(0),
            scales.stride(1), acc_out.stride(0), acc_out.stride(1))
    if x.is_cuda and blocks is None:
        path = "skinny" if M <= SKINNY_MAX_M else "gemm"
        if (path, block_k_cap) not in _TUNED:
            _TUNED[path, block_k_cap] = _autotuned(SKINNY_CONFIGS if path == "skinny" else GEMM_CONFIGS, block_k_cap)
        _TUNED[path, block_k_cap][lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]),
                                                meta["SPLIT_K"])](*args, GROUPED=block_k_cap > 0)
    else:
        BM, BN, BK, split = blocks or (*block_sizes(M), 1)
        BK = min(BK, block_k_cap) if block_k_cap else BK
        if split > 1:
            acc_out.zero_()
        w4a16_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN), split)](*args, GROUPED=block_k_cap > 0, BLOCK_M=BM,
                                                                       BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=split)
    if acc_out is not out:
        out.copy_(acc_out)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], N)
