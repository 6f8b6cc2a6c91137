"""The CPU kernels (minquant/kernels/cpu_kernels.c through kernels/cpu.py) against a float64 product of the
layer's dequantized weight: every bit width, group size, act-order, odd shapes, few and many rows,
both paths; QuantLinear's CPU dispatch, its fallbacks, and the compiled library's cache."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from layers import make_layer
from minquant.kernels import cpu, reference as torch_reference
from minquant.quant import QuantConfig

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler: QuantLinear uses the reference on CPU")


def float64_product(x, layer):
    y = x.double() @ layer.dequantize_weight(torch.float64).t()
    return y + layer.bias.double() if layer.bias is not None else y


def relative_error(y, x, layer):
    ref = float64_product(x, layer)
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


SHAPES = {2: [(256, 48), (512, 80)], 3: [(256, 96), (512, 160)], 4: [(256, 40), (384, 200)], 8: [(256, 36), (320, 132)]}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("path", ["gemv", "dequant"])
def test_every_width_group_and_path_against_float64(bits, group_size, path):
    for (K, N) in SHAPES[bits]:  # N never a whole number of tiles: the padding is exercised
        if group_size != -1 and K % group_size:
            continue
        layer = make_layer(K, N, QuantConfig(bits, group_size), seed=K + bits)
        p = cpu.prepare_cpu(layer)
        assert p is not None and p.bits == (4 if bits == 3 else bits)
        for M in (1, 2, 3, 4, 5, 9):  # 5 and 9: the GEMV's second pass of 4 rows
            x = torch.randn(M, K)
            with torch.no_grad():
                y = cpu.matmul(x, p, layer.bias, path=path)
            assert y.shape == (M, N) and y.dtype == torch.float32
            assert relative_error(y, x, layer) < 1e-5, (K, N, M)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("M", [1, 6])
def test_act_order_rows_sorted_once(bits, M):
    layer = make_layer(512, 96, QuantConfig(bits, 64), act_order=True, seed=M)
    assert layer.act_order
    x = torch.randn(M, 512)
    with torch.no_grad():
        y = layer(x)
    p = layer._cpu_prepared
    assert p is not None and p.perm is not None and p.group_size == 64
    assert relative_error(y, x, layer) < 1e-5


def test_act_order_with_unequal_groups_takes_the_reference():
    layer = make_layer(256, 64, QuantConfig(4, 64), seed=3)
    g = torch.zeros(256, dtype=torch.int32)
    g[100:] = torch.randint(1, 4, (156,), dtype=torch.int32)  # group 0 holds 100 inputs: not runs of 64
    layer.g_idx.copy_(g)
    x = torch.randn(2, 256)
    with torch.no_grad():
        y = layer(x)
    assert cpu.prepare_cpu(layer) is None
    torch.testing.assert_close(y, torch_reference.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales,
                                                                 layer.g_idx, 4, layer.bias))


def test_quantlinear_forward_uses_the_kernels_and_keeps_shapes_and_dtypes():
    layer = make_layer(256, 72, QuantConfig(4, 32))
    for shape in [(256,), (3, 256), (2, 5, 256)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*shape[:-1], 72)
        assert relative_error(y.reshape(-1, 72), x.reshape(-1, 256), layer) < 1e-5
    assert layer._cpu_prepared is not None
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        x = torch.randn(3, 256).to(dtype)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype and relative_error(y, x, layer) < tol


def test_a_gradient_takes_the_differentiable_reference():
    layer = make_layer(128, 32, QuantConfig(4, 32))
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()
    W = layer.dequantize_weight()
    torch.testing.assert_close(x.grad, W.sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)


def test_edited_buffers_and_bias_are_read_again():
    a, b = make_layer(128, 64, QuantConfig(4, 32), seed=1), make_layer(128, 64, QuantConfig(4, 32), seed=2)
    x = torch.randn(1, 128)
    with torch.no_grad():
        before = a(x)
        a.load_state_dict(b.state_dict())  # in-place copies: same storage, new version
        after = a(x)
        assert relative_error(after, x, b) < 1e-5 and not torch.allclose(before, after)
        a.scales.mul_(2)   # the view holds fp32 copies of the scales: an edit must reach them
        assert torch.allclose(a(x) - a.bias.float(), 2 * (after - a.bias.float()), rtol=1e-5, atol=1e-4)
        a.scales.div_(2)
        a.bias.add_(1.0)  # (in fp16, so not exactly after + 1)
        edited = a(x)
        assert relative_error(edited, x, a) < 1e-5 and (edited - after - 1.0).abs().max() < 1e-3


def test_inference_mode_tensors():
    with torch.inference_mode():
        layer = make_layer(128, 64, QuantConfig(4, 32))
        x = torch.randn(2, 128)
        assert relative_error(layer(x), x, layer) < 1e-5


def test_many_rows_choose_a_path_by_measurement():
    layer = make_layer(256, 64, QuantConfig(4, 64))
    cpu._CHOICE.clear()
    x = torch.randn(12, 256)
    with torch.no_grad():
        y = layer(x)
    assert relative_error(y, x, layer) < 1e-5
    (key, path), = cpu._CHOICE.items()
    assert key[0] == 16 and path in cpu.PATHS  # rows bucketed by powers of two


def test_dequant_buffer_shared_by_layers_of_one_shape():
    a, b = make_layer(128, 64, QuantConfig(4, 32), seed=1), make_layer(128, 64, QuantConfig(4, 32), seed=2)
    x = torch.randn(20, 128)
    pa, pb = cpu.prepare_cpu(a), cpu.prepare_cpu(b)
    with torch.no_grad():
        ya = cpu.matmul(x, pa, a.bias, path="dequant")
        yb = cpu.matmul(x, pb, b.bias, path="dequant")
    assert relative_error(ya, x, a) < 1e-5 and relative_error(yb, x, b) < 1e-5


def test_dequant_path_rounds_as_the_reference():
    """(q - z) * s in fp32, like the reference: the buffer holds exactly the reference's weights."""
    layer = make_layer(256, 64, QuantConfig(4, 64), bias=False)
    p = cpu.prepare_cpu(layer)
    wt = cpu.dequantize_t(p)[:, :64]
    assert torch.equal(wt, layer.dequantize_weight().t())


