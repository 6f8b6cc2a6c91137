"""QuantLinear: a linear layer that really stores n-bit weights, in the GPTQ checkpoint layout.

Derived in notebooks/05_packing_and_quantlinear.ipynb. Its buffers are exactly the tensors a GPTQ
checkpoint holds (qweight, qzeros, scales, g_idx, bias), so `state_dict()` *is* the checkpoint,
and transformers, GPTQModel and vLLM find the names they expect.
"""
from __future__ import annotations

import torch
from torch import nn

from minquant import kernels
from minquant.kernels import cpu
from minquant.kernels.prepare import prepare
from minquant.packing import check_packable, contiguous_g_idx, from_gptq, to_gptq
from minquant.quant import QuantConfig, dequantize, quantize_storable


class QuantLinear(nn.Module):
    minquant_quantized = True  # models.check_float refuses to quantize a model holding one
    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False):
        super().__init__()
        check_packable(out_features, in_features, cfg)
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        K, N, b, G = in_features, out_features, cfg.bits, cfg.groups(in_features)
        self.register_buffer("qweight", torch.zeros(K * b // 32, N, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(G, N * b // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16))
        self.register_buffer("g_idx", contiguous_g_idx(K, G))
        self.register_buffer("bias", torch.zeros(N, dtype=torch.float16) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> QuantLinear:
        """Quantize an nn.Linear's weight (min/max, round to nearest) into a QuantLinear."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, cfg, bias=linear.bias is not None).to(w.device)
        layer.pack_weights(*quantize_storable(w, cfg))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None,
                       cfg: QuantConfig, bias: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear holding integers q (N, K) and their scale/zero (N, G) from any method (GPTQ, AWQ)."""
        N, K = q.shape
        layer = cls(K, N, cfg, bias=bias is not None).to(q.device)
        layer.pack_weights(q, scale, zero, g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def pack_weights(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     g_idx: torch.Tensor | None = None) -> None:
        """Store minquant's (q (N, K), scale, zero (N, G), optional g_idx (K,)) in the GPTQ buffers."""
        for name, t in to_gptq(q, scale, zero, self.cfg, g_idx).items():
            getattr(self, name).copy_(t)

    @property
    def act_order(self) -> bool:
        """Are the input columns' groups permuted (GPTQ act-order), rather than contiguous runs?"""
        return not torch.equal(self.g_idx, contiguous_g_idx(self.in_features, self.cfg.groups(self.in_features), self.g_idx.device))

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (N, K) this layer computes with (all at once: for inspection, not forward)."""
        q, scale, zero, g_idx = from_gptq(self.state_dict(), self.cfg.bits)
        return dequantize(q, scale, zero, dtype=dtype, g_idx=g_idx)

    def contiguous_group_size(self) -> int | None:
        """cfg.group_size when g_idx is the plain k // group_size (no act-order), else None.

        The Triton kernels use it to skip g_idx; minquant.kernels.prepare asks once per buffer content."""
        return None if self.act_order else self.cfg.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.applies(x):
            # the C kernels, on a view derived once (tiled words, act-order sorted); None: they cannot run it
            p = cpu.prepare_cpu(self)
            if p is not None:
                return cpu.matmul(x, p, self.bias)
        backend = kernels.choose_backend(x, self.cfg.bits)
        if backend == "triton":
            # derived once from the buffers and cached (act-order rows sorted into contiguous groups)
            p = prepare(self)
            return kernels.dequant_matmul(x, p.qweight, self.qzeros, self.scales, self.g_idx, self.cfg.bits,
                                          self.bias, backend=backend, group_size=p.group_size, perm=p.perm)
        return kernels.dequant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.cfg.bits, self.bias,
                                      backend=backend)

    def _apply(self, fn, recurse=True):
        self._prepared = self._cpu_prepared = None  # .to(), .cuda(), .half(): the kernels' views are stale
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        g = "per-channel" if self.cfg.group_size == -1 else f"group_size={self.cfg.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.cfg.bits}, "
                f"{g}, symmetric={self.cfg.symmetric}, bias={self.bias is not None}")


@torch.no_grad()
def replace_linear(model: nn.Module, name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   g_idx: torch.Tensor | None, cfg: QuantConfig) -> QuantLinear:
    """Swap the nn.Linear called `name` in `model` for a QuantLinear holding q (N, K), scale/zero (N, G); bias and device kept."""
    linear = model.get_submodule(name)
    bias = linear.bias.detach().cpu() if linear.bias is not None else None
    qlinear = QuantLinear.from_quantized(q.cpu(), scale.cpu(), zero.cpu(), None if g_idx is None else g_idx.cpu(), cfg, bias)
    qlinear = qlinear.to(linear.weight.device)
    model.set_submodule(name, qlinear)
    return qlinear
