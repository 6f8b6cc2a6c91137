"""Layer sensitivity: how much quantizing one linear hurts the model, by a cheap proxy and by measurement.

Derived in notebooks/09_mixed_precision_and_calibration.ipynb. Two proxies, both from one pass over
calibration data, both additive over layers (what a bit allocator needs):

- "output": the layer's own output error per token, sum_n (dW A dW^T)_nn with A = E[x x^T] = H / 2,
  which is what GPTQ and AWQ minimise. It says how far the layer's output moves, not how much the
  model's loss cares about that output.
- "fisher" (the default): a second-order estimate of the loss increase itself. With the Fisher
  approximated per layer as a Kronecker product E[x x^T] (x) E[g g^T] (K-FAC, Martens & Grosse 2015;
  g = dL/dy the gradient at the layer's output) and only the diagonal of E[g g^T] kept,
      dL  ~  1/2 sum_n E[g_n^2] (dW A dW^T)_nn     (nats per token)
  i.e. the output error weighted per output channel by how strongly the loss reacts to it.

`measured_sensitivity` gives the ground truth the proxies are judged by: the real change of the mean
token NLL when that one linear alone is quantized, every other weight float. `first_order_term` is the
part of that change that is linear in dW (g . dW, g the gradient of the loss on the measured text),
which the second-order proxies leave out.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from minquant.quant import QuantConfig

PROXIES = ("fisher", "output")


@contextmanager
def _eval_frozen(model: nn.Module):
    """Inside: eval mode and no parameter requiring a gradient. Both are restored on the way out."""
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


class LayerStats(NamedTuple):
    """What one linear saw on calibration data."""
    A: torch.Tensor  # (K, K) float32: E[x x^T] over tokens (GPTQ's H is 2A); shared by the linears of a group
    g2: torch.Tensor  # (N,) float32: E[(dL/dy_n)^2] over tokens, L the summed token NLL
    n: int  # tokens


def layer_groups(model: nn.Module) -> list[list[str]]:
    """The full names of the linears minquant quantizes, per block and per group of linears sharing an input."""
    from minquant.models import architecture

    arch = architecture(model)
    prefix, blocks = arch.locate_blocks(model)
    return [[f"{prefix}.{i}.{name}" for name in group] for i in range(len(blocks)) for group in arch.groups]


def layer_names(model: nn.Module) -> list[str]:
    """Every linear that minquant quantizes (those of the architecture table, in every block), in forward order."""
    return [name for group in layer_groups(model) for name in group]


def collect_layer_stats(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2,
                        progress: bool = True) -> dict[str, LayerStats]:
    """A and g2 of every quantizable linear, from a forward and backward pass over `windows` (n, seqlen).

    The gradient is of the summed next-token NLL (labels = the windows themselves), so g2 is per token.
    Only activations get gradients: no weight gradient is computed or stored.
    """
    from minquant.calibrate import batched
    from minquant.models import architecture

    arch = architecture(model)
    prefix, blocks = arch.locate_blocks(model)
    device = next(model.parameters()).device
    xxt: dict[str, torch.Tensor] = {}  # per group (keyed by its first linear): sum of x x^T
    g2: dict[str, torch.Tensor] = {}
    n_tokens, handles = 0, []

    def on_input(key):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            xxt[key] = xxt[key].addmm_(x.T, x) if key in xxt else x.T @ x
        return hook

    def on_output(name):
        def hook(module, args, out):
            def on_grad(g):
                s = g.detach().reshape(-1, module.out_features).float().pow(2).sum(0)
                g2[name] = g2[name] + s if name in g2 else s
            out.register_hook(on_grad)
        return hook

    for i, block in enumerate(blocks):
        for group in arch.groups:
            key = f"{prefix}.{i}.{group[0]}"
            handles.append(block.get_submodule(group[0]).register_forward_pre_hook(on_input(key)))
            for name in group:
                handles.append(block.get_submodule(name).register_forward_hook(on_output(f"{prefix}.{i}.{name}")))
    # gradients flow from the embeddings' output on: weights stay requires_grad=False
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with _eval_frozen(model):
            for ids in tqdm(batched(windows, batch_size), desc="layer statistics", disable=not progress):
                ids = ids.to(device)
                with torch.enable_grad():
                    out = model(input_ids=ids, labels=ids, use_cache=False)
                    tokens = ids.shape[0] * (ids.shape[1] - 1)  # positions with a next token to predict
                    (out.loss * tokens).backward()  # the summed NLL: per-token gradients, not averaged
                n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for i in range(len(blocks)):
        for group in arch.groups:
            A = xxt[f"{prefix}.{i}.{group[0]}"] / n_tokens
            for name in group:
                full = f"{prefix}.{i}.{name}"
                stats[full] = LayerStats(A, g2[full] / n_tokens, n_tokens)
    return stats


def proxy_loss(W: torch.Tensor, W_q: torch.Tensor, stats: LayerStats, proxy: str = "fisher") -> float:
    """The proxy's cost of replacing W (N, K) by W_q: 1/2 sum_n g2_n (dW A dW^T)_nn ("fisher"), or sum_n (dW A dW^T)_nn ("output")."""
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose one of {', '.join(PROXIES)}")
    D = (W_q.float() - W.float()).to(stats.A.device)
    per_row = ((D @ stats.A) * D).sum(1)  # (N,): E[(dW x)_n^2]
    if proxy == "output":
        return float(per_row.sum())
    return float(0.5 * (stats.g2 * per_row).sum())


