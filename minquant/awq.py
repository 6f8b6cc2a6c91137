"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up first.

Derived in notebooks/08_awq.ipynb. A few input channels of a layer carry much larger activations
than the rest, and the weights that multiply them matter most. AWQ multiplies those columns of W
by s > 1 before rounding (they get relatively finer steps) and divides the input by s, folding
1/s into the op before (a norm's weight, or the rows of the previous linear), so the float
model computes exactly the same function:

    W x = (W diag(s)) (diag(s)^-1 x)        s = mean|x|^alpha, normalised so that max(s) min(s) = 1.

alpha is searched on a grid: the one whose quantized layer best reproduces the float outputs on
calibration data. Then each output row's group ranges are shrunk ("clip"), again by search.

Both searches measure the output error of a group of linears sharing an input through its input
Hessian, exactly, over all calibration tokens:  sum over tokens |(W - W_q) x|^2 = n/2 tr((W - W_q) H (W - W_q)^T),
H = 2 X X^T / n, as GPTQ uses it. So no search re-runs the model. (AutoAWQ and llm-compressor
re-run the attention or MLP module per alpha for the q/k/v and gate/up groups, and measure the clip
error on a sample of tokens.)

The search returns plain data (`AWQSearch`: the scales per mapping, the clip ratios per linear);
`apply_awq` folds and quantizes any float copy of the model with it, giving identical weights.
The weights are plain min/max-quantized after scaling, so the result is an ordinary GPTQ-format model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from minquant.calibrate import InputStats
from minquant.quant import QuantConfig, dequantize, grouped, round_to_grid, storable_qparams_from_range


@dataclass(frozen=True)
class AWQConfig:
    quant: QuantConfig = QuantConfig()  # the grid: AWQ's default is asymmetric (a zero-point per group)
    n_grid: int = 20  # alpha in 0, 1/(n_grid-1), ..., 1; n_grid = 1 tries alpha = 0 only (no scaling)
    duo_scaling: bool = False  # s = mean|x|^alpha / mean|w|^(1-alpha) (llm-compressor's default) instead of mean|x|^alpha
    clip: bool = True  # search each (row, group)'s range shrink
    clip_grid: int = 20  # shrink ratios 1, 1 - 1/clip_grid, ...
    max_shrink: float = 0.5  # ... down to (not including) 1 - max_shrink

    def __post_init__(self):
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(f"quant must be a QuantConfig (bits, group_size, symmetric, ...), got {self.quant!r}")
        if not self.quant.integer_zero:
            raise ValueError("AWQ stores integer zero-points (the GPTQ format): QuantConfig(integer_zero=False) is RTN-only")
        if not (isinstance(self.n_grid, int) and self.n_grid >= 1):
            raise ValueError(f"n_grid must be a positive integer, got {self.n_grid!r}")
        if not (isinstance(self.clip_grid, int) and self.clip_grid >= 1) or not 0 < self.max_shrink < 1:
            raise ValueError(f"need clip_grid >= 1 and 0 < max_shrink < 1, got {self.clip_grid!r}, {self.max_shrink!r}")

    @property
    def alphas(self) -> list[float]:
        return [i / (self.n_grid - 1) for i in range(self.n_grid)] if self.n_grid > 1 else [0.0]

    @property
    def shrinks(self) -> list[float]:
        return [1 - i / self.clip_grid for i in range(max(1, int(self.max_shrink * self.clip_grid)))]


@dataclass
class AWQSearch:
    """What the search found: everything `apply_awq` needs, as plain tensors keyed by module name."""
    config: AWQConfig
    mappings: list[tuple[str, list[str]]] = field(default_factory=list)  # (previous op, the linears it feeds), in order
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # previous op -> s (K,)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> shrink ratio per (row, group) (N, G)
    alphas: dict[str, float] = field(default_factory=dict)  # previous op -> the alpha chosen
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # previous op -> output error (alpha=0, best)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the tensors, plus the config and mappings as JSON metadata."""
        from safetensors.torch import save_file

        tensors = {f"scale:{k}": v.contiguous() for k, v in self.scales.items()}
        tensors |= {f"clip:{k}": v.contiguous() for k, v in self.clips.items()}
        meta = {"config": asdict(self.config), "mappings": self.mappings, "alphas": self.alphas, "errors": self.errors}
        save_file(tensors, str(path), metadata={"minquant_awq": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> AWQSearch:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("minquant_awq")
            if meta is None:
                raise ValueError(f"{path} is not an AWQ search result saved by minquant (no 'minquant_awq' metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(meta)
        c = dict(meta["config"])  # searches saved before the config carried a QuantConfig held its fields flat
        quant = QuantConfig(**c.pop("quant")) if "quant" in c else \
            QuantConfig(c.pop("bits"), c.pop("group_size"), symmetric=c.pop("sym"))
        return cls(AWQConfig(quant, **c), [(p, list(ls)) for p, ls in meta["mappings"]],
                   {k[6:]: v for k, v in tensors.items() if k.startswith("scale:")},
                   {k[5:]: v for k, v in tensors.items() if k.startswith("clip:")},
                   meta["alphas"], {k: tuple(v) for k, v in meta["errors"].items()})


# ---------------------------------------------------------------------------------------------
# The pieces: quantize with per-group shrink, the output error through H, the two searches, folding.
# ---------------------------------------------------------------------------------------------

def quantize_shrunk(w: torch.Tensor, cfg: QuantConfig, shrink: torch.Tensor | float = 1.0):
    """Min/max quantization (GPTQ-storable) of w (N, K) with each group's range scaled by `shrink` (N, G) or a float.

    Returns (q uint8 (N, K), scale (N, G), zero (N, G), the dequantized weight (N, K) float32).
    """
    wg = grouped(w, cfg)
    scale, zero = storable_qparams_from_range(wg.amin(-1) * shrink, wg.amax(-1) * shrink, cfg)
    # round the grouped view already checked above (quantize(w, ...) would check and group w again: this
    # runs once per alpha and per shrink ratio of the searches)
    q = round_to_grid(wg / scale.unsqueeze(-1), zero.unsqueeze(-1), cfg).reshape(w.shape).to(torch.uint8)
    return q, scale, zero, dequantize(q, scale, zero, cfg)


def output_error(W: torch.Tensor, W_q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_q) H (W - W_q)^T): the squared output error summed over tokens, times 2/n."""
    D = (W - W_q).float()
    return float(((D @ H) * D).sum())


def search_scale(weights: list[torch.Tensor], stats: InputStats, cfg: AWQConfig) -> tuple[torch.Tensor, float, list[float]]:
    """The per-input-channel scale s (K,) of the best alpha for linears sharing an input; also alpha and errors per alpha."""
    W = torch.cat([w.float() for w in weights])  # (sum N, K): the group as one matrix
    x_mean = stats.mean_abs.float()
    if cfg.duo_scaling:  # each weight relative to its group's largest, averaged over the rows
        wg = grouped(W, cfg.quant).abs()
        w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(W.shape).mean(0)
    best = (float("inf"), None, None)
    errors = []
    for alpha in cfg.alphas:
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if cfg.duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (on a log scale)
        err = output_error(W, quantize_shrunk(W * s, cfg.quant)[3] / s, stats.H)
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errors


def search_clip(w: torch.Tensor, H: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per (row, group) of w (N, K), the range shrink among cfg.shrinks with the least output error.

    A group's own error is d H_gg d^T for d the rounding error of its weights (the diagonal block
    of H: cross-group terms are left out, so each group's choice is its own).
    """
    qc = cfg.quant
    N, K = w.shape
    G = qc.groups(K)
    g = K // G
    Hg = torch.stack([H[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(G)])  # (G, g, g)
    best_err, best = None, torch.ones(N, G, device=w.device)
    for r in cfg.shrinks:
        d = (w.float() - quantize_shrunk(w, qc, r)[3]).reshape(N, G, g)
        err = torch.einsum("ngk,gkl,ngl->ng", d, Hg, d)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, r, best)
    return best


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's output /= s (a norm's weight and bias, or a linear's output rows) and each linear's columns *= s.

    Function-preserving in exact arithmetic: the linears' inputs are divided by s exactly where their
    weights were multiplied by it.
    """
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
    elif prev.weight.ndim == 1:
        prev.weight.div_(s)
    else:
        raise ValueError(f"cannot fold a scale into {type(prev).__name__}: not a linear or a norm")
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.device)[None, :])


def foldable(prev: nn.Module, linears: list[nn.Linear]) -> bool:
    """Does prev's output size match the linears' input (not so for v_proj -> o_proj with grouped-query attention)?"""
    width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
    return all(linear.in_features == width for linear in linears)


# ---------------------------------------------------------------------------------------------
# A whole model: search block by block (calibrate.py's driver), or re-apply a saved search.
# ---------------------------------------------------------------------------------------------

def _check_model(model: nn.Module, cfg: AWQConfig, weights: bool = True):
    from minquant.models import architecture
    from minquant.calibrate import check_linears
    from minquant.nn import QuantLinear

    arch = architecture(model)
    if arch.awq_prev is None:
        from minquant.models import ARCHITECTURES

        have = sorted(k for k, a in ARCHITECTURES.items() if a.awq_prev is not None)
        raise ValueError(f"model family {model.config.model_type!r} has no AWQ mapping (which op feeds each group of "
                         f"linears); families with one: {', '.join(have)}. Add awq_prev to its Architecture in "
                         "minquant/models.py, or quantize it with method='gptq' or 'rtn'")
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise ValueError("this OPT model normalises after the residual add (do_layer_norm_before=False): scales "
                         "cannot fold into its norms; use method='gptq'")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized (it has QuantLinear layers); load the float model again")
    if weights:  # (a streamed model's are checked as each block arrives)
        check_linears(model, arch, cfg.quant)
    return arch


def _to_quantlinears(model: nn.Module, quantized: dict[str, tuple], cfg: QuantConfig) -> None:
    from minquant.nn import replace_linear

    for name, (q, scale, zero) in quantized.items():
        replace_linear(model, name, q, scale, zero, None, cfg)


@torch.no_grad()
def awq_quantize_model(model: nn.Module, windows: torch.Tensor, cfg: AWQConfig, *, device=None, batch_size: int = 8,
                       progress: bool = True, **placement) -> tuple[AWQSearch, dict]:
    """Search AWQ's scales and clips block by block on `windows` (n, seqlen), apply them, quantize.

    The model's linears become QuantLinear (each block's once it is done). Returns the search (save it
    to re-apply) and a report. Each block's statistics come from its float inputs' one pass; the next
    block sees the quantized one. `placement` goes to the driver (calibrate.py).
    """
    from minquant.calibrate import quantize_blocks_one_pass

    arch = _check_model(model, cfg, weights=placement.get("source") is None)
    search, quantized = AWQSearch(cfg), {}

    def quantize_block(prefix: str, block: nn.Module, stats: list[InputStats]) -> None:
        scaled = {}  # linear -> the s its inputs were divided by
        for group, st in zip(arch.groups, stats):
            if not torch.isfinite(st.H).all():
                raise ValueError(f"{prefix}.{group[0]}: its calibration inputs (H) have NaN/Inf values")
        for group, prev_name, st in zip(arch.groups, arch.awq_prev, stats):
            linears = [block.get_submodule(name) for name in group]
            if prev_name is None or not foldable(prev := block.get_submodule(prev_name), linears):
                continue
            s, alpha, errors = search_scale([lin.weight for lin in linears], st, cfg)
            fold_scale(prev, linears, s)
            key = f"{prefix}.{prev_name}"
            search.mappings.append((key, [f"{prefix}.{name}" for name in group]))
            search.scales[key], search.alphas[key], search.errors[key] = s.cpu(), alpha, (errors[0], min(errors))
            scaled |= {name: s for name in group}
        for group, st in zip(arch.groups, stats):
            for name in group:
                linear = block.get_submodule(name)
                shrink = 1.0
                if cfg.clip and name not in arch.awq_no_clip:
                    s = scaled.get(name)
                    H = st.H if s is None else st.H / s[:, None] / s[None, :]  # the input is x / s now
                    shrink = search_clip(linear.weight, H, cfg)
                    search.clips[f"{prefix}.{name}"] = shrink.cpu()
                q, scale, zero, w_q = quantize_shrunk(linear.weight, cfg.quant, shrink)
                if not torch.isfinite(scale).all():
                    raise ValueError(f"{prefix}.{name}: scaled by AWQ, its weights need scales beyond fp16's range")
                linear.weight.data = w_q.to(linear.weight.dtype)  # the next block sees the quantized one
                quantized[f"{prefix}.{name}"] = (q.cpu(), scale.cpu(), zero.cpu())

    def finish(prefix: str, block: nn.Module) -> None:
        _to_quantlinears(model, quantized, cfg.quant)
        quantized.clear()

    report = quantize_blocks_one_pass(model, windows, quantize_block, device=device, batch_size=batch_size,
                                      progress=progress, desc=f"AWQ W{cfg.quant.bits}", finish=finish, **placement)
    report["alphas"] = search.alphas
    return search, report


@torch.no_grad()
def apply_awq(model: nn.Module, search: AWQSearch) -> nn.Module:
    """Fold a saved search's scales into a float `model`, quantize with its clips: the same QuantLinears as the search made."""
    cfg = search.config
    arch = _check_model(model, cfg)
    for prev_name, names in search.mappings:
        fold_scale(model.get_submodule(prev_name), [model.get_submodule(n) for n in names], search.scales[prev_name])
    quantized, (prefix, blocks) = {}, arch.locate_blocks(model)
    for i in range(len(blocks)):
        for name in arch.linears:
            full = f"{prefix}.{i}.{name}"
            q, scale, zero, _ = quantize_shrunk(model.get_submodule(full).weight, cfg.quant, search.clips.get(full, 1.0))
            quantized[full] = (q, scale, zero)
    _to_quantlinears(model, quantized, cfg.quant)
    return model
