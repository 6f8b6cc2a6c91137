"""The fused Triton W4A16 kernel against a float64 reference, on CPU through Triton's interpreter,
plus a real compile of every configuration for NVIDIA GPUs (sm_80, sm_90) without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

from minquant.nn import QuantLinear
from minquant.quant import QuantConfig

triton = pytest.importorskip("triton")  # conftest.py has switched on the interpreter when there is no GPU
from minquant.kernels.triton_w4a16 import w4a16_matmul  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors: runs through the Triton interpreter (set when there is no GPU)")


def reference(x, layer):
    """float64: x @ W^T + b with W dequantized from the layer's GPTQ buffers."""
    y = x.double() @ layer.dequantize_weight(torch.float64).t()
    return y + layer.bias.double() if layer.bias is not None else y


def check(M, K, N, cfg, dtype, act_order=False, seed=0, contiguous=False, blocks=None):
    """contiguous: tell the kernel the groups are runs of cfg.group_size (it then skips g_idx)."""
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=bool(seed % 2)), cfg)
    if act_order:  # GPTQ's act-order: inputs belong to groups in any order, as g_idx says
        G = layer.scales.shape[0]
        layer.g_idx.copy_(torch.randperm(K) % G)
    x = torch.randn(M, K).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)  # poisoned: every element must be written
    y = w4a16_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, out=out,
                     group_size=cfg.group_size if contiguous else None, blocks=blocks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp16: x and the dequantized w are rounded to fp16
    torch.testing.assert_close(y.double(), reference(x, layer), rtol=tol, atol=tol)


@interpreted
@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("contiguous", [False, True], ids=["g_idx", "grouped"])
def test_matches_float64_reference(M, group_size, symmetric, contiguous):
    for dtype in (torch.float16, torch.float32):
        check(M, 256, 200, QuantConfig(4, group_size, symmetric), dtype, seed=M + group_size, contiguous=contiguous)


@interpreted
@pytest.mark.parametrize("path", ["skinny", "gemm"])
def test_every_autotune_configuration(path):
    """Each configuration the GPU autotuner may pick (split-K with atomic adds included), both K paths."""
    from minquant.kernels.triton_w4a16 import GEMM_CONFIGS, SKINNY_CONFIGS

    for i, (bm, bn, bk, split, _warps, _stages) in enumerate(SKINNY_CONFIGS if path == "skinny" else GEMM_CONFIGS):
        M = 3 if path == "skinny" else 33
        for group_size, contiguous in ((64, True), (32, True), (-1, True), (64, False)):
            # K = 320: with BLOCK_K 64 and SPLIT_K 4 the slices get unequal numbers of K-steps
            check(M, 320 if group_size != -1 else 200, 72, QuantConfig(4, group_size), torch.float32,
                  seed=i, contiguous=contiguous, blocks=(bm, bn, bk, split))


def test_fast_path_block_k():
    from minquant.kernels.triton_w4a16 import fast_path_block_k

    assert [fast_path_block_k(g, 4096) for g in (32, 64, 128, -1, 4096, None, 48, 8)] == [32, 64, 128, 256, 256, 0, 16, 0]


@interpreted
@pytest.mark.parametrize("K,N", [(128, 8), (64, 40), (192, 136)])
def test_odd_shapes(K, N):
    check(5, K, N, QuantConfig(4, 64 if K % 64 == 0 else -1), torch.float32)


@interpreted
def test_act_order_g_idx():
    check(7, 256, 96, QuantConfig(4, 32), torch.float32, act_order=True)
    check(1, 256, 96, QuantConfig(4, 64, symmetric=True), torch.float16, act_order=True)


@interpreted
def test_batched_input_and_errors():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), QuantConfig(4, 32))
    x = torch.randn(2, 3, 64)
    y = w4a16_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y.double(), reference(x, layer), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x has 63 features, the layer expects K = 64"):
        w4a16_matmul(torch.randn(1, 63), layer.qweight, layer.qzeros, layer.scales, layer.g_idx)


