"""GPTQ (Frantar et al. 2022): quantize a weight matrix so that its *outputs* stay close.

Derived in notebooks/07_gptq.ipynb. RTN rounds each weight on its own. GPTQ rounds the columns of
W (N, K) one at a time and, after each, moves the not-yet-rounded columns to cancel the error it
just made, as measured on calibration inputs X (K, n):

    minimise ||W X - Q X||^2   whose curvature is the Hessian  H = 2 X X^T / n   (K, K).

Rounding column j costs err_j = (w_j - q_j) / [H^-1]_jj, and the best correction of the columns
still to come is  W[:, j+1:] -= err_j * [H^-1]_{j, j+1:}  (OBQ's update, with H^-1 of the remaining
columns). GPTQ's three ideas make that fast and stable:
    1. a fixed column order for all rows, so one H^-1 serves every row;
    2. lazy batches: apply the updates inside a block of `block_size` columns at once, and to
       the columns after the block with one matmul;
    3. Cholesky: the rows of H^-1 for "the remaining columns" are the rows of the upper Cholesky
       factor of H^-1, so no inverse is ever updated.
Groups pick their scale and zero-point when the sweep enters them (from the already-corrected
weights), or up front from the original weights with `static_groups`; from their min and max, or,
with `search_range`, from the narrowed range p * (min, max) that rounds the group best.
`act_order` sweeps the columns in order of decreasing H_jj (most-used inputs first) and returns
`g_idx`, the group of each original column, which packing and the kernels honour.

This module knows nothing of models: tensors in, tensors out. `calibrate.py` supplies H.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from minquant.quant import (QuantConfig, dequantize, grouped, round_to_grid, storable_qparams,
                            storable_qparams_from_range)


@dataclass(frozen=True)
class GPTQConfig:
    quant: QuantConfig = QuantConfig()  # the grid and its storage: bits, group size, symmetric, full_range
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps H invertible
    block_size: int = 128  # columns per lazy batch (a speed knob: the result does not depend on it)
    act_order: bool = False  # sweep columns by decreasing H_jj ("desc_act")
    static_groups: bool = False  # with act_order: fix every group's scale/zero from the original W first
    search_range: bool = False  # each group's range: the p * (min, max) that rounds it best, not min/max
    true_sequential: bool = True  # a block's later linears calibrated on inputs through its already-quantized ones

    def __post_init__(self):
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(f"quant must be a QuantConfig (bits, group_size, symmetric, ...), got {self.quant!r}")
        if not self.quant.integer_zero:
            raise ValueError("GPTQ stores integer zero-points (the GPTQ format): QuantConfig(integer_zero=False) is RTN-only")
        if not 0 < self.damp <= 1:
            raise ValueError(f"damp is a fraction of H's mean diagonal, in (0, 1]; got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.static_groups and not self.act_order:
            raise ValueError("static_groups is a variant of act_order (without it, groups are already fixed in order); "
                             "set act_order=True")


class GPTQResult(NamedTuple):
    q: torch.Tensor  # (N, K) uint8 integers, original column order
    scale: torch.Tensor  # (N, G) float32 (fp16-representable, as stored)
    zero: torch.Tensor  # (N, G) float32 integers
    g_idx: torch.Tensor  # (K,) int32: the group of each input column
    loss: float  # the sweep's sum of OBQ costs: ||(W - Q) X||^2 / n for H = 2 X X^T / n (up to damping)
    damp: float  # the damping really used (raised if H needed more to be positive definite)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (N, K) the quantized layer computes with."""
        return dequantize(self.q, self.scale, self.zero, dtype=dtype, g_idx=self.g_idx)


