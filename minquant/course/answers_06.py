"""Notebook 06's exercises: the references the check cells compare with (kept out of the notebook)."""
import torch

from minquant.course import answer, cases
from minquant.nn import QuantLinear
from minquant.packing import unpack
from minquant.quant import QuantConfig


def _fused_bytes_per_weight(group_size: int, bits: int = 4) -> float:
    return (bits + (16 + bits) / group_size) / 8      # the value, plus an fp16 scale and a zero per group


@answer("06.1")
def fused_bytes_per_weight_g64():
    return _fused_bytes_per_weight(64)


@answer("06.2")
def programs_for_33_by_200():
    import triton  # here, not at import: the answer module loads without Triton

    from minquant.kernels.triton_w4a16 import block_sizes

    BM, BN, _ = block_sizes(33)
    return triton.cdiv(33, BM) * triton.cdiv(200, BN)


@answer("06.3")
def intensity_w(M, K, N, bits, group_size):
    G = 1 if group_size == -1 else K // group_size
    weights = N * K * bits / 8 + N * G * (2 + bits / 8)     # packed values; an fp16 scale and a zero per group and column
    activations = 2 * M * K + 2 * M * N                     # fp16 x read, fp16 y written
    return 2 * M * N * K / (weights + activations)


@cases("06.3")
def _():
    return [(16, 8192, 8192, 4, 128), (1, 4096, 4096, 4, 128), (512, 4096, 11008, 8, -1),
            (64, 576, 1536, 2, 64), (1, 8192, 28672, 3, 128)]


@answer("06.4")
def unpack_word(words):
    return torch.stack([((words >> 4 * p) & 0xF).to(torch.float32) for p in range(8)], dim=-1)


@cases("06.4")
def _():
    g = torch.Generator().manual_seed(6)
    edges = torch.tensor([0, -1, -2**31, 2**31 - 1, 0x7654321F, 0x0F0F0F0F, -0x0F0F0F10], dtype=torch.int32)
    return [(torch.randint(-2**31, 2**31 - 1, (1000,), generator=g, dtype=torch.int32),), (edges,),
            (torch.randint(-2**31, 2**31 - 1, (16, 8), generator=g, dtype=torch.int32),)]


@answer("06.5")
def h200_issue_budget():
    lanes_per_s = 132 * 128 * 1.98e9
    weights_per_s = 0.8 * 4.8e12 / _fused_bytes_per_weight(128)
    return lanes_per_s / weights_per_s


@answer("06.6")
def cpu_matvec_bits(x, qweight, zeros, scales, group_size, bits):
    # float64 from the library's unpacking: y = x @ ((q - zero[g]) * scale[g])
    q = unpack(qweight, bits, dim=0).double()                                 # (K, N)
    g = torch.arange(x.numel()) // group_size
    w_t = (q - zeros[g].double()) * scales[g].double()
    return (x.double() @ w_t).float()


@cases("06.6")
def _():
    g = torch.Generator().manual_seed(66)
    out = []
    for bits, K, N, group_size in ((2, 256, 64, 64), (4, 256, 64, 64), (8, 256, 64, 128), (4, 576, 96, 32)):
        linear = torch.nn.Linear(K, N, bias=False)
        linear.weight.data = torch.randn(N, K, generator=g) * 0.05
        layer = QuantLinear.from_linear(linear, QuantConfig(bits, group_size))
        zeros = unpack(layer.qzeros, bits, dim=1).float() + 1                # GPTQ v1 stores zero - 1
        out.append((torch.randn(K, generator=g), layer.qweight, zeros, layer.scales.float(), group_size, bits))
    return out


def _smollm2_mb() -> tuple[float, float, float]:
    hidden, inner, kv, blocks, vocab = 576, 1536, 192, 30, 49152              # SmolLM2-135M's config
    linears = blocks * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner)
    return 4 * linears / 1e6, (4 + (16 + 4) / 64) / 8 * linears / 1e6, 4 * vocab * hidden / 1e6


@answer("06.7")
def cap_with_8_bit_head():
    fp32_mb, w4_mb, head_mb = _smollm2_mb()
    return (fp32_mb + head_mb) / (w4_mb + head_mb / 4)

