"""Perplexity with the GPTQ paper's protocol, so our numbers compare with published ones.

Used from notebook 04 on. The protocol (Frantar et al. 2022, and most quantization papers since):
the WikiText-2 test rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
`seqlen` tokens (the tail that does not fill a window is dropped); each window is scored on its
own (no context carried over), and perplexity = exp(mean negative log-likelihood per predicted
token). Quick runs score only the first `max_windows` windows: say so when you quote them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens scored: windows * (seqlen - 1)
    windows: int
    seqlen: int
    text: str  # which text was scored, e.g. 'wikitext2/test joined with "\n\n"'


def default_seqlen(model) -> int:
    return min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)


def eval_ids(text: str, tokenizer) -> torch.Tensor:
    """The whole text tokenized once, as GPTQ does: (1, T) int64."""
    return tokenizer(text, return_tensors="pt").input_ids


@torch.inference_mode()
def perplexity(model, tokenizer=None, data: str | torch.Tensor = "wikitext2", seqlen: int | None = None,
               max_windows: int | None = None, progress: bool = True, kv_cache: str | None = None) -> PerplexityResult:
    """Perplexity of a causal LM on `data`: "wikitext2" (test split), a string, or token ids (1, T).

    `kv_cache` ("int8", "fp8"): attention reads its keys and values from a quantized KV cache
    (minquant.kvcache), so the score includes what storing them in 8 bits costs.
    """
    from minquant.data import load_text
    from minquant.models import check_positions, check_token_ids

    if seqlen is not None and not (isinstance(seqlen, int) and seqlen >= 2):
        raise ValueError(f"seqlen must be a whole number of tokens >= 2 (one predicts the next), got {seqlen!r}")
    if seqlen is not None:
        check_positions(model, seqlen)
    if max_windows is not None and not (isinstance(max_windows, int) and max_windows >= 1):
        raise ValueError(f"max_windows must be a positive number of windows (None: all), got {max_windows!r}")
    if isinstance(data, torch.Tensor):
        ids, name = data.reshape(1, -1), f"{data.numel()} given token ids"
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to score text")
        if data == "wikitext2":
            text, name = load_text("wikitext2", "test"), 'wikitext2/test joined with "\\n\\n"'
        else:
            text, name = data, f"given text of {len(data)} characters"
        ids = eval_ids(text, tokenizer)
    seqlen = seqlen or default_seqlen(model)
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    check_token_ids(model, ids)
    device = next(model.parameters()).device
    cache_kwargs = lambda: {"use_cache": False}  # noqa: E731
    if kv_cache is not None:
        from minquant.kvcache import QuantizedKVCache, cache_keyword

        QuantizedKVCache(model.config, kv_cache)  # a bad dtype or model is named before any window runs
        cache_kwargs = lambda: {"use_cache": True, cache_keyword(model): QuantizedKVCache(model.config, kv_cache)}  # noqa: E731
    total_nll = 0.0
    for i in tqdm(range(n), desc=f"perplexity ({seqlen}-token windows)", disable=not progress):
        window = ids[:, i * seqlen:(i + 1) * seqlen].to(device)
        logits = model(window, **cache_kwargs()).logits.float()
        # token t is predicted from tokens < t: compare logits[:-1] with window[1:]
        total_nll += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
    tokens = n * (seqlen - 1)
    return PerplexityResult(math.exp(total_nll / tokens), total_nll / tokens, tokens, n, seqlen, name)