def test_avx2_and_avx512_builds_give_the_same_bits():
    """Lanes are output columns, so each column's sum runs in one order at any vector width."""
    layer = make_layer(512, 128, QuantConfig(4, 64))
    x = torch.randn(3, 512)
    with torch.no_grad():
        y8 = cpu.matmul(x, cpu.prepare_cpu(layer, vw=8), layer.bias, path="gemv")
        y16 = cpu.matmul(x, cpu.prepare_cpu(layer, vw=16), layer.bias, path="gemv")
    assert torch.equal(y8, y16)


def test_bad_input():
    layer = make_layer(128, 64, QuantConfig(4, 32))
    p = cpu.prepare_cpu(layer)
    with pytest.raises(ValueError, match="x has 100 features, the layer expects K = 128"):
        cpu.matmul(torch.randn(2, 100), p)
    with pytest.raises(ValueError, match="unknown CPU path 'fast'"):
        cpu.matmul(torch.randn(2, 128), p, path="fast")


def test_without_the_kernels_quantlinear_warns_once_and_uses_the_reference():
    code = ("import warnings, torch\n"
            "from minquant.nn import QuantLinear\nfrom minquant.quant import QuantConfig\n"
            "from minquant.kernels import reference\n"
            "layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), QuantConfig(4, 32))\n"
            "x = torch.randn(2, 64)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    with torch.no_grad():\n"
            "        y = layer(x); layer(x)\n"
            "ref = reference.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, layer.bias)\n"
            "assert torch.equal(y, ref)\n"
            "msgs = [str(m.message) for m in w if 'CPU kernels are unavailable' in str(m.message)]\n"
            "assert len(msgs) == 1, msgs\n"
            "print(msgs[0])\n")
    for env in ({"MINQUANT_CPU_KERNELS": "off"}, {"CC": "no-such-compiler", "PATH": "/nonexistent",
                                                  "MINQUANT_CACHE": "off"}):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "CPU kernels are unavailable" in done.stdout


def test_the_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MINQUANT_CACHE", str(tmp_path))
    first = cpu.build(vw=8)
    assert first.parent == tmp_path / "cpu-kernels" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert cpu.build(vw=8) == first and first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert cpu.build(vw=16) != first                                       # other flags: another file
    assert not list(first.parent.glob(".*.tmp"))                           # nothing half-written left behind
    changed = tmp_path / "cpu_kernels.c"
    changed.write_text(cpu.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu, "SOURCE", changed)
    assert cpu.build(vw=8) != first


def test_a_compile_error_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("MINQUANT_CACHE", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("int mq_gemv( {\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="could not compile minquant's CPU kernels"):
        cpu.build(vw=8)
    assert not list((tmp_path / "cpu-kernels").glob("*.so"))


def test_no_warning_when_available():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.available()
