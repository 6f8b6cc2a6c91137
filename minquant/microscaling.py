"""Microscaling 4-bit floats, MXFP4 and NVFP4: fp4 e2m1 values that share one scale per small block.

Derived in notebooks/11_activations_and_kv_cache.ipynb. An int4 group stores 16 evenly spaced
levels; e2m1 stores 0, 0.5, 1, 1.5, 2, 3, 4, 6 (and their negatives): finer near zero, where most
weights are, coarser at the edge. A scale per block of consecutive inputs (along K) sets the range:

    MXFP4  (OCP Microscaling spec v1.0, 2023): blocks of 32, the scale a power of two stored as
           E8M0 (an 8-bit exponent, bias 127, no mantissa). The spec's shared exponent is
           X = floor(log2(max|w|)) - 2 (2 = e2m1's largest exponent: 6 = 1.5 * 2^2), which puts the
           block's largest value in [4, 8): values that land above 6 saturate to 6.
           4 + 8/32 = 4.25 bits per weight.
    NVFP4  (NVIDIA Blackwell, 2025): blocks of 16, the scale an fp8 e4m3 number (any of e4m3's
           values, not only powers of two), and one fp32 number per tensor that brings the block scales
           into e4m3's range. We keep it as compressed-tensors and vLLM do, a divisor:
           global_scale = 448 * 6 / max|W|, block scale = e4m3(global_scale * max|w_block| / 6),
           w ~ value * block_scale / global_scale.  4 + 8/16 = 4.5 bits per weight (and 32 per tensor).
           Linears that a server fuses into one matmul (q/k/v, gate/up) share one global scale.

Storage: codes are e2m1 bit patterns (sign | 2 exponent bits | 1 mantissa bit, 0..15), two per byte,
the even element in the low nibble (`pack_fp4`), as compressed-tensors and the Blackwell kernels keep them.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minquant.formats import FP4_E2M1, FP8_E4M3, decode, round_to_format

FP4Scheme = Literal["mxfp4", "nvfp4"]
BLOCK = {"mxfp4": 32, "nvfp4": 16}
FP4_MAX = FP4_E2M1.max  # 6.0
FP4_VALUES = decode(torch.arange(16), FP4_E2M1).float()  # code -> value: 0, 0.5, ..., 6, -0, -0.5, ..., -6
E8M0_BIAS = 127


def bits_per_weight(scheme: FP4Scheme, numel: int | None = None) -> float:
    """4 bits per value plus an 8-bit scale per block (NVFP4: plus a 32-bit tensor scale over `numel` weights)."""
    bpw = 4 + 8 / BLOCK[_check_scheme(scheme)]
    return bpw + (32 / numel if scheme == "nvfp4" and numel else 0.0)


def _check_scheme(scheme: str) -> str:
    if scheme not in BLOCK:
        raise ValueError(f"unknown fp4 scheme {scheme!r}; minquant has: {', '.join(BLOCK)}")
    return scheme


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """w (N, K) as (N, K // block, block) float32; clear errors for shapes and values that cannot be stored."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if w.shape[1] % block:
        raise ValueError(f"the {w.shape[1]} input features are not a multiple of the block of {block} values "
                         "that share a scale")
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN/Inf values")
    return w.float().reshape(w.shape[0], -1, block)


# the magnitudes of codes 0..7, and the midpoints between neighbours
_MAGNITUDES = FP4_VALUES[:8]
_MIDPOINTS = (_MAGNITUDES[1:] + _MAGNITUDES[:-1]) / 2


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, 0..15) of x rounded to the nearest e2m1 value (ties to even), saturating at +-6.

    The same as encode(round_to_format(x, FP4_E2M1)) (a test checks it), by a search among the 7
    midpoints, which is fast enough for a whole model: a value on a midpoint goes to the even code
    (mantissa bit 0), as round-half-to-even does.
    """
    a = x.float().abs().clamp(max=FP4_MAX).contiguous()
    mid = _MIDPOINTS.to(x.device)
    lower, upper = torch.searchsorted(mid, a, right=False), torch.searchsorted(mid, a, right=True)
    index = torch.where((lower == upper) | (lower % 2 == 0), lower, upper)
    return (index | (torch.signbit(x).long() << 3)).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of e2m1 codes."""
    return FP4_VALUES.to(codes.device)[codes.long()]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4: w (N, K) -> (codes uint8 (N, K), shared exponents uint8 E8M0 (N, K // 32)); w ~ value(code) * 2^(e - 127)."""
    wb = _blocks(w, BLOCK["mxfp4"])
    amax = wb.abs().amax(-1)
    # floor(log2(amax)) from frexp (exact, unlike log2 in floating point); an all-zero block takes the smallest scale
    exponent = torch.where(amax > 0, torch.frexp(amax).exponent - 1, -E8M0_BIAS) - FP4_E2M1.max_exp
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scale = torch.exp2(exponent.float())
    codes = fp4_codes(wb / scale.unsqueeze(-1)).reshape(w.shape)
    return codes, (exponent + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(codes: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight (N, K) an MXFP4 tensor stands for."""
    scale = torch.exp2(exponents.float() - E8M0_BIAS)
    return _apply_block_scale(fp4_values(codes), scale).to(dtype)


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """448 * 6 / max|W| (float32): the largest block's scale lands on e4m3's largest value (1 for an all-zero W)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    # an amax so small that the quotient overflows float32 (or zero) takes 1: its blocks store zeros
    gs = FP8_E4M3.max * FP4_MAX / amax
    return torch.where(torch.isfinite(gs) & (amax > 0), gs, torch.ones_like(gs))


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: w (N, K) -> (codes uint8 (N, K), block scales float8_e4m3fn (N, K // 16), global scale float32 ()).

    w ~ value(code) * block_scale / global_scale. `global_scale`: a shared one (fused linears), else w's own.
    """
    wb = _blocks(w, BLOCK["nvfp4"])
    gs = nvfp4_global_scale(wb.abs().amax()) if global_scale is None else torch.as_tensor(global_scale, dtype=torch.float32)
    # in e4m3's range when gs is w's own; a shared one is at most that, so the clamp only matters for a foreign gs
    block_scale = round_to_format((gs * wb.abs().amax(-1) / FP4_MAX).clamp(max=FP8_E4M3.max), FP8_E4M3)
    scale = (block_scale / gs).unsqueeze(-1)
    # a block that rounds to scale 0 (all zero, or tiny beside the tensor's largest) stores zeros
    codes = fp4_codes(torch.where(scale > 0, wb / torch.where(scale > 0, scale, 1.0), 0.0)).reshape(w.shape)
    return codes, block_scale.to(torch.float8_e4m3fn), gs.reshape(())


def dequantize_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight (N, K) an NVFP4 tensor stands for."""
    return _apply_block_scale(fp4_values(codes), block_scale.float() / global_scale.float()).to(dtype)


def _apply_block_scale(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    N, G = scale.shape
    return (values.reshape(N, G, -1) * scale.unsqueeze(-1)).reshape(values.shape)


def fake_quantize_fp4(w: torch.Tensor, scheme: FP4Scheme) -> torch.Tensor:
    """Quantize-dequantize w (N, K) with MXFP4 or NVFP4: same shape and dtype."""
    if _check_scheme(scheme) == "mxfp4":
        return dequantize_mxfp4(*quantize_mxfp4(w), dtype=w.dtype)
    return dequantize_nvfp4(*quantize_nvfp4(w), dtype=w.dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K // 2) uint8: element 2i in the low nibble, 2i + 1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"two fp4 codes per byte need an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) codes, the inverse of `pack_fp4`."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


class FP4Linear(nn.Module):
    """A linear layer whose weight is stored as MXFP4 or NVFP4 (packed codes and block scales).

    Weight-only ("W4A16"): the forward dequantizes the weight to the input's dtype and multiplies,
    which is what a GPU without FP4 tensor cores does; Blackwell's run the products in fp4 directly.
    """
    minquant_quantized = True

    def __init__(self, in_features: int, out_features: int, scheme: FP4Scheme, bias: bool = False):
        super().__init__()
        block = BLOCK[_check_scheme(scheme)]
        if in_features % block:
            raise ValueError(f"{scheme} shares a scale per {block} inputs; {in_features} input features are not a multiple")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        scale_dtype = torch.uint8 if scheme == "mxfp4" else torch.float8_e4m3fn
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // block, dtype=scale_dtype))
        # (1,) float32, compressed-tensors' shape
        self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32) if scheme == "nvfp4" else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: FP4Scheme, global_scale: torch.Tensor | None = None) -> FP4Linear:
        """Quantize `linear`'s weight; NVFP4 with a shared `global_scale` (fused linears) or the weight's own."""
        layer = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None).to(linear.weight.device)
        if scheme == "mxfp4":
            codes, layer.weight_scale = quantize_mxfp4(linear.weight)
        else:
            codes, layer.weight_scale, gs = quantize_nvfp4(linear.weight, global_scale)
            layer.weight_global_scale = gs.reshape(1).clone()  # fused linears share the value, not the storage
        layer.weight_packed = pack_fp4(codes)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_fp4(self.weight_packed)
        if self.scheme == "mxfp4":
            return dequantize_mxfp4(codes, self.weight_scale, dtype)
        return dequantize_nvfp4(codes, self.weight_scale, self.weight_global_scale.reshape(()), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, bias={self.bias is not None}"


@torch.no_grad()
def fp4_quantize_model(model: nn.Module, arch, scheme: FP4Scheme, progress: bool = False) -> dict:
    """Every linear of the model's blocks (an `Architecture`'s) -> FP4Linear; lm_head and embeddings stay float.

    All layers are checked before the first changes, and if one still fails (an interrupt), every
    linear already replaced is put back. Returns a report: seconds, and each layer's relative squared
    error ||W - W_q||^2 / ||W||^2.
    """
    import time

    from tqdm.auto import tqdm

    from minquant.models import check_float, float_block_linears

    check_float(model)
    linears = float_block_linears(model, arch)
    block = BLOCK[_check_scheme(scheme)]
    for name, linear in linears.items():
        if linear.in_features % block:
            raise ValueError(f"{name}: {scheme} shares a scale per {block} inputs, and its {linear.in_features} input "
                             f"features are not a multiple of {block}; nothing was quantized")
    # NVFP4: one global scale per group of linears reading the same input (q/k/v, gate/up): servers fuse them
    shared = {}
    if scheme == "nvfp4":
        prefix, blocks = arch.locate_blocks(model)
        for i in range(len(blocks)):
            for group in arch.groups:
                full = [f"{prefix}.{i}.{n}" for n in group]
                gs = nvfp4_global_scale(max(float(linears[n].weight.abs().max()) for n in full))
                shared |= {n: gs for n in full}
    start, errors, done = time.perf_counter(), {}, []
    try:
        for name, linear in tqdm(linears.items(), desc=scheme.upper(), disable=not progress):
            layer = FP4Linear.from_linear(linear, scheme, shared.get(name))
            w = linear.weight.float()
            errors[name] = float((layer.dequantize_weight() - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
            model.set_submodule(name, layer)
            done.append(name)
    except BaseException:
        for name in done:
            model.set_submodule(name, linears[name])
        raise
    return {"seconds": time.perf_counter() - start, "layers": {n: {"rel_error": e} for n, e in errors.items()}}
