"""minquant.quant: min/max quantization against float64 references and its defining properties."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minquant.quant import (QuantConfig, choose_qparams, dequantize, fake_quantize, max_abs_error,
                            mse, quantize, sqnr_db)


def reference_fake_quant(w: torch.Tensor, bits: int, g: int, symmetric: bool) -> torch.Tensor:
    """A plain float64 loop over rows and groups: the textbook formulas, no vectorisation."""
    w = w.double()
    out = torch.empty_like(w)
    g = w.shape[1] if g == -1 else g
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            if symmetric:
                s = x.abs().max() / (2 ** (bits - 1) - 1)
                s = s if s > 0 else torch.tensor(1.0, dtype=torch.float64)
                z = 2 ** (bits - 1)
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                s = (hi - lo) / (2**bits - 1)
                s = s if s > 0 else torch.tensor(1.0, dtype=torch.float64)
                z = torch.round(-lo / s)
            q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
            out[r, c:c + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_float64_reference(bits, group_size, symmetric):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(12, 64) * 0.02
    w[3, 5] = 0.4  # an outlier
    ours = fake_quantize(w, QuantConfig(bits, group_size, symmetric))
    torch.testing.assert_close(ours.double(), reference_fake_quant(w, bits, group_size, symmetric),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_full_range_symmetric_is_gptqs_grid(bits, group_size):
    """GPTQ's reference quantizer, symmetric: x_max = max|x|, scale = 2 x_max / maxq, zero = (maxq + 1) / 2.

    In float32 like ours: +-x_max sit exactly half-way between two levels, so float64 could round
    such a tie the other way."""
    torch.manual_seed(bits)
    w = torch.randn(10, 64) * 0.02
    w[2, 3] = -0.5
    maxq = 2**bits - 1
    g = 64 if group_size == -1 else group_size
    wg = w.reshape(10, -1, g)
    scale = 2 * wg.abs().amax(-1, keepdim=True) / maxq
    q = torch.clamp(torch.round(wg / scale) + (maxq + 1) / 2, 0, maxq)
    expected = ((q - (maxq + 1) / 2) * scale).reshape(10, 64)
    cfg = QuantConfig(bits, group_size, symmetric=True, full_range=True)
    torch.testing.assert_close(fake_quantize(w, cfg), expected, rtol=0, atol=1e-6)
    assert cfg.minq == 0 and QuantConfig(bits, group_size, symmetric=True).minq == 1
    # +-max|w| are 7.5 steps from zero: round(7.5) = 8 is clamped to 7, round(-7.5) = -8 is a level
    x = torch.tensor([[0.1, -0.1, 0.0314159, 0.0]])
    out = fake_quantize(x, QuantConfig(4, -1, symmetric=True, full_range=True))[0]
    assert out.tolist() == pytest.approx([7 * 0.2 / 15, -8 * 0.2 / 15, 2 * 0.2 / 15, 0.0], abs=1e-7)


def test_worked_example_pi_over_100():
    # The course's example: 0.0314159 in a layer whose weights span [-0.1, 0.1] (symmetric).
    w = torch.tensor([[0.0314159, -0.1, 0.1, 0.0]])
    for bits, expected in [(8, 0.0314961), (4, 0.0285714)]:
        # s = 0.1 / 127 -> q = round(0.0314159 / s) = 40 -> 40 * 0.1 / 127 = 0.0314961
        # s = 0.1 / 7   -> q = round(2.199) = 2      -> 2 * 0.1 / 7 = 0.0285714
        out = fake_quantize(w, QuantConfig(bits, -1, symmetric=True))
        assert out[0, 0].item() == pytest.approx(expected, abs=1e-7)


shapes = st.tuples(st.integers(1, 6), st.sampled_from([8, 16, 24, 48, 64]))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.integers(2, 8), group=st.sampled_from([-1, 8]), symmetric=st.booleans(),
       seed=st.integers(0, 2**16), spread=st.floats(1e-4, 1e3))
def test_properties(shape, bits, group, symmetric, seed, spread):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread
    cfg = QuantConfig(bits, group, symmetric)
    scale, zero = choose_qparams(w, cfg)
    G = 1 if group == -1 else shape[1] // group
    assert scale.shape == zero.shape == (shape[0], G) and scale.dtype == torch.float32
    q = quantize(w, scale, zero, cfg)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    w_hat = dequantize(q, scale, zero, cfg)
    # error <= scale / 2 everywhere inside the range (min/max with clip_ratio 1 keeps all of w inside)
    per_elem_scale = scale.repeat_interleave(shape[1] // G, dim=1)
    assert ((w - w_hat).abs() <= per_elem_scale / 2 * (1 + 1e-5) + 1e-30).all()
    # quantize -> dequantize -> quantize gives the same integers (idempotent)
    assert torch.equal(quantize(w_hat, scale, zero, cfg), q)
    # zero maps to 0 exactly
    w0 = w.clone(); w0[:, 0] = 0
    s0, z0 = choose_qparams(w0, cfg)
    assert (dequantize(quantize(w0, s0, z0, cfg), s0, z0, cfg)[:, 0] == 0).all()
    if not symmetric:
        assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= 2**bits - 1).all()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), K=st.sampled_from([8, 24, 64]), bits=st.integers(2, 8), symmetric=st.booleans())
def test_group_size_K_is_per_channel(rows, K, bits, symmetric):
    w = torch.randn(rows, K)
    assert torch.equal(fake_quantize(w, QuantConfig(bits, K, symmetric)), fake_quantize(w, QuantConfig(bits, -1, symmetric)))


def test_float_zero_is_exact_on_a_q4_1_grid():
    # A Q4_1-style group: w = d * q + m with q in 0..15, both ends used: min/max with a float
    # zero-point finds d and m again; an integer zero-point cannot represent the offset m.
    torch.manual_seed(0)
    q = torch.randint(0, 16, (4, 32)); q[:, 0], q[:, 1] = 0, 15
    d, m = torch.rand(4, 1) * 0.01, -torch.rand(4, 1) * 0.05 + 0.01
    w = d * q + m
    assert max_abs_error(w, fake_quantize(w, QuantConfig(4, 32, integer_zero=False))) < 1e-8
    assert max_abs_error(w, fake_quantize(w, QuantConfig(4, 32))) > 1e-4


def test_clipping_shrinks_the_range():
    w = torch.tensor([[-1.0, -0.01, 0.02, 0.03, 1.0, 0.5, -0.5, 0.0]])
    s_full, _ = choose_qparams(w, QuantConfig(4, -1, symmetric=True))
    s_clip, _ = choose_qparams(w, QuantConfig(4, -1, symmetric=True, clip_ratio=0.5))
    assert s_clip.item() == pytest.approx(s_full.item() / 2)
    out = fake_quantize(w, QuantConfig(4, -1, symmetric=True, clip_ratio=0.5))
    assert out.max().item() == pytest.approx(0.5) and out.min().item() == pytest.approx(-0.5)


def test_constant_and_zero_groups():
    w = torch.zeros(2, 16); w[1] = 0.25
    for cfg in [QuantConfig(4, 8), QuantConfig(4, 8, symmetric=True), QuantConfig(4, 8, integer_zero=False)]:
        torch.testing.assert_close(fake_quantize(w, cfg), w, rtol=0, atol=1e-7)


def test_metrics_against_hand_values():
    w, w_hat = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.5, 2.0]])
    assert mse(w, w_hat) == pytest.approx((0 + 0.25 + 1) / 3)
    assert max_abs_error(w, w_hat) == 1.0
    assert sqnr_db(w, w_hat) == pytest.approx(10 * torch.log10(torch.tensor(14 / 1.25)).item())
    assert sqnr_db(w, w) == float("inf")


def test_fake_quantize_keeps_dtype():
    w = torch.randn(4, 32, dtype=torch.bfloat16)
    assert fake_quantize(w, QuantConfig(4, 16)).dtype == torch.bfloat16


def test_bad_configs_and_weights():
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8, got 9"):
        QuantConfig(bits=9)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8, got 1"):
        QuantConfig(bits=1)
    with pytest.raises(ValueError, match="group_size must be a positive integer or -1"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError, match="clip_ratio"):
        QuantConfig(clip_ratio=1.5)
    with pytest.raises(ValueError, match="integer_zero=False needs symmetric=False"):
        QuantConfig(symmetric=True, integer_zero=False)
    with pytest.raises(ValueError, match="full_range is a variant of symmetric"):
        QuantConfig(full_range=True)
    with pytest.raises(ValueError, match="group_size 128 does not divide the 576 input features.*"
                                         "group sizes that do: 8, 16, 24, 32, 48, 64, 72, 96, 144, 192, 288, 576"):
        fake_quantize(torch.randn(4, 576), QuantConfig(4, 128))
    w = torch.randn(4, 32); w[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/Inf values \(first at row 2, column 7\)"):
        fake_quantize(w, QuantConfig(4, 32))
    with pytest.raises(ValueError, match="expected a 2-D weight"):
        fake_quantize(torch.randn(32), QuantConfig(4, 32))
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.ones(4, 32, dtype=torch.int32), QuantConfig(4, 32))
