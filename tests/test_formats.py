"""minquant.formats against torch's own dtypes: finfo/iinfo, every bit pattern, and torch's casts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minquant.formats import (BF16, FORMATS, FP8_E4M3, FP8_E5M2, FP16, FP32, INT2, INT3, INT4, INT8, NF4,
                              FloatFormat, IntFormat, decode, encode, grid, normal_float_values,
                              round_to_format)

DTYPES = {FP32: torch.float32, FP16: torch.float16, BF16: torch.bfloat16,
          FP8_E4M3: torch.float8_e4m3fn, FP8_E5M2: torch.float8_e5m2}
SMALL = [FP16, BF16, FP8_E4M3, FP8_E5M2]  # the float formats with grids (at most 16 bits)
INT_VIEW = {32: torch.int32, 16: torch.int16, 8: torch.uint8}  # reinterpret a dtype's bits as integers

# The 16 NF4 values as published with QLoRA (bitsandbytes' table), as float32 numbers.
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def fmt_id(fmt):
    return fmt.name


def torch_round(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The independent reference: torch's cast to the real dtype and back.

    e4m3fn has no inf, and what torch's cast does past its max differs between releases (recent ones
    saturate to +-448, older ones give NaN above 464): the reference saturates first, as minquant and
    serving code do, so the test holds on every torch that pyproject.toml allows."""
    if not fmt.has_inf:
        x = x.clamp(-fmt.max, fmt.max)
    return x.to(DTYPES[fmt]).to(x.dtype)


def all_patterns(fmt: FloatFormat) -> torch.Tensor:
    """Every bit pattern of `fmt`, as values of its torch dtype (NaN and inf included)."""
    n = 2**fmt.bits
    return torch.arange(n, dtype=torch.int64).to(INT_VIEW[fmt.bits]).view(DTYPES[fmt])


def assert_identical(ours: torch.Tensor, ref: torch.Tensor):
    """Same NaNs, and bit-for-bit the same elsewhere (so -0.0 differs from 0.0)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    view = INT_VIEW[ref.element_size() * 8] if ref.element_size() < 8 else torch.int64
    bad = (ours[~nan].view(view) != ref[~nan].view(view)).nonzero()
    assert len(bad) == 0, f"{len(bad)} differ, first: ours {ours[~nan][bad[0]]} vs ref {ref[~nan][bad[0]]}"


# ----------------------------------------------------------------------------------------------
# Properties of each format against torch.finfo / torch.iinfo
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(DTYPES), ids=fmt_id)
def test_float_properties_match_finfo(fmt):
    info = torch.finfo(DTYPES[fmt])
    assert (fmt.bits, fmt.max, fmt.smallest_normal, fmt.eps) == (info.bits, info.max, info.tiny, info.eps)
    # finfo has no smallest subnormal: it is bit pattern 1 (exponent field 0, mantissa 0...01).
    one = torch.tensor([1], dtype=INT_VIEW[fmt.bits]).view(DTYPES[fmt])
    assert fmt.smallest_subnormal == one.item()


def test_integer_ranges():
    info = torch.iinfo(torch.int8)
    assert (INT8.min, INT8.max) == (info.min, info.max)
    assert (IntFormat("uint8", 8, signed=False).min, IntFormat("uint8", 8, signed=False).max) == (0, 255)
    assert [(f.min, f.max) for f in (INT4, INT3, INT2)] == [(-8, 7), (-4, 3), (-2, 1)]
    assert torch.equal(grid(INT4), torch.arange(-8.0, 8.0))


def test_registry_and_fp32_has_no_grid():
    assert list(FORMATS) == ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1",
                             "int8", "int4", "int3", "int2", "nf4"]
    with pytest.raises(ValueError, match="at most 16 bits"):
        grid(FP32)


# ----------------------------------------------------------------------------------------------
# Grids and bit patterns against every bit pattern of the torch dtype
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SMALL, ids=fmt_id)
def test_grid_is_every_finite_bit_pattern(fmt):
    values = all_patterns(fmt).float()
    expected = values[torch.isfinite(values)].unique()  # sorted; -0.0 and 0.0 count once
    assert torch.equal(grid(fmt), expected)


@pytest.mark.parametrize("fmt", SMALL, ids=fmt_id)
def test_decode_every_bit_pattern(fmt):
    patterns = torch.arange(2**fmt.bits)
    assert_identical(decode(patterns, fmt), all_patterns(fmt).double())


@pytest.mark.parametrize("fmt", SMALL, ids=fmt_id)
def test_encode_is_torch_bit_pattern(fmt):
    values = all_patterns(fmt)
    finite = torch.isfinite(values.float())
    patterns = torch.arange(2**fmt.bits)
    assert torch.equal(encode(values.float()[finite], fmt), patterns[finite])
    # Random values: the bits of our rounding are the bits of torch's cast (sign of zero included).
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 4.0 ** torch.arange(-6, 4).repeat(200)
    torch_bits = x.to(DTYPES[fmt]).view(INT_VIEW[fmt.bits]).long() & (2**fmt.bits - 1)
    assert torch.equal(encode(x, fmt), torch_bits)


def test_worked_example_bits():
    # 0.0314159 = 1.00531 * 2^-5. fp16: quantum 2^-15, 0.0314159 / 2^-15 = 1029.44 -> 1029, so the
    # exponent field is -5 + 15 = 01010, the mantissa 1029 - 1024 = 5 = 0000000101. In e4m3 the
    # quantum is 2^-8, 0.0314159 / 2^-8 = 8.04 -> 8: exactly 2^-5 = 0.03125, mantissa 000.
    x = torch.tensor([0.0314159])
    assert encode(x, FP16).item() == 0b0_01010_0000000101
    assert round_to_format(x, FP16).item() == 1029 * 2**-15 == 0.031402587890625
    assert encode(x, FP8_E4M3).item() == 0b0_0010_000
    assert round_to_format(x, FP8_E4M3).item() == 0.03125


# ----------------------------------------------------------------------------------------------
# round_to_format against torch's casts
# ----------------------------------------------------------------------------------------------

def log_uniform(fmt: FloatFormat, n: int, seed: int) -> torch.Tensor:
    """n float32 values of random sign whose magnitudes span the subnormals to beyond max."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = fmt.min_exp - fmt.man_bits - 3, min(fmt.max_exp + 3, 127)
    exponent = torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return (sign * torch.exp2(exponent)).float()


