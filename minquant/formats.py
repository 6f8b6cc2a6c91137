"""Number formats as data: fp32, fp16, bf16, fp8, small integers and NF4, and rounding to each.

Derived step by step in notebooks/02_number_formats.ipynb.

A float format is sign | exponent | mantissa. With E exponent bits, M mantissa bits and a bias,
an exponent field f in 1 .. 2^E - 2 means (-1)^s * 1.mantissa * 2^(f - bias) (normal numbers) and
f = 0 means (-1)^s * 0.mantissa * 2^(1 - bias) (subnormals, which fill the gap down to zero with
even steps). Between 2^e and 2^(e+1) the values are evenly spaced by the quantum 2^(e - M): the
*relative* spacing is the same at every magnitude, which is why floats suit numbers of any size.

The fp8 formats follow the OCP 8-bit floating point specification (2023): e5m2 is IEEE-like
(inf and NaN at exponent field 31); e4m3 is torch's `float8_e4m3fn` ("finite, NaN"): no inf,
the all-ones exponent holds normal numbers, and only S.1111.111 is NaN, so it reaches 448.
NF4 is the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023, arXiv:2305.14314), a lookup table.
FP4 e2m1 is the element format of the OCP Microscaling formats (MX, 2023) and of NVIDIA's NVFP4:
no inf, no NaN, fifteen values 0, +-0.5, 1, 1.5, 2, 3, 4, 6 (notebook 11; minquant/microscaling.py).

    >>> BF16.max, FP16.max, FP8_E4M3.max, FP8_E5M2.max
    (3.3895313892515355e+38, 65504.0, 448.0, 57344.0)
    >>> round_to_format(torch.tensor([0.0314159]), FP8_E4M3)  # 1.000 * 2^-5 = 0.03125
    tensor([0.0312])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool = True  # False: overflow saturates to +-max (recent torch's float8_e4m3fn cast does too; older ones give NaN)
    # NaN patterns. ieee: exponent all ones and mantissa != 0; all_ones: only S.1..1.1..1 (e4m3fn);
    # none: every pattern is a number (fp4 e2m1).
    nan: Literal["ieee", "all_ones", "none"] = "ieee"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def max_exp(self) -> int:
        # IEEE reserves the all-ones exponent for inf/NaN; "all_ones" formats use it for numbers.
        top_field = 2**self.exp_bits - (2 if self.nan == "ieee" else 1)
        return top_field - self.bias

    @property
    def min_exp(self) -> int:
        return 1 - self.bias

    @property
    def max(self) -> float:
        # The largest mantissa is all ones, except where that pattern is the NaN (e4m3fn: 1.110).
        top_mantissa = 2**self.man_bits - (2 if self.nan == "all_ones" else 1)
        return (1 + top_mantissa / 2**self.man_bits) * 2.0**self.max_exp

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.min_exp

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exp - self.man_bits)

    @property
    def eps(self) -> float:
        """Distance from 1 to the next larger value: 2^-M."""
        return 2.0**-self.man_bits


@dataclass(frozen=True)
class IntFormat:
    name: str
    bits: int
    signed: bool = True

    @property
    def min(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


@dataclass(frozen=True)
class TableFormat:
    """A format that is a list of values (a codebook): index i stands for values[i]."""
    name: str
    values: tuple[float, ...]  # sorted

    @property
    def bits(self) -> int:
        return (len(self.values) - 1).bit_length()

    @property
    def max(self) -> float:
        return self.values[-1]


Format = FloatFormat | IntFormat | TableFormat

FP32 = FloatFormat("fp32", 8, 23, 127)
FP16 = FloatFormat("fp16", 5, 10, 15)
BF16 = FloatFormat("bf16", 8, 7, 127)  # fp32's exponent with a 7-bit mantissa: same range, less precision
FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, has_inf=False, nan="all_ones")
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15)
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, has_inf=False, nan="none")
INT8, INT4, INT3, INT2 = (IntFormat(f"int{b}", b) for b in (8, 4, 3, 2))


def normal_float_values(bits: int = 4) -> tuple[float, ...]:
    """The NormalFloat code (QLoRA, section 3): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.

    Symmetric quantiles cannot give both an exact zero and all 2^k codes, so the positive half gets
    2^(k-1) + 1 quantiles and the negative half 2^(k-1), both including 0 (which is then kept once).
    The outermost quantile is not at probability 1 (that is infinity) but at `offset`, the mean of
    1 - 1/(2*15) and 1 - 1/(2*16): halfway between the choices for 15 and 16 quantiles.
    """
    n = 2 ** (bits - 1)
    offset = (1 - 1 / (2 * (2 * n - 1)) + 1 - 1 / (2 * 2 * n)) / 2
    # ndtri is the inverse of the normal CDF: the quantile at each probability.
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, n + 1, dtype=torch.float64))  # n values and 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, n, dtype=torch.float64)[:-1])  # n - 1 values
    values = torch.cat([negative, positive]).sort().values
    return tuple((values / values.max()).tolist())


NF4 = TableFormat("nf4", normal_float_values(4))

FORMATS: dict[str, Format] = {f.name: f for f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP4_E2M1,
                                                   INT8, INT4, INT3, INT2, NF4)}


def grid(fmt: Format) -> torch.Tensor:
    """Every finite value of `fmt` (at most 16 bits), sorted, zero once: (n,) float32."""
    if fmt.bits > 16:
        raise ValueError(f"{fmt.name} has 2^{fmt.bits} values; grids are built for at most 16 bits")
    if isinstance(fmt, IntFormat):
        return torch.arange(fmt.min, fmt.max + 1, dtype=torch.float32)
    if isinstance(fmt, TableFormat):
        return torch.tensor(fmt.values, dtype=torch.float32)
    steps = torch.arange(2**fmt.man_bits, dtype=torch.float64) / 2**fmt.man_bits  # 0.mantissa
    subnormals = steps * fmt.smallest_normal
    normals = torch.cat([(1 + steps) * 2.0**e for e in range(fmt.min_exp, fmt.max_exp + 1)])
    positive = torch.cat([subnormals, normals[normals <= fmt.max]])
    return torch.cat([-positive[1:].flip(0), positive]).float()


def round_to_format(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round every element of `x` to the nearest value of `fmt` (ties to even): same shape and dtype.

    Overflow: to inf for formats with inf, to +-max for fp8_e4m3 (which has none; recent torch
    casts saturate the same way, older ones give NaN above 464); integers saturate to [min, max]. NaN stays NaN. For float64 input the rounding is done
    once, from the exact value (torch's float64 -> fp16 cast goes through float32 and can round twice).
    NF4 (a table): the nearest of its 16 values; an exact tie goes to the lower one.
    """
    if isinstance(fmt, IntFormat):
        return torch.round(x).clamp(fmt.min, fmt.max)
    if isinstance(fmt, TableFormat):
        return _round_to_table(x, fmt)
    # In float64 every step below is exact, for float32 and float64 input alike.
    a = x.double().abs()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, 0.0)
    # frexp: a = m * 2^p with m in [0.5, 1), so a lies in [2^(p-1), 2^p). Below the normal range
    # every value shares the subnormals' exponent, hence their even spacing.
    e = (torch.frexp(a).exponent - 1).clamp(min=fmt.min_exp)
    quantum = torch.exp2((e - fmt.man_bits).double())
    y = torch.round(a / quantum) * quantum  # torch.round rounds half to even
    overflow = (y > fmt.max) | ~finite
    y = torch.where(overflow, float("inf") if fmt.has_inf else fmt.max, y)
    y = torch.where(torch.isnan(x), float("nan"), y)
    return torch.copysign(y, x.double()).to(x.dtype)  # keeps -0.0 (a negative number that rounds to zero)


