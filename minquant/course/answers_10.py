"""Notebook 10's exercises: the references its check cells compare with (kept out of the notebook)."""
import math

import torch

from minquant.course import answer, cases


def _smollm2_points() -> list[tuple[str, float, float]]:
    """(label, MB, perplexity) of every configuration in section 3, with notebook 01's accounting."""
    from minquant.bench.results import load_results
    from minquant.memory import param_shapes, weight_bytes
    from minquant.models import load_config

    cfg = load_config("smollm2-135m")
    linear_params = sum(math.prod(s) for n, s in param_shapes(cfg).items() if ".layers." in n and len(s) == 2)
    rest_bytes = weight_bytes(cfg, "fp16").total - 2 * linear_params   # embeddings and norms in fp16

    def mb(bits, group_size, sym=False):
        return weight_bytes(cfg, f"int{bits}", group_size, symmetric=sym, linears_only=True).total / 1e6

    points = []
    for r in load_results("rtn_smollm2")["results"]["smollm2"]:
        c = r["config"]
        if c is None:
            points.append(("Q4_1 baseline in fp16", weight_bytes(cfg, "fp16").total / 1e6, r["ppl"]))
        elif c["integer_zero"]:
            points.append(("RTN " + r["label"], mb(c["bits"], c["group_size"], c["symmetric"]), r["ppl"]))
    for name in ["gptq_smollm2", "awq_smollm2", "mixed_smollm2"]:
        for label, r in load_results(name)["results"].items():
            if r["method"] == "gptq" and "bits_per_weight" in r:
                points.append((label, (rest_bytes + r["bits_per_weight"] * linear_params / 8) / 1e6, r["ppl"]))
            elif r["method"] in ("gptq", "awq"):
                points.append((label, mb(r["bits"], r["group_size"], r["sym"]), r["ppl"]))
    return points


@answer("10.1")
def rtn_w4_g64_over_the_front():
    points = _smollm2_points()
    _, size, ppl = next(p for p in points if p[0] == "RTN W4 g64")
    return ppl / min(p for _, mb, p in points if mb <= size)


@answer("10.2")
def llama2_7b_g_idx_bytes():
    from minquant.memory import param_shapes
    from minquant.models import load_config

    shapes = param_shapes(load_config("meta-llama/Llama-2-7b-hf"))
    return sum(4 * shape[1] for name, shape in shapes.items() if ".layers." in name and len(shape) == 2)


@answer("10.3")
def costliest_linear_type():
    from minquant.bench.results import load_results

    cost = {}
    for name, nats in load_results("sensitivity_smollm2")["results"]["measured"].items():
        kind = name.split(".", 3)[3]                          # model.layers.7.mlp.up_proj -> mlp.up_proj
        cost[kind] = cost.get(kind, 0.0) + nats
    return max(cost, key=cost.get)


@answer("10.4")
def fp32_memory_over_checkpoint():
    from minquant.bench.results import load_results

    demo = load_results("demo_smollm2")["results"]
    fp32 = next(e for e in demo["entries"] if e["method"] == "fp32")
    return fp32["model_bytes"] / demo["checkpoint_bytes"]


@answer("10.5")
def bits_per_weight(qweight, qzeros, scales, g_idx):
    """Another route than counting bytes: minquant.memory's bits for the (N, K) matrix, plus g_idx's int32s."""
    from minquant.memory import linear_bits

    N, K, G = scales.shape[1], g_idx.numel(), scales.shape[0]
    bits = qweight.shape[0] * 32 // K
    # GPTQ stores qzeros even for symmetric layers, so count the zero-points whatever the scheme
    return (linear_bits(N, K, bits, K // G, symmetric=False) + 32 * K) / (N * K)


@cases("10.5")
def _():
    from minquant.packing import to_gptq
    from minquant.quant import QuantConfig

    g = torch.Generator().manual_seed(10)

    def layer(N, K, cfg, act_order=False):
        G = cfg.groups(K)
        q = torch.randint(0, 2**cfg.bits, (N, K), generator=g)
        zero = torch.randint(1, 2**cfg.bits, (N, G), generator=g).float()
        scale = torch.rand(N, G, generator=g) * 0.01 + 1e-3
        g_idx = None
        if act_order:  # act-order with static groups: each group still holds group_size columns, shuffled
            g_idx = (torch.arange(K) // (K // G))[torch.randperm(K, generator=g)]
        t = to_gptq(q, scale, zero, cfg, g_idx)
        return t["qweight"], t["qzeros"], t["scales"], t["g_idx"]

    return [layer(64, 128, QuantConfig(4, 64)),
            layer(32, 96, QuantConfig(3, 32)),
            layer(64, 256, QuantConfig(2, 128), act_order=True),
            layer(16, 64, QuantConfig(8, -1)),                      # per channel: one group per row
            layer(8, 16, QuantConfig(4, 16, symmetric=True))]       # tiny, and symmetric: qzeros are stored anyway
