"""Quantized layers for the kernel tests (CPU and GPU)."""
import torch

from minquant.nn import QuantLinear


def make_layer(K, N, cfg, bias=True, act_order=False, seed=0):
    """A QuantLinear (K -> N) from a random nn.Linear; act_order: GPTQ-style permuted groups."""
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=bias), cfg)
    if act_order:  # GPTQ's act-order: input perm[i] goes to group i // group_size
        perm = torch.randperm(K)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // cfg.group_size).to(torch.int32)
        layer.g_idx.copy_(g_idx)
    return layer
