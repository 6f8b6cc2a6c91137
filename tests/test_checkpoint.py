"""GPTQ checkpoints: save, load, identical logits, bytes on disk, and clear errors for other formats."""
import json

import pytest
import torch
import transformers as T
from torch import nn

from minquant.checkpoint import load_quantized, save_quantized
from minquant.memory import weight_bytes
from minquant.nn import QuantLinear
from minquant.quant import QuantConfig
from minquant.rtn import quantize_to_quantlinear


def quantized_tiny(cfg=QuantConfig(4, 32), tie=True):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = T.LlamaForCausalLM(config).eval()
    quantize_to_quantlinear(model, cfg)
    for p in model.parameters():  # the checkpoint stores the float rest in fp16
        p.data = p.data.half()
    return model


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32), QuantConfig(8, -1, symmetric=True), QuantConfig(2, 64)])
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_gives_identical_logits(tmp_path, cfg, tie):
    model = quantized_tiny(cfg, tie)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, None, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == \
        ("gptq", "gptq", cfg.bits, cfg.group_size, cfg.symmetric, False)
    loaded, _ = load_quantized(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)


def test_a_4096_square_layer_at_4_bits_g128_is_under_027x_fp16_on_disk(tmp_path):
    from safetensors.torch import save_file

    ql = QuantLinear.from_linear(nn.Linear(4096, 4096, bias=False), QuantConfig(4, 128))
    save_file(ql.state_dict(), tmp_path / "q.safetensors")
    save_file({"weight": torch.zeros(4096, 4096, dtype=torch.float16)}, tmp_path / "fp16.safetensors")
    ratio = (tmp_path / "q.safetensors").stat().st_size / (tmp_path / "fp16.safetensors").stat().st_size
    assert ratio <= 0.27 and ratio == pytest.approx((4 + 20 / 128) / 16, abs=0.003)  # + g_idx


def write_config(folder, qc):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **({"quantization_config": qc} if qc else {})}))


@pytest.mark.parametrize("qc,found", [
    ({"quant_method": "awq", "version": "gemm", "bits": 4}, "an AWQ checkpoint"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "a bitsandbytes checkpoint"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "a compressed-tensors checkpoint"),
    ({"quant_method": "gptq", "checkpoint_format": "gptq_v2", "bits": 4}, "a GPTQ v2 checkpoint"),
    ({"quant_method": "hqq"}, "quant_method='hqq'"),
])
def test_other_formats_are_named(tmp_path, qc, found):
    write_config(tmp_path, qc)
    with pytest.raises(ValueError, match=f"holds {found}"):
        load_quantized(tmp_path)


def test_unquantized_folder(tmp_path):
    write_config(tmp_path, None)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized(tmp_path)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_quantized(quantized_tiny(), None, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    damaged = dict(tensors)
    del damaged["model.layers.1.self_attn.o_proj.scales"]
    save_file(damaged, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor.*model.layers.1.self_attn.o_proj.scales"):
        load_quantized(tmp_path)
    damaged = dict(tensors)
    damaged["model.layers.0.mlp.gate_proj.qweight"] = damaged["model.layers.0.mlp.gate_proj.qweight"][:4]
    save_file(damaged, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.qweight has shape \(4, 128\), expected \(8, 128\)"):
        load_quantized(tmp_path)


@pytest.mark.slow
def test_smollm2_int4_g64_on_disk_matches_the_byte_accounting(smollm2, tmp_path):
    import copy

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    quantize_to_quantlinear(model, QuantConfig(4, 64))
    save_quantized(model, tokenizer, tmp_path)
    on_disk = (tmp_path / "model.safetensors").stat().st_size
    analytic = weight_bytes(model.config, "int4", 64, linears_only=True).total
    assert on_disk == pytest.approx(analytic, rel=0.01)  # the rest: g_idx and the safetensors header
    loaded, tok = load_quantized(tmp_path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    for p in model.parameters():
        p.data = p.data.half()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
