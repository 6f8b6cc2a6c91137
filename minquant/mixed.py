"""Mixed precision: bits and group size per linear, chosen to minimise the summed sensitivity under a byte budget.

Derived in notebooks/09_mixed_precision_and_calibration.ipynb. Each linear l may take one of a few
storage configs o (2/3/4/8 bits at a few group sizes, or kept fp16); config o costs it bits_lo
(counted as `minquant.memory` counts them: values, fp16 scales, zero-points) and a proxy loss
c_lo (`minquant.sensitivity`). Choosing one o per layer to minimise sum c_lo subject to
sum bits_lo <= budget is a multiple-choice knapsack. We solve it by dynamic programming over the
budget above the cheapest plan, cut into at most `resolution` units, each option's bits rounded
*up* to whole units (so whatever the DP picks fits the true budget), then spend the true bits
still left on the upgrades that buy the most proxy per bit. On small problems (a spare budget of
at most `resolution` bits) the unit is one bit and the DP is exact: the tests check it against
brute force.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from minquant.memory import linear_bits
from minquant.quant import QuantConfig, scheme_label

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
FLOAT = "fp16"  # the label of "keep this layer in float"


def config_label(cfg: QuantConfig | None) -> str:
    """'W4 g64', 'W3 per-channel', or 'fp16' for a layer kept float."""
    return FLOAT if cfg is None else scheme_label(cfg.bits, cfg.group_size)


def candidate_configs(bits=BITS, group_sizes=GROUP_SIZES, symmetric: bool = False,
                      keep_float: bool = True) -> dict[str, QuantConfig | None]:
    """The options every layer chooses from, by label (a config that does not fit a layer is skipped there)."""
    configs: dict[str, QuantConfig | None] = {config_label(c): c for c in
                                             (QuantConfig(b, g, symmetric=symmetric) for b in bits for g in group_sizes)}
    if keep_float:
        configs[FLOAT] = None
    return configs


def option_bits(shape: tuple[int, int], cfg: QuantConfig | None) -> int | None:
    """Storage bits of an (N, K) linear at `cfg` (fp16 if None); None if the config cannot store it."""
    N, K = shape
    if cfg is None:
        return linear_bits(N, K, 16)
    from minquant.packing import check_packable

    try:
        check_packable(N, K, cfg)
    except ValueError:
        return None
    return linear_bits(N, K, cfg.bits, cfg.group_size, cfg.symmetric)


def allocate(costs: list[list[float]], sizes: list[list[int | None]], budget: int, resolution: int = 1 << 16) -> list[int]:
    """The option index per layer minimising sum costs[l][o] with sum sizes[l][o] <= budget (None = not allowed)."""
    L = len(costs)
    if L == 0 or any(len(c) != len(s) for c, s in zip(costs, sizes)):
        raise ValueError("costs and sizes need one equally long row of options per layer")
    smallest = sum(min((s for s in row if s is not None), default=math.inf) for row in sizes)
    if smallest > budget:
        raise ValueError(f"the budget of {budget:,} bits is below the smallest possible plan ({smallest:,} bits: "
                         "every layer at its cheapest option)")
    # Work in bits above each layer's cheapest option: the cheapest plan always fits, and the units
    # only have to cover the part of the budget that is really being shared out.
    floor = [min(s for s in row if s is not None) for row in sizes]
    spare = budget - smallest
    unit = max(1, -(-spare // resolution))
    cap = spare // unit
    dp = np.zeros(cap + 1)  # dp[c]: least cost of the layers so far within c units above their cheapest
    choice = np.zeros((L, cap + 1), dtype=np.int16)
    for layer, (row_costs, row_sizes) in enumerate(zip(costs, sizes)):
        best = np.full(cap + 1, np.inf)
        for o, (c, s) in enumerate(zip(row_costs, row_sizes)):
            if s is None:
                continue
            u = -(-(s - floor[layer]) // unit)  # rounded up: whatever fits in units fits in bits
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = dp[:cap + 1 - u] + c
            better = cand < best
            best[better], choice[layer, better] = cand[better], o
        dp = best
    picks, c = [0] * L, cap
    for layer in range(L - 1, -1, -1):
        picks[layer] = int(choice[layer, c])
        c -= -(-(sizes[layer][picks[layer]] - floor[layer]) // unit)
    return _fill(picks, costs, sizes, budget)


def _fill(picks: list[int], costs, sizes, budget: int) -> list[int]:
    """Spend the bits the rounding left over: repeatedly take the affordable switch with the best cost saved per bit."""
    left = budget - sum(sizes[layer][o] for layer, o in enumerate(picks))
    while True:
        best, best_gain = None, 0.0
        for layer, o in enumerate(picks):
            for p, (c, s) in enumerate(zip(costs[layer], sizes[layer])):
                if s is None or c >= costs[layer][o]:
                    continue
                extra = s - sizes[layer][o]
                if extra <= left:
                    gain = (costs[layer][o] - c) / max(extra, 1)
                    if gain > best_gain:
                        best, best_gain = (layer, p, extra), gain
        if best is None:
            return picks
        layer, p, extra = best
        picks[layer], left = p, left - extra


@dataclass
class MixedPlan:
    """Per layer: the chosen config's label; and the options, bits and proxy cost behind the choice."""
    layers: dict[str, str]  # layer name -> config label
    configs: dict[str, QuantConfig | None]  # label -> config (None: kept fp16)
    bits: int  # total storage bits of the planned linears
    params: int  # their weights
    proxy: float  # summed proxy cost of the plan

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params

    def config(self, name: str) -> QuantConfig | None:
        return self.configs[self.layers[name]]

    def counts(self) -> dict[str, int]:
        """How many layers took each config."""
        out: dict[str, int] = {}
        for label in self.layers.values():
            out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_json(self) -> dict:
        cfgs = {label: None if c is None else {"bits": c.bits, "group_size": c.group_size, "sym": c.symmetric}
                for label, c in self.configs.items() if label in set(self.layers.values())}
        return {"layers": self.layers, "configs": cfgs, "bits": self.bits, "params": self.params, "proxy": self.proxy}

    @classmethod
    def from_json(cls, d: dict) -> MixedPlan:
        configs = {label: None if c is None else QuantConfig(c["bits"], c["group_size"], symmetric=c["sym"])
                   for label, c in d["configs"].items()}
        return cls(dict(d["layers"]), configs, d["bits"], d["params"], d["proxy"])

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> MixedPlan:
        return cls.from_json(json.loads(Path(path).read_text()))


