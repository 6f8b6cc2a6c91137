"""The small-batch tensor-core kernel against float64 (Triton's interpreter on CPU), and its SASS on sm_80/sm_90."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minquant.quant import QuantConfig

triton = pytest.importorskip("triton")  # conftest.py has switched on the interpreter when there is no GPU
from minquant import kernels  # noqa: E402
from minquant.kernels import prepare, triton_tc  # noqa: E402
from test_triton_gemv import close, interpreted, make_layer  # noqa: E402


@interpreted
@pytest.mark.parametrize("M", [5, 16, 33])
@pytest.mark.parametrize("group_size", [128, 256, -1])
def test_tc_matches_float64(M, group_size):
    for dtype, N in ((torch.float32, 72), (torch.float16, 128)):  # 72: a ragged last column tile
        layer = make_layer(512, N, QuantConfig(4, group_size, symmetric=group_size == 256), bias=N == 72, seed=M)
        x = torch.randn(M, 512).to(dtype)
        y = triton_tc.w4_tc_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, group_size)
        assert y.dtype == dtype and y.shape == (M, N)
        close(y, x, layer, dtype)


@interpreted
@pytest.mark.parametrize("config", triton_tc.CONFIGS, ids=str)
def test_every_tc_configuration(config, monkeypatch):
    """Right results, and launched as configured (the interpreter ignores warps and stages: they are read off)."""
    launched = []
    real = triton_tc.tc_kernel

    class Recording:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs) or real[grid](*args, **kwargs)
    monkeypatch.setattr(triton_tc, "tc_kernel", Recording())
    layer = make_layer(384, 136, QuantConfig(4, 128), seed=config[1])
    x = torch.randn(20, 384)
    close(triton_tc.w4_tc_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, 128, config=config),
          x, layer, torch.float32)
    assert [(k["BLOCK_M"], k["BLOCK_N"], k["SPLIT_K"], k["num_warps"], k["num_stages"]) for k in launched] == [config]


@interpreted
def test_tc_through_dispatch_with_act_order():
    layer = make_layer(256, 64, QuantConfig(4, 128), act_order=True)
    p = prepare.prepare(layer)
    x = torch.randn(3, 4, 256)
    assert kernels.large_m_path(x.reshape(12, 256), p.qweight, layer.qzeros, layer.scales, layer.g_idx, 128, p.perm) == "tc"
    y = kernels.dequant_matmul(x, p.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, layer.bias, backend="triton",
                               group_size=p.group_size, perm=p.perm)
    close(y.reshape(12, 64), x.reshape(12, 256), layer, torch.float32)


def test_tc_takes_what_it_can():
    assert triton_tc.supports(16, 4096, 128) and triton_tc.supports(16, 4096, -1) and triton_tc.supports(8, 768, 768)
    assert not triton_tc.supports(16, 4096, 64)      # a dot is 16 words = 128 inputs deep: smaller groups go elsewhere
    assert not triton_tc.supports(16, 4096, None)
    assert not triton_tc.supports(16, 576, -1)       # K not a multiple of 128 (SmolLM2: its layers take the others)
    layer = make_layer(256, 16, QuantConfig(4, 64))
    with pytest.raises(ValueError, match="multiples of 128 inputs, not K=256, group_size=64"):
        triton_tc.w4_tc_matmul(torch.randn(8, 256), layer.qweight, layer.qzeros, layer.scales, None, 64)


SASS_CHECK = """
import json
from minquant.bench import sass
from minquant.kernels import triton_tc
cases = [(cap, dt, 16, triton_tc.CONFIGS[0]) for cap in (80, 90) for dt in ("fp16", "bf16")]
cases += [(90, "fp16", c[0], c) for c in triton_tc.CONFIGS[1:]]  # every configuration the tuner may pick, at its M
out = []
for cap, dt, M, config in cases:
    compiled, per_thread = sass.compile_tc(cap, M, dtype=dt, bias=True, config=config)
    r = sass.report(compiled, per_thread)
    loop = sass.main_loop(sass.sass_of(compiled))
    wide = sum(1 for ins in loop if sass.opcode(ins) == "LDG.E.EF.128")  # the weights (x: plain LDG.E.128)
    out.append(dict(cap=cap, dtype=dt, M=M, config=config, per_weight=r.per_weight, wide_loads=wide,
                    words_per_thread=per_thread // 8, converts=r.converts, spills=r.spills,
                    mma=sum(v for op, v in r.opcodes.items() if op.startswith(("HMMA", "HGMMA")))))  # mma / wgmma
print(json.dumps(out))
"""


@pytest.mark.slow
def test_tc_sass_is_fast():
    """8192 x 8192 g128: 16-byte weight loads (each word once), tensor-core MMAs, no I2F, no spills in any
    configuration; at M = 16 and 32 at most 5.5 SASS instructions per weight (at 64 the x side grows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SASS_CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in json.loads(run.stdout.strip().splitlines()[-1]):
        name = f"sm_{r['cap']} {r['dtype']} M={r['M']} {r['config']}"
        assert r["spills"] == 0 and r["mma"] > 0, name
        assert not any(c.startswith(("I2F", "I2FP")) for c in r["converts"]), (name, r["converts"])
        assert r["wide_loads"] * 4 == r["words_per_thread"], name
        if r["M"] <= 32:
            assert r["per_weight"] <= 5.5, (name, r["per_weight"])
