"""Min/max (round-to-nearest) quantization: the primitives every later method builds on.

Derived in notebooks/03_minmax_quantization.ipynb; granularity in 04_granularity_and_outliers.

One convention, used everywhere in minquant:
    - a weight matrix W is (N, K) = (out_features, in_features), as nn.Linear stores it;
    - each row is cut into groups of `group_size` consecutive input columns (group_size=-1: the
      whole row, "per channel"), and each group gets a scale s and a zero-point z;
    - integers q in [0, 2**bits - 1] (uint8) stand for  w ~ (q - z) * s;
    - `scale` and `zero` are float32 of shape (N, K // group_size).

Symmetric ("absmax"): s = max|w| / (2**(bits-1) - 1) and z = 2**(bits-1), so 0 maps to q = z
exactly and the grid is symmetric around 0 (q = 0 is never used). With `full_range`, symmetric
uses all 2**bits integers, as GPTQ's reference code and llm-compressor do: s = 2 max|w| / (2**bits - 1),
one more level and a step (2**bits - 2) / (2**bits - 1) as large, for an error of half a step at
+-max|w| (which sit half-way between two levels). Asymmetric ("zero-point"):
s = (max - min) / (2**bits - 1) over a range that includes 0, and z = round(-min / s), an integer,
as GPTQ stores it. With `integer_zero=False`, z = -min / s stays a float and the range is the
group's own [min, max] (llama.cpp's Q4_1 does this: w = d*q + m).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4  # 2..8: integers 0 .. 2**bits - 1
    group_size: int = 128  # consecutive input columns sharing one scale/zero; -1 = whole row
    symmetric: bool = False  # absmax (zero fixed at 2**(bits-1)) vs min/max with a zero-point
    integer_zero: bool = True  # round the zero-point to an integer (GPTQ format) or keep it float
    clip_ratio: float = 1.0  # shrink the range to clip_ratio * (min, max): trades clipping for resolution
    full_range: bool = False  # symmetric only: all 2**bits levels (GPTQ's grid), not one symmetric around 0

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if not (isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 1)):
            raise ValueError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.symmetric and not self.integer_zero:
            raise ValueError("symmetric quantization has a fixed integer zero; integer_zero=False needs symmetric=False")
        if self.full_range and not self.symmetric:
            raise ValueError("full_range is a variant of symmetric quantization; asymmetric always uses every level")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def minq(self) -> int:
        # symmetric keeps q - z in [-(2**(bits-1) - 1), 2**(bits-1) - 1]: q = 0 would be one step
        # further below zero than the top is above it, so clipped values never land there.
        return 1 if self.symmetric and not self.full_range else 0

    def groups(self, K: int) -> int:
        return groups_per_row(K, self.group_size)


def scheme_label(bits: int, group_size: int, sym: bool | None = None) -> str:
    """The one way minquant names a scheme: 'W4 g64', 'W3 per-channel', and with `sym` given 'W4 g64 asym'."""
    label = f"W{bits} " + ("per-channel" if group_size == -1 else f"g{group_size}")
    return label if sym is None else f"{label} {'sym' if sym else 'asym'}"


def groups_per_row(K: int, group_size: int) -> int:
    """How many groups a row of K inputs has; a clear error if group_size cannot cut it evenly.

    The whole package refuses ragged groups (a shorter last group) rather than supporting them:
    the GPTQ checkpoint format and the kernels that read it assume K % group_size == 0.
    """
    g = K if group_size == -1 else group_size
    if K % g:
        fits = [d for d in range(8, K + 1) if K % d == 0 and d % 8 == 0] or [K]
        raise ValueError(f"group_size {g} does not divide the {K} input features of this layer; "
                         f"group sizes that do: {', '.join(map(str, fits))} (or -1, per channel)")
    return K // g


def grouped(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """(N, K) -> (N, G, g) float32 view by groups, after checking the weight is usable."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    bad = ~torch.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight has {int(bad.sum())} NaN/Inf values (first at row {r}, column {c})")
    N, K = w.shape
    G = cfg.groups(K)
    return w.float().reshape(N, G, K // G)


def choose_qparams(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point, float32 of shape (N, K // group_size), from each group's min and max."""
    wg = grouped(w, cfg)
    return qparams_from_range(wg.amin(dim=-1) * cfg.clip_ratio, wg.amax(dim=-1) * cfg.clip_ratio, cfg)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point (float32, shape of `lo`) that map the range [lo, hi] onto the integer grid."""
    if cfg.symmetric:
        half = 2 ** (cfg.bits - 1)
        scale = torch.maximum(lo.abs(), hi) / (half - 0.5 if cfg.full_range else half - 1)
        scale = torch.where(scale == 0, 1.0, scale)  # an all-zero group: any scale works
        return scale, torch.full_like(scale, half)
    if cfg.integer_zero:  # the range must hold 0, so that z is an integer inside [0, maxq]
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / cfg.maxq
    scale = torch.where(scale == 0, 1.0, scale)  # constant group: z below then maps it exactly
    zero = -lo / scale
    return scale, (zero.round() if cfg.integer_zero else zero)


def storable_qparams(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`choose_qparams`, made storable in the GPTQ v1 checkpoint format (zero-point >= 1) and in fp16 scales.

    RTN, GPTQ, AWQ and QuantLinear all quantize with these (the plain `choose_qparams` is the
    textbook version of notebook 03, which a v1 checkpoint cannot always hold).

    A group with no negative weight gets zero-point 0, which v1 cannot store (it writes zero - 1;
    readers add 1 back without wrapping). Such groups take zero-point 1 and a scale stretched so
    that their maximum still fits: s = max / (maxq - 1). Scales are rounded to fp16 first, since
    that is what the checkpoint holds.
    """
    wg = grouped(w, cfg)
    return storable_qparams_from_range(wg.amin(-1) * cfg.clip_ratio, wg.amax(-1) * cfg.clip_ratio, cfg)


def quantize_storable(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with `storable_qparams`: (q, scale, zero) exactly as a GPTQ v1 checkpoint stores w."""
    scale, zero = storable_qparams(w, cfg)
    return quantize(w, scale, zero, cfg), scale, zero


def storable_qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`storable_qparams` of groups whose (already clipped) range is [lo, hi]: any shape, broadcast."""
    scale, zero = qparams_from_range(lo, hi, cfg)
    if cfg.integer_zero and not cfg.symmetric:
        at_zero = zero < 1
        scale = torch.where(at_zero, hi.clamp(min=1e-8) / (cfg.maxq - 1), scale)
        zero = torch.where(at_zero, torch.ones_like(zero), zero)
    return scale.to(torch.float16).float(), zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Integers q = clamp(round(w / s) + z, minq, maxq) as uint8, shape (N, K).

    A float zero-point is added before rounding instead: round(w / s + z).
    """
    q = round_to_grid(grouped(w, cfg) / scale.unsqueeze(-1), zero.unsqueeze(-1), cfg)
    return q.reshape(w.shape).to(torch.uint8)


def round_to_grid(x: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The integers (as floats) clamp(round(x) + z, minq, maxq) of x = w / s, any shapes that broadcast.

    Every quantizer rounds through here (RTN, GPTQ's column sweep and range search, AWQ), so they
    all land on the same grid. A float zero-point is added before rounding: round(x + z).
    """
    q = torch.round(x).add_(zero) if cfg.integer_zero else torch.round(x + zero)
    return q.clamp_(cfg.minq, cfg.maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig | None = None,
               dtype: torch.dtype = torch.float32, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """w ~ (q - z) * s, shape (N, K), in `dtype`; scale and zero (N, G).

    Column k is in group k // (K / G), or in group g_idx[k] when given (GPTQ's act-order).
    `cfg`, if given, checks that its group size is the one the shapes say.
    """
    N, K = q.shape
    G = scale.shape[1] if cfg is None else cfg.groups(K)
    if scale.shape != (N, G) or zero.shape != (N, G):
        raise ValueError(f"scale and zero must be (N, G) = ({N}, {G}) for q {tuple(q.shape)}, got "
                         f"{tuple(scale.shape)} and {tuple(zero.shape)}")
    if g_idx is not None:
        g = g_idx.long()
        return ((q.float() - zero[:, g]) * scale[:, g]).to(dtype)
    qg = q.float().reshape(N, G, K // G)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(N, K).to(dtype)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Quantize then dequantize: the float weight the quantized model really computes with."""
    scale, zero = choose_qparams(w, cfg)
    return dequantize(quantize(w, scale, zero, cfg), scale, zero, cfg, dtype=w.dtype)


# ---------------------------------------------------------------------------------------------
# Error metrics: how far is the quantized weight from the original?
# ---------------------------------------------------------------------------------------------

def mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared error, computed in float64."""
    return float((w.double() - w_hat.double()).pow(2).mean())


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum w^2 / sum (w - w_hat)^2)."""
    noise = (w.double() - w_hat.double()).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(w.double().pow(2).sum() / noise))


def max_abs_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w.double() - w_hat.double()).abs().max())