def search_qparams(w: torch.Tensor, cfg: QuantConfig, steps: int = 80, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """`storable_qparams` of the range p * (min, max), p = 1, 0.99, ..., that minimises sum |w - w_q|^norm per group.

    A narrower range clips a few large weights but rounds all the others on a finer grid. This is
    the reference GPTQ's `--mse` option (there on by choice, too): the exponent 2.4 > 2 weighs the
    large errors that clipping makes a little more than plain squared error would. The candidates
    are tried a chunk of p's at a time, vectorised: a chunk's copies of w (~1 MB) stay in cache,
    which is faster than both one p at a time and all 80 at once.
    """
    wg = grouped(w, cfg)  # (N, G, g); checks shape and NaN once
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = best_scale = best_zero = None
    chunk = max(1, min(steps, 2**18 // wg.numel()))
    for p0 in range(0, steps, chunk):
        p = (1 - torch.arange(p0, min(p0 + chunk, steps), dtype=torch.float64) / 100).float().to(w.device).view(-1, 1, 1)
        scale, zero = storable_qparams_from_range(p * lo, p * hi, replace(cfg, clip_ratio=1.0))  # (P, N, G)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = round_to_grid(wg / s, z, cfg)
        err = (wg - (q - z) * s).abs_().pow_(norm).sum(-1)  # (P, N, G)
        err, i = err.min(0)  # the first (widest) p among equals, as a sweep keeping only strict improvements
        scale, zero = scale.gather(0, i[None])[0], zero.gather(0, i[None])[0]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def hessian_inverse_cholesky(H: torch.Tensor, damp: float, retries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp x10 until H is positive definite."""
    return _inverse_factor(H.clone, H.diagonal().mean(), damp, retries)


def _inverse_factor(copy_of_H, mean_diag: torch.Tensor, damp: float, retries: int = 6) -> tuple[torch.Tensor, float]:
    """hessian_inverse_cholesky of the matrix `copy_of_H()` makes, each attempt on a fresh copy that it damps in
    place: at most three K x K matrices alive at once (the caller's H, the damped copy or a factor, the next)."""
    for attempt in range(retries + 1):
        damped = copy_of_H()
        damped.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                if attempt:
                    warnings.warn(f"H was not positive definite: damping raised to {damp:g} of its mean diagonal")
                return U, damp
        damp *= 10
    raise ValueError(f"H is not positive definite even with damping {damp / 10:g}; are the calibration inputs all zero?")


def _check(W: torch.Tensor, H: torch.Tensor) -> None:
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"expected W (N, K) and H (K, K), got W {tuple(W.shape)} and H {tuple(H.shape)}")
    for t, what in ((W, "W has"), (H, "its calibration inputs (H) have")):
        if not all(torch.isfinite(c).all() for c in t.reshape(-1).split(1 << 22)):  # (a few MB at a time)
            raise ValueError(f"{what} NaN/Inf values")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> GPTQResult:
    """Quantize W (N, K) column by column, spreading each rounding error over the columns to come via H (K, K)."""
    _check(W, H)
    qc = cfg.quant
    qparams = search_qparams if cfg.search_range else storable_qparams
    N, K = W.shape
    G = qc.groups(K)
    g = K // G
    W, H = W.detach().float().clone(), H.detach().float()

    dead = H.diagonal() == 0  # inputs that were always zero: their weights never matter
    W[:, dead] = 0

    # Scale/zero of every group from the original W: used per channel, or with static_groups.
    fixed = None
    if G == 1 or cfg.static_groups:
        fixed = qparams(W, qc)  # (N, G) each

    diagonal = torch.where(dead, 1.0, H.diagonal())
    perm = torch.argsort(diagonal, descending=True, stable=True) if cfg.act_order else torch.arange(K, device=W.device)
    W = W[:, perm]

    def swept_H() -> torch.Tensor:  # H in the sweep's order, dead inputs' diagonal 1: a copy, made when needed
        Hp = H[perm][:, perm] if cfg.act_order else H.clone()
        Hp.diagonal().copy_(diagonal[perm])
        return Hp

    Hinv, damp = _inverse_factor(swept_H, diagonal[perm].mean(), cfg.damp)

    # Work on W^T (K, N) so that the column being rounded, and each update, is one contiguous row.
    Wt, Qt = W.t().contiguous(), torch.zeros(K, N, device=W.device)
    del W
    scale, zero = torch.zeros(G, N, device=Wt.device), torch.zeros(G, N, device=Wt.device)
    group_of = (perm // g if fixed is not None else torch.arange(K, device=Wt.device) // g).tolist()  # by swept position
    if fixed is not None:
        scale, zero = fixed[0].t().contiguous(), fixed[1].t().contiguous()
    loss = 0.0
    B = max(g, cfg.block_size // g * g) if fixed is None else cfg.block_size  # groups never straddle blocks
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1, Hinv1 = Wt[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i  # position in the sweep
            if fixed is None and j % g == 0:  # entering a group: its range from the weights as corrected so far
                s, z = qparams(W1[i:i + g].t(), replace(qc, group_size=-1))
                scale[j // g], zero[j // g] = s[:, 0], z[:, 0]
            s, z = scale[group_of[j]], zero[group_of[j]]
            w = W1[i]
            q = round_to_grid(w / s, z, qc)
            err = (w - (q - z) * s).div_(Hinv1[i, i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # OBQ's update of the columns to come
            Err1[i], Qt[j] = err, q
        loss += float(Err1.double().pow(2).sum()) / 2  # sum of (w - q)^2 / [H^-1]_jj: OBQ's cost of each rounding
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1  # the lazy update of everything after the block

    inv = torch.argsort(perm)
    g_idx = torch.tensor(group_of, device=Wt.device)[inv].to(torch.int32)  # group of each original column
    Q = Qt[inv].t().to(torch.uint8).contiguous()
    scale, zero = scale.t().contiguous(), zero.t().contiguous()
    return GPTQResult(Q, scale, zero, g_idx, loss, damp)


# ---------------------------------------------------------------------------------------------
# A whole model: the block driver (calibrate.py) supplies each group's H; we quantize its linears.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def gptq_quantize_model(model: torch.nn.Module, windows: torch.Tensor, cfg: GPTQConfig, *, device=None,
                        batch_size: int = 8, plan: dict | None = None,
                        progress: bool = True, **placement) -> dict:
    """GPTQ every linear of every block on calibration `windows` (n, seqlen); linears become QuantLinear.

    `cfg.true_sequential=False`: every group's H from the block's float inputs, one pass per block (as
    llm-compressor does), instead of inputs that went through the block's already-quantized linears.
    `plan` (mixed precision): {full layer name: QuantConfig, or None to keep it float}; a layer in it
    gets that grid instead of cfg.quant. Returns a report: total seconds, per-layer loss and
    damping. lm_head and embeddings stay float. Each block's linears become QuantLinear as soon as
    the block is done; `placement` goes to the driver (calibrate.py: a BlockSource, where the hidden
    states live, `replay`). With a streamed source the layers are checked as each block arrives.
    """
    from minquant.calibrate import check_linears, quantize_blocks_sequential, quantize_blocks_one_pass
    from minquant.models import architecture
    from minquant.nn import replace_linear

    arch = architecture(model)
    if placement.get("source") is None:
        check_linears(model, arch, cfg.quant, plan)  # every layer, before changing any
    layer_cfgs = {name: None if q is None else replace(cfg, quant=q) for name, q in (plan or {}).items()}

    results: dict[str, GPTQResult] = {}  # the block's, until `finish` stores them
    layers: dict[str, dict] = {}

    def quantize_group(linears: dict[str, torch.nn.Linear], H: torch.Tensor) -> None:
        for name, linear in linears.items():
            layer_cfg = layer_cfgs.get(name, cfg)
            if layer_cfg is None:
                continue  # the plan keeps it float
            try:
                r = gptq_quantize(linear.weight, H, layer_cfg)
            except ValueError as e:  # NaN activations, an H no damping fixes: say which layer
                raise ValueError(f"{name}: {e}") from None
            linear.weight.data = r.dequantize(linear.weight.dtype)  # later groups see the quantized layer
            results[name] = GPTQResult(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in r))

    def finish(prefix: str, block: torch.nn.Module) -> None:
        for name, r in results.items():
            replace_linear(model, name, r.q, r.scale, r.zero, r.g_idx, (layer_cfgs.get(name) or cfg).quant)
            layers[name] = {"loss": r.loss, "damp": r.damp}
        results.clear()

    desc = f"GPTQ W{cfg.quant.bits}"
    replay = placement.pop("replay", True)  # (only the true-sequential driver re-runs parts of a block)
    if cfg.true_sequential:
        placement["replay"] = replay
        report = quantize_blocks_sequential(model, windows, quantize_group, device=device, batch_size=batch_size,
                                            progress=progress, desc=desc, finish=finish, **placement)
    else:
        def quantize_block(prefix, block, stats):
            for group, st in zip(arch.groups, stats):
                quantize_group({f"{prefix}.{name}": block.get_submodule(name) for name in group}, st.H)

        report = quantize_blocks_one_pass(model, windows, quantize_block, device=device, batch_size=batch_size,
                                          progress=progress, desc=desc, finish=finish, **placement)
    report["layers"] = layers
    return report
