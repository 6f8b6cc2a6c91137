"""Safetensors files read and written a piece at a time: what lets stream.py hold one block, not a model.

`Checkpoint` reads every shard's header up front (8 bytes of length, then JSON: each tensor's dtype,
shape and byte range), so a missing, truncated or inconsistent folder is named before any work,
and then reads a tensor straight from its byte range into its own storage. `ShardWriter` takes
tensors as they are made, puts each batch on disk at once, and lays them out into shards
`model-0000k-of-0000N.safetensors` with the index transformers and vLLM read. Derived in notebook 10.

    [8 bytes: n][n bytes: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [a, b]}, ...}][data ...]
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path

import torch
from torch import nn


def parse_size(size: int | str) -> int:
    """Bytes from 2_000_000_000, "2GB", "500MB" or "1GiB" (as save_pretrained's max_shard_size)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: give bytes (an integer > 0) or a size like '2GB', '500MB', '1GiB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


class Checkpoint:
    """A float model's safetensors files: every tensor's file, dtype, shape and bytes read from the headers up
    front (a truncated or damaged file is named before any work); a tensor is read straight into its own
    storage, one block at a time, so the process holds exactly the tensors at work (a memory map would add
    the pages it touched, until it is closed)."""

    def __init__(self, folder: str | Path):
        from minquant.checkpoint import read_json, weight_files

        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        self.header: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.span: dict[str, tuple[int, int]] = {}  # byte range in its file
        for f in weight_files(self.folder):  # (names a shard the index lists that is not there)
            for k, (dtype, shape, start, end) in _read_header(f).items():
                if k in self.where:
                    raise ValueError(f"{f}: tensor {k} is stored twice (also in {self.where[k].name})")
                self.where[k], self.header[k], self.span[k] = f, (dtype, shape), (start, end)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            for name, file in read_json(index)["weight_map"].items():
                if self.where.get(name, Path()).name != file:
                    raise ValueError(f"{index} says {name} is in {file}, but " + (
                        f"it is in {self.where[name].name}" if name in self.where else "no weight file holds it"))

    def check(self, model: nn.Module) -> None:
        """Every tensor `model` needs is there, a float of the right shape (tied ones once); else named."""
        state = model.state_dict(keep_vars=True)
        by_tensor: dict[int, list[str]] = {}
        for name, t in state.items():
            by_tensor.setdefault(id(t), []).append(name)
        missing = [names[0] for names in by_tensor.values() if not any(n in self.header for n in names)]
        if missing:
            raise ValueError(f"{self.folder}: the weight files lack {len(missing)} tensor(s) this {model.config.model_type} "
                             f"model needs: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (their names "
                             f"look like {next(iter(self.header), '?')}); re-save it with save_pretrained")
        for name, t in state.items():
            if name not in self.header:
                continue
            dtype, shape = self.header[name]
            if t.is_floating_point() and dtype not in FLOAT_DTYPES:
                raise ValueError(f"{self.where[name]}: {name} is stored as {dtype}, not a float: a quantized or "
                                 "foreign checkpoint; streaming reads float models (fp32, fp16, bf16)")
            if shape != tuple(t.shape):
                raise ValueError(f"{self.where[name]}: {name} has shape {shape}, the config makes it {tuple(t.shape)}")

    def read(self, names: list[str], dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """The named tensors (floats in `dtype`), checked to be finite; the file is named in any error."""
        out = {}
        for f in sorted({self.where[n] for n in names}):
            with open(f, "rb") as fh:
                for n in (n for n in names if self.where[n] == f):
                    t = _read_tensor(fh, f, n, *self.header[n], *self.span[n])
                    if t.is_floating_point():
                        t = t.to(device, dtype or t.dtype)
                        bad = _non_finite(t)
                        if bad:
                            raise ValueError(f"{f}: {n} has {bad} NaN/Inf values; nothing was written")
                    out[n] = t.to(device)
        return out


FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_DTYPES = FLOAT_DTYPES | {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                                     "U8": torch.uint8, "BOOL": torch.bool}


def _non_finite(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """How many NaN/Inf values, counted a few MB at a time (isfinite on the whole would copy it)."""
    return sum(int((~torch.isfinite(c)).sum()) for c in t.reshape(-1).split(chunk))


def _read_header(f: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{name: (dtype, shape, start, end)} with absolute byte offsets; a file its header does not fit is named."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        entries = {k: (v["dtype"], tuple(int(d) for d in v["shape"]), 8 + n + int(v["data_offsets"][0]),
                       8 + n + int(v["data_offsets"][1])) for k, v in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    end = max((e for *_, e in entries.values()), default=8 + n)
    if end > size:
        raise ValueError(f"{f} is truncated: its header places tensors up to byte {end}, the file has {size}")
    for k, (dtype, shape, start, stop) in entries.items():
        if dtype in SAFETENSORS_DTYPES:
            numel = 1
            for d in shape:
                numel *= d
            if stop - start != numel * torch.empty(0, dtype=SAFETENSORS_DTYPES[dtype]).element_size():
                raise ValueError(f"{f}: tensor {k} ({dtype} {list(shape)}) spans {stop - start} bytes, not its size")
    return entries


def _read_tensor(fh, f: Path, name: str, dtype: str, shape, start: int, end: int) -> torch.Tensor:
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{f}: {name} is stored as {dtype}, which streaming does not read")
    t = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
    fh.seek(start)
    if end > start and fh.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
        raise ValueError(f"{f} ended inside tensor {name}: the file is truncated")
    return t


class ShardWriter:
    """Tensors in, safetensors shards out, never holding more than the tensors handed in.

    Each `add` goes to disk at once, as a hidden part file (save_file needs every tensor of a file at once,
    and a shard of several blocks would otherwise wait in memory). `close` lays the parts' bytes out into
    shards of at most `max_bytes` (a tensor is never split), copying them a few MB at a time (a shard that is
    one whole part, the same bytes, is renamed instead), named
    model-0000k-of-0000N.safetensors with the index transformers and vLLM read (one model.safetensors when
    one shard holds everything). A full disk is named; new_folder then removes everything written.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.parts: list[Path] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        with _disk_full_named(self.folder):
            save_tensors({k: t.contiguous().cpu() for k, t in tensors.items()}, path)
        self.parts.append(path)
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> list[Path]:
        """Write the shards (and the index when there is more than one); returns their paths."""
        entries = [(part, name, e) for part in self.parts
                   for name, e in sorted(_read_header(part).items(), key=lambda item: item[1][2])]
        shards: list[list] = [[]]
        for entry in entries:
            size = entry[2][3] - entry[2][2]
            if shards[-1] and sum(e[2][3] - e[2][2] for e in shards[-1]) + size > self.max_bytes:
                shards.append([])
            shards[-1].append(entry)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        count = {part: sum(1 for e in entries if e[0] == part) for part in self.parts}
        left = dict(count)
        weight_map = {}
        for name, shard in zip(names, shards):
            whole = {e[0] for e in shard} == {shard[0][0]} and count[shard[0][0]] == len(shard)
            with _disk_full_named(self.folder):
                if whole:  # the shard is one part file, which _write_shard would copy byte for byte
                    os.replace(shard[0][0], self.folder / name)
                else:
                    _write_shard(self.folder / name, shard)
            for part, tensor, _ in shard:
                weight_map[tensor] = name
                left[part] -= 1
                if left[part] == 0 and not whole:
                    part.unlink()  # copied whole: the disk holds the output about once
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / name for name in names]


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written from the tensors' own memory (safetensors' save_file first copies each to bytes)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{name} is {t.dtype}, which a safetensors file written here cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            if t.numel():
                out.write(t.reshape(-1).view(torch.uint8).numpy())


def _write_shard(path: Path, entries: list, chunk: int = 1 << 26) -> None:
    """One safetensors file from byte ranges of part files: the header, then each tensor's bytes in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for _, name, (dtype, shape, start, end) in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + end - start]}
        offset += end - start
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for part, _, (_, _, start, end) in entries:
            with open(part, "rb") as f:
                f.seek(start)
                while start < end:
                    block = f.read(min(chunk, end - start))
                    out.write(block)
                    start += len(block)


@contextlib.contextmanager
def _disk_full_named(folder: Path):
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"the disk filled while writing the checkpoint into {folder}; nothing was saved "
                          "(the output folder holds what it held before)") from None
        raise
