import itertools
import random
from fractions import Fraction

import pytest

from minquant.memory import linear_bits, weight_bytes
from minquant.mixed import (FLOAT, MixedPlan, allocate, candidate_configs, config_label, option_bits, plan_mixed,
                            uniform_bits_per_weight)
from minquant.quant import QuantConfig


def brute_force(costs, sizes, budget):
    best = None
    for picks in itertools.product(*[range(len(r)) for r in costs]):
        if any(sizes[i][o] is None for i, o in enumerate(picks)):
            continue
        if sum(sizes[i][o] for i, o in enumerate(picks)) <= budget:
            c = sum(costs[i][o] for i, o in enumerate(picks))
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_allocation_equals_brute_force_on_toys(seed):
    rng = random.Random(seed)
    L, O = rng.randint(1, 5), rng.randint(1, 4)
    sizes = [[rng.randint(1, 30) if rng.random() > 0.15 else None for _ in range(O)] for _ in range(L)]
    for row in sizes:
        row[0] = row[0] or rng.randint(1, 30)  # every layer has some option
    costs = [[rng.random() for _ in range(O)] for _ in range(L)]
    least = sum(min(s for s in row if s is not None) for row in sizes)
    most = sum(max(s for s in row if s is not None) for row in sizes)
    for budget in sorted({least, (least + most) // 2, most, rng.randint(least, most)}):
        picks = allocate(costs, sizes, budget)
        used = sum(sizes[i][o] for i, o in enumerate(picks))
        assert used <= budget
        assert sum(costs[i][o] for i, o in enumerate(picks)) == pytest.approx(brute_force(costs, sizes, budget))


def test_coarse_resolution_never_goes_over_the_budget():
    rng = random.Random(1)
    sizes = [[rng.randint(10_000, 1_000_000) for _ in range(6)] for _ in range(40)]
    costs = [[rng.random() for _ in range(6)] for _ in range(40)]
    for budget in (sum(min(r) for r in sizes) + 123, sum(sorted(r)[3] for r in sizes), sum(max(r) for r in sizes) - 1):
        picks = allocate(costs, sizes, budget, resolution=50)  # a unit of thousands of bits: heavy rounding
        assert sum(sizes[i][o] for i, o in enumerate(picks)) <= budget
        # at least as good as the cheapest-everywhere plan, and close to the fine DP's optimum
        assert sum(costs[i][o] for i, o in enumerate(picks)) <= sum(costs[i][r.index(min(r))] for i, r in enumerate(sizes))
        fine = allocate(costs, sizes, budget, resolution=1 << 18)
        coarse_cost = sum(costs[i][o] for i, o in enumerate(picks))
        assert coarse_cost <= sum(costs[i][o] for i, o in enumerate(fine)) * 1.25


def test_budget_below_the_cheapest_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="below the smallest possible plan"):
        allocate([[1.0, 0.0]], [[10, 20]], 9)
    shapes = {"a": (64, 128), "b": (128, 64)}
    configs = candidate_configs(bits=(2, 4), group_sizes=(64,))
    table = {n: {label: 1.0 for label in configs} for n in shapes}
    with pytest.raises(ValueError, match="budget of 1.9 bits per weight is below"):
        plan_mixed(table, shapes, configs, 1.9)
    with pytest.raises(ValueError, match="no cost for W4 g64"):
        plan_mixed({n: {"W2 g64": 1.0, FLOAT: 0.0} for n in shapes}, shapes, configs, 4.5)


def test_linear_bits_counts_as_memory_does():
    # values + per group an fp16 scale and a bits-bit zero; symmetric drops the zero; 16 bits: no overhead
    assert linear_bits(576, 576, 4, 64) == 576 * 576 * 4 + 576 * 9 * (16 + 4)
    assert linear_bits(576, 1536, 3, -1, symmetric=True) == 576 * 1536 * 3 + 576 * 16
    assert linear_bits(10, 20, 16) == 10 * 20 * 16
    with pytest.raises(ValueError, match="does not divide"):
        linear_bits(576, 576, 4, 128)
    # the model-level accounting is the sum of these
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    wb = weight_bytes(cfg, "int4", 64, linears_only=True)
    shapes = [(128, 128), (64, 128), (64, 128), (128, 128), (256, 128), (256, 128), (128, 256)]
    quantized = 2 * sum(linear_bits(N, K, 4, 64) for N, K in shapes)
    assert wb.weights * 8 + wb.overhead * 8 == pytest.approx(quantized + 16 * (wb.params - 2 * sum(N * K for N, K in shapes)), abs=16)


def test_plan_at_a_uniform_budget():
    shapes = {f"l{i}": (128, 256) for i in range(6)}
    configs = candidate_configs(bits=(2, 3, 4, 8), group_sizes=(64, -1))
    w3 = QuantConfig(3, 64)
    budget = uniform_bits_per_weight(shapes, w3)
    assert isinstance(budget, Fraction) and budget == Fraction(linear_bits(128, 256, 3, 64), 128 * 256)
    # if every layer's costs are the same, the best plan can be no better than uniform and must fit
    table = {n: {label: (0 if c is None else 2.0 ** -c.bits * (2 if c.group_size == -1 else 1)) for label, c in configs.items()}
             for n in shapes}
    plan = plan_mixed(table, shapes, configs, budget)
    assert plan.bits <= budget * plan.params and plan.bits_per_weight <= budget
    uniform_cost = sum(table[n][config_label(w3)] for n in shapes)
    assert plan.proxy <= uniform_cost + 1e-12
    # one layer far more sensitive than the rest gets more bits than the others
    table["l0"] = {label: 100 * v for label, v in table["l0"].items()}
    plan = plan_mixed(table, shapes, configs, budget)
    bits = {n: (16 if c is None else c.bits) for n, c in ((n, plan.config(n)) for n in shapes)}
    assert bits["l0"] > min(bits.values())
    assert plan.bits_per_weight <= budget


def test_option_bits_and_plan_round_trip(tmp_path):
    assert option_bits((576, 576), QuantConfig(4, 128)) is None  # 128 does not divide 576
    assert option_bits((576, 576), None) == 576 * 576 * 16
    configs = candidate_configs()
    assert FLOAT in configs and config_label(configs["W3 per-channel"]) == "W3 per-channel"
    shapes = {"a": (64, 128), "b": (128, 64)}
    table = {n: {label: (0.0 if c is None else 1.0 / c.bits) for label, c in configs.items()} for n in shapes}
    plan = plan_mixed(table, shapes, configs, 4.5)
    again = MixedPlan.load(plan.save(tmp_path / "plan.json"))
    assert again.layers == plan.layers and again.bits == plan.bits and again.proxy == plan.proxy
    assert all(again.config(n) == plan.config(n) for n in shapes)


def tiny_windows(n=8, seqlen=32, vocab=64, seed=0):
    import torch

    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_mixed_gptq_follows_the_plan_and_round_trips(tiny_llama, tmp_path):
    import json

    import torch

    import minquant
    from minquant.checkpoint import load_quantized, module_config, save_quantized
    from minquant.nn import QuantLinear
    from minquant.sensitivity import layer_names

    ids, names = tiny_windows(), layer_names(tiny_llama)
    model = minquant.quantize(tiny_llama, "gptq", bits=4, group_size=32, bits_budget=3.5, calib=ids,
                              sensitivity_samples=4, progress=False)
    plan = model.mixed_plan
    assert plan.bits_per_weight <= 3.5 and set(plan.layers) == set(names)
    assert len(set(plan.layers.values())) > 1  # really mixed
    for name in plan.layers:  # each layer stored as planned (or left float)
        m, cfg = model.get_submodule(name), plan.config(name)
        if cfg is None:
            assert type(m) is torch.nn.Linear
        else:
            assert isinstance(m, QuantLinear) and m.cfg == cfg
    # tied groups share a config (vLLM fuses q/k/v and gate/up)
    for i in range(2):
        assert len({plan.layers[f"model.layers.{i}.self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert plan.layers[f"model.layers.{i}.mlp.gate_proj"] == plan.layers[f"model.layers.{i}.mlp.up_proj"]
    out = save_quantized(model, None, tmp_path / "mixed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for name in plan.layers:  # the dynamic rules, read as vLLM reads them, give back every layer's config
        assert module_config(qc, name) == plan.config(name), name
    again, _ = load_quantized(out, dtype=torch.float32)
    x = ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model.float()(x).logits, rtol=1e-3, atol=1e-3)


def test_module_config_reads_dynamic_rules_in_order():
    from minquant.checkpoint import module_config

    qc = {"bits": 4, "group_size": 128, "sym": True,
          "dynamic": {"-:model\\.layers\\.0\\.mlp\\.down_proj$": {}, r"+:.*\.mlp\..*": {"bits": 8, "group_size": 32},
                      r".*\.1\..*": {"bits": 2}}}
    assert module_config(qc, "model.layers.0.mlp.down_proj") is None
    assert module_config(qc, "model.layers.1.mlp.up_proj") == QuantConfig(8, 32, symmetric=True)  # first match wins
    assert module_config(qc, "model.layers.1.self_attn.q_proj") == QuantConfig(2, 128, symmetric=True)
    assert module_config(qc, "model.layers.2.self_attn.q_proj") == QuantConfig(4, 128, symmetric=True)


def test_plan_naming_unknown_layers_is_refused(tiny_llama):
    from minquant.gptq import GPTQConfig, gptq_quantize_model

    with pytest.raises(ValueError, match="does not quantize: model.layers.9.mlp.up_proj"):
        gptq_quantize_model(tiny_llama, tiny_windows(), GPTQConfig(QuantConfig(4, 32)), plan={"model.layers.9.mlp.up_proj": None},
                            progress=False)
    import minquant

    with pytest.raises(ValueError, match=r"bits_budget=3.0: not option\(s\) of method='awq'"):
        minquant.quantize(tiny_llama, "awq", bits_budget=3.0, calib=tiny_windows())