def quantized_weight(W: torch.Tensor, cfg: QuantConfig | None, stats: LayerStats | None = None,
                     method: str = "rtn") -> torch.Tensor:
    """W as `method` ("rtn", or "gptq" with the layer's H = 2A) stores it at `cfg`; None = kept float (W itself)."""
    if cfg is None:
        return W
    if method == "rtn":
        from minquant.quant import dequantize, quantize_storable

        return dequantize(*quantize_storable(W, cfg), cfg, W.dtype)  # what QuantLinear.from_linear stores
    if method == "gptq":
        from minquant.gptq import GPTQConfig, gptq_quantize

        return gptq_quantize(W, 2 * stats.A, GPTQConfig(cfg)).dequantize(W.dtype)
    raise ValueError(f"unknown method {method!r}; choose 'rtn' or 'gptq'")


def sensitivity_table(model: nn.Module, stats: dict[str, LayerStats], configs: dict[str, QuantConfig | None], *,
                      proxy: str = "fisher", method: str = "rtn", progress: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {config label: proxy cost}} for every layer in `stats` and every labelled config
    (inf where the config cannot store that layer, e.g. a group size that does not divide it)."""
    from minquant.packing import check_packable

    def fits(W, cfg):
        try:
            return cfg is None or check_packable(*W.shape, cfg) is None
        except ValueError:
            return False

    table = {}
    for name, st in tqdm(stats.items(), desc=f"{proxy} proxy ({method})", disable=not progress):
        W = model.get_submodule(name).weight.detach()
        table[name] = {label: proxy_loss(W, quantized_weight(W, cfg, st, method), st, proxy) if fits(W, cfg) else math.inf
                       for label, cfg in configs.items()}
    return table


@torch.no_grad()
def measured_sensitivity(model: nn.Module, windows: torch.Tensor, cfg: QuantConfig, names: list[str] | None = None, *,
                         method: str = "rtn", stats: dict[str, LayerStats] | None = None, batch_size: int = 1,
                         progress: bool = True) -> tuple[float, dict[str, float]]:
    """The mean token NLL of the float model on `windows`, and its increase when each linear alone is quantized.

    Each layer's run starts from its block: the blocks before it replay their recorded float outputs.
    """
    from minquant.calibrate import Replay, batched
    from minquant.models import architecture

    prefix, blocks = architecture(model).locate_blocks(model)
    names = names or layer_names(model)
    batches = [b.to(next(model.parameters()).device) for b in batched(windows, batch_size)]
    replays = [Replay(block) for block in blocks]  # the float run records every block's outputs

    def mean_nll() -> float:
        total = count = 0.0
        for b, ids in enumerate(batches):
            for r in replays:
                r.batch = b
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * tokens
            count += tokens
        return total / count

    try:
        base = mean_nll()  # every block computes, and records its output for each batch
        deltas = {}
        for name in tqdm(names, desc="layer alone", disable=not progress):
            first_live = int(name[len(prefix) + 1:].split(".")[0])  # the layer's block
            for j, r in enumerate(replays):  # blocks before it replay their float outputs, the rest compute
                r.resume() if j < first_live else r.pause()
            linear = model.get_submodule(name)
            W = linear.weight.data
            linear.weight.data = quantized_weight(W, cfg, stats[name] if stats else None, method)
            try:
                deltas[name] = mean_nll() - base
            finally:
                linear.weight.data = W
    finally:
        for r in replays:
            r.remove()
    return base, deltas


def first_order_term(model: nn.Module, windows: torch.Tensor, cfg: QuantConfig, names: list[str] | None = None, *,
                     batch_size: int = 1, progress: bool = True) -> dict[str, float]:
    """g . dW per linear: the first-order (linear) term of the change of the mean token NLL on `windows` when
    that linear is RTN-quantized at `cfg`; g = the gradient of that NLL with respect to the weight.

    The proxies leave this term out: its expectation over data is about zero for a trained model and it has
    either sign. On a given text (and on a text unlike the model's training data) it need not be small.
    """
    from minquant.calibrate import batched

    names = names or layer_names(model)
    weights = {n: model.get_submodule(n).weight for n in names}
    grads = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    device = next(model.parameters()).device
    total = windows.shape[0] * (windows.shape[1] - 1)  # positions with a next token to predict
    with _eval_frozen(model):
        for w in weights.values():  # only these weights get gradients
            w.requires_grad_(True)
        for ids in tqdm(batched(windows, batch_size), desc="first-order term", disable=not progress):
            ids = ids.to(device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[0] * (ids.shape[1] - 1))
                for n, g in zip(names, torch.autograd.grad(loss / total, list(weights.values()))):
                    grads[n] += g.float()
    return {n: float((grads[n] * (quantized_weight(w.detach().float(), cfg) - w.detach().float())).sum())
            for n, w in weights.items()}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks; ties get their mean rank)."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in t.unique():  # average ranks of ties
            tied = t == v
            r[tied] = r[tied].mean()
        return r
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long lists of at least 2 values, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
