"""minquant.memory against real models: every parameter's shape, bytes, KV cache."""
import math

import pytest
import torch
import transformers as T

from minquant import memory
from minquant.models import MODEL_CONFIGS_DIR, load_config, packaged_path

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
TINY_CONFIGS = {
    "llama": T.LlamaConfig(**TINY, intermediate_size=64, num_key_value_heads=2),
    "llama-bias-tied": T.LlamaConfig(**TINY, intermediate_size=64, num_key_value_heads=4,
                                     attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama-head-dim": T.LlamaConfig(**TINY, intermediate_size=64, num_key_value_heads=2, head_dim=16),
    "mistral": T.MistralConfig(**TINY, intermediate_size=64, num_key_value_heads=2),
    "qwen2": T.Qwen2Config(**TINY, intermediate_size=64, num_key_value_heads=2),
    "qwen2-tied": T.Qwen2Config(**TINY, intermediate_size=48, num_key_value_heads=1, tie_word_embeddings=True),
    "opt": T.OPTConfig(**TINY, ffn_dim=64, max_position_embeddings=64),
    "opt-proj": T.OPTConfig(**TINY, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=16),
    "gpt_neox": T.GPTNeoXConfig(**TINY, intermediate_size=64, max_position_embeddings=64),
    "gpt_neox-tied": T.GPTNeoXConfig(**TINY, intermediate_size=64, max_position_embeddings=64,
                                     tie_word_embeddings=True),
}
PUBLISHED = sorted(p.stem.replace("--", "/") for p in MODEL_CONFIGS_DIR.glob("*.json"))


def named_shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("key", TINY_CONFIGS)
def test_param_shapes_match_random_init_model(key):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[key])
    assert memory.param_shapes(TINY_CONFIGS[key]) == named_shapes(model)
    assert memory.count_params(TINY_CONFIGS[key]) == sum(p.numel() for p in model.parameters())


def test_count_worked_by_hand():
    # Tiny Llama, untied: embed 101*32 + lm_head 101*32 + final norm 32, and per block
    # q 32*32 + k 32*16 + v 32*16 + o 32*32 + gate/up/down 3*32*64 + two norms 2*32.
    per_block = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert memory.count_params(TINY_CONFIGS["llama"]) == 2 * 101 * 32 + 32 + 2 * per_block == 25_056


@pytest.mark.parametrize("name", PUBLISHED)
def test_count_matches_full_size_model_on_meta_device(name):
    cfg = load_config(name)
    with torch.device("meta"):  # no memory is allocated, even for 405B parameters
        model = T.AutoModelForCausalLM.from_config(cfg)
    assert memory.param_shapes(cfg) == named_shapes(model)


def test_published_parameter_counts():
    # Counts quoted in model cards and papers (Llama-2 "7B" = 6.74B, Qwen2.5-0.5B = 0.49B, ...).
    assert memory.count_params(load_config("meta-llama/Llama-2-7b-hf")) == 6_738_415_616
    assert memory.count_params(load_config("meta-llama/Llama-3.1-8B")) == 8_030_261_248
    assert memory.count_params(load_config("Qwen/Qwen2.5-0.5B")) == 494_032_768
    assert memory.count_params(load_config("facebook/opt-125m")) == 125_239_296


@pytest.mark.slow
def test_count_matches_real_smollm2(smollm2):
    model, _ = smollm2
    assert memory.count_params(model.config) == sum(p.numel() for p in model.parameters()) == 134_515_008
    assert memory.count_params(load_config("smollm2-135m")) == 134_515_008


def reference_bytes(model, bits, group_size, symmetric):
    """Bytes counted from the real tensors: 2-D weights at `bits`, 1-D vectors at 16 bits."""
    values = overhead = 0
    for p in model.parameters():
        if bits >= 16 or p.ndim == 1:
            values += p.numel() * max(bits, 16)
        else:
            rows, cols = p.shape
            groups = 1 if group_size == -1 else cols // group_size
            values += p.numel() * bits
            overhead += rows * groups * (16 + (0 if symmetric else bits))
    return math.ceil(values / 8), math.ceil(overhead / 8)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("group_size,symmetric", [(16, False), (-1, True), (8, False)])
def test_weight_bytes_against_real_tensors(fmt, group_size, symmetric):
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS["qwen2"])
    wb = memory.weight_bytes(TINY_CONFIGS["qwen2"], fmt, group_size, symmetric)
    assert (wb.weights, wb.overhead) == reference_bytes(model, memory.FORMAT_BITS[fmt], group_size, symmetric)