def _round_to_table(x: torch.Tensor, fmt: TableFormat) -> torch.Tensor:
    values = torch.tensor(fmt.values, dtype=x.dtype)
    midpoints = (values[1:] + values[:-1]) / 2
    # Index of the nearest value: how many midpoints lie below x (a tie goes to the lower value).
    index = torch.searchsorted(midpoints, x.contiguous(), right=False)
    return torch.where(torch.isnan(x), x, values[index])


def encode(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit patterns (sign | exponent | mantissa, as int64) of `x` rounded to `fmt`; NaN as all-ones."""
    y = round_to_format(x.double(), fmt)
    a = y.abs()
    e = (torch.frexp(a).exponent - 1).clamp(min=fmt.min_exp)
    normal = a >= fmt.smallest_normal
    exp_field = torch.where(normal, e + fmt.bias, 0)
    # Mantissa field: a / quantum is 1.mantissa * 2^M for normals and 0.mantissa * 2^M below.
    man_field = (a / torch.exp2((e - fmt.man_bits).double())).long() - torch.where(normal, 2**fmt.man_bits, 0)
    top_exp = 2**fmt.exp_bits - 1
    exp_field = torch.where(torch.isinf(a), top_exp, exp_field)
    man_field = torch.where(torch.isinf(a), 0, man_field)
    exp_field = torch.where(torch.isnan(a), top_exp, exp_field)
    man_field = torch.where(torch.isnan(a), 2**fmt.man_bits - 1, man_field)
    sign = torch.signbit(y).long()
    return (sign << (fmt.bits - 1)) | (exp_field.long() << fmt.man_bits) | man_field


def decode(bits: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The float64 values of integer bit patterns (sign | exponent | mantissa) of `fmt`."""
    bits = bits.long()
    sign = (bits >> (fmt.bits - 1)) & 1
    exp_field = (bits >> fmt.man_bits) & (2**fmt.exp_bits - 1)
    man_field = bits & (2**fmt.man_bits - 1)
    fraction = man_field.double() / 2**fmt.man_bits
    value = torch.where(exp_field > 0, 1 + fraction, fraction) * torch.exp2(
        (exp_field.clamp(min=1) - fmt.bias).double())
    top = exp_field == 2**fmt.exp_bits - 1
    if fmt.nan == "ieee":
        value = torch.where(top, torch.where(man_field == 0, float("inf"), float("nan")), value)
    elif fmt.nan == "all_ones":
        value = torch.where(top & (man_field == 2**fmt.man_bits - 1), float("nan"), value)
    return torch.where(sign == 1, -value, value)


def scaled_fp8(w: torch.Tensor, per_channel: bool = True, fmt: FloatFormat = FP8_E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only fp8 as inference engines store it ("FP8 W8A16"): w ~ fp8(w / s) * s, one fp32 scale
    s = max|w| / fmt.max per output row (or per tensor), so each row's largest weight lands on fmt's largest value.

    Returns (the dequantized weight, same shape and dtype as w; the scales (N, 1) or (1, 1)).
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN/Inf values")
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    scale = (amax.float() / fmt.max).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero row keeps scale > 0
    return (round_to_format(w.float() / scale, fmt) * scale).to(w.dtype), scale