@pytest.mark.parametrize("fmt", SMALL, ids=fmt_id)
def test_round_matches_cast_on_random_values(fmt):
    x = log_uniform(fmt, 100_000, seed=1)
    assert_identical(round_to_format(x, fmt), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", SMALL, ids=fmt_id)
def test_ties_between_every_pair_of_neighbours(fmt):
    # Midpoints are exactly representable in float32 (one more mantissa bit) and must round to
    # the neighbour with an even mantissa; one float32 step either side must not.
    g = grid(fmt)
    beyond = g[-1] + (g[-1] - g[-2])  # where the next value would be: its midpoint is the overflow tie
    mid = (g[:-1] + g[1:]) / 2
    mid = torch.cat([mid, (g[-1] + beyond).view(1) / 2, -(g[-1] + beyond).view(1) / 2])
    x = torch.cat([mid, torch.nextafter(mid, mid - 1), torch.nextafter(mid, mid + 1)])
    assert_identical(round_to_format(x, fmt), torch_round(x, fmt))


EDGES = [0.0, -0.0, -1e-30, 1e-30, 1.0, -1.0, 0.0314159, 70000.0, 1e5, -1e5, 1e6, 3e38,
         float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("fmt", SMALL, ids=fmt_id)
def test_edge_cases(fmt):
    tiny, big = fmt.smallest_subnormal, fmt.max
    quantum_at_max = 2.0 ** (fmt.max_exp - fmt.man_bits)
    special = [tiny, tiny / 2, -tiny / 2, 0.75 * tiny, 1.5 * tiny, fmt.smallest_normal * (1 - fmt.eps / 4),
               big, -big, big + quantum_at_max / 2, big + quantum_at_max / 4, big * 1.0001, 2 * big]
    x = torch.tensor(EDGES + special, dtype=torch.float32)
    assert_identical(round_to_format(x, fmt), torch_round(x, fmt))


def test_overflow_by_format():
    # fp16 and e5m2 overflow to inf, bf16 holds 70000 (at bf16 precision), e4m3fn saturates.
    x = torch.tensor([70000.0, 1e5, -1e6])
    assert torch.equal(round_to_format(x, FP16), torch.tensor([math.inf, math.inf, -math.inf]))
    assert torch.equal(round_to_format(x, BF16), torch.tensor([70144.0, 99840.0, -999424.0]))
    assert torch.equal(round_to_format(x, FP8_E5M2), torch.tensor([math.inf, math.inf, -math.inf]))
    # e5m2's max 57344 = 1.11 * 2^15, quantum 2^13: up to the tie at 61440 it rounds down, at the tie up.
    assert round_to_format(torch.tensor([61439.0, 61440.0]), FP8_E5M2).tolist() == [57344.0, math.inf]
    assert torch.equal(round_to_format(x, FP8_E4M3), torch.tensor([448.0, 448.0, -448.0]))
    assert round_to_format(torch.tensor([math.inf]), FP8_E4M3).item() == 448.0  # saturates, as recent torch's cast


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=32))
def test_round_matches_cast_property(values):
    x = torch.tensor(values, dtype=torch.float32)
    for fmt in SMALL:
        assert_identical(round_to_format(x, fmt), torch_round(x, fmt))