def test_seed_numbers_made_exact():
    # The course's opening claim: a 70B model is 280 GB in fp32, 140 in fp16, 70 in int8, 35 in int4.
    cfg = load_config("meta-llama/Llama-2-70b-hf")
    gb = {f: memory.weight_bytes(cfg, f).weights / 1e9 for f in ("fp32", "fp16", "int8", "int4")}
    assert gb["fp32"] == pytest.approx(275.9, abs=0.05) and gb["fp16"] == pytest.approx(137.95, abs=0.05)
    assert gb["int8"] == pytest.approx(68.98, abs=0.05) and gb["int4"] == pytest.approx(34.49, abs=0.05)
    # 4 bits + (16-bit scale + 4-bit zero) / 128 = 4.156 bits per weight in the linear layers
    overhead = memory.weight_bytes(cfg, "int4", 128).overhead
    assert overhead / memory.weight_bytes(cfg, "int4", 128).weights == pytest.approx(20 / 128 / 4, rel=0.01)


def test_linears_only_keeps_embeddings_in_fp16():
    cfg = load_config("HuggingFaceTB/SmolLM2-135M")
    embed = cfg.vocab_size * cfg.hidden_size  # tied: stored once
    full = memory.weight_bytes(cfg, "int4", 64)
    lin = memory.weight_bytes(cfg, "int4", 64, linears_only=True)
    assert lin.weights - full.weights == embed * 2 - embed // 2
    assert full.overhead - lin.overhead == cfg.vocab_size * (cfg.hidden_size // 64) * (16 + 4) // 8


@pytest.mark.parametrize("key", ["llama", "qwen2-tied", "opt", "gpt_neox"])
def test_kv_cache_bytes_match_a_real_cache(key):
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[key]).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 100, (3, 7)), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert memory.kv_cache_bytes(TINY_CONFIGS[key], context=7, batch=3, bytes_per_value=4) == real


def test_gpus_and_decode_bound():
    cfg = load_config("meta-llama/Llama-2-70b-hf")
    h100, rtx = memory.GPUS[2], memory.GPUS[0]
    fp16, int4 = memory.weight_bytes(cfg, "fp16").total, memory.weight_bytes(cfg, "int4").total
    assert memory.gpus_needed(fp16, h100) == 2 and memory.gpus_needed(int4, h100) == 1
    assert memory.gpus_needed(int4, rtx) == 2  # 35.8 GB does not fit one 24 GB card
    assert memory.decode_tokens_per_s(2 * 10**9, 1000) == 500.0
    assert memory.decode_tokens_per_s(2 * 10**9, 1000, batch=4) == 2000.0  # one read serves 4 sequences
    assert memory.decode_tokens_per_s(fp16, h100.bandwidth_gbs) == pytest.approx(24.28, abs=0.01)


def test_bad_input_errors():
    cfg = TINY_CONFIGS["llama"]
    with pytest.raises(ValueError, match="known formats: fp32, fp16"):
        memory.weight_bytes(cfg, "int5")
    with pytest.raises(ValueError, match="group_size must be"):
        memory.weight_bytes(cfg, "int4", group_size=0)
    # the same rule as minquant.quant: no ragged groups (SmolLM2's hidden size 576 is not a multiple of 128)
    with pytest.raises(ValueError, match="model.embed_tokens.weight: group_size 128 does not divide the 576 "
                                         "input features.*group sizes that do: .*64, 72, 96"):
        memory.weight_bytes(load_config("HuggingFaceTB/SmolLM2-135M"), "int4", group_size=128)
    assert memory.weight_bytes(load_config("HuggingFaceTB/SmolLM2-135M"), "fp16", group_size=128).overhead == 0
    with pytest.raises(ValueError, match="cannot count the parameters of model_type=''"):
        memory.count_params(T.PretrainedConfig())


def test_other_architectures_are_counted_on_the_meta_device():
    # MiniLM (BERT) is no hand-derived family: its count comes from a meta-device build.
    cfg = load_config("minilm-l6")
    model = T.AutoModel.from_pretrained(packaged_path("minilm-l6"))
    assert memory.param_shapes(cfg) == named_shapes(model)
    assert memory.count_params(cfg) == 22_713_216
    # its 6 encoder blocks are found as blocks: with linears_only, embeddings stay fp16
    in_blocks = {n: p for n, p in model.named_parameters() if n.startswith("encoder.layer.") and p.ndim == 2}
    rest = memory.count_params(cfg) - sum(p.numel() for p in in_blocks.values())
    lin = memory.weight_bytes(cfg, "int4", 32, linears_only=True)
    assert lin.weights == sum(p.numel() for p in in_blocks.values()) // 2 + rest * 2
    assert lin.overhead == sum(p.shape[0] * (p.shape[1] // 32) for p in in_blocks.values()) * (16 + 4) // 8


def test_memory_table_rows():
    table = memory.memory_table(load_config("meta-llama/Llama-2-70b-hf"), "Llama-2-70b")
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line[:4] in ("fp32", "int4")}
    assert rows["fp32"][2] == "275.91" and rows["int4"][2] == "34.49"
    assert "68,976,648,192 parameters" in table
