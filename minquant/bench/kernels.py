"""`minquant bench kernels`: the W4A16 kernel against fp16 cuBLAS and torch's int4 kernel, on a GPU (notebook 06).

One script, nothing to install (the GPU machine has torch and Triton): it checks correctness at
full size, sweeps batch sizes and layer shapes, measures the card's copy bandwidth, times decoding
of a Llama-2-7B-shaped model, and writes data/results/kernels_<gpu>.json (after every layer shape,
so a run cut short still leaves its numbers). Kernel times are GPU times from CUDA graphs, with the
weights rotated through enough copies to overflow any L2 cache: at batch 1 a kernel runs for tens of
microseconds, about what Python needs to launch it, so timing eager calls measures the launch.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch

from minquant.nn import QuantLinear
from minquant.quant import QuantConfig

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 512)
# (K, N); the targets' shape first, so a run cut short still has it (and the decode test, run after it)
SHAPES = ((8192, 8192), (4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192))
G_IDX_BATCHES = (1, 16, 128)  # where the act-order (g_idx) path is timed too
REFERENCE_BATCHES = (1, 16, 128, 512)  # where the unfused reference is timed
ROTATE_BYTES = 512 * 2**20  # more than any L2 cache: each call reads its weights from HBM
TARGETS = ("8192x8192, g128: M=1 >= 3.0x fp16, >= 1.1x torch int4, >= 75% of copy bandwidth; M=16 >= 2.0x fp16; "
           "M=128 >= 0.9x; M=512 >= 0.6x; act-order within 5% of plain groups at M=1; 7B-shaped decode as a CUDA "
           "graph >= 2.5x fp16")


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
    """torch's own int4 kernel (tinygemm) for w (N, K) fp16: (fn of bf16 x, error), or (None, reason) when unavailable.

    The second item is then its max error relative to the int4 weights it was given, so a packing mistake
    (nibble order changes between torch versions) shows in the record instead of passing silently."""
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
        fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)  # noqa: E731  (bf16 only)
        w_q = (q.reshape(N, K // group_size, group_size) * scale.unsqueeze(-1) + lo.unsqueeze(-1)).reshape(N, K)
        eye = torch.eye(K, device=w.device, dtype=torch.bfloat16)[:256]       # 256 unit inputs
        w_seen = fn(eye).float()                                              # (256, N) = W_q[:, :256]^T
        rel = float((w_seen - w_q[:, :256].t()).abs().max() / w_q.abs().max())  # bf16 scales: ~1e-2
        return fn, rel
    except Exception as e:  # the op's signature changes between torch versions
        return None, f"{type(e).__name__}: {e}"


def random_layer(K: int, N: int, group_size: int, act_order: bool = False) -> QuantLinear:
    """A 4-bit QuantLinear of a random fp16 linear, on the GPU; act_order: inputs sent to groups in a random
    order (as GPTQ's act-order does), and the layer prepared (sorted) once, as its first call would."""
    from minquant.kernels import prepare

    linear = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.float16).requires_grad_(False)
    layer = QuantLinear.from_linear(linear, QuantConfig(4, group_size))
    if act_order:
        perm = torch.randperm(K, device="cuda")
        g_idx = torch.empty(K, dtype=torch.int32, device="cuda")
        g_idx[perm] = (torch.arange(K, device="cuda") // group_size).to(torch.int32)
        layer.g_idx.copy_(g_idx)
    prepare.prepare(layer)  # outside any timing or graph capture
    return layer


def full_size_checks(group_size: int) -> list[dict]:
    """Every Triton path against float64 at full size, fp16 and bf16, plain and act-order (sorted once)."""
    from minquant.kernels import dequant_matmul, prepare

    checks = []
    for K, N in ((4096, 11008), (8192, 8192)):
        for act_order in (False, True):
            layer = random_layer(K, N, group_size, act_order=act_order)
            p = prepare.prepare(layer)
            w64 = layer.dequantize_weight(torch.float64)
            for M, path in ((1, "gemv"), (4, "gemv"), (16, "tc"), (64, "tc"), (16, "fused"), (33, "fused"),
                               (512, "fused"), (512, "dequant")):
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(M, K, device="cuda", dtype=dtype)
                    y = dequant_matmul(x, p.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, backend="triton",
                                       group_size=p.group_size, perm=p.perm, path=path)
                    ref = x.double() @ w64.t()
                    err = float((y.double() - ref).abs().max() / ref.abs().max())
                    checks.append({"K": K, "N": N, "M": M, "dtype": str(dtype).split(".")[1], "path": path,
                                   "act_order": act_order, "max_rel_error": err, "ok": err < 1e-2})
    return checks


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def run(batches=BATCHES, shapes=SHAPES, group_size: int = 128, out: Path | None = None,
        decode: bool = True) -> Path:
    """Run the sweep on the current CUDA device and save data/results/kernels_<gpu>.json."""
    if not torch.cuda.is_available():
        raise RuntimeError("`minquant bench kernels` needs a CUDA GPU; on CPU the kernel runs in the Triton "
                           "interpreter, which tests correctness, not speed")
    import triton
    from triton.testing import do_bench

    from minquant.bench.results import RESULTS_DIR, save_results
    from minquant.kernels import dequant_matmul
    from minquant.kernels.timing import graph_time_ms

    torch.manual_seed(0)
    name = "kernels_" + re.sub(r"[^a-z0-9]+", "_", gpu_name().lower()).strip("_")
    out = out or RESULTS_DIR / f"{name}.json"
    protocol = {"group_size": group_size, "dtype": "fp16 activations (torch int4: bf16, its only dtype)",
                "timing": "GPU time per call from CUDA graphs of 20 calls (median of 5 replays), weights rotated through "
                          "512 MB of copies so every call reads HBM; '_eager' and 'reference': triton.testing.do_bench "
                          "median of eager calls (Python launch included); autotuning ranks configs by graph time too",
                "rotation_bytes": ROTATE_BYTES, "targets": TARGETS, "triton": triton.__version__,
                "cuda": torch.version.cuda}
    major, minor = torch.cuda.get_device_capability()
    from minquant.bench.sass import gemv_figures, tc_figures

    for key, figures in (("gemv_sass", lambda: gemv_figures(10 * major + minor)),
                         ("tc_sass", lambda: tc_figures(10 * major + minor, 16))):
        try:
            protocol[key] = figures()
            print(f"{key} (sm_{major}{minor}): {protocol[key]['summary']}", flush=True)
        except Exception as e:  # an architecture this Triton cannot target: the timings still count
            protocol[key] = {"error": f"{type(e).__name__}: {e}"}
    protocol["copy_bandwidth_gbs"] = copy_bw = copy_bandwidth_gbs(do_bench)
    print(f"{gpu_name()}: device-to-device copy {copy_bw:.0f} GB/s (read + write)", flush=True)
    checks = full_size_checks(group_size)
    bad = [c for c in checks if not c["ok"]]
    print(f"full-size checks: {len(checks) - len(bad)} of {len(checks)} within 1e-2 relative"
          + (f"; failing: {bad}" if bad else ""), flush=True)
    rows, int4_notes, decoded, fallbacks = [], {}, {}, set()

    def gpu_ms(fn):
        """Graph-timed GPU ms; eager do_bench (noted in the record) if fn cannot be captured."""
        try:
            return graph_time_ms(fn)
        except Exception as e:
            fallbacks.add(f"{type(e).__name__}: {e}"[:300])
            return do_bench(fn)

    for i, (K, N) in enumerate(shapes):
        w = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        fp16_w = rotating(lambda: w.clone(), w.numel() * 2)
        probe = random_layer(K, N, group_size)
        q_bytes = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
        q_layers = rotating(lambda: random_layer(K, N, group_size), q_bytes)
        ao_layers = rotating(lambda: random_layer(K, N, group_size, act_order=True), q_bytes) if i == 0 else None
        int4_fn, int4_notes[f"{K}x{N}"] = int4_torch(w, group_size)
        for M in batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            probe(x)  # first use: the path (GEMV / fused / dequantize) and its configuration are measured here
            # GPU time from CUDA graphs of 20 calls (each reading its own rotated copy of the weights);
            # the eager timing shows what Python's launch adds on top.
            t = {"fp16_matmul": gpu_ms(lambda: x @ fp16_w().t()), "minquant_w4a16": gpu_ms(lambda: q_layers()(x)),
                 "minquant_w4a16_eager": do_bench(lambda: q_layers()(x))}
            if M in REFERENCE_BATCHES:  # the unfused torch reference: milliseconds, eager
                ql = q_layers()
                t["reference"] = do_bench(lambda: dequant_matmul(x, ql.qweight, ql.qzeros, ql.scales, ql.g_idx, 4,
                                                                 backend="torch"))
            if M in G_IDX_BATCHES and ao_layers is not None:  # act-order checkpoints: sorted once, x gathered
                t["minquant_w4a16_act_order"] = gpu_ms(lambda: ao_layers()(x))
            if int4_fn is not None:
                x_bf16 = x.to(torch.bfloat16)  # cast outside the timing: tinygemm takes bf16 only
                t["torch_int4"] = gpu_ms(lambda: int4_fn(x_bf16))
            flops, moved = 2 * M * N * K, q_bytes + 2 * M * (K + N)
            row = {"M": M, "K": K, "N": N, "ms": t, "path": chosen_path(M, K, N, group_size),
                   "minquant_tflops": flops / (t["minquant_w4a16"] * 1e-3) / 1e12,
                   "minquant_gbs": moved / (t["minquant_w4a16"] * 1e-3) / 1e9,
                   "fp16_gbs": (2 * N * K + 2 * M * (K + N)) / (t["fp16_matmul"] * 1e-3) / 1e9,
                   "speedup_vs_fp16": t["fp16_matmul"] / t["minquant_w4a16"]}
            row["percent_of_copy_bandwidth"] = 100 * row["minquant_gbs"] / copy_bw
            if "torch_int4" in t:
                row["speedup_vs_torch_int4"] = t["torch_int4"] / t["minquant_w4a16"]
            if "minquant_w4a16_act_order" in t:
                row["act_order_slowdown"] = t["minquant_w4a16_act_order"] / t["minquant_w4a16"]
            rows.append(row)
            int4 = f"  int4 {t['torch_int4']:.4f} ms ({row['speedup_vs_torch_int4']:.2f}x)" if "torch_int4" in t else ""
            print(f"K={K:5} N={N:5} M={M:3}  fp16 {t['fp16_matmul']:.4f} ms  minquant {t['minquant_w4a16']:.4f} ms "
                  f"({row['speedup_vs_fp16']:.2f}x, {row['percent_of_copy_bandwidth']:.0f}% of copy BW){int4}"
                  f"  eager {t['minquant_w4a16_eager']:.4f}  reference {t.get('reference', float('nan')):.4f}", flush=True)
        fp16_w = q_layers = ao_layers = None  # free the rotated copies before the next shape
        protocol["torch_int4"] = int4_notes
        protocol["graph_capture_failures"] = sorted(fallbacks)
        if i == 0:
            print(f"targets: {targets_reached(rows)}", flush=True)
        if i == 0 and decode:
            try:
                decoded = decode_tokens_per_s(group_size)
            except Exception as e:  # record why, keep the sweep
                decoded = {"error": f"{type(e).__name__}: {e}"}
            print(f"decode: {decoded}", flush=True)
        save_results(name, protocol, {"checks": checks, "sweep": rows, "complete": False,
                                      "targets": targets_reached(rows, decoded), "decode": decoded}, out)
    results = {"checks": checks, "sweep": rows, "complete": True, "targets": targets_reached(rows, decoded), "decode": decoded}
    return save_results(name, protocol, results, out)


def chosen_path(M: int, K: int, N: int, group_size: int) -> str:
    """Which Triton path a call of this shape takes (after its first call measured the choice)."""
    import triton

    from minquant import kernels
    from minquant.kernels import triton_gemv

    if triton_gemv.supports(M, K, group_size):
        return "gemv " + str(next((v for k, v in triton_gemv._BEST.items() if k[:4] == (M, K, N, group_size)), ""))
    return next((v for k, v in kernels._LARGE.items() if k[:4] == (triton.next_power_of_2(M), K, N, group_size)), "?")


def targets_reached(rows: list[dict], decode: dict | None = None) -> dict:
    """Issue 21's targets, read off the sweep at 8192 x 8192 (and the decode run): value, target, met."""
    at = {r["M"]: r for r in rows if (r["K"], r["N"]) == (8192, 8192)}
    out = {}

    def check(name, value, target, higher_is_better=True):
        out[name] = {"value": value, "target": target,
                     "met": value >= target if higher_is_better else value <= target}
    if 1 in at:
        check("M1_speedup_vs_fp16", at[1]["speedup_vs_fp16"], 3.0)
        check("M1_percent_of_copy_bandwidth", at[1]["percent_of_copy_bandwidth"], 75)
        if "speedup_vs_torch_int4" in at[1]:
            check("M1_speedup_vs_torch_int4", at[1]["speedup_vs_torch_int4"], 1.1)
        if "act_order_slowdown" in at[1]:
            check("M1_act_order_time_ratio", at[1]["act_order_slowdown"], 1.05, higher_is_better=False)
    for M, target in ((16, 2.0), (128, 0.9), (512, 0.6)):
        if M in at:
            check(f"M{M}_speedup_vs_fp16", at[M]["speedup_vs_fp16"], target)
    if decode and "graphed_speedup" in decode:
        check("decode_graphed_speedup", decode["graphed_speedup"], 2.5)
    return out


@torch.inference_mode()
def decode_tokens_per_s(group_size: int = 128, new_tokens: int = 64) -> dict:
    """Batch-1 greedy decoding of a random Llama-2-7B-shaped model: fp16 vs minquant 4-bit."""
    import transformers as T

    from minquant.kernels.timing import graph_time_ms
    from minquant.models import load_config
    from minquant.rtn import quantize_to_quantlinear

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

    def graphed():
        try:
            # one decode-sized forward (1 token, no cache) per replay: the time to read every weight once,
            # what decoding costs per token once the framework's overhead is gone (vLLM, torch.compile)
            token = ids[:, :1].clone()
            return 1e3 / graph_time_ms(lambda: model(token, use_cache=False), calls=1, replays=20, warmup=3)
        except Exception as e:  # capture can fail on some transformers versions; the eager number stands
            return f"{type(e).__name__}: {e}"

    result = {"model": "Llama-2-7B shape, random init", "new_tokens": new_tokens,
              "fp16_tokens_per_s": speed(), "fp16_graphed_tokens_per_s": graphed()}
    quantize_to_quantlinear(model, QuantConfig(4, group_size))
    result["minquant_w4_tokens_per_s"] = speed()
    result["minquant_w4_graphed_tokens_per_s"] = graphed()
    result["speedup"] = result["minquant_w4_tokens_per_s"] / result["fp16_tokens_per_s"]
    if all(isinstance(result[k], float) for k in ("fp16_graphed_tokens_per_s", "minquant_w4_graphed_tokens_per_s")):
        result["graphed_speedup"] = result["minquant_w4_graphed_tokens_per_s"] / result["fp16_graphed_tokens_per_s"]
    return result


def table(record: dict, batches=(1, 16, 128, 512)) -> str:
    """Markdown: per layer shape and batch, GPU time of fp16, minquant and torch int4, and the ratios."""
    p, r = record["protocol"], record["results"]
    lines = [f"W4A16 g{p['group_size']} on {record['machine'].get('gpu', '?')} (`{record['command']}`, "
             f"{record['date'][:10]}; torch {record['versions']['torch']}, Triton {p['triton']}). GPU time per call "
             f"from CUDA graphs, weights rotated through {p['rotation_bytes'] // 2**20} MB; copy bandwidth "
             f"{p['copy_bandwidth_gbs']:.0f} GB/s (read + write). Target: {p['targets']}.", "",
             "| K x N | M | fp16 (us) | minquant (us) | vs fp16 | % copy BW | torch int4 (us) | minquant vs int4 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["sweep"]:
        if row["M"] not in batches:
            continue
        t = row["ms"]
        int4 = (f"{t['torch_int4'] * 1e3:.1f} | {row['speedup_vs_torch_int4']:.2f}x" if "torch_int4" in t else "- | -")
        lines.append(f"| {row['K']} x {row['N']} | {row['M']} | {t['fp16_matmul'] * 1e3:.1f} | {t['minquant_w4a16'] * 1e3:.1f} | "
                     f"{row['speedup_vs_fp16']:.2f}x | {row['percent_of_copy_bandwidth']:.0f}% | {int4} |")
    d = r.get("decode") or {}
    if "fp16_tokens_per_s" in d:
        graphed = (f"; as CUDA graphs (no Python overhead): fp16 {d['fp16_graphed_tokens_per_s']:.0f}, "
                   f"minquant {d['minquant_w4_graphed_tokens_per_s']:.0f} tokens/s ({d['graphed_speedup']:.2f}x)"
                   if "graphed_speedup" in d else "")
        lines += ["", f"Decoding a random Llama-2-7B-shaped model at batch 1 with transformers' `generate`: fp16 "
                      f"{d['fp16_tokens_per_s']:.1f}, minquant 4-bit {d['minquant_w4_tokens_per_s']:.1f} tokens/s "
                      f"({d['speedup']:.2f}x){graphed}."]
    return "\n".join(lines)
