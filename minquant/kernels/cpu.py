"""QuantLinear on the CPU: a C kernel that reads each packed weight once, and dequantize + BLAS for many rows.

Decoding reads every weight once per token, so on a CPU too a 4-bit layer should beat fp32 by the
ratio of bytes (8x fewer for 4 bits), as llama.cpp's 4-bit formats do. The reference
(`kernels/reference.py`) cannot: it unpacks and dequantizes the whole weight on every call. Two paths:

    gemv     1 to a few rows (decoding): cpu_kernels.c sums x * q per group straight from the packed
             words (one AND, one int->float and one FMA per weight, VW columns at a time) and applies
             s * (sum x q) - z s * (sum x) once per column per group
    dequant  many rows (prefill): the same C file dequantizes into a float buffer reused across calls
             (one per layer shape), and torch's matmul (MKL / oneDNN) does the rest

Which one a layer takes is measured, once per power of two of the row count and layer shape, as
the GPU kernels' large-batch choice is (`kernels/__init__.py`). torch.compile was measured too
(see the README's CPU table): Inductor vectorizes the unpacking along the 8 nibbles of a word, or
materializes the products, and stays slower than this loop, so the kernel is plain C.

The C source is compiled at first use with the machine's C compiler (`$CC`, else cc / gcc: the one
torch.compile's CPU backend also needs), for this CPU (-march=native, OpenMP threads as many as
torch uses), and cached on disk ($MINQUANT_CACHE or ~/.cache/minquant, keyed by source, flags and
CPU), so later runs load it in milliseconds. Without a compiler, or with MINQUANT_CPU_KERNELS=off,
QuantLinear warns once and uses the reference: slower, same results.

What a layer needs is derived once from its GPTQ buffers and cached on it (like kernels/prepare.py
for the GPU): the words re-laid in tiles of columns (cpu_kernels.c explains why), 3-bit weights
widened to 4 bits (their values straddle words; reading 4 bits a weight costs a third more bytes
and keeps one kernel), act-order rows sorted by group (x is gathered through the same permutation
on each call), fp32 scales, zero-points and their product. That is a second copy of the packed
weights (half a byte a weight at 4 bits), beside the checkpoint buffers, which stay as they are.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from minquant.cache import cache_root
from minquant.kernels.prepare import group_order, version
from minquant.packing import pack, unpack

SOURCE = Path(__file__).with_name("cpu_kernels.c")
PATHS = ("gemv", "dequant")
KERNEL_BITS = (2, 4, 8)   # 3-bit layers are widened to 4 bits for the kernel


# ---------------------------------------------------------------------------------------------
# Building and loading the C library
# ---------------------------------------------------------------------------------------------

@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def vector_width() -> int:
    """fp32 lanes the kernel's vectors hold: 16 with AVX-512, else 8 (AVX2, and the compiler splits as needed)."""
    return 16 if "avx512f" in cpu_flags() else 8


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cache_dir() -> Path:
    root = cache_root()  # MINQUANT_CACHE=off: built afresh in a temporary folder each process
    return Path(tempfile.mkdtemp(prefix="minquant-cpu-")) if root is None else root / "cpu-kernels"


# tried in order: the last ones for compilers without OpenMP (Apple clang) or -march=native
FLAG_SETS = (["-fopenmp", "-march=native"], ["-march=native"], [])


