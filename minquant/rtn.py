"""RTN (round-to-nearest) on a whole model: min/max quantization applied to every linear layer.

Derived in notebooks/04_granularity_and_outliers.ipynb. RTN is the baseline that GPTQ and AWQ
improve on: each weight matrix is quantized on its own, with no data.

`fake_quantize_model` is *fake* quantization: each nn.Linear keeps a float weight, replaced by its
quantize-dequantize round trip, which is what a packed model computes. `quantize_to_quantlinear` stores
the weights for real: each nn.Linear becomes a QuantLinear in the GPTQ layout (notebook 05).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from minquant.quant import QuantConfig, fake_quantize, max_abs_error, mse, sqnr_db

# Embeddings are not nn.Linear; lm_head is, but it is usually tied to the embeddings and kept
# in 16 bits by every tool, so it is skipped unless asked for.
DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    mse: float
    sqnr_db: float
    max_abs_error: float


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """The model's nn.Linear modules by name, minus those matching a `skip` pattern (fnmatch)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch.fnmatch(name, p) for p in skip)}


@torch.no_grad()
def fake_quantize_model(model: nn.Module, cfg: QuantConfig, skip: tuple[str, ...] = DEFAULT_SKIP,
                        progress: bool = False) -> list[LayerReport]:
    """Fake-quantize every linear weight in place with `cfg`; return each layer's error."""
    return _quantize_linears(model, cfg, skip, progress, pack=False)


@torch.no_grad()
def quantize_to_quantlinear(model: nn.Module, cfg: QuantConfig, skip: tuple[str, ...] = DEFAULT_SKIP,
                            progress: bool = False) -> list[LayerReport]:
    """RTN with real storage: replace every linear by a QuantLinear (GPTQ layout); return each layer's error."""
    return _quantize_linears(model, cfg, skip, progress, pack=True)


def _quantize_linears(model: nn.Module, cfg: QuantConfig, skip: tuple[str, ...], progress: bool,
                      pack: bool) -> list[LayerReport]:
    from minquant.nn import QuantLinear
    from minquant.packing import check_storable

    linears = quantizable_linears(model, skip)
    if not linears:
        raise ValueError(f"no nn.Linear left to quantize (skip={skip})")
    for name, linear in linears.items():  # check every layer before changing any
        try:
            if pack:
                check_storable(linear, cfg)
            else:
                cfg.groups(linear.in_features)
                if not torch.isfinite(linear.weight).all():
                    raise ValueError("weight has NaN/Inf values; nothing was quantized")
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    report = []
    for name, linear in tqdm(linears.items(), desc="RTN", disable=not progress):
        w = linear.weight.data
        if pack:
            qlinear = QuantLinear.from_linear(linear, cfg)
            model.set_submodule(name, qlinear)
            w_hat = qlinear.dequantize_weight(w.dtype)
        else:
            w_hat = fake_quantize(w, cfg)
            linear.weight.data = w_hat
        report.append(LayerReport(name, tuple(w.shape), mse(w, w_hat), sqnr_db(w, w_hat), max_abs_error(w, w_hat)))
    return report