def plan_mixed(table: dict[str, dict[str, float]], shapes: dict[str, tuple[int, int]],
               configs: dict[str, QuantConfig | None], bits_per_weight: float | Fraction,
               tied: list[list[str]] | None = None, resolution: int = 1 << 16) -> MixedPlan:
    """The plan with the least summed proxy (`table[layer][label]`) at <= `bits_per_weight` over these layers.

    `tied`: groups of layers that must share one config (q/k/v, gate/up: vLLM fuses each group into
    one matrix, stored with one config); the other layers choose alone.
    """
    names, labels = list(table), list(configs)
    missing = [label for label in labels if any(label not in table[n] for n in names)]
    if missing:
        raise ValueError(f"the sensitivity table has no cost for {', '.join(missing)} on every layer")
    grouped = {n for g in tied or [] for n in g}
    units = [list(g) for g in tied or []] + [[n] for n in names if n not in grouped]
    if sorted(n for u in units for n in u) != sorted(names):
        raise ValueError("tied groups must name each layer of the table at most once, and only those layers")
    params = sum(N * K for N, K in (shapes[n] for n in names))
    budget = math.floor(Fraction(bits_per_weight) * params)  # exact: never a bit over
    layer_sizes = {n: [option_bits(shapes[n], configs[label]) for label in labels] for n in names}
    sizes = [[None if any(layer_sizes[n][o] is None for n in u) else sum(layer_sizes[n][o] for n in u)
              for o in range(len(labels))] for u in units]
    costs = [[sum(table[n][label] for n in u) for label in labels] for u in units]
    try:
        picks = allocate(costs, sizes, budget, resolution)
    except ValueError as e:
        least = sum(min(s for s in row if s is not None) for row in sizes) / params
        raise ValueError(f"a budget of {float(bits_per_weight):.4g} bits per weight is below what these options allow "
                         f"({least:.3f}: every layer at its cheapest option): {e}") from None
    chosen = {n: labels[o] for u, o in zip(units, picks) for n in u}
    return MixedPlan({n: chosen[n] for n in names}, dict(configs), sum(sizes[i][o] for i, o in enumerate(picks)), params,
                     sum(costs[i][o] for i, o in enumerate(picks)))


def plan_model(model: torch.nn.Module, windows: torch.Tensor, bits_per_weight: float | Fraction,
               configs: dict[str, QuantConfig | None] | None = None, *, proxy: str = "fisher", method: str = "rtn",
               tie_groups: bool = True, batch_size: int = 2, progress: bool = True) -> tuple[MixedPlan, dict]:
    """Measure every linear's sensitivity on `windows` and plan bits per layer at `bits_per_weight`.

    Returns the plan and the sensitivity table it was chosen from ({layer: {config label: proxy}}).
    """
    from minquant.sensitivity import collect_layer_stats, layer_groups, layer_names, sensitivity_table

    configs = configs or candidate_configs()
    names = layer_names(model)
    shapes = layer_shapes(model, names)
    check_budget(bits_per_weight, shapes, configs)  # before minutes of measuring
    stats = collect_layer_stats(model, windows, batch_size=batch_size, progress=progress)
    table = sensitivity_table(model, stats, configs, proxy=proxy, method=method, progress=progress)
    tied = [g for g in layer_groups(model) if len(g) > 1] if tie_groups else None
    return plan_mixed(table, shapes, configs, bits_per_weight, tied=tied), table


def check_budget(bits_per_weight, shapes: dict[str, tuple[int, int]], configs: dict[str, QuantConfig | None]) -> None:
    """A clear error for a budget that is not a number, cannot be met, or quantizes nothing (every layer fp16)."""
    try:
        budget = float(bits_per_weight)
    except (TypeError, ValueError):
        raise ValueError(f"bits_budget must be a number of bits per weight, got {bits_per_weight!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"bits_budget must be a positive, finite number of bits per weight, got {bits_per_weight!r}")
    params = sum(N * K for N, K in shapes.values())
    cheapest = sum(min(b for c in configs.values() if (b := option_bits(s, c)) is not None) for s in shapes.values())
    if budget * params < cheapest:
        raise ValueError(f"a budget of {budget:g} bits per weight is below what these options allow "
                         f"({cheapest / params:.3f}: every layer at its cheapest option)")
    if FLOAT in configs and budget >= 16:
        raise ValueError(f"a budget of {budget:g} bits per weight keeps every layer in fp16 (16 bits): nothing would "
                         "be quantized; budgets below 16 mix formats")


def uniform_bits_per_weight(shapes: dict[str, tuple[int, int]], cfg: QuantConfig) -> Fraction:
    """Bits per weight of quantizing every one of these layers at `cfg`, exactly (the budget to compare a plan with)."""
    return Fraction(sum(linear_bits(N, K, cfg.bits, cfg.group_size, cfg.symmetric) for N, K in shapes.values()),
                    sum(N * K for N, K in shapes.values()))


def layer_shapes(model: torch.nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: tuple(model.get_submodule(n).weight.shape) for n in names}