def build(vw: int | None = None, cc: str | None = None) -> Path:
    """Compile cpu_kernels.c for this machine (or load the cached build): the shared library's path.

    vw: force the vector width (tests build both to check they agree bit for bit)."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc) to build minquant's CPU kernels")
    vw = vw or vector_width()
    source = SOURCE.read_bytes()
    compiler_version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    errors = []
    for extra in FLAG_SETS:
        flags = ["-O3", "-shared", "-fPIC", f"-DVW={vw}", *extra]
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler_version.encode(),
                                         " ".join(sorted(cpu_flags())).encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        out = _cache_dir() / f"cpu_kernels-{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        # compile next to the target and rename: a concurrent or killed build never leaves half a library
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, out)
            return out
        tmp.unlink(missing_ok=True)
        errors.append(f"{cc} {' '.join(flags)}: {done.stderr.strip()[-400:]}")
    raise RuntimeError("could not compile minquant's CPU kernels:\n" + "\n".join(errors))


_LIB: dict = {}  # vector width -> ctypes library, or the error that stopped building it


def library(vw: int | None = None):
    """The loaded C kernels (built on first use), or raise RuntimeError saying why there are none."""
    vw = vw or vector_width()
    if vw not in _LIB:
        try:
            if os.environ.get("MINQUANT_CPU_KERNELS", "").lower() in ("off", "0", "false"):
                raise RuntimeError("MINQUANT_CPU_KERNELS=off")
            lib = ctypes.CDLL(str(build(vw)))
            i, p = ctypes.c_int, ctypes.c_void_p
            lib.mq_gemv.argtypes = [i, i, i, i, i, p, p, p, p, p, p, i]
            lib.mq_dequant.argtypes = [i, i, i, i, p, p, p, p, i]
            lib.mq_gemv.restype = lib.mq_dequant.restype = lib.mq_tile_columns.restype = i
            _LIB[vw] = lib
        except (RuntimeError, OSError) as e:
            _LIB[vw] = RuntimeError(str(e))
    found = _LIB[vw]
    if isinstance(found, Exception):
        raise found
    return found


enabled = True  # False: QuantLinear takes the reference on CPU (benchmarks compare the two)


def applies(x: torch.Tensor) -> bool:
    """Should a QuantLinear on this input use the C kernels? Not for a gradient (they have no backward:
    the reference is differentiable in x), not while torch.compile traces (fake tensors have no data)."""
    if not enabled or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return False
    found = _LIB.get(vector_width())  # loaded already: the per-call check stays a dict lookup
    return (found is not None and not isinstance(found, Exception)) or available()


def available() -> bool:
    """Can QuantLinear use the C kernels here? (False: it uses the reference, after one warning.)"""
    try:
        library()
        return True
    except RuntimeError as e:
        if not getattr(available, "warned", False):
            available.warned = True
            warnings.warn(f"minquant's CPU kernels are unavailable ({str(e).splitlines()[0]}); QuantLinear uses "
                          "the slower reference on CPU", RuntimeWarning, stacklevel=3)
        return False


# ---------------------------------------------------------------------------------------------
# The layer's CPU view, derived once
# ---------------------------------------------------------------------------------------------

@dataclass
class CpuPrepared:
    qweight: torch.Tensor          # int32 (tiles, K * bits / 32, NB): the words, tile by tile
    scales: torch.Tensor           # fp32 (G, N_pad)
    zeros: torch.Tensor            # fp32 (G, N_pad)
    zero_scales: torch.Tensor      # fp32 (G, N_pad): zeros * scales
    perm: torch.Tensor | None      # int64 (K,): sorted row i is input perm[i] (act-order), else None
    bits: int                      # the kernel's bits (4 for a 3-bit layer)
    group_size: int                # inputs per group (K for per-channel)
    K: int
    N: int
    vw: int
    key: tuple
    _bias: tuple = (None, None)    # (the layer's bias buffer, its fp32 copy padded to N_pad)

    def bias_for(self, bias: torch.Tensor) -> torch.Tensor:
        """The bias in fp32, N_pad long, converted once per bias tensor (and again if it is edited)."""
        key = (bias.data_ptr(), version(bias))
        if self._bias[0] != key:
            b = torch.nn.functional.pad(bias.detach().float(), (0, self.scales.shape[1] - self.N))
            self._bias = (key, b.contiguous())
        return self._bias[1]


def kernel_layout(layer) -> tuple[int, int] | None:
    """(kernel bits, group size) if the C kernels can run this layer, else None (the reference runs it).

    They need groups of whole words (a multiple of 32 / bits inputs: every group size above 16 is)
    and, with act-order, groups of equal size (what GPTQ writes)."""
    bits = 4 if layer.cfg.bits == 3 else layer.cfg.bits
    K = layer.in_features
    gs = K if layer.cfg.group_size == -1 else layer.cfg.group_size
    if bits not in KERNEL_BITS or gs % (32 // bits) or K % gs:
        return None
    return bits, gs


def prepare_cpu(layer, vw: int | None = None) -> CpuPrepared | None:
    """The layer's CPU kernel view, derived on first use and whenever its buffers change; None if the
    kernels cannot run it."""
    vw = vw or vector_width()
    buffers = layer._buffers  # (not layer.qweight: nn.Module's attribute lookup costs a microsecond a name)
    # every buffer the view copies: an in-place edit of any of them (scales too) derives it again
    key = (vw,) + tuple((t.data_ptr(), version(t)) for t in (buffers["qweight"], buffers["qzeros"], buffers["scales"],
                                                              buffers["g_idx"]))
    cached = layer.__dict__.get("_cpu_prepared")
    if cached is not None and cached.key == key:
        return cached
    layer._cpu_prepared = _derive(layer, vw, key)
    return layer._cpu_prepared


@torch.no_grad()
def _derive(layer, vw: int, key: tuple) -> CpuPrepared | None:
    layout = kernel_layout(layer)
    if layout is None:
        return None
    bits, gs = layout
    K, N = layer.in_features, layer.out_features
    q = unpack(layer.qweight, layer.cfg.bits, dim=0)[:K]          # (K, N) integers
    perm = None
    if layer.act_order:
        perm = group_order(layer.g_idx, gs)
        if perm is None:
            return None  # groups of unequal sizes: only the reference's g_idx lookup is right
        q = q[perm]
    nb = library(vw).mq_tile_columns()  # columns per tile, as the C file was built
    n_pad = -(-N // nb) * nb
    zeros = unpack(layer.qzeros, layer.cfg.bits, dim=1)[:, :N].float() + 1   # v1 stores zero - 1
    scales = layer.scales.float()
    pad = (0, n_pad - N)
    words = pack(torch.nn.functional.pad(q.to(torch.int64), pad), bits, dim=0).to(torch.int32)  # (K*bits/32, N_pad)
    tiled = words.view(words.shape[0], n_pad // nb, nb).permute(1, 0, 2).contiguous()
    zeros, scales = torch.nn.functional.pad(zeros, pad), torch.nn.functional.pad(scales, pad)
    return CpuPrepared(qweight=tiled, scales=scales.contiguous(), zeros=zeros.contiguous(),
                       zero_scales=(zeros * scales).contiguous(), perm=perm, bits=bits, group_size=gs, K=K, N=N,
                       vw=vw, key=key)


# ---------------------------------------------------------------------------------------------
# The two paths, and the choice between them
# ---------------------------------------------------------------------------------------------

def gemv(x2: torch.Tensor, p: CpuPrepared, bias: torch.Tensor | None = None, shape: tuple | None = None) -> torch.Tensor:
    """(M, K) fp32 contiguous -> (M, N_pad) fp32 (or `shape`, its size the same), straight from the packed
    words (any M; fastest for few rows). bias: fp32 (N_pad,) or None."""
    M, K = x2.shape
    n_pad = p.scales.shape[1]
    out = torch.empty(shape or (M, n_pad))
    rc = library(p.vw).mq_gemv(p.bits, M, K, n_pad, p.group_size, x2.data_ptr(), p.qweight.data_ptr(),
                               p.scales.data_ptr(), p.zero_scales.data_ptr(), 0 if bias is None else bias.data_ptr(),
                               out.data_ptr(), torch.get_num_threads())
    if rc:
        raise MemoryError(f"the CPU GEMV could not allocate {M} x {K} floats") if rc == -2 else \
            ValueError(f"the CPU GEMV has no {p.bits}-bit copy")
    return out


_BUFFERS: dict = {}  # (K, N_pad) -> the fp32 buffer the dequant path reuses (one per layer shape)


def dequantize_t(p: CpuPrepared) -> torch.Tensor:
    """W^T (K, N_pad) in fp32 (rows in sorted order under act-order), in a buffer reused across calls."""
    K, n_pad = p.K, p.scales.shape[1]
    buf = _BUFFERS.get((K, n_pad))
    if buf is None:
        buf = _BUFFERS[(K, n_pad)] = torch.empty(K, n_pad)
    rc = library(p.vw).mq_dequant(p.bits, K, n_pad, p.group_size, p.qweight.data_ptr(), p.scales.data_ptr(),
                                  p.zeros.data_ptr(), buf.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"the CPU dequantization has no {p.bits}-bit copy")
    return buf


def matmul(x: torch.Tensor, p: CpuPrepared, bias: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T (+ bias) -> (..., N) in x's dtype; path None: the measured choice.

    Written for decoding, where a SmolLM2 layer's kernel takes 20-40 us: every torch call from Python
    costs a microsecond or two, so the common case (fp32, N a whole number of tiles) makes no copies."""
    K, N, n_pad = p.K, p.N, p.scales.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects K = {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if p.perm is not None:
        x2 = x2[:, p.perm]  # x in the sorted rows' order: x[perm] @ W[:, perm]^T = x @ W^T
    x2 = x2.contiguous()
    if bias is not None:
        bias = p.bias_for(bias)
    path = path or choose_path(x2, p)
    if path == "gemv":
        out = gemv(x2, p, bias, lead + (n_pad,))
    elif path == "dequant":
        out = torch.addmm(bias, x2, dequantize_t(p)) if bias is not None else x2 @ dequantize_t(p)
        out = out.view(lead + (n_pad,))
    else:
        raise ValueError(f"unknown CPU path {path!r}; known: {', '.join(PATHS)}")
    if n_pad != N:
        out = out[..., :N].contiguous()
    return out if x.dtype == torch.float32 else out.to(x.dtype)


GEMV_ALWAYS = 2   # up to this many rows the GEMV wins on every shape measured (README's CPU table)
_CHOICE: dict = {}  # (rows bucket, K, N_pad, bits, group_size) -> "gemv" or "dequant"


def choose_path(x2: torch.Tensor, p: CpuPrepared) -> str:
    """The GEMV for 1-2 rows; for more, the faster of the GEMV and dequantize + matmul, timed once per
    power of two of the row count and layer shape (a few calls each), then remembered."""
    M, K = x2.shape
    if M <= GEMV_ALWAYS:
        return "gemv"
    bucket = 1 << (M - 1).bit_length()
    key = (bucket, K, p.scales.shape[1], p.bits, p.group_size, p.vw)
    if key not in _CHOICE:
        probe = torch.randn(bucket, K)
        best = {path: float("inf") for path in PATHS}
        for path in PATHS:
            matmul(probe, p, path=path)  # warm: the buffer allocated, caches filled
        for _ in range(3):  # the paths take turns, so a machine that slows for a moment slows both
            for path in PATHS:
                start = time.perf_counter()
                matmul(probe, p, path=path)
                best[path] = min(best[path], time.perf_counter() - start)
        _CHOICE[key] = min(best, key=best.get)
    return _CHOICE[key]
