"""Quantize a model bigger than memory: blocks read one at a time from its safetensors shards, the
checkpoint written shard by shard. Derived in notebook 10 (its section "A model bigger than memory").

`minquant.quantize(model)` needs the float model whole in memory first: 32 GB for an 8B model in
fp32, 282 GB for a 70B one. The block driver (calibrate.py) never needs more than one block at a
time, so here the model is built on the meta device (every shape, no storage) and only what is at
work is ever real:

    held in memory                              for how long
    the embedding (+ rotary tables)             while the calibration windows run up to block 0
    one float block, then its QuantLinears      read from the shards (shards.py), written, freed
    the hidden states between blocks            all along: n_tokens x hidden, twice (in and out)
    the block's Hessians (GPTQ) / stats (AWQ)   while the block is quantized
    the head, in fp32 and fp16                  while it is copied to the output (one tensor at a time)

The tensors written are the ones `minquant.quantize` + `minquant.save` write for the same model and
calibration, bit for bit (tests/test_stream.py): the same blocks see the same inputs. The output is
a GPTQ checkpoint in shards `model-0000k-of-0000N.safetensors` with `model.safetensors.index.json`
(one `model.safetensors` when it fits one shard), atomic as a whole (atomic.py). Mixed precision is
not streamed: its plan needs every layer's sensitivity, measured on the float model, before the first
block is quantized (a streamed sensitivity pass would read the model once more; not built yet).
"""
from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minquant.calibrate import BlockSource, move_all_but
from minquant.shards import Checkpoint, ShardWriter, parse_size

STREAMED_METHODS = ("rtn", "gptq", "awq")


class StreamedBlocks(BlockSource):
    """The driver's blocks read from a Checkpoint and, once quantized, handed to a ShardWriter, then freed."""

    def __init__(self, checkpoint: Checkpoint, writer: ShardWriter, *, dtype: torch.dtype, save_dtype: torch.dtype,
                 check=None):
        self.checkpoint, self.writer, self.dtype, self.save_dtype, self.check = checkpoint, writer, dtype, save_dtype, check
        self.home = torch.device("cpu")
        self.act_order = False  # does any layer written permute its columns (config.json's desc_act)
        self.loaded: dict[str, float] = {}  # block -> seconds to read it

    @contextlib.contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList, device):
        """Everything outside the blocks but the output head, real on `device` for the run up to block 0, then freed."""
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = {id(p) for p in head.parameters()} if head is not None else set()
        skip -= {id(p) for p in model.get_input_embeddings().parameters()}  # tied: the embedding is needed
        state = model.state_dict(keep_vars=True)
        names = [n for n, t in state.items() if not n.startswith(prefix + ".") and id(t) not in skip]
        try:
            _rebuild_buffers(model, blocks)
            tensors = self.checkpoint.read([n for n in names if n in self.checkpoint.header], self.dtype, device)
            model.load_state_dict(_tied_copies(state, names, tensors), strict=False, assign=True)
            move_all_but(model, blocks, device)
            yield
        finally:
            move_all_but(model, blocks, torch.device("meta"))
            release_freed_memory()

    def load(self, index: int, prefix: str, block: nn.Module, device) -> None:
        start = time.perf_counter()
        names = {k: f"{prefix}.{k}" for k in block.state_dict()}
        tensors = self.checkpoint.read(list(names.values()), self.dtype, device)
        block.load_state_dict({k: tensors[full] for k, full in names.items()}, assign=True)
        self.loaded[prefix] = time.perf_counter() - start
        if self.check is not None:
            self.check(prefix, block)

    def done(self, prefix: str, block: nn.Module) -> None:
        from minquant.checkpoint import storable_tensors
        from minquant.nn import QuantLinear

        self.act_order |= any(m.act_order for m in block.modules() if isinstance(m, QuantLinear))
        self.writer.add(storable_tensors({f"{prefix}.{k}": t for k, t in block.state_dict().items()}, self.save_dtype))

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")  # its storage is freed; the shapes stay for the next pass
        release_freed_memory()


