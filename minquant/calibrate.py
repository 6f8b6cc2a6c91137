"""Drive a model block by block over calibration data: the one place GPTQ (and AWQ) touch a model.

Derived in notebooks/07_gptq.ipynb. Quantizing a 70B model must not need the whole model on the
GPU, so we never run the model as a whole. Instead:

    1. run the model on the calibration windows only until the first block, and keep what that
       block receives (hidden states, plus keyword arguments: attention mask, rotary embeddings);
    2. for each block in turn: move it to the device; for each group of linears, in the order the
       forward runs them (q/k/v, then o, then gate/up, then down: "true sequential"), run the block
       over the calibration batches up to that group, accumulate H = 2 X X^T / n from the group's
       input, and let the caller quantize the group; then run the whole block to produce the next
       block's inputs, and move it back.

Later groups therefore see the outputs of already-quantized linears. Each pass stops as soon as
the group's input is known (`StopForward`), and a finished part of the block (a quantized linear,
or `self_attn` once all its linears are quantized) is recorded the first time it runs and replayed
afterwards, since neither its input nor its weights change any more. A part that simply returns
its last linear's output (Llama's `self_attn` returns o_proj's, its `mlp` down_proj's) is not even
run again: its outputs are that linear, once quantized, applied to the inputs its own pass saw.
So the passes cost about one forward through the block, for some memory (`replay=False` trades it
back).

Where the blocks come from and where they go is a `BlockSource`: by default the model in memory
(each block visits the device and comes back); stream.py's reads each block from the checkpoint's
safetensors shards and writes it, quantized, to the output's, so the float model is never whole.
The hidden states between blocks (one (b, seqlen, hidden) tensor per batch) stay on the device
unless `hidden_states_device` says where else, in `hidden_states_dtype` if given (fp16 halves them).
"""
from __future__ import annotations

import contextlib
import inspect
import time
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from minquant.models import Architecture, architecture, find_blocks


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not computed."""


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """(n, seqlen) token ids -> list of (b, seqlen) batches; a clear error for no or empty data."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise ValueError(f"calibration data must be (n >= 1, seqlen >= 1) token ids, got shape {tuple(windows.shape)}")
    return list(windows.split(batch_size))


