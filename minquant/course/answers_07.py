"""Notebook 07's exercises: the references its check cells compare with (kept out of the notebook).

Exercises 1, 2 and 4 are about section 4's real layer, rebuilt here as the notebook builds it (the same
model, C4 windows and split, so the same bits on the learner's machine); exercise 3 about section 3's
seeded W2, H2; exercise 5's reference is GPTQ's column sweep one column at a time, in float64, with no
lazy batches: the blocked version must give the same answer (the GPTQ paper's claim for its idea 3).
"""
import functools

import torch

from minquant.course import answer, cases, layer_inputs
from minquant.gptq import GPTQConfig, gptq_quantize
from minquant.quant import QuantConfig, fake_quantize

LAYER = "model.layers.2.mlp.down_proj"


@functools.cache
def _real_layer():
    """(W, H from the 16 calibration windows, the 8 held-out windows' inputs) of notebook 07's LAYER."""
    W, X = layer_inputs("smollm2-135m", LAYER)
    X_cal, X_test = X[:16 * 512], X[16 * 512:]
    H = 2 * X_cal.T @ X_cal / X_cal.shape[0]
    return W, H, X_test


def _test_error(W, W_hat, X_test):
    return ((X_test @ (W - W_hat).T) ** 2).mean().item()


@answer("07.1")
def gptq_over_rtn_w3_per_channel():
    W, H, X_test = _real_layer()
    gptq = gptq_quantize(W, H, GPTQConfig(QuantConfig(3, -1))).dequantize()
    return _test_error(W, gptq, X_test) / _test_error(W, fake_quantize(W, QuantConfig(3, -1)), X_test)


@answer("07.2")
def first_column_of_act_order():
    _, H, _ = _real_layer()
    return int(torch.argsort(H.diagonal(), descending=True, stable=True)[0])   # as gptq_quantize sorts


def section3_data():
    """Notebook 07's W2 (48, 96) and H2 (96, 96): the same seed, the same arithmetic."""
    g = torch.Generator().manual_seed(2)
    W2 = torch.randn(48, 96, generator=g)
    X2 = torch.randn(96, 1024, generator=g) * (torch.rand(96, 1, generator=g) * 3 + 0.1)
    return W2, 2 * X2 @ X2.T / 1024


@answer("07.3")
def obq_costs_of_w2_4bit_g32():
    W2, H2 = section3_data()
    return gptq_quantize(W2, H2, GPTQConfig(QuantConfig(4, 32))).loss


@answer("07.4")
def integers_that_differ_block_64_vs_256():
    W, H, _ = _real_layer()
    qa = gptq_quantize(W, H, GPTQConfig(QuantConfig(4, 64), block_size=64)).q
    qb = gptq_quantize(W, H, GPTQConfig(QuantConfig(4, 64), block_size=256)).q
    return int((qa != qb).sum())


class RowGrid:
    """A fixed grid per row: column w (N,) -> its nearest levels (q - zero) * scale, q in 0..2^bits - 1.

    Exercise 5's quantizer: scale and zero (N,) are chosen once, before the sweep, so that the
    exercise is GPTQ's update alone (as gptq_quantize does per channel)."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, bits: int):
        self.scale, self.zero, self.bits = scale, zero, bits

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        q = (torch.round(w / self.scale) + self.zero).clamp(0, 2**self.bits - 1)
        return (q - self.zero) * self.scale

    def __eq__(self, other):
        return (isinstance(other, RowGrid) and self.bits == other.bits and torch.equal(self.scale, other.scale)
                and torch.equal(self.zero, other.zero))

    def __repr__(self):
        return f"RowGrid({self.bits} bits, {self.scale.numel()} rows)"


@answer("07.5")
def gptq_lazy_batches(W, U, quantize_column, block_size):
    """The column sweep with every update applied at once (block_size plays no part), in float64."""
    W, Q = W.clone(), torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = quantize_column(W[:, j])
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]   # OBQ's update of column j and all after it
    return Q


@cases("07.5")
def _():
    g = torch.Generator().manual_seed(7)

    def case(N, K, bits, block_size, narrow=1.0):
        X = torch.randn(K, 4 * K, generator=g, dtype=torch.float64)
        X = torch.randn(K, K, generator=g, dtype=torch.float64) @ X * 0.5 + X      # correlated inputs
        H = 2 * X @ X.T / X.shape[1]
        H += 0.01 * H.diagonal().mean() * torch.eye(K, dtype=torch.float64)         # damped, as in section 3
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        W = torch.randn(N, K, generator=g, dtype=torch.float64)
        lo, hi = W.amin(1) * narrow, W.amax(1) * narrow       # narrow < 1: corrected weights leave the grid
        scale = (hi - lo) / (2**bits - 1)
        return W, U, RowGrid(scale, torch.round(-lo / scale), bits), block_size

    return [case(8, 16, 4, 4),
            case(16, 40, 3, 16),                 # the last block is shorter (40 = 16 + 16 + 8)
            case(4, 24, 4, 1),                   # blocks of one column: every update is a lazy one
            case(6, 12, 4, 64),                  # one block holds everything: no lazy update at all
            case(1, 10, 2, 3, narrow=0.5)]       # one row, a 2-bit grid too narrow: clamping matters
