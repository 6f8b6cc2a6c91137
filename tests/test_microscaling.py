"""MXFP4 and NVFP4 against a brute-force float64 reference: nearest grid value, scales from the specs' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from minquant.formats import FP4_E2M1, FP8_E4M3, grid
from minquant.microscaling import (FP4Linear, bits_per_weight, dequantize_mxfp4, dequantize_nvfp4, fake_quantize_fp4,
                                   fp4_quantize_model, pack_fp4, quantize_mxfp4, quantize_nvfp4, unpack_fp4)


def nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest entry of `table` to each value, by brute force (random data has no exact ties)."""
    d = (values.double().reshape(-1, 1) - table.double().reshape(1, -1)).abs()
    return table.double()[d.argmin(1)].reshape(values.shape)


def test_e2m1_is_the_published_grid():
    # OCP MX spec v1.0, table 5: the e2m1 magnitudes
    assert grid(FP4_E2M1).abs().unique().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FP4_E2M1.bits == 4 and FP4_E2M1.max == 6


def test_mxfp4_matches_the_spec_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 128) * torch.logspace(-3, 2, 8).reshape(8, 1)
    codes, exponents = quantize_mxfp4(w)
    assert codes.dtype == exponents.dtype == torch.uint8 and exponents.shape == (8, 4)
    fp4 = grid(FP4_E2M1)
    for r in range(8):
        for b in range(4):
            block = w[r, b * 32:(b + 1) * 32].double()
            x = math.frexp(float(block.abs().max()))[1] - 1 - 2  # floor(log2(amax)) - emax(e2m1)
            assert int(exponents[r, b]) == x + 127
            expected = nearest((block / 2.0**x).clamp(-6, 6), fp4) * 2.0**x
            got = dequantize_mxfp4(codes, exponents, torch.float64)[r, b * 32:(b + 1) * 32]
            assert torch.equal(got, expected)


def test_nvfp4_matches_the_two_level_scale_formula():
    torch.manual_seed(1)
    w = torch.randn(4, 64) * 3
    codes, block_scale, global_scale = quantize_nvfp4(w)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (4, 4)
    gs = 448 * 6 / w.double().abs().max()  # compressed-tensors' and vLLM's convention: a divisor
    assert float(global_scale) == pytest.approx(float(gs), rel=1e-6)
    e4m3, fp4 = grid(FP8_E4M3), grid(FP4_E2M1)
    deq = dequantize_nvfp4(codes, block_scale, global_scale, torch.float64)
    for r in range(4):
        for b in range(4):
            block = w[r, b * 16:(b + 1) * 16].double()
            bs = nearest(global_scale.double() * block.abs().max() / 6, e4m3)
            assert float(block_scale[r, b].float()) == float(bs)
            step = bs / global_scale.double()
            expected = nearest((block / step).clamp(-6, 6), fp4) * step
            torch.testing.assert_close(deq[r, b * 16:(b + 1) * 16], expected, rtol=1e-6, atol=0)


def test_all_zero_blocks_and_zero_tensors_stay_zero():
    w = torch.zeros(2, 64)
    w[0, 40] = 1.0
    for scheme in ("mxfp4", "nvfp4"):
        out = fake_quantize_fp4(w, scheme)
        assert torch.isfinite(out).all() and torch.equal(out, w)
        assert torch.equal(fake_quantize_fp4(torch.zeros(2, 64), scheme), torch.zeros(2, 64))


def test_fast_codes_equal_rounding_to_the_format():
    from minquant.formats import encode, round_to_format
    from minquant.microscaling import fp4_codes

    torch.manual_seed(4)
    x = torch.cat([torch.randn(10000) * 3, grid(FP4_E2M1), (grid(FP4_E2M1)[1:] + grid(FP4_E2M1)[:-1]) / 2,  # every tie
                   torch.tensor([7.0, -9.0, 0.0, -0.0, 1e-9, -1e-9])])
    expected = encode(round_to_format(x.clamp(-6, 6), FP4_E2M1), FP4_E2M1).to(torch.uint8)
    assert torch.equal(fp4_codes(x), expected)


def test_pack_round_trip_and_nibble_order():
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    codes = torch.stack([codes & 0xF, codes >> 4], -1).reshape(1, 512)  # every pair of codes
    packed = pack_fp4(codes)
    assert torch.equal(packed[0], torch.arange(256, dtype=torch.uint8))  # even element low, odd high
    assert torch.equal(unpack_fp4(packed), codes)


def test_fp4_linear_computes_with_the_dequantized_weight():
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(5, 64)
    for scheme in ("mxfp4", "nvfp4"):
        layer = FP4Linear.from_linear(linear, scheme)
        assert layer.weight_packed.shape == (24, 32)
        w_q = fake_quantize_fp4(linear.weight.detach(), scheme)
        torch.testing.assert_close(layer(x), F.linear(x, w_q, linear.bias.detach()))
        stored = sum(t.numel() * t.element_size() for t in (layer.weight_packed, layer.weight_scale))
        assert stored * 8 / linear.weight.numel() == bits_per_weight(scheme)


def test_fp4_error_is_between_int4_levels():
    # a published property: on Gaussian weights NVFP4 (block 16, fp8 scales) beats MXFP4 (block 32, power-of-two scales)
    torch.manual_seed(3)
    w = torch.randn(256, 512)
    err = {s: float((fake_quantize_fp4(w, s) - w).pow(2).mean()) for s in ("mxfp4", "nvfp4")}
    assert err["nvfp4"] < err["mxfp4"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="multiple of the block of 32"):
        quantize_mxfp4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="NaN"):
        quantize_nvfp4(torch.full((2, 16), float("nan")))
    with pytest.raises(ValueError, match="unknown fp4 scheme"):
        fake_quantize_fp4(torch.randn(2, 32), "fp4")
    with pytest.raises(ValueError, match="not a multiple"):
        FP4Linear(48, 8, "mxfp4")


def test_model_conversion_checks_every_layer_first(tiny_llama):
    from minquant.models import architecture

    model = tiny_llama
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj has NaN"):
        fp4_quantize_model(model, architecture(model), "nvfp4")
    after = model.state_dict()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)
    assert not any(isinstance(m, FP4Linear) for m in model.modules())


def test_nvfp4_fused_linears_share_one_global_scale(tiny_llama):
    from minquant.models import architecture

    fp4_quantize_model(tiny_llama, architecture(tiny_llama), "nvfp4")
    attn, mlp = tiny_llama.model.layers[0].self_attn, tiny_llama.model.layers[0].mlp
    qkv = {float(m.weight_global_scale) for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(qkv) == 1 and len({float(m.weight_global_scale) for m in (mlp.gate_proj, mlp.up_proj)}) == 1


def test_a_failure_part_way_puts_every_linear_back(tiny_llama, monkeypatch):
    from minquant.models import architecture

    calls = {"n": 0}
    real = FP4Linear.from_linear.__func__

    def failing(cls, linear, scheme, global_scale=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(cls, linear, scheme, global_scale)
    monkeypatch.setattr(FP4Linear, "from_linear", classmethod(failing))
    with pytest.raises(KeyboardInterrupt):
        fp4_quantize_model(tiny_llama, architecture(tiny_llama), "mxfp4")
    assert calls["n"] == 5 and not any(isinstance(m, FP4Linear) for m in tiny_llama.modules())
