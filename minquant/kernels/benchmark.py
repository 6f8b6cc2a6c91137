"""`minquant bench kernels`: the W4A16 kernel against fp16 cuBLAS and torch's int4 kernel, on a GPU.

One script, nothing to install (the GPU machine has torch and Triton): it checks correctness at
full size, sweeps batch sizes and layer shapes, measures the card's copy bandwidth, times decoding
of a Llama-2-7B-shaped model, and writes data/results/kernels_<gpu>.json. Timings are medians of
`triton.testing.do_bench`, with the weights rotated through enough copies to overflow the L2 cache.
"""
from __future__ import annotations

import math
import re
import time

import torch

from minquant.nn import QuantLinear
from minquant.quant import QuantConfig

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 512)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192))  # (K, N)
ROTATE_BYTES = 512 * 2**20  # more than any L2 cache: each call reads its weights from HBM


def copy_bandwidth_gbs(do_bench) -> float:
    """Device-to-device copy: bytes read + written per second, the practical memory roofline."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def rotating(make, bytes_each: int):
    """A callable that cycles through enough copies of `make()` to defeat the caches."""
    copies = [make() for _ in range(max(1, math.ceil(ROTATE_BYTES / bytes_each)))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return next_copy


def int4_torch(w: torch.Tensor, group_size: int):
    """torch's own int4 kernel (tinygemm) for w (N, K) fp16, or None with the reason when unavailable."""
    try:
        N, K = w.shape
        wg = w.float().reshape(N, K // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.int32).reshape(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        # tinygemm: w = (q - 8) * scale + zero, scale and zero (K/g, N, 2) in bf16
        zero = lo + 8 * scale
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return lambda x: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, group_size, sz), None
    except Exception as e:  # the op's signature changes between torch versions
        return None, f"{type(e).__name__}: {e}"


def bench_kernels(batches=BATCHES, shapes=SHAPES, group_size: int = 128, out=None):
    """Run the sweep on the current CUDA device and save data/results/kernels_<gpu>.json."""
    if not torch.cuda.is_available():
        raise RuntimeError("`minquant bench kernels` needs a CUDA GPU; on CPU the kernel runs in the Triton "
                           "interpreter, which tests correctness, not speed")
    from triton.testing import do_bench

    from minquant.bench import save_results
    from minquant.kernels import dequant_matmul

    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(do_bench)
    rows, checks, int4_note = [], [], None
    for K, N in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.float16)
                                        .requires_grad_(False), QuantConfig(4, group_size))
        x = torch.randn(16, K, device="cuda", dtype=torch.float16)
        ref = x.double() @ layer.dequantize_weight(torch.float64).t()
        fused = dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, backend="triton")
        checks.append({"K": K, "N": N, "max_abs_error": float((fused.double() - ref).abs().max()),
                       "max_abs_ref": float(ref.abs().max())})
        fp16_w = rotating(lambda: w.clone(), w.numel() * 2)
        q_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        q_layers = rotating(lambda: QuantLinear.from_linear(
            torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.float16).requires_grad_(False),
            QuantConfig(4, group_size)), q_bytes)
        int4_fn, int4_note = int4_torch(w, group_size)
        for M in batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)

            def fused_call():
                ql = q_layers()
                return dequant_matmul(x, ql.qweight, ql.qzeros, ql.scales, ql.g_idx, 4, backend="triton")

            def reference_call():
                ql = q_layers()
                return dequant_matmul(x, ql.qweight, ql.qzeros, ql.scales, ql.g_idx, 4, backend="torch")
            t = {"fp16_matmul": do_bench(lambda: x @ fp16_w().t()), "minquant_w4a16": do_bench(fused_call),
                 "reference": do_bench(reference_call)}
            if int4_fn is not None:
                t["torch_int4"] = do_bench(lambda: int4_fn(x))
            flops, moved = 2 * M * N * K, q_bytes + 2 * M * (K + N)
            row = {"M": M, "K": K, "N": N, "ms": t,
                   "minquant_tflops": flops / (t["minquant_w4a16"] * 1e-3) / 1e12,
                   "minquant_gbs": moved / (t["minquant_w4a16"] * 1e-3) / 1e9,
                   "speedup_vs_fp16": t["fp16_matmul"] / t["minquant_w4a16"]}
            row["percent_of_copy_bandwidth"] = 100 * row["minquant_gbs"] / copy_gbs
            if "torch_int4" in t:
                row["speedup_vs_torch_int4"] = t["torch_int4"] / t["minquant_w4a16"]
            rows.append(row)
            print(f"K={K:5} N={N:5} M={M:3}  fp16 {t['fp16_matmul']:.4f} ms  minquant {t['minquant_w4a16']:.4f} ms "
                  f"({row['speedup_vs_fp16']:.2f}x, {row['percent_of_copy_bandwidth']:.0f}% of copy BW)", flush=True)
    decode = decode_tokens_per_s(group_size)
    gpu = torch.cuda.get_device_name()
    name = "kernels_" + re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    protocol = {"group_size": group_size, "dtype": "fp16 activations", "timing": "triton.testing.do_bench median",
                "rotation_bytes": ROTATE_BYTES, "copy_bandwidth_gbs": copy_gbs, "torch_int4": int4_note or "available"}
    return save_results(name, protocol, {"checks": checks, "sweep": rows, "decode": decode}, out)


@torch.inference_mode()
def decode_tokens_per_s(group_size: int = 128, new_tokens: int = 64) -> dict:
    """Batch-1 greedy decoding of a random Llama-2-7B-shaped model: fp16 vs minquant 4-bit."""
    import transformers as T

    from minquant.models import load_config
    from minquant.rtn import quantize_model

    cfg = load_config("meta-llama/Llama-2-7b-hf")
    with torch.device("cuda"):  # initialise on the GPU: 6.7B parameters in fp16, never on the CPU
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")

    def speed():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up, autotune
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return new_tokens / (time.perf_counter() - start)

    result = {"model": "Llama-2-7B shape, random init", "fp16_tokens_per_s": speed()}
    quantize_model(model, QuantConfig(4, group_size))
    result["minquant_w4_tokens_per_s"] = speed()
    result["speedup"] = result["minquant_w4_tokens_per_s"] / result["fp16_tokens_per_s"]
    return result
