import copy
import math
import os

import pytest
import torch

# Tests never wait on the Hugging Face Hub: a Hub id fails at once with a clear error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run on CPU through Triton's interpreter, which must be switched on
# before anything imports triton (tests/test_triton_w4a16.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M in fp32 (about 30 s the first time, then from its cache): shared by every test."""
    from minquant.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """A fast tokenizer that loads in well under a second (MiniLM's WordPiece)."""
    from transformers import AutoTokenizer

    from minquant.models import packaged_path

    return AutoTokenizer.from_pretrained(packaged_path("minilm-l6"))


@pytest.fixture
def tiny_llama():
    """A fresh, seeded 2-block Llama with tied embeddings (hidden 64): fast enough for every test."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return T.LlamaForCausalLM(cfg).eval()


def save_tiny(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, minilm_tokenizer):
    """A random 2-block Llama saved with a real tokenizer (MiniLM's): loads by path like any Hub model."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(minilm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        max_position_embeddings=256)
    return save_tiny(T.LlamaForCausalLM(cfg).eval(), minilm_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


def float64_ppl(model, ids: torch.Tensor, seqlen: int, windows: int) -> tuple[float, int]:
    """Perplexity computed independently of minquant.eval, the reference the tests compare with:
    a float64 copy of the model, window by window, -log p(token t | tokens < t) summed over the
    windows' predicted tokens, averaged, exp. Returns (ppl, predicted tokens)."""
    model64 = copy.deepcopy(model).double()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = ids[:, w * seqlen:(w + 1) * seqlen]
            logp = torch.log_softmax(model64(x).logits[0, :-1], dim=-1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += seqlen - 1
    return math.exp(nll / count), count
