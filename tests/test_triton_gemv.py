"""The decoding GEMV, the large-batch paths and act-order preparation against a float64 reference (on
CPU through Triton's interpreter), and what the GEMV compiles to on sm_80 / sm_90 (SASS, no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minquant.quant import QuantConfig

triton = pytest.importorskip("triton")  # conftest.py has switched on the interpreter when there is no GPU
from minquant import kernels  # noqa: E402
from minquant.kernels import prepare, triton_gemv  # noqa: E402
from layers import make_layer  # noqa: E402
from test_triton_w4a16 import interpreted, on_gpu, reference  # noqa: E402  (x @ W^T in float64, g_idx honoured)


def close(y, x, layer, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # x and y rounded to dtype
    ref = reference(x, layer)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48])
def test_gemv_matches_float64(M, group_size):
    K = 384 if group_size != -1 else 200  # 200: K/8 = 25 words, chunks of one word
    for dtype, bias in ((torch.float32, True), (torch.float16, False)):
        layer = make_layer(K, 72, QuantConfig(4, group_size, symmetric=group_size == 64), bias=bias, seed=M)
        x = torch.randn(M, K).to(dtype)
        y = triton_gemv.w4_gemv(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, group_size)
        assert y.dtype == dtype and y.shape == (M, 72)
        close(y, x, layer, dtype)


@interpreted
@pytest.mark.parametrize("config", triton_gemv.CONFIGS, ids=str)
def test_every_gemv_configuration(config):
    """Each configuration the GPU tuner may pick, split-K ones included, on ragged and even shapes."""
    for K, N, g in ((512, 96, 64), (256, 64, 128)):
        layer = make_layer(K, N, QuantConfig(4, g), seed=config[0])
        x = torch.randn(2, K)
        close(triton_gemv.w4_gemv(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, g, config=config),
              x, layer, torch.float32)


@interpreted
def test_gemv_reads_strided_and_offset_inputs():
    layer = make_layer(256, 64, QuantConfig(4, 64))
    big = torch.randn(3, 257).half()
    x = big[:, 1:]  # odd storage offset: the fp16 pair loads need 4-byte aligned rows, so it is copied
    close(triton_gemv.w4_gemv(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, 64), x, layer, torch.float16)


@interpreted
def test_one_launch_no_memset_no_copy(monkeypatch):
    """The GEMV path at split-K 1 is one kernel writing an uninitialised output: no memset, no copy back."""
    launches = []
    real = triton_gemv.gemv_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(triton_gemv, "gemv_kernel", Counting())
    layer = make_layer(256, 64, QuantConfig(4, 128))
    x = torch.randn(1, 256).to(torch.bfloat16)
    close(triton_gemv.w4_gemv(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, 128, config=(32, 16, 1, 4)),
          x, layer, torch.bfloat16)
    assert len(launches) == 1
    out, acc = triton_gemv.output_buffers(1, 64, torch.bfloat16, "cpu", split=1)
    assert acc is out
    poisoned = torch.full((1, 64), float("nan"), dtype=torch.bfloat16)
    assert triton_gemv.output_buffers(1, 64, torch.bfloat16, "cpu", 1, poisoned)[1] is poisoned  # no memset
    out, acc = triton_gemv.output_buffers(1, 64, torch.bfloat16, "cpu", split=2)
    assert acc.dtype == torch.float32 and acc.abs().sum() == 0  # split-K in bf16: a zeroed fp32 buffer


def test_gemv_takes_what_it_can():
    assert triton_gemv.supports(1, 4096, 128) and triton_gemv.supports(4, 4096, -1)
    assert not triton_gemv.supports(5, 4096, 128)    # more rows: the tensor-core or dequantize path
    assert not triton_gemv.supports(1, 4096, None)   # unknown / act-order groups: prepare sorts them first
    assert not triton_gemv.supports(1, 4096, 4)      # groups smaller than a word
    assert [triton_gemv.chunk_words(w, n) for w, n in ((16, 1024), (4, 1024), (6, 72), (25, 25), (72, 72))] == [16, 4, 2, 1, 8]


@interpreted
@pytest.mark.parametrize("M", [1, 7])
def test_act_order_sorted_once(M):
    """An act-order layer is sorted into contiguous groups at first use; x read through the permutation."""
    layer = make_layer(256, 64, QuantConfig(4, 32), act_order=True)
    assert layer.contiguous_group_size() is None
    p = prepare.prepare(layer)
    assert p.group_size == 32 and p.perm is not None and p.qweight is not layer.qweight
    x = torch.randn(M, 256)
    y = kernels.dequant_matmul(x, p.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, layer.bias,
                               backend="triton", group_size=p.group_size, perm=p.perm)
    close(y, x, layer, torch.float32)
    assert prepare.prepare(layer) is p  # cached


def test_prepare_keeps_plain_layers_and_refuses_unequal_groups():
    layer = make_layer(128, 16, QuantConfig(4, 32))
    p = prepare.prepare(layer)
    assert p.perm is None and p.qweight is layer.qweight and p.group_size == 32
    odd = make_layer(128, 16, QuantConfig(4, 32))
    g = torch.arange(128, dtype=torch.int32) // 32
    g[0] = 1  # group 0 has 31 members, group 1 has 33: sorting cannot make runs of 32
    odd.g_idx.copy_(g)
    p = prepare.prepare(odd)
    assert p.perm is None and p.group_size is None  # the kernels then gather through g_idx


def test_prepared_view_follows_the_buffers():
    layer = make_layer(128, 16, QuantConfig(4, 32), act_order=True)
    first = prepare.prepare(layer)
    layer.load_state_dict(make_layer(128, 16, QuantConfig(4, 32)).state_dict())  # a plain checkpoint now
    second = prepare.prepare(layer)
    assert second is not first and second.perm is None and second.group_size == 32
    layer.to(torch.float32)
    assert layer._prepared is None  # .to() drops it


@interpreted
@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_large_batch_paths(path):
    for perm_case in (False, True):
        layer = make_layer(256, 64, QuantConfig(4, 64), act_order=perm_case)
        p = prepare.prepare(layer)
        x = torch.randn(2, 9, 256)
        y = kernels.dequant_matmul(x, p.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, layer.bias,
                                   backend="triton", group_size=p.group_size, perm=p.perm, path=path)
        assert y.shape == (2, 9, 64)
        close(y.reshape(18, 64), x.reshape(18, 256), layer, torch.float32)
    assert kernels.large_m_path(x.reshape(18, 256), p.qweight, layer.qzeros, layer.scales, layer.g_idx, 64, p.perm) == "fused"


@interpreted
def test_dispatch_errors():
    layer = make_layer(64, 16, QuantConfig(4, 32))
    args = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, layer.bias)
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        kernels.dequant_matmul(torch.randn(1, 64), *args, backend="triton", group_size=32, path="fast")
    with pytest.raises(ValueError, match="the GEMV takes 1-4 rows"):
        kernels.dequant_matmul(torch.randn(5, 64), *args, backend="triton", group_size=32, path="gemv")
    with pytest.raises(ValueError, match="needs contiguous groups"):
        kernels.dequant_matmul(torch.randn(5, 64), *args, backend="triton", path="dequant")
    with pytest.raises(ValueError, match="perm .* is for the Triton kernels"):
        kernels.dequant_matmul(torch.randn(5, 64), *args, backend="torch", perm=torch.arange(64, dtype=torch.int32))


SASS_CHECK = """
import json
from minquant.bench import sass
out = []
for cap in (80, 90):
    for M, dt, permuted in ((1, "fp16", False), (1, "bf16", False), (1, "fp16", True), (4, "fp16", False)):
        compiled, per_thread = sass.compile_gemv(cap, M, dtype=dt, permuted=permuted, bias=True)
        r = sass.report(compiled, per_thread)
        loop = sass.main_loop(sass.sass_of(compiled))
        wide = sum(1 for ins in loop if sass.opcode(ins).startswith("LDG") and sass.opcode(ins).endswith(".128"))
        out.append(dict(cap=cap, M=M, dtype=dt, permuted=permuted, per_weight=r.per_weight, wide_loads=wide,
                        evict_first=sum(1 for ins in loop if ".EF." in ins), words_per_thread=per_thread // 8,
                        converts=r.converts, spills=r.spills, registers=r.registers))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def gemv_sass():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, no GPU needed
    run = subprocess.run([sys.executable, "-c", SASS_CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gemv_sass_is_fast(gemv_sass):
    """What makes the batch-1 GEMV fast, read from its SASS for sm_80 and sm_90 at 8192 x 8192 g128."""
    for r in gemv_sass:
        name = f"sm_{r['cap']} M={r['M']} {r['dtype']}{' act-order' if r['permuted'] else ''}"
        assert r["spills"] == 0, name
        assert not any(c.startswith(("I2F", "I2FP")) for c in r["converts"]), (name, r["converts"])  # magic numbers
        assert r["wide_loads"] * 4 == r["words_per_thread"], name  # 16-byte loads, each word exactly once
        assert r["evict_first"] == r["wide_loads"], name           # weights stream past the cache
        if r["M"] == 1 and not r["permuted"]:
            assert r["per_weight"] <= 4.5, (name, r["per_weight"])
        if r["M"] == 1 and r["permuted"]:  # x gathered through the permutation: more per weight, still < 5
            assert r["per_weight"] <= 5.0, (name, r["per_weight"])


@on_gpu
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_path_full_size_on_gpu(act_order, dtype):
    """QuantLinear on a GPU: prepared once, the GEMV for 1-4 rows, the measured choice beyond."""
    layer = make_layer(4096, 4104, QuantConfig(4, 128), act_order=act_order).cuda()
    for M in (1, 3, 4, 16, 300):
        x = torch.randn(M, 4096, device="cuda", dtype=dtype)
        y = layer(x)
        ref = reference(x, layer)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2, M
    p = prepare.prepare(layer)
    assert p.group_size == 128 and (p.perm is not None) == act_order


@interpreted
@pytest.mark.parametrize("group_size", [64, 4, -1])
def test_dequantize_for_cublas(group_size):
    """The one-pass dequantization behind the large-batch path, groups of whole words or not."""
    from minquant.kernels.triton_dequant import dequantize_t

    layer = make_layer(64, 24, QuantConfig(4, group_size))
    wt = dequantize_t(layer.qweight, layer.qzeros, layer.scales, group_size, torch.float32, reuse=False)
    torch.testing.assert_close(wt, layer.dequantize_weight().t(), rtol=1e-6, atol=1e-6)


def test_fastest_skips_what_cannot_run(monkeypatch):
    from minquant.kernels import timing

    monkeypatch.setattr(timing, "graph_time_ms", lambda fn: fn())  # the "time" is what fn returns

    def fails():
        raise RuntimeError("out of shared memory")
    assert timing.fastest({"a": lambda: 3.0, "b": fails, "c": lambda: 1.0}, "config") == "c"
    with pytest.raises(RuntimeError, match="no GEMV config ran") as e:
        timing.fastest({"b": fails}, "GEMV config")
    assert "out of shared memory" in str(e.value.__cause__)
