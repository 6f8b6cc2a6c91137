"""SmoothQuant (Xiao et al. 2023, arXiv:2211.10438), and a whole model converted to W8A8.

Derived in notebooks/11_activations_and_kv_cache.ipynb. A few input channels of a linear carry
activations ~100x larger than the rest (notebook 04), in every token; the weights have no such
channels. With one activation scale per tensor (or per token), those channels set the step and the
others are left a few levels. SmoothQuant moves the difficulty from the activations into the weights
with a per-input-channel scale s, exactly as AWQ does (and folded the same way, into the norm or
linear before: `minquant.awq.fold_scale`):

    x W^T = (x / s) (W diag(s))^T,      s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)

alpha = 0 leaves the activations alone, alpha = 1 flattens them entirely (their outliers now in W);
the paper uses 0.5 for most models. Here alpha is searched per group of linears sharing an input: the
one whose W8A8 output best matches the float output on a sample of calibration tokens.

`w8a8_quantize_model` goes block by block (minquant.calibrate's driver): each block's inputs give the
per-channel max|x| of every group (and, for static activations, one scale per tensor: after
smoothing, max|x / s| = max_j max|x_j| / s_j), the scales are folded, and every linear becomes a
`W8A8Linear`; the next block sees the quantized block's outputs.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from minquant.w8a8 import W8A8Config, W8A8Linear, fake_quantize_8bit, token_scale, weight_scale

SAMPLE_TOKENS = 512  # calibration tokens per group on which alpha is chosen


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (K,) = x_max^alpha / w_max^(1 - alpha) per input channel; a channel with no activation or no weight keeps s = 1."""
    live = (x_max > 0) & (w_max > 0)
    s = x_max.float().clamp(min=1e-30).pow(alpha) / w_max.float().clamp(min=1e-30).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s))


def w8a8_output_error(x: torch.Tensor, W: torch.Tensor, s: torch.Tensor, cfg: W8A8Config,
                      x_max: torch.Tensor | None = None, y: torch.Tensor | None = None) -> float:
    """Squared error of the W8A8 output with smoothing s against the float output y = x W^T, on tokens x (n, K).

    Static activations take the per-tensor scale all calibration tokens give (`x_max`, per channel).
    """
    xs, Ws = x.float() / s, W.float() * s
    if cfg.activations == "static":
        a_scale = (x_max.float() / s).amax().clamp(min=1e-30).reshape(1, 1) / cfg.qmax
    else:
        a_scale = token_scale(xs, cfg.dtype)
    y_q = fake_quantize_8bit(xs, a_scale, cfg.dtype) @ fake_quantize_8bit(Ws, weight_scale(Ws, cfg.dtype), cfg.dtype).T
    return float((y_q - (x.float() @ W.float().T if y is None else y)).pow(2).sum())


def search_alpha(x: torch.Tensor, x_max: torch.Tensor, weights: list[torch.Tensor], cfg: W8A8Config):
    """The best alpha among cfg.alphas for linears sharing an input: (s (K,), alpha, {alpha: error})."""
    W = torch.cat([w.float() for w in weights])
    w_max, y = W.abs().amax(0), x.float() @ W.T
    errors, best = {}, None
    for alpha in cfg.alphas:
        s = smoothing_scales(x_max, w_max, alpha)
        errors[alpha] = w8a8_output_error(x, W, s, cfg, x_max, y)
        if best is None or errors[alpha] < errors[best[1]]:
            best = (s, alpha)
    return best[0], best[1], errors