COMPILE_ALL = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minquant.kernels.triton_w4a16 import GEMM_CONFIGS, SKINNY_CONFIGS, w4a16_kernel
ints = ["M", "N", "K", "group_k", "m_bucket", "stride_xm", "stride_xk", "stride_qk", "stride_qn", "stride_zg", "stride_zn",
        "stride_sg", "stride_sn", "stride_om", "stride_on"]
n = 0
configs = SKINNY_CONFIGS + GEMM_CONFIGS
for ((bm, bn, bk, split, warps, stages), grouped, dtype, cap) in itertools.product(configs, (True, False), ("fp16", "bf16"), (80, 90)):
    sig = {"x_ptr": f"*{dtype}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
           "g_idx_ptr": "*i32", "out_ptr": f"*{dtype}", **{i: "i32" for i in ints},
           **{c: "constexpr" for c in ("GROUPED", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")}}
    src = ASTSource(w4a16_kernel, sig, constexprs={"GROUPED": grouped, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                                                   "SPLIT_K": split})
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
    assert len(kernel.asm["cubin"]) > 1000
    n += 1
print("compiled", n)
"""


@pytest.mark.slow
def test_every_configuration_compiles_for_real_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, no GPU needed
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled 96" in run.stdout  # 12 autotune configs x grouped/g_idx x fp16/bf16 x sm_80/sm_90


def on_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def gpu_check(layer, M, dtype, **kwargs):
    x = torch.randn(M, layer.in_features, device="cuda", dtype=dtype)
    out = torch.full((M, layer.out_features), float("nan"), device="cuda", dtype=dtype)
    y = w4a16_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, out=out, **kwargs)
    torch.testing.assert_close(y.double(), reference(x, layer), rtol=2e-2, atol=5e-2)


@on_gpu
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_size_on_gpu(group_size, grouped, dtype):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(4096, 4104), QuantConfig(4, group_size)).cuda()
    for M in (1, 33):  # autotuned: the skinny path (split-K) and the GEMM path
        gpu_check(layer, M, dtype, group_size=group_size if grouped else None)


@on_gpu
@pytest.mark.parametrize("path", ["skinny", "gemm"])
def test_every_configuration_on_gpu(path):
    from minquant.kernels.triton_w4a16 import GEMM_CONFIGS, SKINNY_CONFIGS

    layer = QuantLinear.from_linear(torch.nn.Linear(2048, 1000), QuantConfig(4, 128)).cuda()
    for bm, bn, bk, split, _warps, _stages in SKINNY_CONFIGS if path == "skinny" else GEMM_CONFIGS:
        for grouped in (128, None):
            gpu_check(layer, 7 if path == "skinny" else 100, torch.float16, group_size=grouped, blocks=(bm, bn, bk, split))


@on_gpu
def test_quantlinear_on_gpu_sees_act_order():
    """QuantLinear passes its group size to the kernel only while g_idx is contiguous."""
    layer = QuantLinear.from_linear(torch.nn.Linear(512, 256), QuantConfig(4, 64)).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    assert layer.contiguous_group_size() == 64
    torch.testing.assert_close(layer(x).double(), reference(x, layer), rtol=2e-2, atol=5e-2)
    layer.g_idx.copy_(torch.randperm(512, device="cuda") % 8)
    assert layer.contiguous_group_size() is None
    torch.testing.assert_close(layer(x).double(), reference(x, layer), rtol=2e-2, atol=5e-2)


@interpreted
def test_dispatch():
    from minquant import kernels

    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), QuantConfig(4, 32))
    x = torch.randn(3, 64)
    args = (x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, layer.bias)
    assert kernels.choose_backend(x, 4) == "torch"  # CPU tensors: the reference
    torch.testing.assert_close(kernels.dequant_matmul(*args, backend="triton"),
                               kernels.dequant_matmul(*args, backend="torch"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="handle 4-bit weights, not 3-bit"):
        kernels.dequant_matmul(*args[:5], 3, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        kernels.dequant_matmul(*args, backend="cuda")


def test_benchmark_rotates_through_copies():
    from minquant.bench import kernels as benchmark

    made = []
    nxt = benchmark.rotating(lambda: made.append(len(made)) or len(made), benchmark.ROTATE_BYTES // 4)
    assert len(made) == 4 and [nxt() for _ in range(6)] == [2, 3, 4, 1, 2, 3]
