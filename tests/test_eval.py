"""minquant.eval.perplexity against a direct float64 computation on a tiny model."""
import math

import pytest
import torch
import transformers as T

from conftest import float64_ppl
from minquant.eval import perplexity


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return T.LlamaForCausalLM(cfg).eval()


def test_matches_float64_reference(tiny_lm):
    ids = torch.randint(0, 97, (1, 16 * 5 + 7), generator=torch.Generator().manual_seed(1))
    r = perplexity(tiny_lm, data=ids, seqlen=16, progress=False)
    ppl, count = float64_ppl(tiny_lm, ids, 16, 5)
    assert (r.windows, r.tokens, r.seqlen) == (5, count, 16)  # the 7-token tail is dropped
    assert r.ppl == pytest.approx(ppl, rel=1e-5) and r.nll == pytest.approx(math.log(ppl), rel=1e-5)


def test_max_windows_and_default_seqlen(tiny_lm):
    ids = torch.randint(0, 97, (1, 64 * 3), generator=torch.Generator().manual_seed(2))
    r = perplexity(tiny_lm, data=ids, max_windows=2, progress=False)
    assert (r.seqlen, r.windows) == (64, 2)  # min(2048, max_position_embeddings)
    assert r.ppl == pytest.approx(float64_ppl(tiny_lm, ids, 64, 2)[0], rel=1e-5)


def test_errors(tiny_lm):
    with pytest.raises(ValueError, match="fewer than one window of 16"):
        perplexity(tiny_lm, data=torch.zeros(1, 10, dtype=torch.long), seqlen=16, progress=False)
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        perplexity(tiny_lm, data="some text", progress=False)


@pytest.mark.slow
def test_smollm2_wikitext_first_window(smollm2):
    model, tokenizer = smollm2
    r = perplexity(model, tokenizer, "wikitext2", max_windows=1, progress=False)
    assert r.text == 'wikitext2/test joined with "\\n\\n"' and r.tokens == 2047
    assert 5 < r.ppl < 60  # a trained 135M model; random weights would give ~49,000 (the vocabulary)
