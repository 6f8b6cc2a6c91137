import os

import pytest

# Tests never wait on the Hugging Face Hub: a Hub id fails at once with a clear error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M in fp32 (about 20 s to load): shared by every test that needs it."""
    from minquant.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """A fast tokenizer that loads in well under a second (MiniLM's WordPiece)."""
    from transformers import AutoTokenizer

    from minquant.models import packaged_path

    return AutoTokenizer.from_pretrained(packaged_path("minilm-l6"))
