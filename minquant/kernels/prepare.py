"""What the GPU kernels need from a QuantLinear, derived once from its GPTQ buffers and cached on it.

The buffers stay exactly the checkpoint (qweight, qzeros, scales, g_idx): saving writes GPTQ v1.
An act-order checkpoint's g_idx sends the inputs to their groups in any order, which would make the
kernel gather a scale and zero per input row. Sorting the inputs by group once, at load, makes the
groups contiguous runs again: qweight's rows are permuted (unpacked, reordered, repacked: 4 bits
per row, so rows move in nibbles), and each call reads x through the same permutation, so
x[perm] @ W[:, perm]^T = x @ W^T. The kernel then takes the same fast path as any checkpoint.

The cache is keyed by the buffers' storage and in-place version: `.to()`, `load_state_dict` and any
edit of the buffers make the next call derive it again (QuantLinear also drops it on `.to()`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minquant.packing import pack, unpack


@dataclass
class Prepared:
    qweight: torch.Tensor            # qweight, its rows sorted by group when act-order (else the buffer itself)
    perm: torch.Tensor | None        # int32 (K,): sorted row i is input perm[i]; None without act-order
    group_size: int | None           # the contiguous group size the kernel may assume; None: use g_idx
    key: tuple


def version(t: torch.Tensor):
    """The tensor's in-place version counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:  # made under inference_mode: no version counter
        return None


def buffers_key(layer) -> tuple:
    return tuple((t.data_ptr(), version(t), t.device) for t in (layer.qweight, layer.g_idx))


def group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The permutation (int64) that sorts the inputs by group, if it makes the groups runs of group_size;
    None for groups of unequal sizes, where only a per-input g_idx lookup is right."""
    perm = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    return perm if torch.equal(g_idx.long()[perm], expected) else None


def sort_by_group(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int):
    """(qweight with rows sorted by group, perm) if sorting makes the groups runs of group_size, else None."""
    perm = group_order(g_idx, group_size)
    if perm is None:
        return None
    q = unpack(qweight, bits, dim=0)[:g_idx.numel()]     # (K, N) integers
    return pack(q[perm], bits, dim=0).to(torch.int32).contiguous(), perm.to(torch.int32)


def prepare(layer) -> Prepared:
    """The layer's kernel view, derived on first use and whenever its buffers change."""
    key = buffers_key(layer)
    cached = getattr(layer, "_prepared", None)
    if cached is not None and cached.key == key:
        return cached
    group_size = layer.contiguous_group_size()
    qweight, perm = layer.qweight, None
    if group_size is None and layer.cfg.group_size != -1:
        found = sort_by_group(layer.qweight, layer.g_idx, layer.cfg.bits, layer.cfg.group_size)
        if found is not None:
            (qweight, perm), group_size = found, layer.cfg.group_size
    layer._prepared = Prepared(qweight=qweight, perm=perm, group_size=group_size, key=key)
    return layer._prepared
