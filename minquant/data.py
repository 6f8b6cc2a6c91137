"""Evaluation and calibration text: WikiText-2 and a C4 slice, offline first.

Used by notebook 04 on (perplexity) and 07 on (calibration). The files are the ones described in
data/README.md. The code finds them through one setting, the environment variable MINQUANT_DATA
(a folder); each file's sha256 is checked, so a perplexity is always measured on the same text.
When MINQUANT_DATA is not set, the same data come from the Hugging Face Hub through the
`datasets` package (online only).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "MINQUANT_DATA"


@dataclass(frozen=True)
class DataFile:
    path: str  # relative to MINQUANT_DATA
    sha256: str
    fmt: str  # "lines" (one row per line, like HF's wikitext rows) or "jsonl" (C4: the "text" field)


FILES = {
    ("wikitext2", "test"): DataFile(
        "wikitext-2-raw/wiki.test.raw",
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", "lines"),
    ("wikitext2", "validation"): DataFile(
        "wikitext-2-raw/wiki.valid.raw",
        "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7", "lines"),
    ("c4", "train"): DataFile(
        "c4/c4-train.00000-of-01024.first1000.jsonl",
        "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32", "jsonl"),
}
SPLIT_ALIASES = {"valid": "validation", "val": "validation"}


def _key(name: str, split: str) -> tuple[str, str]:
    key = (name, SPLIT_ALIASES.get(split, split))
    if key not in FILES:
        known = ", ".join(f"{n}/{s}" for n, s in FILES)
        raise ValueError(f"no data set {name!r} split {split!r}; known: {known}")
    return key


def data_dir() -> Path | None:
    """The folder named by MINQUANT_DATA, or None when the variable is unset."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else None


_verified: set[tuple[Path, int]] = set()  # (file, mtime) already hashed in this process


def _read_checked(df: DataFile, folder: Path) -> str:
    path = folder / df.path
    if not path.is_file():
        raise FileNotFoundError(f"{ENV_VAR}={folder} but the file {df.path} is not there "
                                f"(expected {path}); see data/README.md for where to get it")
    raw = path.read_bytes()
    stamp = (path, path.stat().st_mtime_ns)
    if stamp not in _verified:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != df.sha256:
            raise ValueError(f"{path} has sha256 {digest}, expected {df.sha256}: "
                             "not the published file (see data/README.md)")
        _verified.add(stamp)
    return raw.decode("utf-8")


def _rows_from_hub(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"set {ENV_VAR} to the folder holding the data files (see data/README.md), "
                           "or `pip install datasets` to fetch them from the Hugging Face Hub") from None
    if name == "wikitext2":
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    shard = "en/c4-train.00000-of-01024.json.gz"  # the shard GPTQ calibrates on
    return list(datasets.load_dataset("allenai/c4", data_files={"train": shard}, split="train")["text"])


def load_rows(name: str, split: str) -> list[str]:
    """The data set's rows as the Hugging Face loader gives them (WikiText: lines, blank -> "")."""
    key = _key(name, split)
    folder = data_dir()
    if folder is None:
        return _rows_from_hub(*key)
    df = FILES[key]
    text = _read_checked(df, folder)
    if df.fmt == "jsonl":
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    # HF's wikitext loader keeps each line with its "\n" and turns whitespace-only lines into "".
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def load_text(name: str, split: str = "test", sep: str = "\n\n") -> str:
    """One string: the rows joined with `sep` ("\\n\\n" is the GPTQ paper's evaluation text)."""
    return sep.join(load_rows(name, split))


def calibration_windows(source: str, tokenizer, n: int = 128, seqlen: int = 512, seed: int = 0,
                        split: str | None = None, min_doc_tokens: int = 0) -> torch.Tensor:
    """`n` random windows of `seqlen` token ids, (n, seqlen) int64, reproducible from `seed`.

    C4 as in the GPTQ paper: pick a random document, keep it only if it is longer than `seqlen`
    tokens, take a random window of it. WikiText-2 (validation split by default, never the test
    split we evaluate on): random windows of the whole tokenized text. "random": uniformly random
    token ids, a control that shows what real text is worth. `min_doc_tokens` (C4 only) draws only
    from documents longer than that, whatever the window: it separates *which* documents a window
    length allows from the length itself (the calibration study of notebook 09).
    """
    if n < 1 or seqlen < 1:
        raise ValueError(f"need n >= 1 and seqlen >= 1, got n={n}, seqlen={seqlen}")
    rng = random.Random(seed)  # our own generator: never touches the global random state
    if min_doc_tokens and source != "c4":
        raise ValueError(f"min_doc_tokens chooses among C4 documents; {source!r} has none")
    if source == "c4":
        return _c4_windows(load_rows("c4", split or "train"), tokenizer, n, seqlen, rng, max(seqlen, min_doc_tokens))
    if source == "wikitext2":
        if (split or "validation") == "test":
            raise ValueError("calibrating on the WikiText-2 test split would leak the evaluation text")
        ids = tokenizer(load_text("wikitext2", split or "validation"), return_tensors="pt").input_ids[0]
        if len(ids) <= seqlen:
            raise ValueError(f"WikiText-2 has {len(ids)} tokens, fewer than seqlen={seqlen}")
        starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
        return torch.stack([ids[s:s + seqlen] for s in starts])
    if source == "random":  # no text at all: token ids drawn uniformly from the vocabulary
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, len(tokenizer), (n, seqlen), generator=g)
    raise ValueError(f"unknown calibration source {source!r}; known: c4, wikitext2, random")


def _c4_windows(docs: list[str], tokenizer, n: int, seqlen: int, rng: random.Random, min_tokens: int) -> torch.Tensor:
    tokenized: dict[int, torch.Tensor] = {}  # documents are drawn again and again: tokenize once
    windows = []
    for _ in range(n):
        for _attempt in range(100 * len(docs)):
            i = rng.randint(0, len(docs) - 1)
            if i not in tokenized:
                tokenized[i] = tokenizer(docs[i], return_tensors="pt").input_ids[0]
            if len(tokenized[i]) > min_tokens:
                break
        else:
            raise ValueError(f"no C4 document is longer than {min_tokens} tokens (seqlen={seqlen})")
        start = rng.randint(0, len(tokenized[i]) - seqlen - 1)
        windows.append(tokenized[i][start:start + seqlen])
    return torch.stack(windows)