def map_large_allocations(size: int = 1 << 20) -> None:
    """Have glibc give every allocation of `size` bytes or more its own mapping, returned to the OS when freed.

    By default glibc raises that threshold (up to 32 MB) each time a large block is freed, and then serves
    the tensors below it from its heap, which a block's temporaries fragment: measured on a 0.94 GB Llama,
    RTN's peak while one 45 MB block was rounded went from 0.40 GB above the start to 0.13 GB with 1 MB.
    Process-wide, as `MALLOC_MMAP_THRESHOLD_=1048576` would set it; a value set in the environment wins.
    """
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so that what a block's mid-sized temporaries
    left in the heap is not still resident when the next block is read."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): the allocator does what it does
        pass


def _rebuild_buffers(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Buffers no checkpoint stores (rotary inv_freq, BERT's position ids), computed as transformers' loader does."""
    for name, module in model.named_modules():
        if module is blocks or name.startswith(tuple(f"{n}." for n, m in model.named_modules() if m is blocks)):
            continue
        own = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
        if any(getattr(module, b).is_meta for b in own):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)


def _tied_copies(state: dict, names: list[str], tensors: dict) -> dict:
    """`tensors` plus, for a name the files lack, the tensor of the one it is tied to (same parameter)."""
    out = dict(tensors)
    for n in names:
        if n not in out:
            twin = next((m for m in tensors if state[m] is state[n]), None)
            if twin is not None:
                out[n] = tensors[twin]
    return out


def source_folder(name_or_path: str) -> Path:
    """The local folder of a float model's safetensors: a folder, a packaged model's float copy, or a Hub download."""
    from minquant.models import PACKAGED, cached_source

    if name_or_path in PACKAGED:
        folder = cached_source(name_or_path)  # SmolLM2's GGUF, dequantized once to fp32 safetensors
        return Path(folder) if folder else _packaged_folder(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        raise ValueError(f"{path} is a GGUF file: it is dequantized whole when loaded, so it cannot be streamed; "
                         "quantize it in memory (minquant.quantize without out_dir) or from a safetensors folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face model folder")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"no model folder at {name_or_path!r}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                    "*.jinja", "tokenizer*"]))
    except Exception as e:
        raise OSError(f"could not fetch {name_or_path!r} from the Hugging Face Hub (offline, or a typo?) ({e})") from None


def _packaged_folder(name: str) -> Path:
    from minquant.models import PACKAGED, packaged_path

    if PACKAGED[name].gguf_file:
        raise ValueError(f"{name} is a GGUF file and MINQUANT_CACHE is off: streaming needs its float copy in the cache")
    return packaged_path(name)


def open_meta_model(folder: Path, dtype: torch.dtype = torch.float32):
    """(model on the meta device, its tokenizer or None) from the folder's config; a quantized checkpoint is refused."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from minquant.checkpoint import load_tokenizer, read_json
    from minquant.models import is_causal_lm

    qc = read_json(folder / "config.json").get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ValueError(f"{folder} holds a quantized checkpoint (quant_method={method!r}); streaming quantizes float "
                         "models: give the float model's folder")
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def output_bytes(model: nn.Module, linears: list[str], cfg, save_dtype: torch.dtype) -> int:
    """Bytes the checkpoint will take: each listed linear as a QuantLinear, every other tensor in `save_dtype`."""
    from minquant.nn import QuantLinear

    total, state = 0, model.state_dict(keep_vars=True)
    skip = set()
    for name in linears:
        linear = model.get_submodule(name)
        try:
            with torch.device("meta"):
                q = QuantLinear(linear.in_features, linear.out_features, cfg, bias=linear.bias is not None)
        except ValueError as e:  # a group size that does not divide it, before any block is read
            raise ValueError(f"{name}: {e}") from None
        total += sum(t.numel() * t.element_size() for t in q.state_dict().values())
        skip |= {f"{name}.weight", f"{name}.bias"}
    seen = set()
    for n, t in state.items():
        if n not in skip and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * (torch.finfo(save_dtype).bits // 8 if t.is_floating_point() else t.element_size())
    return total


def check_compute(device: torch.device, dtype: torch.dtype) -> None:
    """A clear error when `device` cannot compute in `dtype` (a matmul of two tiny tensors fails)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: the blocks compute in a float dtype (torch.float32, bfloat16, float16)")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device} cannot compute in {dtype} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "choose another dtype") from None


@torch.no_grad()
def stream_rtn(model: nn.Module, arch, cfg, source: StreamedBlocks, progress: bool) -> dict:
    """RTN block by block: each block read, its linears rounded into QuantLinear (as in memory), written, freed."""
    from minquant.rtn import quantize_to_quantlinear

    prefix, blocks = arch.locate_blocks(model)
    start, layers = time.perf_counter(), {}
    for i, block in enumerate(tqdm(blocks, desc=f"RTN W{cfg.bits}", disable=not progress)):
        try:
            source.load(i, f"{prefix}.{i}", block, torch.device("cpu"))
            for r in quantize_to_quantlinear(block, cfg, skip=()):
                layers[f"{prefix}.{i}.{r.name}"] = {"mse": r.mse}
            source.done(f"{prefix}.{i}", block)
        finally:
            source.release(i, block)
    return {"seconds": time.perf_counter() - start, "blocks": len(blocks), "layers": layers}


@torch.no_grad()
def quantize_streamed(model: str, out_dir: str | Path, method: str, cfg, *, windows_for=None, tokenizer=None,
                      device: torch.device, batch_size: int = 8, dtype: torch.dtype = torch.float32,
                      save_dtype: torch.dtype = torch.float16, hidden_states_device=None,
                      hidden_states_dtype: torch.dtype | None = None, max_shard_size: int | str = "2GB",
                      overwrite: bool = False, replay: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Quantize the float model in folder / packaged name / Hub id `model` into a GPTQ checkpoint at `out_dir`,
    never holding more of it than one block: returns (the folder, a report: seconds, per-block times, bytes
    of the hidden states, shards). Called by minquant.quantize(..., out_dir=...), which checks the arguments:
    `cfg` is the method's validated config; `windows_for(tokenizer, model)` makes the calibration token ids
    (None for RTN). `dtype`: what the blocks compute in; `save_dtype`: what float tensors are stored in.
    `replay` (GPTQ, true sequential; off here, on in memory) keeps the outputs of a block's finished linears
    instead of computing them again: faster, but 2 x n_tokens x intermediate_size floats more for Llama.
    """
    from minquant.atomic import check_destination, new_folder
    from minquant.checkpoint import method_quantization_config, quantization_config_of, write_metadata
    from minquant.models import architecture

    quant = cfg if method == "rtn" else cfg.quant
    max_bytes = parse_size(max_shard_size)
    map_large_allocations()
    check_compute(device, dtype)
    folder = source_folder(str(model))
    meta, found_tokenizer = open_meta_model(folder, dtype)
    tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    arch = architecture(meta)
    checkpoint = Checkpoint(folder)
    checkpoint.check(meta)
    prefix, blocks = arch.locate_blocks(meta)
    block_linears = [f"{prefix}.{i}.{n}" for i in range(len(blocks)) for n in arch.linears]
    outside_linears = _outside_linears(meta, prefix) if method == "rtn" else []
    out_dir = check_destination(out_dir, overwrite)
    _check_disk(out_dir, output_bytes(meta, block_linears + outside_linears, quant, save_dtype))
    windows = windows_for(tokenizer, meta) if windows_for is not None else None

    def check(block_prefix: str, block: nn.Module) -> None:
        from minquant.packing import check_storable

        for name in arch.linears:
            try:
                check_storable(block.get_submodule(name), quant)
            except ValueError as e:
                raise ValueError(f"{block_prefix}.{name}: {e}; nothing was written") from None

    start = time.perf_counter()
    with new_folder(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        source = StreamedBlocks(checkpoint, writer, dtype=dtype, save_dtype=save_dtype, check=check)
        placement = dict(source=source, hidden_states_device=hidden_states_device, hidden_states_dtype=hidden_states_dtype)
        if method == "gptq":
            placement["replay"] = replay
        report = _run(meta, method, cfg, windows, source, placement, device=device, batch_size=batch_size,
                      progress=progress)
        _write_outside(meta, prefix, checkpoint, writer, quant, outside_linears, dtype, save_dtype)
        meta.config.quantization_config = method_quantization_config(method, cfg)  # as quantize records it
        config = meta.config
        config.quantization_config = quantization_config_of(meta, quant, permuted=source.act_order)
        config.dtype = save_dtype
        files = writer.close()
        write_metadata(tmp, config, _generation_config(folder, meta), tokenizer)
        if method == "awq":
            report.pop("search").save(tmp / "awq_search.safetensors")
    report |= {"seconds_total": time.perf_counter() - start, "method": method, "source": str(folder),
               "read_seconds": source.loaded, "shards": [f.name for f in files], "output_bytes": writer.total}
    if windows is not None:
        report["calibration"] = {"n_samples": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
    return Path(out_dir), report


def _run(meta, method: str, cfg, windows, source, placement: dict, *, device, batch_size: int, progress: bool) -> dict:
    from minquant.models import architecture

    if method == "rtn":
        return stream_rtn(meta, architecture(meta), cfg, source, progress)
    if method == "awq":
        from minquant.awq import awq_quantize_model

        search, report = awq_quantize_model(meta, windows, cfg, device=device, batch_size=batch_size, progress=progress,
                                            **placement)
        return report | {"search": search}
    from minquant.gptq import gptq_quantize_model

    return gptq_quantize_model(meta, windows, cfg, device=device, batch_size=batch_size, progress=progress, **placement)


def _outside_linears(model: nn.Module, prefix: str) -> list[str]:
    """The linears RTN quantizes in memory outside the blocks (all but lm_head: BERT's pooler), by full name."""
    from minquant.rtn import quantizable_linears

    return [n for n in quantizable_linears(model) if not n.startswith(prefix + ".")]


def _write_outside(model: nn.Module, prefix: str, checkpoint: Checkpoint, writer: ShardWriter, quant, linears: list[str],
                   dtype: torch.dtype, save_dtype: torch.dtype) -> None:
    """Every tensor outside the blocks, one at a time: floats in `save_dtype`, `linears` as QuantLinear (RTN)."""
    from minquant.checkpoint import storable_tensors
    from minquant.nn import QuantLinear

    state = model.state_dict(keep_vars=True)
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state
    for name in linears:
        linear = model.get_submodule(name)
        tensors = checkpoint.read([f"{name}.{k}" for k in linear.state_dict()], dtype)
        linear.load_state_dict({k: tensors[f"{name}.{k}"] for k in linear.state_dict()}, assign=True)
        writer.add(storable_tensors({f"{name}.{k}": t for k, t in QuantLinear.from_linear(linear, quant).state_dict().items()},
                                    save_dtype))
        linear.to("meta")
    done = {f"{name}.{k}" for name in linears for k in ("weight", "bias")}
    for name, t in state.items():
        if name.startswith(prefix + ".") or name in done or (tied and name == "lm_head.weight"):
            continue
        # a name the files lack is tied to one they hold (Checkpoint.check): stored under the model's name
        stored = name if name in checkpoint.header else next(m for m in checkpoint.header if state.get(m) is t)
        writer.add(storable_tensors({name: checkpoint.read([stored], dtype)[stored]}, save_dtype))


def _generation_config(folder: Path, model):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return getattr(model, "generation_config", None)


def _check_disk(out_dir: Path, needed: int) -> None:
    import shutil

    parent = out_dir.absolute().parent
    free = shutil.disk_usage(parent).free
    if free < needed * 1.05:
        raise OSError(errno.ENOSPC, f"the checkpoint needs about {needed / 1e9:.2f} GB and {parent} has "
                      f"{free / 1e9:.2f} GB free; nothing was written")
