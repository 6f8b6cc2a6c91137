"""QuantLinear and real-storage quantization of whole models."""
import copy

import pytest
import torch
import transformers as T
from torch import nn

from minquant.memory import module_bytes, weight_bytes
from minquant.nn import QuantLinear
from minquant.quant import QuantConfig, dequantize, quantize, storable_qparams
from minquant.rtn import quantize_to_quantlinear


@pytest.mark.parametrize("cfg", [QuantConfig(4, 64), QuantConfig(3, 32), QuantConfig(2, -1), QuantConfig(8, 128, symmetric=True)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64_reference(cfg, bias):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias)
    ql = QuantLinear.from_linear(lin, cfg)
    scale, zero = storable_qparams(lin.weight.detach(), cfg)
    w_hat = dequantize(quantize(lin.weight.detach(), scale, zero, cfg), scale, zero, cfg, dtype=torch.float64)
    torch.testing.assert_close(ql.dequantize_weight(torch.float64), w_hat, rtol=0, atol=0)
    x = torch.randn(3, 5, 256)
    ref = x.double() @ w_hat.t() + (ql.bias.double() if bias else 0)
    torch.testing.assert_close(ql(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_forward_in_chunks_never_holds_the_whole_weight(monkeypatch):
    from minquant.kernels import cpu, reference

    monkeypatch.setattr(cpu, "enabled", False)  # the reference path (the C kernels never hold float weights)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 256 * 32)  # 32 columns at a time
    seen, real = [], reference.dequantize_columns

    def spy(*args, **kwargs):
        w = real(*args, **kwargs)
        seen.append(tuple(w.shape))
        return w

    monkeypatch.setattr(reference, "dequantize_columns", spy)
    ql = QuantLinear.from_linear(nn.Linear(256, 96), QuantConfig(4, 64))
    x = torch.randn(2, 256)
    torch.testing.assert_close(ql(x), x @ ql.dequantize_weight().t() + ql.bias.float(), rtol=1e-5, atol=1e-5)
    assert seen == [(256, 32)] * 3


def test_state_dict_is_the_gptq_checkpoint():
    ql = QuantLinear.from_linear(nn.Linear(128, 64, bias=True), QuantConfig(4, 32))
    sd = ql.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == {
        "qweight": ((16, 64), torch.int32), "qzeros": ((4, 8), torch.int32), "scales": ((4, 64), torch.float16),
        "g_idx": ((128,), torch.int32), "bias": ((64,), torch.float16)}




def test_quantize_model_replaces_linears_and_saves_bytes(tiny_llama):
    model = tiny_llama
    fake = copy.deepcopy(model)
    before = module_bytes(model)
    report = quantize_to_quantlinear(model, QuantConfig(4, 32))
    assert len(report) == 14 and isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)  # skipped, still tied to the embeddings
    linear_fp32 = sum(m.weight.numel() * 4 for m in fake.modules() if isinstance(m, nn.Linear)) - 64 * 64 * 4
    saved = before - module_bytes(model)
    g_idx = sum(m.g_idx.numel() * 4 for m in model.modules() if isinstance(m, QuantLinear))
    analytic = weight_bytes(model.config, "int4", 32, linears_only=True)
    quantized_linears = analytic.total - (weight_bytes(model.config, "fp16").total - linear_fp32 // 2)
    assert saved == linear_fp32 - quantized_linears - g_idx
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert model(ids).logits.isfinite().all()


def test_unpackable_layer_is_refused_before_anything_changes():
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1)  # k_proj and v_proj: 16 outputs
    model = T.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj: qzeros packs 32 values .* N \(out_features\) = 16"):
        quantize_to_quantlinear(model, QuantConfig(3, 32))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_contiguous_group_size_follows_g_idx():
    """What QuantLinear tells the fused kernel: its group size while g_idx is k // group_size, else None."""
    layer = QuantLinear.from_linear(nn.Linear(256, 64), QuantConfig(4, 64))
    assert layer.contiguous_group_size() == 64 and not layer.act_order
    layer.g_idx.copy_(torch.randperm(256) % 4)  # act-order, edited in place: the version counter moves
    assert layer.contiguous_group_size() is None and layer.act_order
    layer.g_idx.copy_(torch.arange(256) // 64)
    assert layer.contiguous_group_size() == 64
    per_channel = QuantLinear.from_linear(nn.Linear(256, 64), QuantConfig(4, -1))
    assert per_channel.contiguous_group_size() == -1