def _to(x, device):
    """Move tensors (also inside tuples/dicts, e.g. rotary (cos, sin)) to device."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple | list):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def move_all_but(module: nn.Module, keep: nn.Module, device) -> None:
    """Move every parameter and buffer of `module` to device, except those inside `keep` (and those not loaded: meta)."""
    for child in module.children():
        if child is keep:
            continue
        if any(m is keep for m in child.modules()) or any(t.is_meta for t in [*child.parameters(), *child.buffers()]):
            move_all_but(child, keep, device)
        else:
            child.to(device)
    for name, p in module._parameters.items():
        if p is not None and not p.is_meta:
            p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None and not b.is_meta:
            module._buffers[name] = b.to(device)


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device):
    """Embeddings, rotary tables, final norm on `device` for the duration; always moved back."""
    home = next(model.parameters()).device
    move_all_but(model, blocks, device)
    try:
        yield
    finally:
        move_all_but(model, blocks, home)


class BlockSource:
    """Where the driver's blocks live: here, the model in memory (each block visits the device and goes home).

    stream.py's source loads each block from safetensors shards instead, writes it once `done`, and
    frees it; the driver calls the same four methods either way.
    """

    def __init__(self, model: nn.Module):
        self.home = next(model.parameters()).device

    def outside(self, model: nn.Module, blocks: nn.ModuleList, device):
        """A context in which the model runs up to its first block on `device` (embeddings, rotary tables)."""
        return _outside_blocks_on(model, blocks, device)

    def load(self, index: int, prefix: str, block: nn.Module, device) -> None:
        block.to(device)

    def done(self, prefix: str, block: nn.Module) -> None:
        """The block is finished (quantized, its outputs computed); nothing to do for a model in memory."""

    def release(self, index: int, block: nn.Module) -> None:
        """Called whatever happened, after `done` or a failure."""
        block.to(self.home)


class _Staged(Sequence):
    """The hidden states as stored (maybe on the CPU, maybe fp16), each batch handed out on the device in `dtype`."""

    def __init__(self, stored: list[torch.Tensor], device, dtype: torch.dtype | None):
        self.stored, self.device, self.dtype = stored, device, dtype

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, i):
        return self.stored[i].to(self.device, self.dtype)  # no copy when it is there already


@torch.no_grad()
def block_inputs(model: nn.Module, batches: list[torch.Tensor], device=None, source: BlockSource | None = None
                 ) -> tuple[list, list[dict]]:
    """What the first block receives for each batch: (hidden states, keyword arguments)."""
    arch = architecture(model)
    blocks = find_blocks(model, arch)
    source = source or BlockSource(model)
    device = device or source.home
    inputs, kwargs = [], []

    def catch(module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise StopForward

    # no KV cache: it would hold every batch's keys and values for nothing
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with source.outside(model, blocks, device):
            for ids in batches:
                with contextlib.suppress(StopForward):
                    model(input_ids=ids.to(device), **extra)
    finally:
        handle.remove()
    return inputs, kwargs


def _run(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(x, **kw)
    return out[0] if isinstance(out, tuple) else out


class Replay:
    """Record a finished module's output per batch the first time it runs, then return it instead."""

    def __init__(self, module: nn.Module, outputs: list | None = None):
        self.module, self.outputs, self.batch = module, [(out, _versions(out)) for out in outputs or []], 0
        module.forward = self  # an instance attribute wins over the class's forward

    def __call__(self, *args, **kwargs):
        if self.batch < len(self.outputs):
            out, versions = self.outputs[self.batch]
            if _versions(out) != versions:  # the caller changed our stored tensor in place: it is stale
                raise RuntimeError(f"{type(self.module).__name__}'s output was modified in place after it was "
                                   "recorded; run the driver with replay=False for this model")
            return out
        out = type(self.module).forward(self.module, *args, **kwargs)
        if self.batch == len(self.outputs):
            self.outputs.append((out, _versions(out)))
        return out

    def pause(self) -> None:
        """The module computes again (its recorded outputs are kept for `resume`)."""
        vars(self.module).pop("forward", None)

    def resume(self) -> None:
        self.module.forward = self

    def remove(self) -> None:
        self.pause()
        self.outputs = []


def _versions(x) -> tuple:
    """Every tensor's in-place modification counter: to notice if a replayed output was changed."""
    if isinstance(x, torch.Tensor):
        return (x._version,)
    return tuple(v for item in x for v in _versions(item)) if isinstance(x, tuple | list) else ()


def finished_modules(block: nn.Module, done: set[str]) -> list[str]:
    """The largest submodules of `block` whose linears are all quantized (e.g. `self_attn` once o_proj is).

    Their inputs come from earlier, already-quantized parts of the block, so their outputs are
    final: they can be recorded once and replayed in later passes.
    """
    found: list[str] = []
    for name, module in block.named_modules():  # a parent comes before its children
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        linears = {n for n, m in module.named_modules(prefix=name) if isinstance(m, nn.Linear)}
        if linears and linears <= done:
            found.append(name)
    return found


def check_linears(model: nn.Module, arch: Architecture, cfg, plan: dict | None = None) -> None:
    """Every linear of every block can be stored with `cfg` (a QuantConfig; or `plan[full name]`, None = stays
    float): it packs, its weights are finite, its scales and bias fit fp16; else a clear error."""
    from minquant.packing import check_storable

    prefix, blocks = arch.locate_blocks(model)
    unknown = sorted(set(plan or {}) - {f"{prefix}.{i}.{name}" for i in range(len(blocks)) for name in arch.linears})
    if unknown:
        raise ValueError(f"the plan names layers the model does not quantize: {', '.join(unknown[:3])}"
                         + (" ..." if len(unknown) > 3 else "") + f" (its layers look like {prefix}.0.{arch.linears[0]})")
    for i, block in enumerate(blocks):
        for name in arch.linears:
            linear = block.get_submodule(name)
            layer_cfg = plan.get(f"{prefix}.{i}.{name}", cfg) if plan else cfg
            if layer_cfg is None:
                continue
            try:
                check_storable(linear, layer_cfg)
            except ValueError as e:
                raise ValueError(f"block {i} {name}: {e}") from None


