"""W8A8: weights *and* activations in 8 bits, so the matmul itself runs in int8 or fp8.

Derived in notebooks/11_activations_and_kv_cache.ipynb. Weight-only quantization (W4A16) saves
memory traffic and then computes in 16 bits; the "int8" and "fp8" labels of serving engines mostly
mean this instead: both operands of every linear in 8 bits, multiplied on tensor cores that do int8
or fp8 at twice the fp16 rate, which is what pays at large batch, where the matmul is compute-bound.

    y = x W^T  ~  (s_x * q_x) (s_w * q_w)^T  =  s_x s_w^T * (q_x q_w^T)

The integer product q_x q_w^T is exact in int32 (int8 * int8 summed over K); the scales are applied
once per output. Weights: symmetric, one scale per output channel (s_w (N, 1), a column of the
product). Activations: symmetric, either one scale per token computed at run time ("dynamic",
s_x (M, 1) = max|x_row| / 127) or one per tensor fixed from calibration data ("static", cheaper, and
broken by outlier channels: notebook 04's activations reach ~100x the typical value, so one scale
for the whole tensor leaves the other channels a handful of levels; SmoothQuant's fix is in
minquant/smoothquant.py).

int8 runs on `torch._int_mm` (CPU and CUDA; exact integer emulation where a shape or build cannot);
fp8 (e4m3) on `torch._scaled_mm` where the build has it for the device (CUDA sm_89+, recent CPU builds),
else emulated: each fp8 value is exact in fp32, so the emulation differs only in summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minquant.formats import FP8_E4M3

INT8_MAX = 127  # symmetric: -127..127, so that -x quantizes to -q (-128 is never used)
FP8_MAX = FP8_E4M3.max  # 448
TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class W8A8Config:
    dtype: Literal["int8", "fp8"] = "int8"
    activations: Literal["dynamic", "static"] = "dynamic"  # per-token scales at run time, or one per tensor from calibration
    smoothquant: bool = False  # migrate activation outliers into the weights first (minquant.smoothquant)
    alpha: float | None = None  # SmoothQuant's migration strength; None: searched per group of linears
    n_grid: int = 11  # the alphas searched: 0, 0.1, ..., 1

    def __post_init__(self):
        if self.dtype not in ("int8", "fp8"):
            raise ValueError(f"W8A8 dtype must be 'int8' or 'fp8', got {self.dtype!r}")
        if self.activations not in ("dynamic", "static"):
            raise ValueError(f"activations must be 'dynamic' (per token) or 'static' (per tensor), got {self.activations!r}")
        if self.dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise ValueError(f"fp8 needs torch's float8_e4m3fn dtype, which this torch ({torch.__version__}) lacks")
        if self.alpha is not None and not (isinstance(self.alpha, int | float) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be a number in [0, 1] (or None: searched), got {self.alpha!r}")
        if self.alpha is not None and not self.smoothquant:
            raise ValueError("alpha is SmoothQuant's migration strength: it needs smoothquant=True")
        if not (isinstance(self.n_grid, int) and self.n_grid >= 2):
            raise ValueError(f"n_grid must be an integer >= 2, got {self.n_grid!r}")

    @property
    def qmax(self) -> float:
        return INT8_MAX if self.dtype == "int8" else FP8_MAX

    @property
    def alphas(self) -> list[float]:
        return [self.alpha] if self.alpha is not None else [i / (self.n_grid - 1) for i in range(self.n_grid)]


def to_8bit(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """x / scale rounded into int8 (half to even, clamped to int8's -128..127) or float8_e4m3fn (saturating at +-448).

    Scales from max|x| / 127 never reach -128; only inputs beyond a static scale's calibrated range do,
    and vLLM's and compressed-tensors' quantizers clamp those to -128 too.
    """
    y = x.float() / scale
    if dtype == "int8":
        return torch.round(y).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # clamp first: older torch casts overflow to NaN


def weight_scale(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """Symmetric per-output-channel scales (N, 1) float32: each row's largest |w| on the grid's largest value."""
    qmax = INT8_MAX if dtype == "int8" else FP8_MAX
    return (w.abs().amax(dim=1, keepdim=True).float() / qmax).clamp(min=TINY)


def token_scale(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Dynamic activation scales, one per token: x (M, K) -> (M, 1) float32."""
    qmax = INT8_MAX if dtype == "int8" else FP8_MAX
    return (x.abs().amax(dim=-1, keepdim=True).float() / qmax).clamp(min=TINY)


def fake_quantize_8bit(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """x rounded to the 8-bit grid of `scale` and back, in x's dtype (what W8A8 computes with)."""
    return (to_8bit(x, scale, dtype).float() * scale).to(x.dtype)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 times b_t (N, K) int8 transposed -> (M, N) int32, exactly."""
    M = a.shape[0]
    if a.is_cuda and M <= 16:  # CUDA's kernel needs M > 16: pad with zero rows (decoding) and drop them after
        return int8_matmul(torch.cat([a, a.new_zeros(17 - M, a.shape[1])]), b_t)[:M]
    try:  # CUDA's kernel also needs K, N multiples of 8; the CPU one takes any shape
        return torch._int_mm(a, b_t.t())
    except RuntimeError:
        # float64 holds every partial sum exactly: |sum| <= K * 127^2 < 2^53 for any K below 5e11
        return (a.double() @ b_t.double().t()).to(torch.int32)


def fp8_matmul(a: torch.Tensor, b_t: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(a * scale_a) (b_t * scale_b)^T for fp8 a (M, K), b_t (N, K) with scales (M, 1), (N, 1)."""
    M = a.shape[0]
    if a.is_cuda and M % 16:  # CUDA's fp8 GEMM wants every dimension a multiple of 16: pad the rows
        pad = 16 - M % 16
        a, scale_a = torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([scale_a, scale_a.new_ones(pad, 1)])
    # row-wise scales want a bf16 output on some CUDA builds; the scales are applied inside either way
    for out in (out_dtype, torch.bfloat16) if a.is_cuda else (out_dtype,):
        try:
            return torch._scaled_mm(a, b_t.t(), scale_a=scale_a, scale_b=scale_b.t(), out_dtype=out)[:M].to(out_dtype)
        except (RuntimeError, NotImplementedError, AttributeError):  # no fp8 GEMM for this device, shape or build
            pass
    return ((a[:M].float() @ b_t.float().t()) * scale_a[:M] * scale_b.t()).to(out_dtype)


class W8A8Linear(nn.Module):
    """A linear layer computing in 8 bits: weight int8/fp8 (N, K) with scales (N, 1); input quantized per token
    (dynamic) or with one calibrated scale (static, `input_scale`)."""
    minquant_quantized = True

    def __init__(self, in_features: int, out_features: int, dtype: str = "int8", static: bool = False, bias: bool = False):
        super().__init__()
        W8A8Config(dtype)  # validates dtype (and fp8 support) once
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        storage = torch.int8 if dtype == "int8" else torch.float8_e4m3fn
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=storage))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.register_buffer("input_scale", torch.ones(1) if static else None)  # (1,): compressed-tensors' shape
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: str = "int8", input_scale: float | torch.Tensor | None = None,
                    weight: torch.Tensor | None = None) -> W8A8Linear:
        """Quantize `linear`'s weight (or `weight`, e.g. smoothed, in its place) per channel; `input_scale`
        (static activations) or None (dynamic)."""
        w = (linear.weight if weight is None else weight).detach()
        if not torch.isfinite(w).all():
            raise ValueError("weight has NaN/Inf values")
        layer = cls(linear.in_features, linear.out_features, dtype, static=input_scale is not None,
                    bias=linear.bias is not None).to(w.device)
        layer.weight_scale = weight_scale(w, dtype)
        layer.weight = to_8bit(w, layer.weight_scale, dtype)
        if input_scale is not None:
            s = torch.as_tensor(input_scale, dtype=torch.float32, device=w.device).reshape(1)
            if not (torch.isfinite(s).all() and s.item() > 0):
                raise ValueError(f"a static input scale must be a positive finite number, got {s.item()!r}")
            layer.input_scale = s
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        scale = self.input_scale.float().reshape(1, 1).expand(x2.shape[0], 1) if self.input_scale is not None \
            else token_scale(x2, self.dtype)
        xq = to_8bit(x2, scale, self.dtype)
        if self.dtype == "int8":
            y = int8_matmul(xq, self.weight).float() * scale * self.weight_scale.float().t()
        else:
            y = fp8_matmul(xq, self.weight, scale.contiguous(), self.weight_scale.float(), torch.float32)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "static per-tensor" if self.input_scale is not None else "dynamic per-token"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, activations {act}"


def reference_w8a8(x: torch.Tensor, w: torch.Tensor, dtype: str, input_scale: float | None = None) -> torch.Tensor:
    """What a W8A8 linear computes, in plain float64: fake-quantized input times fake-quantized weight (the tests' reference)."""
    x2 = x.reshape(-1, x.shape[-1])
    s_x = torch.full((x2.shape[0], 1), float(input_scale)) if input_scale is not None else token_scale(x2, dtype)
    x_q = to_8bit(x2, s_x, dtype).double() * s_x.double()
    s_w = weight_scale(w, dtype)
    w_q = to_8bit(w, s_w, dtype).double() * s_w.double()
    return F.linear(x_q, w_q).reshape(*x.shape[:-1], w.shape[0])