class _GroupInputs:
    """Per input channel max|x| over every calibration token of a group, and a fixed sample of its tokens."""

    def __init__(self, name: str, picks: list[torch.Tensor]):
        self.name, self.picks, self.x_max, self.sample, self.batch = name, picks, None, [], 0

    def __call__(self, module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: its calibration inputs have NaN/Inf values (the float model overflows "
                             "on this data, or an earlier layer is broken); nothing was converted")
        m = x.abs().amax(0).float()
        self.x_max = m if self.x_max is None else torch.maximum(self.x_max, m)
        self.sample.append(x[self.picks[self.batch].to(x.device)].float())
        self.batch += 1


def _sample_picks(inputs: list, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Which token rows of each batch go into the sample: n spread over all of them, the same for every group."""
    sizes = [x.shape[0] * x.shape[1] for x in inputs]
    chosen = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    starts = torch.tensor([0, *sizes]).cumsum(0)
    return [chosen[(chosen >= starts[b]) & (chosen < starts[b + 1])] - starts[b] for b in range(len(sizes))]


@torch.no_grad()
def w8a8_quantize_model(model: nn.Module, windows: torch.Tensor | None, cfg: W8A8Config, *, device=None,
                        batch_size: int = 8, progress: bool = True) -> dict:
    """Convert the model's block linears into W8A8Linear (SmoothQuant first if cfg.smoothquant); returns a report.

    `windows` (n, seqlen) token ids calibrate static activation scales and SmoothQuant; dynamic
    activations without smoothing need none (None). lm_head and embeddings stay float. If anything
    fails part-way (NaN activations, an all-zero input), every block is put back as it was.
    """
    from minquant.calibrate import for_each_block
    from minquant.models import architecture, check_float

    check_float(model)
    arch = architecture(model)
    needs_data = cfg.smoothquant or cfg.activations == "static"
    if needs_data and windows is None:
        raise ValueError("static activation scales and SmoothQuant are calibrated: give calibration windows")
    _check_model(model, arch, cfg)
    report = {"alphas": {}, "errors": {}, "input_scales": {}}
    undo: list[tuple] = []  # (module, attribute, what it held): replayed backwards if anything fails
    start = time.perf_counter()
    try:
        if needs_data:
            report |= for_each_block(model, windows, lambda *a: _convert_block(*a, arch, cfg, report, undo), device=device,
                                     batch_size=batch_size, progress=progress,
                                     desc=f"{'SmoothQuant ' if cfg.smoothquant else ''}W8A8 {cfg.dtype}")
        else:  # dynamic activations: each linear on its own, no data
            prefix, blocks = arch.locate_blocks(model)
            for block in blocks:
                _replace(block, {name: (None, None) for name in arch.linears}, cfg, undo)
            report |= {"seconds": time.perf_counter() - start, "blocks": len(blocks)}
    except BaseException:
        for module, attr, held in reversed(undo):
            if isinstance(held, nn.Module):
                module.set_submodule(attr, held)
            else:
                getattr(module, attr).data = held
        raise
    return report


def _convert_block(prefix: str, block: nn.Module, inputs: list, kwargs: list[dict], arch, cfg: W8A8Config,
                   report: dict, undo: list) -> None:
    """One block: its groups' inputs seen, smoothing scales searched and folded, every linear made W8A8."""
    from minquant.awq import fold_scale, foldable
    from minquant.calibrate import run_with_input_hooks

    picks = _sample_picks(inputs, SAMPLE_TOKENS)
    seen = [_GroupInputs(f"{prefix}.{group[0]}", picks) for group in arch.groups]
    run_with_input_hooks(block, inputs, kwargs, {block.get_submodule(g[0]): h for g, h in zip(arch.groups, seen)})
    scales = {}  # linear -> the s its input channels are divided by
    prevs = arch.awq_prev or (None,) * len(arch.groups)
    # last group first: its scale folds into rows of an earlier group's linear (up_proj), whose search then sees them
    for group, prev_name, st in reversed(list(zip(arch.groups, prevs, seen))):
        linears = [block.get_submodule(name) for name in group]
        if not cfg.smoothquant or prev_name is None or not foldable(prev := block.get_submodule(prev_name), linears):
            continue
        s, alpha, errors = search_alpha(torch.cat(st.sample), st.x_max,
                                        [lin.weight * scales.get(n, 1.0) for n, lin in zip(group, linears)], cfg)
        undo.extend((prev, attr, getattr(prev, attr).data.clone()) for attr in ("weight", "bias")
                    if getattr(prev, attr, None) is not None)
        fold_scale(prev, [], s)  # prev's output / s; the linears' weights are scaled when converted, below
        scales |= {name: s for name in group}
        report["alphas"][f"{prefix}.{prev_name}"] = alpha
        report["errors"][f"{prefix}.{prev_name}"] = (errors.get(0.0), errors[alpha])
    plan = {}
    for group, st in zip(arch.groups, seen):
        input_scale = None
        if cfg.activations == "static":
            amax = float((st.x_max / scales.get(group[0], 1.0)).amax())
            if amax == 0:
                raise ValueError(f"{st.name}: every calibration input is zero, so a static activation scale "
                                 "cannot be set (use activations='dynamic', or other calibration data)")
            input_scale = amax / cfg.qmax
            report["input_scales"][st.name] = input_scale
        plan |= {name: (scales.get(name), input_scale) for name in group}
    _replace(block, plan, cfg, undo)


def _replace(block: nn.Module, plan: dict, cfg: W8A8Config, undo: list) -> None:
    """Each linear named in `plan` -> W8A8Linear, its weight's columns times s (smoothing) and its input scale."""
    for name, (s, input_scale) in plan.items():
        linear = block.get_submodule(name)
        weight = linear.weight if s is None else linear.weight * s.to(linear.weight.device)
        undo.append((block, name, linear))
        block.set_submodule(name, W8A8Linear.from_linear(linear, cfg.dtype, input_scale, weight=weight))


def _check_model(model: nn.Module, arch, cfg: W8A8Config) -> None:
    """Every block linear convertible (finite weights, not quantized already); smoothing has somewhere to fold."""
    from minquant.awq import foldable
    from minquant.models import float_block_linears

    float_block_linears(model, arch)
    if cfg.smoothquant:
        block = arch.locate_blocks(model)[1][0]
        prevs = arch.awq_prev or (None,) * len(arch.groups)
        ok = [p for g, p in zip(arch.groups, prevs) if p is not None and
              foldable(block.get_submodule(p), [block.get_submodule(n) for n in g])]
        if not ok:
            raise ValueError(f"model family {model.config.model_type!r}: no op before a group of linears can absorb a "
                             "smoothing scale (a pre-norm, or a linear feeding it through a linear path); use "
                             "method='w8a8' without SmoothQuant")
        if getattr(model.config, "do_layer_norm_before", True) is False:
            raise ValueError("this OPT model normalises after the residual add (do_layer_norm_before=False): its "
                             "norms cannot absorb smoothing scales; use method='w8a8'")