GroupQuantizer = Callable[[dict[str, nn.Linear], torch.Tensor], None]


@torch.no_grad()
def quantize_blocks_sequential(model: nn.Module, windows: torch.Tensor, quantize_group: GroupQuantizer, *, device=None,
                               batch_size: int = 8, replay: bool = True, progress: bool = True, desc: str = "blocks",
                               **placement) -> dict:
    """Run the block-by-block driver; `quantize_group({name: linear}, H)` quantizes one group in place.

    True sequential (GPTQ): each group's H comes from inputs that went through the already-quantized
    groups before it. Returns timings and peak memory. The model keeps its device; each block visits
    `device` in turn. `placement`: `finish(prefix, block)`, called once a block's outputs are known
    (the method turns its linears into QuantLinear there); `source`, a BlockSource; hidden_states_device
    and hidden_states_dtype, where and how the hidden states between blocks are kept (see `_drive`).
    """
    arch: Architecture = architecture(model)

    def work(prefix: str, block: nn.Module, inputs: list, kwargs: list[dict], replays: dict) -> None:
        done: set[str] = set()
        for group in arch.groups:
            linears = {f"{prefix}.{name}": block.get_submodule(name) for name in group}
            finished = finished_modules(block, done | set(group)) if replay else []  # once it is quantized
            # the part of the block this group finishes, if it is more than the group's one linear
            through = next((n for n in finished if n not in replays and group[0].startswith(n + ".")),
                           None) if len(group) == 1 else None
            H, pending = _hessian(block, linears[f"{prefix}.{group[0]}"], inputs, kwargs,
                                  list(replays.values()), block.get_submodule(through) if through else None)
            quantize_group(linears, H)
            del H
            done |= set(group)
            if pending is not None:  # `through` returns its last linear's output: fill in the quantized one
                last = block.get_submodule(group[0])
                replays[through] = Replay(block.get_submodule(through), [_with_first(out, last(x)) for x, out in pending])
                del pending
            for name in finished:
                if name not in replays:
                    replays[name] = Replay(block.get_submodule(name))
            _drop_inner(replays, len(inputs))

    return _drive(model, windows, work, device=device, batch_size=batch_size, progress=progress, desc=desc, **placement)


class InputStats(NamedTuple):
    """What a group of linears saw on the calibration data (all its tokens)."""
    H: torch.Tensor  # (K, K) float32: 2 X X^T / n
    mean_abs: torch.Tensor  # (K,) float32: mean |x| per input channel (AWQ's activation salience)
    n: int  # tokens


BlockQuantizer = Callable[[str, nn.Module, list[InputStats]], None]


@torch.no_grad()
def quantize_blocks_one_pass(model: nn.Module, windows: torch.Tensor, quantize_block: BlockQuantizer, *, device=None,
                             batch_size: int = 8, progress: bool = True, desc: str = "blocks", **placement) -> dict:
    """The driver for methods that treat a block at once (AWQ): `quantize_block(prefix, block, stats)`.

    `stats[j]` are the input statistics of the block's j-th group, all from one pass of the block as
    it arrives (float, before any of its linears change); `quantize_block` may then change the whole
    block. The next block receives the changed block's outputs, as with `quantize_blocks_sequential`
    (whose `placement` options it takes too).
    """
    arch: Architecture = architecture(model)

    def work(prefix: str, block: nn.Module, inputs: list, kwargs: list[dict], replays: dict) -> None:
        quantize_block(prefix, block, _input_stats(block, [block.get_submodule(g[0]) for g in arch.groups], inputs, kwargs))

    return _drive(model, windows, work, device=device, batch_size=batch_size, progress=progress, desc=desc, **placement)


BlockWorker = Callable[[str, nn.Module, list, list[dict]], None]