def test_float64_input():
    # To fp32, torch's float64 -> float32 cast is a correct single rounding: the reference.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, dtype=torch.float64, generator=gen) * torch.exp2(
        torch.empty(20_000, dtype=torch.float64).uniform_(-160, 135, generator=gen))
    assert_identical(round_to_format(x, FP32), x.to(torch.float32).double())
    # Values that float32 holds exactly round the same in either input dtype.
    x32 = x.float()
    for fmt in SMALL:
        assert_identical(round_to_format(x32.double(), fmt), round_to_format(x32, fmt).double())
    # Just above a tie, float64 input rounds once (up); torch's float64 -> fp16 cast rounds twice
    # (through float32, landing on the tie, then to even) and returns 1.0.
    above_tie = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to_format(above_tie, FP16).item() == 1 + 2**-10


def test_round_keeps_shape_and_dtype():
    x = torch.randn(3, 4, 5)
    for fmt in FORMATS.values():
        assert round_to_format(x, fmt).shape == (3, 4, 5) and round_to_format(x, fmt).dtype == torch.float32
    assert round_to_format(x.double(), FP8_E4M3).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Integer formats and NF4
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [INT8, INT4, INT3, INT2, IntFormat("uint4", 4, signed=False)], ids=fmt_id)
def test_integer_rounding(fmt):
    ties = [-9.5, -8.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5, 127.5, -128.5]
    # Python's round() rounds half to even too, and min/max saturate: an independent reference.
    expected = [min(max(round(v), fmt.min), fmt.max) for v in ties]
    assert round_to_format(torch.tensor(ties), fmt).tolist() == expected
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3)) * 100
    expected = torch.round(x).clamp(fmt.min, fmt.max)
    torch.testing.assert_close(round_to_format(x, fmt), expected, rtol=0, atol=0)


def test_nf4_construction_matches_published_table():
    assert len(NF4.values) == 16 and NF4.bits == 4 and NF4.values[7] == 0.0
    ours = torch.tensor(normal_float_values(4), dtype=torch.float64)
    torch.testing.assert_close(ours, torch.tensor(NF4_PUBLISHED, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(grid(NF4), torch.tensor(NF4.values, dtype=torch.float32))


def test_nf4_rounds_to_nearest_value():
    x = torch.empty(20_000).uniform_(-1.2, 1.2, generator=torch.Generator().manual_seed(4))
    values = torch.tensor(NF4.values, dtype=torch.float32)
    nearest = values[(x[:, None] - values).abs().argmin(dim=1)]  # brute force: every distance
    assert torch.equal(round_to_format(x, NF4), nearest)
    assert torch.isnan(round_to_format(torch.tensor([math.nan]), NF4)).all()
    # An exact tie goes to the lower of the two values (the brute force above would pick either).
    g = grid(NF4)
    assert torch.equal(round_to_format((g[:-1] + g[1:]) / 2, NF4), g[:-1])


def test_scaled_fp8_matches_torchs_float8_cast_and_puts_each_rows_max_on_448():
    from minquant.formats import FP8_E4M3, scaled_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-6, 1, 32)[:, None]  # rows of very different size
    w_hat, scale = scaled_fp8(w)
    ref = (w / scale).to(torch.float8_e4m3fn).float() * scale  # torch's own cast, round to nearest even
    torch.testing.assert_close(w_hat, ref, rtol=0, atol=0)
    torch.testing.assert_close((w / scale).abs().amax(1), torch.full((32,), FP8_E4M3.max))
    # relative error of a 3-bit mantissa: at most 2^-4 of each value (normal range)
    normal = (w / scale).abs() >= FP8_E4M3.smallest_normal
    assert ((w_hat - w).abs()[normal] <= w.abs()[normal] * 2**-4 + 1e-12).all()
    # one scale per tensor wastes the small rows' range: their error is far larger
    per_tensor, s1 = scaled_fp8(w, per_channel=False)
    assert s1.shape == (1, 1)
    assert (per_tensor - w)[:4].abs().mean() > 10 * (w_hat - w)[:4].abs().mean()
    with pytest.raises(ValueError, match="NaN"):
        scaled_fp8(torch.tensor([[float("nan"), 1.0]]))
