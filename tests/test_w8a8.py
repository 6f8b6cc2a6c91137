"""W8A8 linears against float64 references written out here: scales by the formula, the integer product exact."""
import pytest
import torch

from minquant.formats import FP8_E4M3, round_to_format
from minquant.w8a8 import W8A8Config, W8A8Linear, fp8_matmul, int8_matmul, to_8bit, token_scale


def int8_reference(x, w, b, input_scale=None):
    """Plain float64: symmetric per-channel weights, per-token (or one given) activation scale, -127..127."""
    x, w = x.double(), w.double()
    s_w = w.abs().amax(1, keepdim=True) / 127
    s_x = x.abs().amax(1, keepdim=True) / 127 if input_scale is None else torch.full((x.shape[0], 1), input_scale).double()
    q_w = torch.round(w / s_w).clamp(-127, 127)
    q_x = torch.round(x / s_x).clamp(-128, 127)  # the int8 range: only a static scale lets an input reach -128
    return (q_x @ q_w.T) * s_x * s_w.T + b.double()


@pytest.mark.parametrize("static", [None, 0.02])
def test_int8_linear_matches_float64(static):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    layer = W8A8Linear.from_linear(linear, "int8", static)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (40, 1)
    expected = int8_reference(x.reshape(-1, 96), linear.weight.detach(), linear.bias.detach(), static)
    torch.testing.assert_close(layer(x).double(), expected.reshape(3, 7, 40), rtol=1e-5, atol=1e-6)


def test_int8_matmul_is_exact_and_the_fallback_too(monkeypatch):
    torch.manual_seed(1)
    a = torch.randint(-127, 128, (5, 200), dtype=torch.int8)
    b = torch.randint(-127, 128, (30, 200), dtype=torch.int8)
    exact = (a.long() @ b.long().T).int()
    assert torch.equal(int8_matmul(a, b), exact)

    def refuse(*args):
        raise RuntimeError("no int8 GEMM here")
    monkeypatch.setattr(torch, "_int_mm", refuse)
    assert torch.equal(int8_matmul(a, b), exact)


def test_fp8_rounding_is_e4m3_with_saturation():
    x = torch.tensor([[0.0314159, 500.0, -1000.0, 3.3, 447.0]])
    q = to_8bit(x, torch.ones(1, 1), "fp8")
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float(), round_to_format(x.clamp(-448, 448), FP8_E4M3))


def test_fp8_linear_matches_float64_and_emulation(monkeypatch):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(9, 64)
    layer = W8A8Linear.from_linear(linear, "fp8")
    w = linear.weight.detach().double()
    s_w = w.abs().amax(1, keepdim=True) / 448
    s_x = x.double().abs().amax(1, keepdim=True) / 448
    q_w = round_to_format(w / s_w, FP8_E4M3)
    q_x = round_to_format(x.double() / s_x, FP8_E4M3)
    expected = (q_x @ q_w.T) * s_x * s_w.T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)

    def refuse(*args, **kwargs):
        raise RuntimeError("no fp8 GEMM here")
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_dynamic_scales_follow_each_token():
    # a published property of per-token scales: a token scaled by a power of two quantizes to the same integers
    torch.manual_seed(3)
    layer = W8A8Linear.from_linear(torch.nn.Linear(32, 16, bias=False), "int8")
    x = torch.randn(4, 32)
    x2 = x.clone()
    x2[1] *= 8
    y, y2 = layer(x), layer(x2)
    torch.testing.assert_close(y2[1], 8 * y[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(y2[[0, 2, 3]], y[[0, 2, 3]])
    assert token_scale(x, "int8").shape == (4, 1)


def test_static_scale_clips_what_lies_beyond():
    layer = W8A8Linear.from_linear(torch.nn.Linear(2, 1, bias=False), "int8", input_scale=0.01)
    layer.weight.fill_(127)
    layer.weight_scale.fill_(1 / 127)  # weight exactly 1.0
    y = layer(torch.tensor([[0.5, 5.0]]))  # 5.0 is beyond 127 * 0.01 = 1.27: clipped
    assert float(y) == pytest.approx(0.5 + 1.27, abs=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'int8' or 'fp8'"):
        W8A8Config("int4")
    with pytest.raises(ValueError, match="dynamic"):
        W8A8Config(activations="per-tensor")
    with pytest.raises(ValueError, match="needs smoothquant=True"):
        W8A8Config(alpha=0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        W8A8Config(smoothquant=True, alpha=2)
    linear = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="positive finite"):
        W8A8Linear.from_linear(linear, "int8", input_scale=0.0)
    linear.weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        W8A8Linear.from_linear(linear, "int8")


def test_fp8_matmul_shapes():
    a = torch.randn(3, 16).to(torch.float8_e4m3fn)
    b = torch.randn(8, 16).to(torch.float8_e4m3fn)
    out = fp8_matmul(a, b, torch.ones(3, 1), torch.full((8, 1), 2.0), torch.float32)
    torch.testing.assert_close(out, 2 * (a.float() @ b.float().T))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 16, 17, 40])
def test_cuda_kernels_match_the_cpu(M):
    # CUDA's int8 GEMM needs M > 16 and its fp8 one multiples of 16: the padded paths must give the same numbers
    torch.manual_seed(5)
    linear = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(M, 256)
    for dtype in ("int8",) + (("fp8",) if torch.cuda.get_device_capability() >= (8, 9) else ()):
        layer = W8A8Linear.from_linear(linear, dtype)
        expected = layer(x)
        torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), expected, rtol=1e-2 if dtype == "fp8" else 1e-5, atol=1e-3)
