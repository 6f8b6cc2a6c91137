"""A 4-bit GEMV for decoding (1 to 4 rows of x) in Triton: each packed word read once, no converts.

Derived in notebooks/06_dequant_matmul_kernels.ipynb. At batch 1 a layer's time is the time to read
its weights, and the GPU must unpack them as fast as memory delivers them: 8192 x 8192 4-bit weights
are 32 MB, 10 us at H100 speed, and 67 M weights in 10 us leave about 4 instructions per weight on
the whole chip. So every instruction per weight counts, and this kernel spends 3:

    LOP3   (word & 0xF << 4p) | exponent bits   one logic op puts nibble p into a float's mantissa
    FADD   that float - (2**e + zero)           exact: the float *is* 2**e + q, so this is q - zero
    FFMA   t += x[k] * (q - zero)                the multiply-add itself

The magic-number trick (as in tinygemm and Marlin): OR an integer q < 2**23 into the mantissa of
2**23 and the float's value is 2**23 + q, so `float - 2**23` is q with no int-to-float convert (a
convert runs at a quarter of the FMA rate). Nibble p of a word sits at bits 4p..4p+3, so instead of
shifting it down we OR it into 2**(23 - 4p), whose mantissa's last bit is worth 2**(-4p): the float
is again 2**(23-4p) + q. Nibbles 0-4 fit (bit 23 is the exponent's); one shift by 12 brings 5-7 to
positions 2-4. The zero-point is folded into the subtracted constant, so there is no `- z * sum(x)`
term, and the scale multiplies once per column per group: y = sum_groups s * sum_k x[k] (q - z).

Each program owns BLOCK_N output columns and reads all of K for them (split-K only for small N),
so columns are summed inside the program: no atomic adds, no zeroed output, one launch per call.
Its SLOTS lanes of K each take a chunk of CHUNK_W words (within one group) at a time, so each
thread applies one scale and zero to 4 x CHUNK_W words. Weights are read with an evict-first hint
(they are used once; x should stay in cache). Act-order checkpoints arrive with their input rows
sorted by group (minquant.kernels.prepare), and x is read through that permutation.

Run on CPU with TRITON_INTERPRET=1 set before this module is imported (tests do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 4          # rows of x handled by one program: each unpacked weight is used for every row
MAGIC = 0x4B000000  # the bits of float 2**23
NIBBLE_SHIFT = 12  # brings nibbles 5-7 to positions 2-4; passed at run time (see the kernel)


@triton.jit
def minus_zero(w, mask, magic, offset):
    """(w's nibble under `mask`) - zero, as fp32: OR the nibble into the mantissa of `magic`, subtract."""
    return (w & mask | magic).to(tl.float32, bitcast=True) - offset


@triton.jit
def _x_halves(p, i):
    """Two fp16 inputs from one 32-bit load, as fp32 columns (one load instead of two)."""
    v = tl.load(p + i)
    lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo[:, None], hi[:, None]


@triton.jit
def _x_at(x_row, perm_ptr, k8, i, PERMUTED: tl.constexpr):
    if PERMUTED:  # act-order: sorted row k8 + i of the weights is row perm[k8 + i] of x
        return tl.load(x_row + tl.load(perm_ptr + k8 + i)).to(tl.float32)[:, None]
    return tl.load(x_row + k8 + i).to(tl.float32)[:, None]


@triton.jit
def _word_dot(t, x_row, perm_ptr, kw, f0, f1, f2, f3, f4, f5, f6, f7, PERMUTED: tl.constexpr):
    """t + sum_i x[8 kw + i] * f_i: one row of x against the 8 unpacked weights of each word."""
    k8 = kw * 8
    if x_row.dtype.element_ty == tl.float16 and not PERMUTED:
        p = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + kw * 4
        x0, x1 = _x_halves(p, 0)
        x2, x3 = _x_halves(p, 1)
        x4, x5 = _x_halves(p, 2)
        x6, x7 = _x_halves(p, 3)
    else:
        x0 = _x_at(x_row, perm_ptr, k8, 0, PERMUTED)
        x1 = _x_at(x_row, perm_ptr, k8, 1, PERMUTED)
        x2 = _x_at(x_row, perm_ptr, k8, 2, PERMUTED)
        x3 = _x_at(x_row, perm_ptr, k8, 3, PERMUTED)
        x4 = _x_at(x_row, perm_ptr, k8, 4, PERMUTED)
        x5 = _x_at(x_row, perm_ptr, k8, 5, PERMUTED)
        x6 = _x_at(x_row, perm_ptr, k8, 6, PERMUTED)
        x7 = _x_at(x_row, perm_ptr, k8, 7, PERMUTED)
    t += x0 * f0
    t += x1 * f1
    t += x2 * f2
    t += x3 * f3
    t += x4 * f4
    t += x5 * f5
    t += x6 * f6
    t += x7 * f7
    return t


@triton.jit
def gemv_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, perm_ptr, out_ptr,
    # n_chunks: K / (8 CHUNK_W); magic, shift: MAGIC and NIBBLE_SHIFT, as run-time values so that the
    # compiler keeps one LOP3 per weight (it cannot fuse two immediates into one LOP3, nor fold the shift)
    N, n_chunks, magic, shift,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, CHUNK_W: tl.constexpr,
    GROUP_CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    PERMUTED: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.arange(0, SLOTS)
    m1, m2, m3, m4 = magic - (4 << 23), magic - (8 << 23), magic - (12 << 23), magic - (16 << 23)  # 2**19 ... 2**7
    acc0 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
    for c0 in range(pid_k * SLOTS, n_chunks, SLOTS * SPLIT_K):
        c = c0 + slot                                          # the chunk each K-lane works on
        if EVEN:
            cc, nn = c, offs_n
        else:  # ragged edges: read a valid chunk and column instead, and give it scale 0
            cc, nn = tl.minimum(c, n_chunks - 1), tl.minimum(offs_n, N - 1)
        g = (cc // GROUP_CHUNKS)[:, None]                      # its group (a chunk lies inside one)
        s = tl.load(scales_ptr + g * stride_sg + nn[None, :]).to(tl.float32)
        if not EVEN:
            s = tl.where((c < n_chunks)[:, None] & (offs_n < N)[None, :], s, 0.0)
        zw = tl.load(qzeros_ptr + g * stride_zg + (nn // 8)[None, :])
        z = minus_zero(zw >> ((nn % 8) * 4)[None, :], 0xF, magic, 8388607.0)  # zero = stored + 1 (GPTQ v1)
        z0, z1, z2, z3, z4 = z + 8388608.0, z + 524288.0, z + 32768.0, z + 2048.0, z + 128.0  # 2**(23-4p) + zero
        t0 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
        t1 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
        t2 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
        t3 = tl.zeros((SLOTS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(CHUNK_W):
            kw = cc * CHUNK_W + j                              # the word row, (SLOTS,)
            w = tl.load(qweight_ptr + kw[:, None] * stride_qk + nn[None, :], eviction_policy="evict_first")
            wh = w >> shift
            f0, f1 = minus_zero(w, 0xF, magic, z0), minus_zero(w, 0xF0, m1, z1)
            f2, f3 = minus_zero(w, 0xF00, m2, z2), minus_zero(w, 0xF000, m3, z3)
            f4, f5 = minus_zero(w, 0xF0000, m4, z4), minus_zero(wh, 0xF00, m2, z2)
            f6, f7 = minus_zero(wh, 0xF000, m3, z3), minus_zero(wh, 0xF0000, m4, z4)
            t0 = _word_dot(t0, x_ptr, perm_ptr, kw, f0, f1, f2, f3, f4, f5, f6, f7, PERMUTED)
            if BLOCK_M > 1:
                t1 = _word_dot(t1, x_ptr + stride_xm, perm_ptr, kw, f0, f1, f2, f3, f4, f5, f6, f7, PERMUTED)
            if BLOCK_M > 2:
                t2 = _word_dot(t2, x_ptr + 2 * stride_xm, perm_ptr, kw, f0, f1, f2, f3, f4, f5, f6, f7, PERMUTED)
            if BLOCK_M > 3:
                t3 = _word_dot(t3, x_ptr + 3 * stride_xm, perm_ptr, kw, f0, f1, f2, f3, f4, f5, f6, f7, PERMUTED)
        acc0 += s * t0                                         # the scale: once per column per chunk
        if BLOCK_M > 1:
            acc1 += s * t1
        if BLOCK_M > 2:
            acc2 += s * t2
        if BLOCK_M > 3:
            acc3 += s * t3
    _finish(acc0, 0, offs_n, bias_ptr, out_ptr, N, stride_om, pid_k, SPLIT_K, HAS_BIAS)
    if BLOCK_M > 1:
        _finish(acc1, 1, offs_n, bias_ptr, out_ptr, N, stride_om, pid_k, SPLIT_K, HAS_BIAS)
    if BLOCK_M > 2:
        _finish(acc2, 2, offs_n, bias_ptr, out_ptr, N, stride_om, pid_k, SPLIT_K, HAS_BIAS)
    if BLOCK_M > 3:
        _finish(acc3, 3, offs_n, bias_ptr, out_ptr, N, stride_om, pid_k, SPLIT_K, HAS_BIAS)


@triton.jit
def _finish(acc, m, offs_n, bias_ptr, out_ptr, N, stride_om, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Sum the K-lanes (once, at the end), add the bias, write row m (atomically when K is split)."""
    y = tl.sum(acc, axis=0)
    mask_n = offs_n < N
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)
    ptrs = out_ptr + m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)


# (BLOCK_N, SLOTS, SPLIT_K, num_warps). SLOTS x 4-column lanes: 4 warps of 32 lanes cover
# BLOCK_N / 4 columns times SLOTS chunks. Split-K only helps where N / BLOCK_N programs cannot fill
# the GPU (small layers); it needs a zeroed output and atomic adds, so it must earn its place.
CONFIGS = [(32, 16, 1, 4), (64, 8, 1, 4), (64, 16, 1, 8), (16, 32, 1, 4), (128, 8, 1, 8),
           (32, 16, 2, 4), (32, 16, 4, 4), (16, 32, 4, 4)]
DEFAULT_CONFIG = CONFIGS[0]  # the interpreter's (no autotuning on CPU)


def chunk_words(words_per_group: int, n_words: int) -> int:
    """CHUNK_W: the words a K-lane reads per step, the largest power of two <= 16 dividing a group and K."""
    cw = 16
    while cw > 1 and (words_per_group % cw or n_words % cw):
        cw //= 2
    return cw


def supports(M: int, K: int, group_size: int | None) -> bool:
    """Can the GEMV take this call? 1-4 rows, and groups made of whole words (group_size known)."""
    return 1 <= M <= MAX_M and group_size is not None and (group_size == -1 or group_size >= K or group_size % 8 == 0)


def launch_args(M: int, K: int, N: int, group_size: int, config) -> dict:
    """The kernel's shape arguments and constexprs for a call (tests read them to compile for a GPU)."""
    block_n, slots, split, warps = config
    n_words = K // 8
    wpg = n_words if group_size == -1 or group_size >= K else group_size // 8
    cw = chunk_words(wpg, n_words)
    n_chunks = n_words // cw
    return {"n_chunks": n_chunks, "grid": (triton.cdiv(N, block_n), split), "num_warps": warps,
            "constexprs": {"BLOCK_M": M, "BLOCK_N": block_n, "SLOTS": slots, "CHUNK_W": cw, "GROUP_CHUNKS": wpg // cw,
                           "SPLIT_K": split, "EVEN": N % block_n == 0 and n_chunks % (slots * split) == 0}}


def w4_gemv(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            bias: torch.Tensor | None, group_size: int, perm: torch.Tensor | None = None,
            out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """x2 (M <= 4, K) @ dequant(W)^T (+ bias) -> (M, N) in x2's dtype; W 4-bit GPTQ v1, groups contiguous.

    perm: for act-order layers prepared by minquant.kernels.prepare, the int32 input order of
    qweight's rows (sorted by group); None when the rows are in x's order."""
    M, K = x2.shape
    N = scales.shape[1]
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dimension (stride {t.stride()}); "
                             f"call .contiguous() once when loading it")
    if x2.stride(1) != 1 or x2.stride(0) % 2 or x2.storage_offset() % 2:
        x2 = x2.contiguous()  # the fp16 path reads x two at a time: rows must start 4-byte aligned
    config = config or (tuned_config(x2, qweight, qzeros, scales, group_size) if x2.is_cuda else DEFAULT_CONFIG)
    a = launch_args(M, K, N, group_size, config)
    split = config[2]
    out, acc = output_buffers(M, N, x2.dtype, x2.device, split, out)
    gemv_kernel[a["grid"]](x2, qweight, qzeros, scales, bias if bias is not None else scales,
                           perm if perm is not None else qweight, acc, N, a["n_chunks"], MAGIC, NIBBLE_SHIFT,
                           x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), acc.stride(0),
                           **a["constexprs"], HAS_BIAS=bias is not None, PERMUTED=perm is not None,
                           num_warps=a["num_warps"], num_stages=1)
    if acc is not out:
        out.copy_(acc)
    return out


def output_buffers(M: int, N: int, dtype: torch.dtype, device, split: int, out: torch.Tensor | None = None):
    """(out, the buffer the kernel writes). Without split-K they are one tensor, left uninitialised: the
    kernel writes every element, so there is no memset and no copy. Split-K adds into the buffer, which
    must start at zero; bf16 (8-bit mantissa) would round every add, so it adds in fp32, cast once after."""
    if out is None:
        out = torch.empty(M, N, dtype=dtype, device=device)
    if split == 1:
        return out, out
    if out.dtype == torch.bfloat16:
        return out, torch.zeros(M, N, dtype=torch.float32, device=device)
    return out, out.zero_()


_BEST: dict = {}  # (M, K, N, group_size, dtype, device) -> the fastest config, measured on first use


def tuned_config(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int):
    """The fastest of CONFIGS for this call's shape on this GPU: each timed once on the call's own
    tensors (as CUDA graphs, so Python's launch is not what is ranked), the winner cached per shape."""
    from minquant.kernels.timing import fastest

    (M, K), N = x2.shape, scales.shape[1]
    key = (M, K, N, group_size, x2.dtype, x2.device)
    if key not in _BEST:
        # split-K only where N / BLOCK_N programs are too few: otherwise no memset and atomics are needed
        candidates = {c: (lambda c=c: w4_gemv(x2, qweight, qzeros, scales, None, group_size, config=c))
                      for c in CONFIGS if c[2] == 1 or triton.cdiv(N, c[0]) < 128}
        _BEST[key] = fastest(candidates, f"GEMV configuration for M={M}, K={K}, N={N}")
    return _BEST[key]