@torch.no_grad()
def for_each_block(model: nn.Module, windows: torch.Tensor, work: BlockWorker, *, device=None, batch_size: int = 8,
                   progress: bool = True, desc: str = "blocks", **placement) -> dict:
    """The driver for methods that read a block's inputs themselves (SmoothQuant, W8A8 calibration):
    `work(prefix, block, inputs, kwargs)` with the block on `device` and, per batch, what it receives
    (`run_with_input_hooks` runs it); the next block receives the changed block's outputs."""
    return _drive(model, windows, lambda prefix, block, inputs, kwargs, replays: work(prefix, block, inputs, kwargs),
                  device=device, batch_size=batch_size, progress=progress, desc=desc, **placement)


def _drive(model: nn.Module, windows: torch.Tensor, work, *, device, batch_size: int, progress: bool, desc: str,
           finish=None, source: BlockSource | None = None, hidden_states_device=None,
           hidden_states_dtype: torch.dtype | None = None) -> dict:
    """Capture the first block's inputs, then per block: load it on `device`, `work(...)`, its outputs,
    `finish(prefix, block)`, `source.done`, and (always) `source.release`.

    The hidden states are kept on `hidden_states_device` (default: `device`) in `hidden_states_dtype`
    (default: as the model computes them) and handed to each block on `device` in its dtype, one batch
    at a time; their size is in the report (`hidden_states_bytes`, one copy: between blocks there are two).
    """
    prefix, blocks = architecture(model).locate_blocks(model)
    source = source or BlockSource(model)
    device = torch.device(device) if device is not None else source.home
    store = torch.device(hidden_states_device) if hidden_states_device is not None else device
    batches = batched(windows, batch_size)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs, kwargs = block_inputs(model, batches, device, source)
    inputs = [x.to(store, hidden_states_dtype) for x in inputs]
    kwargs = [_to(kw, device) for kw in kwargs]
    block_seconds = []
    for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
        replays: dict[str, Replay] = {}  # filled by `work`; they speed up the outputs pass
        block_start = time.perf_counter()
        try:
            source.load(i, f"{prefix}.{i}", block, device)
            dtype = next(block.parameters()).dtype if hidden_states_dtype is not None else None
            staged = _Staged(inputs, device, dtype)
            work(f"{prefix}.{i}", block, staged, kwargs, replays)
            inputs = [out.to(store, hidden_states_dtype) for out in _outputs(block, staged, kwargs, list(replays.values()))]
            del staged
            for r in replays.values():
                r.remove()
            if finish is not None:
                finish(f"{prefix}.{i}", block)
            source.done(f"{prefix}.{i}", block)
            block_seconds.append(time.perf_counter() - block_start)
        finally:  # whatever happens, the model is left as it was found: no replays, every block home
            for r in replays.values():
                r.remove()
            source.release(i, block)
    report = {"seconds": time.perf_counter() - start, "blocks": len(blocks),
              "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "device": str(device),
              "hidden_states_bytes": sum(x.numel() * x.element_size() for x in inputs),
              "hidden_states_device": str(store), "block_seconds": block_seconds}
    if device.type == "cuda":
        report["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def _drop_inner(replays: dict[str, Replay], n_batches: int) -> None:
    """Free the replays inside one that holds every batch's output already: they are not called again."""
    for name, outer in list(replays.items()):
        if name in replays and len(outer.outputs) == n_batches:
            for inner in [r for r in replays if r.startswith(name + ".")]:
                replays.pop(inner).remove()


def _for_each_batch(replays: list[Replay], inputs: list, kwargs: list[dict], fn) -> list:
    outs = []
    for b, (x, kw) in enumerate(zip(inputs, kwargs)):
        for r in replays:
            r.batch = b
        outs.append(fn(x, kw))
    return outs


def _hessian(block: nn.Module, first: nn.Linear, inputs: list, kwargs: list[dict], replays: list[Replay],
             through: nn.Module | None = None) -> tuple[torch.Tensor, list | None]:
    """H = 2 X X^T / n of the input of `first` over all calibration tokens, in float32 (K, K).

    With `through` (a submodule around `first`, finished once `first` is quantized) the pass goes on
    to the end of `through`, `first` returning a placeholder, to see whether `through` returns
    `first`'s output as it is. If it does, the second value is, per batch, (`first`'s input,
    `through`'s output) to fill in later; otherwise (or without `through`) it is None.
    """
    acc = _Accumulator(first)
    seen: list[list] = []  # per batch: [first's input, placeholder, through's output]

    def accumulate(module, args):
        acc.add(args[0])
        if through is None:
            raise StopForward  # the rest of the block is not needed for this group
        seen.append([args[0], None, None])

    def placeholder(x):  # first's forward, while we only look at where its output goes
        seen[-1][1] = x.new_zeros(*x.shape[:-1], first.out_features)
        return seen[-1][1]

    def reached(module, args, out):
        seen[-1][2] = out
        raise StopForward

    handles = [first.register_forward_pre_hook(accumulate)]
    if through is not None:
        handles.append(through.register_forward_hook(reached))
        first.forward = placeholder
    try:
        def run(x, kw):
            with contextlib.suppress(StopForward):
                _run(block, x, kw)
        _for_each_batch(replays, inputs, kwargs, run)
    finally:
        for handle in handles:
            handle.remove()
        vars(first).pop("forward", None)
    passes_through = (through is not None and len(seen) == len(inputs)
                      and all(p is not None and p._version == 0 and _first(out) is p for _, p, out in seen))
    return acc.result().H, [(x, out) for x, _, out in seen] if passes_through else None


class _Accumulator:
    """Sums over the tokens a linear receives: X X^T (lower triangle) and |X|, for `InputStats`."""

    def __init__(self, linear: nn.Linear):
        K, device = linear.in_features, linear.weight.device
        self.XXt, self.abs_sum, self.n = torch.zeros(K, K, device=device), torch.zeros(K, device=device), 0
        self.tile = max(64, -(-K // 4))

    def add(self, x: torch.Tensor) -> None:
        K = self.XXt.shape[0]
        x = x.reshape(-1, K).float()
        for i in range(0, K, self.tile):  # only the lower triangle of the symmetric X^T X: a third less work
            self.XXt[i:, i:i + self.tile].addmm_(x[:, i:].T, x[:, i:i + self.tile])
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]

    def result(self) -> InputStats:
        if self.n == 0:
            raise RuntimeError("the block never called a linear of the architecture table: it does not match the model")
        H = self.XXt.tril_()  # the lower triangle mirrored: in place, one K x K temporary
        H += H.tril(-1).T
        self.XXt = None
        return InputStats(H.mul_(2 / self.n), self.abs_sum / self.n, self.n)


def _input_stats(block: nn.Module, firsts: list[nn.Linear], inputs: list, kwargs: list[dict]) -> list[InputStats]:
    """The input statistics of each linear in `firsts`, from one plain pass of the block over all batches."""
    accs = [_Accumulator(linear) for linear in firsts]
    run_with_input_hooks(block, inputs, kwargs, {linear: lambda m, args, acc=acc: acc.add(args[0])
                                                 for linear, acc in zip(firsts, accs)})
    return [acc.result() for acc in accs]


def run_with_input_hooks(block: nn.Module, inputs: list, kwargs: list[dict], hooks: dict) -> None:
    """One plain pass of `block` over every batch with forward pre-hooks {module: hook(module, args)}, always removed."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    try:
        for x, kw in zip(inputs, kwargs):
            _run(block, x, kw)
    finally:
        for handle in handles:
            handle.remove()


def _first(out):
    return out[0] if isinstance(out, tuple | list) and out else out


def _with_first(out, value):
    """`out` (a tensor, or a tuple led by one) with `value` in the first place."""
    return type(out)((value, *out[1:])) if isinstance(out, tuple | list) else value


def _outputs(block: nn.Module, inputs: _Staged, kwargs: list[dict], replays: list[Replay]) -> list:
    """The block's output for every batch; staged inputs are let go batch by batch (the last use of them), so the
    hidden states are not held twice over at the end of the pass."""
    outs = []
    for b, kw in enumerate(kwargs):
        for r in replays:
            r.batch = b
        outs.append(_run(block, inputs[b], kw))
        inputs.stored[b] = None
    return outs
