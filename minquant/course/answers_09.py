"""Notebook 09's exercises: the references its check cells compare with (kept out of the notebook)."""
import torch

from minquant.course import answer, cases


@answer("09.1")
def knapsack_step(best, layer_costs, layer_sizes):
    # best'[c] = min over options o with size_o <= c of best[c - size_o] + cost_o (inf where none fits)
    new = torch.full_like(best, float("inf"))
    for cost, size in zip(layer_costs.tolist(), layer_sizes.tolist()):
        if size < len(best):
            new[size:] = torch.minimum(new[size:], best[:len(best) - size] + cost)
    return new


@cases("09.1")
def _():
    g = torch.Generator().manual_seed(9)
    toy = (torch.tensor([0.0] * 19, dtype=torch.float64), torch.tensor([9.0, 3.0, 0.5], dtype=torch.float64),
           torch.tensor([2, 3, 8]))
    after_one = knapsack_step(*toy)                         # a row with impossible (inf) entries at the start
    cases_ = [toy, (after_one, torch.tensor([4.0, 1.5, 0.2], dtype=torch.float64), torch.tensor([2, 3, 8]))]
    for budget, options in ((40, 4), (25, 5)):
        best = torch.rand(budget + 1, generator=g, dtype=torch.float64).cumsum(0).flip(0)   # decreasing in c
        best[:3] = float("inf")
        sizes = torch.randint(1, 12, (options,), generator=g)
        sizes[-1] = budget + 5                               # an option too big for any budget
        cases_.append((best, torch.rand(options, generator=g, dtype=torch.float64) * 5, sizes))
    return cases_


@answer("09.2")
def w4_per_channel_bits_per_weight():
    from minquant.bench.mixed import SMOLLM2_BLOCK
    from minquant.mixed import uniform_bits_per_weight
    from minquant.quant import QuantConfig

    return float(uniform_bits_per_weight(SMOLLM2_BLOCK, QuantConfig(4, -1)))


@answer("09.3")
def most_sensitive_linear_type():
    from minquant.bench.results import load_results

    by_type: dict[str, float] = {}
    for name, increase in load_results("sensitivity_smollm2")["results"]["measured"].items():
        kind = name.rsplit(".", 1)[1]
        by_type[kind] = by_type.get(kind, 0.0) + increase
    return max(by_type, key=by_type.get)


@answer("09.4")
def e5m2_max():
    return torch.finfo(torch.float8_e5m2).max
